"""One rounding, proven: every engine writes, for every element, the correctly rounded value of
the exact W + Σ wᵢ·sᵢ·BᵢAᵢ (round to nearest, ties to even) — checked element by element
against exact rational arithmetic, on merges built so that most elements sit on or a hair
away from a rounding midpoint of the output dtype, where a float32 sum (and PEFT's merge)
rounds twice and goes wrong."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import llama_model, peft_adapter, save_base
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from adapterctl import floats
from adapterctl.merge import merge, numpy_engine, rounding

# (significand bits with the implicit one, smallest normal exponent, largest exponent)
FORMATS = {"BF16": (8, -126, 127), "F16": (11, -14, 15), "F32": (24, -126, 127)}
TARGETS = ["q_proj", "down_proj"]  # rows of 48 and of 96 values: whole tiles and a tail


def load_file(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """A safetensors file's tensors as stored: bfloat16 as its uint16 bits."""
    out = {}
    for k, t in load_torch(path).items():
        out[k] = (
            t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        )
    return out


def save_file(tensors: dict[str, np.ndarray[Any, Any]], path: Path) -> None:
    """Save tensors held as ``load_file`` holds them (uint16: bfloat16 bits)."""
    out = {}
    for k, a in tensors.items():
        t = torch.from_numpy(np.ascontiguousarray(a))
        out[k] = t.view(torch.bfloat16) if a.dtype == np.uint16 else t
    save_torch(out, path, metadata={"format": "pt"})


def round_exact(x: Fraction, fmt: str) -> Fraction | float:
    """x rounded to nearest ``fmt`` value, ties to even, from first principles (±inf past the
    largest finite value): the oracle, independent of adapterctl.merge.rounding."""
    p, emin, emax = FORMATS[fmt]
    if x == 0:
        return Fraction(0)
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1  # now 2^e <= a < 2^(e+1)
    e = max(e, emin)  # subnormals share the smallest normal's spacing
    step = Fraction(2) ** (e - p + 1)
    n, rest = divmod(a, step)
    if rest > step / 2 or (rest == step / 2 and n % 2 == 1):
        n += 1
    value = n * step
    if value >= Fraction(2) ** (emax + 1) * (1 - Fraction(1, 2**p)):
        return float("inf") if x > 0 else float("-inf")
    return value if x > 0 else -value


def as_fraction(values: np.ndarray[Any, Any], dtype: str) -> list[Fraction | float]:
    """Stored values (bf16 as bits) as exact fractions (infinities as floats)."""
    wide = floats.widen(values, dtype).astype(np.float64).reshape(-1)
    return [Fraction(v) if np.isfinite(v) else float(v) for v in wide.tolist()]


def half_step(w: np.ndarray[Any, Any], fmt: str) -> np.ndarray[Any, Any]:
    """Half the spacing of ``fmt`` at each |w| (float64, w nonzero and normal in fmt)."""
    p, _, _ = FORMATS[fmt]
    _, e = np.frexp(np.abs(w))  # |w| = m·2^e, m in [0.5, 1)
    return np.ldexp(1.0, e - 1 - p)


def craft(
    base_dir: Path, adapter_dir: Path, fmt: str, seed: int, base_dtype: str, weight: float = 1.0
) -> None:
    """Rewrite the targeted weights and the adapter so that x = W + w·s·B·A sits on a midpoint
    of ``fmt`` (an exact tie), or above or below it by 2⁻³⁰ of a step (a float32 sum cannot
    tell), or by 2⁻⁴⁶ of a step (float64 cannot either), or anywhere (random columns)."""
    rng = np.random.default_rng(seed)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]  # a power of two in these tests
    coeff = weight * scale
    base_file = base_dir / "model.safetensors"
    base = load_file(base_file)
    ad_file = adapter_dir / "adapter_model.safetensors"
    ad = load_file(ad_file)
    for name in list(ad):
        if not name.endswith("lora_A.weight") or not any(t in name for t in TARGETS):
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        w_name = module + ".weight"
        out_f, in_f = base[w_name].shape
        r = ad[name].shape[0]
        # row values representable in every format here: 8 significant bits, moderate range
        w = rng.integers(129, 255, out_f) * np.ldexp(1.0, rng.integers(-14, -4, out_f))
        w *= rng.choice([-1.0, 1.0], out_f)
        h = half_step(w, fmt)  # (out,)
        b = np.zeros((out_f, r))
        a = np.zeros((r, in_f))
        b[:, 0], a[0] = h / coeff, 1.0  # the midpoint
        b[:, 1], a[1] = h * 2.0**-30 / coeff, rng.choice([-1.0, 0.0, 1.0], in_f)
        b[:, 2], a[2] = h * 2.0**-46 / coeff, rng.choice([-1.0, 0.0, 1.0], in_f)
        random_cols = rng.random(in_f) < 0.25
        b[:, 3] = rng.standard_normal(out_f) * 0.01
        a[3] = np.where(random_cols, rng.standard_normal(in_f), 0.0)
        ad[name] = a.astype(np.float32)
        ad[name.replace("lora_A", "lora_B")] = b.astype(np.float32)
        wide = np.repeat(w[:, None], in_f, axis=1)
        base[w_name] = _store(wide, base_dtype)
    save_file(base, base_file)
    save_file(ad, ad_file)


def _store(values: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    if dtype == "BF16":
        return floats.round_bf16(values.astype(np.float32))
    return values.astype(np.float16 if dtype == "F16" else np.float32)


def exact_merge(
    base_dir: Path, adapters: list[tuple[Path, float]], out_dir: Path, fmt: str
) -> dict[str, tuple[list[Fraction | float], list[Fraction | float]]]:
    """Per targeted weight: (what was written, the oracle's correctly rounded exact values)."""
    base = load_file(base_dir / "model.safetensors")
    got = load_file(next(out_dir.glob("*.safetensors")))
    base_dtype = {np.dtype(np.uint16): "BF16", np.dtype(np.float16): "F16"}
    result = {}
    loaded = []
    for path, weight in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text())
        loaded.append((load_file(path / "adapter_model.safetensors"), cfg, weight))
    for w_name, w in base.items():
        if not any(t in w_name for t in TARGETS):
            continue
        w_exact = as_fraction(w, base_dtype.get(w.dtype, "F32"))
        out_f, in_f = w.shape
        x = [list(w_exact[i * in_f : (i + 1) * in_f]) for i in range(out_f)]
        for tensors, cfg, weight in loaded:
            prefix = "base_model.model." + w_name.removesuffix(".weight")
            a = tensors[prefix + ".lora_A.weight"].astype(np.float64)
            b = tensors[prefix + ".lora_B.weight"].astype(np.float64)
            c = Fraction(weight * (cfg["lora_alpha"] / cfg["r"]))
            for i in range(out_f):
                bi = [Fraction(v) for v in b[i].tolist()]
                for j in range(in_f):
                    dot = sum((bi[k] * Fraction(a[k, j]) for k in range(len(bi)) if bi[k]),
                              Fraction(0))  # fmt: skip
                    x[i][j] += c * dot
        want = [round_exact(v, fmt) for row in x for v in row]
        stored = got[w_name]
        result[w_name] = (as_fraction(stored, fmt), want)
    return result


ENGINES = [
    pytest.param("numpy", "none", id="numpy"),
    pytest.param("numpy", "auto", id="fused"),
    pytest.param("torch", None, id="torch"),
]
CASES = [  # (base dtype, output dtype)
    ("BF16", "BF16"),
    ("F32", "BF16"),
    ("F32", "F16"),
    ("BF16", "F16"),
    ("F32", "F32"),
]
DTYPE_FLAG = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rounding")
    dirs = {}
    for dtype, torch_dtype in (("BF16", torch.bfloat16), ("F32", torch.float32)):
        dirs[dtype] = save_base(
            llama_model(layers=1, hidden=48, heads=2), root / dtype, torch_dtype
        )
    for i, alpha in enumerate((8, 16)):
        model = llama_model(layers=1, hidden=48, heads=2)
        peft_adapter(model, root / f"adapter{i}", seed=i, r=4, lora_alpha=alpha,
                     target_modules=TARGETS)  # fmt: skip
    return {**dirs, "root": root}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _mismatches(checked: dict[str, tuple[list[Any], list[Any]]]) -> tuple[int, int]:
    bad = total = 0
    for got, want in checked.values():
        total += len(want)
        bad += sum(1 for g, w in zip(got, want, strict=True) if g != w)
    return bad, total


@pytest.mark.parametrize(("engine", "kernel"), ENGINES)
@pytest.mark.parametrize(("base_dtype", "out_dtype"), CASES, ids=lambda c: str(c))
def test_every_element_is_the_correctly_rounded_exact_sum(
    model_dirs: dict[str, Path],
    tmp_path: Path,
    engine: str,
    kernel: str | None,
    base_dtype: str,
    out_dtype: str,
) -> None:
    if kernel == "auto" and numpy_engine.choose_kernel("auto") is None:
        pytest.skip("the compiled kernel is not installed")
    base = _copy(model_dirs[base_dtype], tmp_path / "base")
    adapter = _copy(model_dirs["root"] / "adapter0", tmp_path / "adapter")
    craft(base, adapter, out_dtype, seed=3, base_dtype=base_dtype)
    out = tmp_path / "out"
    report = merge(base, [adapter], out, dtype=DTYPE_FLAG[out_dtype], engine=engine,
                   kernel=kernel, device="cpu")  # fmt: skip
    assert report.rounding is not None and report.rounding.startswith("correctly rounded")
    bad, total = _mismatches(exact_merge(base, [(adapter, 1.0)], out, out_dtype))
    assert total > 6000
    assert bad == 0, f"{bad} of {total} elements are not the correctly rounded exact sum"


@pytest.mark.parametrize(("engine", "kernel"), ENGINES)
def test_two_adapters_with_weights(
    model_dirs: dict[str, Path], tmp_path: Path, engine: str, kernel: str | None
) -> None:
    """Two adapters, weights 0.5 and 1.5: the second's random columns move every element off
    the crafted midpoints of the first by an arbitrary amount, still rounded exactly."""
    if kernel == "auto" and numpy_engine.choose_kernel("auto") is None:
        pytest.skip("the compiled kernel is not installed")
    base = _copy(model_dirs["F32"], tmp_path / "base")
    one = _copy(model_dirs["root"] / "adapter0", tmp_path / "one")
    two = _copy(model_dirs["root"] / "adapter1", tmp_path / "two")
    craft(base, one, "BF16", seed=5, base_dtype="F32", weight=0.5)
    out = tmp_path / "out"
    merge(base, [one, two], out, weights=[0.5, 1.5], dtype="bf16", engine=engine, kernel=kernel,
          device="cpu")  # fmt: skip
    bad, total = _mismatches(exact_merge(base, [(one, 0.5), (two, 1.5)], out, "BF16"))
    assert bad == 0, f"{bad} of {total} elements are not the correctly rounded exact sum"


@pytest.mark.parametrize(("base_dtype", "out_dtype"), [("BF16", "BF16"), ("F32", "F16")])
def test_the_kernel_above_its_float32_rank(
    model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    base_dtype: str,
    out_dtype: str,
) -> None:
    """Past ``numpy_engine.FLOAT32_RANK`` the kernel sums 16-bit outputs in float64 (the
    float32 sums' bound grows with the rank): still exact, element by element."""
    if numpy_engine.choose_kernel("auto") is None:
        pytest.skip("the compiled kernel is not installed")
    monkeypatch.setattr(numpy_engine, "FLOAT32_RANK", 0)
    base = _copy(model_dirs[base_dtype], tmp_path / "base")
    adapter = _copy(model_dirs["root"] / "adapter0", tmp_path / "adapter")
    craft(base, adapter, out_dtype, seed=7, base_dtype=base_dtype)
    out = tmp_path / "out"
    merge(base, [adapter], out, dtype=DTYPE_FLAG[out_dtype], engine="numpy", kernel="auto",
          device="cpu")  # fmt: skip
    bad, total = _mismatches(exact_merge(base, [(adapter, 1.0)], out, out_dtype))
    assert bad == 0, f"{bad} of {total} elements are not the correctly rounded exact sum"


def test_a_float32_sum_would_have_been_wrong(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The crafted merge is a real test: rounding PEFT's way (a float32 W + ΔW, then bfloat16)
    gets a good share of its elements wrong."""
    base = _copy(model_dirs["F32"], tmp_path / "base")
    adapter = _copy(model_dirs["root"] / "adapter0", tmp_path / "adapter")
    craft(base, adapter, "BF16", seed=3, base_dtype="F32")
    out = tmp_path / "out"
    merge(base, [adapter], out, dtype="bf16", engine="numpy", kernel="none")
    checked = exact_merge(base, [(adapter, 1.0)], out, "BF16")
    peft_way = load_file(next(out.glob("*.safetensors")))
    ad = load_file(adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = load_file(base / "model.safetensors")
    wrong = 0
    for name, (_, want) in checked.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        delta = (
            torch.from_numpy(ad[prefix + ".lora_B.weight"])
            @ torch.from_numpy(ad[prefix + ".lora_A.weight"])
            * (cfg["lora_alpha"] / cfg["r"])
        )
        merged = (torch.from_numpy(w[name]) + delta).to(torch.bfloat16)
        bits = merged.view(torch.int16).numpy().view(np.uint16)
        wrong += sum(g != x for g, x in zip(as_fraction(bits, "BF16"), want, strict=True))
        assert np.array_equal(peft_way[name].shape, bits.shape)
    assert wrong > 500


def test_settle_decides_ties_exactly() -> None:
    """rounding.nearest/neighbours and the exact fallback agree with the oracle on values on,
    beside and between midpoints, subnormals, zero and the overflow threshold."""
    rng = np.random.default_rng(0)
    for fmt in ("BF16", "F16", "F32"):
        p, emin, emax = FORMATS[fmt]
        mant = rng.integers(2 ** (p - 1), 2**p, 300).astype(np.float64)
        e = rng.integers(emin - p + 2, emax - p, 300)
        v = np.ldexp(mant, e)  # representable
        half = np.ldexp(0.5, e)
        xs = np.concatenate([v, v + half, v - half, v + half * (1 + 2.0**-20), -(v + half)])
        xs = np.concatenate([xs, [0.0, np.ldexp(1.0, emin - p + 1) / 2]])
        r = rounding.nearest(xs, fmt)
        down, up = rounding.neighbours(r, fmt)
        for x, lo, mid, hi in zip(xs.tolist(), down.tolist(), r.tolist(), up.tolist(), strict=True):
            want = round_exact(Fraction(x), fmt)
            got = rounding._round_exact(Fraction(x), fmt)
            got_v = float(np.copysign(np.inf, got)) if abs(got) >= 2.0 ** (emax + 1) else got
            assert Fraction(got_v) == want if not isinstance(want, float) else got_v == want, (
                fmt,
                x,
            )
            assert lo <= mid <= hi


def test_verify_checks_bit_for_bit(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """``--verify`` holds a plain merge to the correctly rounded exact sum: the written merge
    passes, and the other neighbour of a near-tie (half a step from the exact value, which a
    tolerance would let through) fails."""
    from adapterctl.checkpoint import open_checkpoint
    from adapterctl.errors import ValidationFailed
    from adapterctl.formats import read
    from adapterctl.merge import plan_merge
    from adapterctl.merge.verify import verify_output

    base = _copy(model_dirs["F32"], tmp_path / "base")
    adapter = _copy(model_dirs["root"] / "adapter0", tmp_path / "adapter")
    craft(base, adapter, "BF16", seed=3, base_dtype="F32")
    out = tmp_path / "out"
    merge(base, [adapter], out, dtype="bf16", kernel="none")
    plan = plan_merge(open_checkpoint(base), [read(adapter)], dtype="bf16")
    assert verify_output(plan, out, rows=48) > 0
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if "q_proj" in n)
    tensors[name] = tensors[name].copy()
    tensors[name][:, 0] ^= 1  # column 0 is an exact tie or a hair off one in every row
    save_file(tensors, shard)
    with pytest.raises(ValidationFailed, match="not the correctly rounded"):
        verify_output(plan, out, rows=48)


@pytest.mark.parametrize(
    ("out_dtype", "value", "bound", "unproven"),
    [
        ("BF16", 1 + 2.0**-8 + 2.0**-23, 6e-8, True),  # d = 2⁻²³ > e·c, not > e·c + |v|·2⁻²³
        ("BF16", 1 + 2.0**-8 + 2.0**-21, 6e-8, False),  # d = 2⁻²¹: proven
        ("F16", 1 + 2.0**-11 + 2.0**-23, 6e-8, True),
        ("F16", 1 + 2.0**-11 + 2.0**-20, 6e-8, False),
        ("BF16", 1.5, 0.0015, True),  # below the row's limit: |v|·2⁻¹⁰ < e·c
        ("F16", 2.0**-20, 1e-30, True),  # a float16 subnormal
        ("BF16", float("nan"), 1e-30, False),  # non-finite sums round as they are
    ],
)
def test_numpy_float32_proof(out_dtype: str, value: float, bound: float, unproven: bool) -> None:
    """``rounding.float32_unproven`` (the NumPy path's float32 sums) flags what its bound
    cannot prove, each term of the test on its own."""
    e = np.array([bound], np.float32)
    c = np.ones(2, np.float32)
    lim = rounding.float32_limits(e, 1.0, out_dtype)
    v = np.array([[value, 3.0]], np.float32)
    flag = rounding.float32_unproven(v, e, c, lim, out_dtype)
    assert flag[0, 0] == unproven
    assert not flag[0, 1]  # 3.0: far from every midpoint, above every limit here


def test_to_odd32_truncates_and_marks_inexact() -> None:
    """float64 to float32 to odd (the NumPy path's recompute, as the kernel's): exact values
    stay, others are truncated toward zero with the last bit set; beyond float32, its
    largest value; NaN stays NaN."""
    one = np.float32(1.0)
    up = np.nextafter(one, np.float32(2))  # 1 + 2⁻²³: odd last bit
    x = np.array([1.0, 1.0 + 2.0**-30, -(1.0 + 2.0**-30), 1.0 + 2.0**-23 - 2.0**-40, 1e39, np.nan])
    got = rounding.to_odd32(x)
    assert got[0] == one
    assert got[1] == up and got[2] == -up  # truncated to 1, then the last bit set
    assert got[3] == up  # nearest would give 1 + 2⁻²³; truncated to 1, then made odd
    assert got[4] == np.finfo(np.float32).max and np.isnan(got[5])
