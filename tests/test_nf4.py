"""adapterctl.nf4 against bitsandbytes, transformers and PEFT (the oracles).

Tiny 4-bit Llamas are made the way users make them (transformers + BitsAndBytesConfig on the
CPU, then ``save_pretrained``); every dequantisation must agree with bitsandbytes bit for bit.
Every bitsandbytes result is checked before it is trusted (``oracles``), and the models use
shapes bitsandbytes handles on the CPU: hidden 256 with 8 heads of 32 and one key/value head,
so in-features are multiples of every blocksize used and out-features multiples of 32, while
k_proj/v_proj (32×256: 128 blocks of 64) end in a ragged nested block of 256 scales. Ragged
last 4-bit blocks and the shapes bitsandbytes' CPU kernel gets wrong are tested against an
independent float64 decode and the 4-bit error bound instead.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import builders
import oracles
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterctl import nf4
from adapterctl.errors import BrokenFile, UsageError
from adapterctl.nf4 import quantization

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = builders.llama_model(layers=1, vocab=32, hidden=256, seed=3, heads=8)
    return builders.save_base(model, tmp_path_factory.mktemp("nf4") / "base")


_SAVED: dict[tuple[str, bool, str], tuple[Path, Any]] = {}


@pytest.fixture(scope="module")
def saved(base_dir: Path) -> Any:
    """(quant_type, double_quant, dtype name) -> (saved 4-bit folder, the loaded model)."""

    def make(quant_type: str, double_quant: bool, dtype: str = "float32") -> tuple[Path, Any]:
        key = (quant_type, double_quant, dtype)
        if key not in _SAVED:
            model = oracles.load_4bit(
                base_dir,
                quant_type=quant_type,
                double_quant=double_quant,
                dtype=getattr(torch, dtype),
            )
            out = base_dir.parent / f"{quant_type}-{int(double_quant)}-{dtype}"
            model.save_pretrained(out)
            _SAVED[key] = (out, model)
        return _SAVED[key]

    yield make
    _SAVED.clear()


def _prefixes(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.split(".quant_state.")[0] for k in sd if ".quant_state." in k)


def _bnb_state(sd: dict[str, torch.Tensor], prefix: str) -> Any:
    from bitsandbytes.functional import QuantState

    stats = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    return QuantState.from_dict(stats, torch.device("cpu"))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (a float view of packed codes may hold NaN patterns)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def _module(model: Any, prefix: str) -> Any:
    return model.get_submodule(prefix.removesuffix(".weight"))


# ------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "dtype"),
    [
        ("nf4", True, "float32"),
        ("nf4", False, "float32"),
        ("fp4", True, "float32"),
        ("fp4", False, "float32"),
        ("nf4", True, "bfloat16"),
    ],
)
def test_dequantize_matches_bitsandbytes(
    saved: Any, quant_type: str, double_quant: bool, dtype: str
) -> None:
    path, model = saved(quant_type, double_quant, dtype)
    sd = load_file(path / "model.safetensors")
    prefixes = _prefixes(sd)
    assert len(prefixes) == len(LINEARS)
    for prefix in prefixes:
        ours = nf4.dequantize(sd, prefix)
        state = nf4.read_state(sd, prefix)
        assert ours.dtype == torch.float32
        assert list(ours.shape) == state["shape"]
        assert (f"{prefix}.nested_absmax" in sd) == double_quant
        assert state["dtype"] == dtype
        qs = _bnb_state(sd, prefix)
        # bitsandbytes in float32, and in the state's own dtype (= ours rounded once).
        assert torch.equal(ours, oracles.bnb_dequantize(sd[prefix], qs))
        assert torch.equal(
            ours.to(qs.dtype), oracles.bnb_dequantize(sd[prefix], qs, dtype=qs.dtype)
        )
        # What the loaded transformers layer holds.
        weight = _module(model, prefix).weight
        assert torch.equal(ours, oracles.bnb_dequantize(weight.data, weight.quant_state))


def test_dequantize_device_argument_and_errors(saved: Any) -> None:
    path, _ = saved("nf4", True)
    sd = load_file(path / "model.safetensors")
    prefix = _prefixes(sd)[0]
    assert torch.equal(nf4.dequantize(sd, prefix, device="cpu"), nf4.dequantize(sd, prefix))
    broken = {k: v for k, v in sd.items() if not k.endswith(".nested_quant_map")}
    with pytest.raises(BrokenFile, match="nested_quant_map: missing"):
        nf4.dequantize(broken, prefix)
    with pytest.raises(BrokenFile, match="expected one of"):
        nf4.dequantize(sd, "model.embed_tokens.weight")
    short = dict(sd)
    short[prefix] = sd[prefix][:-2]
    with pytest.raises(BrokenFile, match="do not fit"):
        nf4.dequantize(short, prefix)


def test_code_tables_match_bitsandbytes() -> None:
    from bitsandbytes.functional import create_dynamic_map, get_4bit_type

    for qt in nf4.QUANT_TYPES:
        assert _same(nf4.code_table(qt), get_4bit_type(qt, device="cpu"))
    assert _same(nf4.nested_code_table(), create_dynamic_map())


# Rows a multiple of 16 but not of the blocksize (where bitsandbytes 0.50's CPU dequantize
# errs), rows shorter than a block, and ragged last blocks.
ODD_SHAPES = [((64, 64), 128), ((32, 192), 128), ((48, 96), 64), ((37, 101), 64), ((3, 70), 64)]


@pytest.mark.parametrize(("shape", "blocksize"), ODD_SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("method", ["absmax", "optimal"])
def test_dequantize_on_odd_shapes_is_the_float64_decode_within_the_bound(
    shape: tuple[int, int], blocksize: int, quant_type: str, double_quant: bool, method: str
) -> None:
    """No peer here: our decoder against an independent float64 decode of the same bytes, and
    the round trip against the 4-bit error bound (half the widest code gap times the scale)."""
    torch.manual_seed(11)
    w = torch.randn(*shape) * 0.05
    out = nf4.quantize(
        w, "w", quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
        method=method,
    )  # fmt: skip
    ours = nf4.dequantize(out, "w")
    ref, tol = oracles.decode_file(out, "w")
    assert ours.shape == w.shape and bool(((ours.double() - ref).abs() <= tol).all())
    assert oracles.within_bound(out, "w", w)
    if method == "absmax":  # the bound is tight enough to mean something: twice the error fails
        assert not oracles.within_bound(out, "w", w + (ref - w.double()).float() * 3)


def test_a_broken_oracle_fails_as_oracle_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.functional as bnbf

    torch.manual_seed(12)
    w = torch.randn(64, 256) * 0.02
    packed, qs = oracles.bnb_quantize(w, blocksize=64, quant_type="nf4")
    oracles.bnb_dequantize(packed, qs)  # the real one passes its check
    real_dequantize, real_quantize = bnbf.dequantize_4bit, bnbf.quantize_4bit

    def off(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real_dequantize(*args, **kwargs) * 1.001

    monkeypatch.setattr(bnbf, "dequantize_4bit", off)
    with pytest.raises(pytest.fail.Exception, match=r"^oracle broken: bitsandbytes .*dequantize"):
        oracles.bnb_dequantize(packed, qs)

    def rolled(x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        p, state = real_quantize(x, **kwargs)
        return p.roll(1), state

    monkeypatch.setattr(bnbf, "quantize_4bit", rolled)
    with pytest.raises(pytest.fail.Exception, match=r"^oracle broken: .*quantize_4bit"):
        oracles.bnb_quantize(w, blocksize=64, quant_type="nf4")


def test_a_linear4bit_off_its_weight_fails_as_oracle_broken(base_dir: Path) -> None:
    import bitsandbytes as bnb

    model = oracles.load_4bit(base_dir, compute=torch.float32)  # checks its forward itself
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    original = layer.forward
    # What the AVX512-BF16 path does to a float32-compute layer: a bf16 result.
    layer.forward = lambda x: original(x).to(torch.bfloat16).float()
    with pytest.raises(pytest.fail.Exception, match=r"^oracle broken: .*Linear4bit"):
        oracles.check_forward(model)


# ------------------------------------------------------------------------------------------
# quantize(method="absmax") == bitsandbytes.functional.quantize_4bit


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_quantize_absmax_matches_bitsandbytes(
    quant_type: str, double_quant: bool, blocksize: int, storage: torch.dtype
) -> None:
    torch.manual_seed(0)
    w = torch.randn(100, 300) * 0.02  # 30000 values: ragged last block and nested block
    packed, qs = oracles.bnb_quantize(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
        quant_storage=storage,
    )  # fmt: skip
    expected = {f"w.{k}": v for k, v in qs.as_dict(packed=True).items()} | {"w": packed}
    ours = nf4.quantize(
        w, "w", quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
        quant_storage=storage,
    )  # fmt: skip
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert _same(ours[key], value), key
    assert torch.equal(nf4.dequantize(ours, "w"), oracles.bnb_dequantize(packed, qs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_pure_torch_absmax_matches_bitsandbytes(quant_type: str, double_quant: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 130)
    w[3] = 0.0  # an all-zero block
    ref = quantization._quantize_absmax(w, quant_type, 64, double_quant)
    ours = quantization._quantize_absmax_torch(w, quant_type, 64, double_quant)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    if double_quant:
        assert ours[2] is not None and ref[2] is not None
        assert all(torch.equal(a, b) for a, b in zip(ours[2][:3], ref[2][:3], strict=True))
        assert ours[2][3] == ref[2][3]


def test_quantize_arguments() -> None:
    w = torch.randn(8, 64, dtype=torch.float64)
    out = nf4.quantize(w, "w", dtype="bfloat16", compress_statistics=False)
    assert nf4.read_state(out, "w")["dtype"] == "bfloat16" and "w.nested_absmax" not in out
    assert nf4.read_state(nf4.quantize(w, "w"), "w")["dtype"] == "float32"
    for bad in ({"quant_type": "int4"}, {"blocksize": 48}, {"method": "best"}, {"dtype": "int8"}):
        with pytest.raises(UsageError):
            nf4.quantize(w, "w", **bad)


# ------------------------------------------------------------------------------------------
# a checkpoint made of our tensors loads with transformers


def test_quantization_config_mirrors_transformers(saved: Any) -> None:
    for qt, dq in (("nf4", True), ("fp4", False)):
        path, _ = saved(qt, dq)
        written = json.loads((path / "config.json").read_text())["quantization_config"]
        assert nf4.quantization_config(qt, dq, "bfloat16") == written


def test_checkpoint_from_quantize_loads_in_transformers(saved: Any, tmp_path: Path) -> None:
    src, _ = saved("nf4", True)
    out = tmp_path / "ours"
    shutil.copytree(src, out)
    sd = load_file(src / "model.safetensors")
    torch.manual_seed(2)
    ours: dict[str, dict[str, torch.Tensor]] = {}
    for i, prefix in enumerate(_prefixes(sd)):
        w = nf4.dequantize(sd, prefix)
        w = w + 0.01 * w.std() * torch.randn_like(w)  # (out, in)
        for key in [k for k in sd if k == prefix or k.startswith(prefix + ".")]:
            del sd[key]
        ours[prefix] = nf4.quantize(
            w, prefix, method=("absmax", "optimal")[i % 2], blocksize=(64, 128, 256)[i % 3],
            dtype="float32",
        )  # fmt: skip
        sd.update(ours[prefix])
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = nf4.quantization_config("nf4", True, "bfloat16")
    (out / "config.json").write_text(json.dumps(config))

    model = oracles.load_4bit(out, as_saved=True)  # its layers compute what they hold
    for prefix, tensors in ours.items():
        weight = _module(model, prefix).weight
        assert type(weight).__name__ == "Params4bit"
        assert weight.quant_state.blocksize == nf4.read_state(tensors, prefix)["blocksize"]
        assert torch.equal(oracles.bnb_dequantize(weight.data, weight.quant_state),
                           nf4.dequantize(tensors, prefix))  # fmt: skip
        ours_16 = nf4.dequantize(tensors, prefix).to(weight.quant_state.dtype)
        assert torch.equal(
            oracles.bnb_dequantize(weight.data, weight.quant_state, weight.quant_state.dtype),
            ours_16,
        )
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------
# method="optimal"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_optimal_beats_absmax_on_gaussian(quant_type: str, double_quant: bool) -> None:
    torch.manual_seed(4)
    w = torch.randn(384, 512) * 0.02
    kw: dict[str, Any] = {"quant_type": quant_type, "double_quant": double_quant}
    err = {
        m: float((nf4.dequantize(nf4.quantize(w, "w", method=m, **kw), "w") - w).norm() / w.norm())
        for m in ("absmax", "optimal")
    }
    gain = 1 - err["optimal"] / err["absmax"]
    print(
        f"\n{quant_type} double_quant={double_quant}: relative error absmax "
        f"{err['absmax']:.5f}, optimal {err['optimal']:.5f} ({gain:.2%} lower)"
    )
    assert err["optimal"] <= err["absmax"]
    assert gain > 0.03  # measured ~7% for NF4 and FP4


def test_optimal_handles_zero_blocks_and_odd_sizes() -> None:
    w = torch.zeros(3, 70)
    w[1, :5] = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    for dq in (True, False):
        out = nf4.quantize(w, "w", method="optimal", double_quant=dq)
        back = nf4.dequantize(out, "w")
        assert back.shape == w.shape and torch.isfinite(back).all()
        assert float((back - w).norm()) <= float(
            (nf4.dequantize(nf4.quantize(w, "w", double_quant=dq), "w") - w).norm()
        )


def test_guard_error_matches_dequantize_on_ragged_sizes() -> None:
    """The absmax-vs-optimal guard measures the error of what is written, padding excluded."""
    torch.manual_seed(7)
    for qt in nf4.QUANT_TYPES:
        w = torch.randn(37, 101)  # 3737 values: the last block of 64 is ragged
        packed, scales, nested = quantization._quantize_absmax(w, qt, 64, True)
        direct = float(
            (nf4.dequantize(nf4.quantize(w, "w", quant_type=qt), "w") - w).square().sum()
        )
        assert quantization._sq_error(w, packed, scales, nested, qt, 64) == pytest.approx(
            direct, rel=1e-5
        )


def test_delta_error() -> None:
    w = torch.randn(4, 6, dtype=torch.float64)
    d = torch.ones(4, 6, dtype=torch.float64)
    assert nf4.delta_error(w, d, w + d) == pytest.approx(0.0, abs=1e-12)
    assert nf4.delta_error(w, d, w + 0.5 * d) == pytest.approx(0.5)
    assert nf4.delta_error(w, d, w) == pytest.approx(1.0)
    assert nf4.delta_error(w, torch.zeros_like(w), w) == 0.0
    with pytest.raises(UsageError):
        nf4.delta_error(w, d, w.T)


def test_optimal_no_worse_than_peft_merge_into_nf4(base_dir: Path) -> None:
    """PEFT's merge_and_unload into a 4-bit base is bitsandbytes' absmax re-quantisation of
    dequant(W) + ΔW; ours with method="absmax" reproduces it bit for bit and "optimal" loses
    less of the delta on every layer."""
    from peft import LoraConfig, get_peft_model

    model = oracles.load_4bit(base_dir, dtype=torch.float32)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=LINEARS, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)  # ‖ΔW‖ / ‖W‖ of a few percent, as after fine-tuning
    layers = {n: m for n, m in pm.named_modules() if type(m).__name__ == "Linear4bit"}
    layers = {n: m for n, m in layers.items() if hasattr(m, "lora_A")}
    assert len(layers) == len(LINEARS)
    before = {}
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            w = oracles.bnb_dequantize(weight.data, weight.quant_state)
            before[name] = (w, layer.get_delta_weight("default").float())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = pm.merge_and_unload()
    rows = []
    for name, (w, delta) in before.items():
        weight = merged.get_submodule(name.removeprefix("base_model.model.")).weight
        peft_w = oracles.bnb_dequantize(weight.data, weight.quant_state)
        ours = {
            m: nf4.dequantize(nf4.quantize(w + delta, "w", method=m), "w")
            for m in ("absmax", "optimal")
        }
        assert torch.equal(ours["absmax"], peft_w)
        errs = [nf4.delta_error(w, delta, r) for r in (peft_w, ours["optimal"])]
        rows.append((name.rsplit(".", 2)[-1], float(delta.norm() / w.norm()), *errs))
        assert errs[1] <= errs[0]
    print("\nmodule      ‖ΔW‖/‖W‖  delta error PEFT  ours (optimal)")
    for r in rows:
        print(f"{r[0]:<10}  {r[1]:8.4f}  {r[2]:16.4f}  {r[3]:14.4f}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_bitsandbytes_and_cpu() -> None:
    from bitsandbytes.functional import quantize_4bit

    torch.manual_seed(6)
    w = torch.randn(256, 320, device="cuda") * 0.02
    for dq in (True, False):
        packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        ours = nf4.quantize(w, "w", double_quant=dq)
        assert torch.equal(ours["w"], packed)
        back = nf4.dequantize(ours, "w")
        assert back.is_cuda and torch.equal(back, oracles.bnb_dequantize(packed, qs))
        cpu = {k: v.cpu() for k, v in ours.items()}
        assert torch.equal(nf4.dequantize(cpu, "w"), back.cpu())
        opt = nf4.quantize(w, "w", double_quant=dq, method="optimal")
        assert float((nf4.dequantize(opt, "w") - w).norm()) <= float((back - w).norm())
