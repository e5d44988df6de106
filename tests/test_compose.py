"""``compose`` against float64 math, against PEFT 0.21's ``add_weighted_adapter``, and through
``PeftModel.from_pretrained``; the methods' ``combine_dense`` against their dense definitions."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import edit_config, gpt2_model, llama_model, peft_adapter
from click.testing import CliRunner
from safetensors.torch import load_file

from adapterctl.cli import cli
from adapterctl.compose import compose
from adapterctl.formats import read
from adapterctl.formats.peft import write_peft
from adapterctl.methods import get_method, methods, parse_options

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _quiet_peft_adapter(model: Any, path: Path, **kw: Any) -> tuple[Any, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_adapter(model, path, **kw)


def _deltas(pm: Any, base: Any) -> dict[str, torch.Tensor]:
    """Every parameter's change under PEFT's own merge on a float64 copy: the oracle."""
    merged = copy.deepcopy(pm).double().merge_and_unload().state_dict()
    ref = base.state_dict()
    return {
        k: v - ref[k].double() for k, v in merged.items() if not torch.equal(v, ref[k].double())
    }


def _weighted(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d, w in zip(deltas, weights, strict=True):
        for k, v in d.items():
            out[k] = out.get(k, 0) + w * v
    return out


def _our_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW of a written adapter in float64, in the weight's layout, keyed by the weight name."""
    adapter = read(path)
    return {f"{n}.weight": m.delta(torch.float64) for n, m in adapter.modules.items()}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, Any], rel: float = 2e-6) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        scale = float(v.abs().max())
        err = float((got[k] - v).abs().max())
        assert err <= rel * scale + 1e-12, (k, err / scale)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A float32 tiny Llama and four adapters: plain r=4 (q,v), plain r=2 (q,o), rsLoRA r=4
    (all linear) and rank/alpha patterns; with PEFT's float64 deltas as oracles."""
    root = tmp_path_factory.mktemp("compose")
    base = llama_model()
    specs = {
        "plain": {"seed": 1},
        "small": {"seed": 2, "r": 2, "target_modules": ["q_proj", "o_proj"]},
        "rslora": {"seed": 3, "use_rslora": True, "target_modules": "all-linear"},
        "patterns": {
            "seed": 4, "target_modules": ["q_proj", "k_proj", "v_proj"],
            "rank_pattern": {r"layers\.1\.self_attn\.q_proj": 6, "k_proj": 2},
            "alpha_pattern": {"v_proj": 3},
        },
        "plain2": {"seed": 5},
        # 16×16 modules only: PEFT's ties_svd fails when svd_rank exceeds a module's size.
        "qo1": {"seed": 21, "target_modules": ["q_proj", "o_proj"]},
        "qo2": {"seed": 22, "target_modules": ["q_proj", "o_proj"]},
    }  # fmt: skip
    out: dict[str, Any] = {"base": base, "root": root, "pm": {}, "path": {}, "delta": {}}
    for name, kw in specs.items():
        pm, path = _quiet_peft_adapter(copy.deepcopy(base), root / name, **kw)
        out["pm"][name], out["path"][name] = pm, path
        out["delta"][name] = _deltas(pm, base)
    return out


def _compose(llama: dict[str, Any], names: list[str], weights: list[float], method: str,
             out: Path, **options: Any) -> Any:  # fmt: skip
    result = compose([read(llama["path"][n]) for n in names], weights, method, options)
    write_peft(result.adapter, out, force=True)
    return result.report


# --------------------------------------------------------------------------------------------
# Exact sums


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_the_exact_weighted_sum(
    llama: dict[str, Any], tmp_path: Path, method: str
) -> None:
    names, weights = ["plain", "small", "rslora", "patterns"], [0.7, -0.3, 0.5, 1.2]
    report = _compose(llama, names, weights, method, tmp_path / "out")
    assert report.exact and report.energy_kept == 1.0
    want = _weighted([llama["delta"][n] for n in names], weights)
    _assert_close(_our_deltas(tmp_path / "out"), want)


def test_output_loads_in_peft_with_the_implied_logits(
    llama: dict[str, Any], tmp_path: Path
) -> None:
    """Different ranks per module (rank_pattern), targets unioned, rsLoRA and patterns in."""
    from peft import PeftModel

    names, weights = ["plain", "small", "rslora", "patterns"], [0.7, -0.3, 0.5, 1.2]
    _compose(llama, names, weights, "linear", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert not cfg["use_rslora"] and not cfg["use_dora"]
    want = _weighted([llama["delta"][n] for n in names], weights)
    ref = copy.deepcopy(llama["base"]).double()
    state = ref.state_dict()
    ref.load_state_dict({k: v + want[k] if k in want else v for k, v in state.items()})
    model = PeftModel.from_pretrained(copy.deepcopy(llama["base"]).double(), tmp_path / "out")
    for name, layer in model.named_modules():
        if hasattr(layer, "scaling") and isinstance(layer.scaling, dict) and layer.scaling:
            assert layer.scaling["default"] == 1.0, name
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_svd_is_the_best_rank_r_approximation(
    llama: dict[str, Any], tmp_path: Path, method: str
) -> None:
    names, weights, rank = ["plain", "small", "rslora"], [0.6, 0.9, -0.4], 3
    report = _compose(llama, names, weights, method, tmp_path / "out", rank=rank)
    want = _weighted([llama["delta"][n] for n in names], weights)
    got = _our_deltas(tmp_path / "out")
    assert set(got) == set(want)
    kept = total = 0.0
    for k, exact in want.items():
        s_exact = torch.linalg.svdvals(exact)
        s_got = torch.linalg.svdvals(got[k])
        r = min(rank, int((s_exact > 1e-12 * s_exact[0]).sum()))
        torch.testing.assert_close(s_got[:r], s_exact[:r], rtol=0, atol=1e-5 * float(s_exact[0]))
        assert float(s_got[r:].abs().sum()) <= 1e-5 * float(s_exact[0])
        # Eckart–Young: the error is the tail of the spectrum.
        err = float(torch.linalg.matrix_norm(got[k] - exact))
        assert math.isclose(
            err, float(s_exact[r:].square().sum().sqrt()), rel_tol=1e-4, abs_tol=1e-6
        )
        kept += float(s_exact[:r].square().sum())
        total += float(s_exact.square().sum())
    assert math.isclose(report.energy_kept, kept / total, rel_tol=1e-6)
    assert not report.exact


def test_negative_weight_negates(llama: dict[str, Any], tmp_path: Path) -> None:
    _compose(llama, ["plain"], [-1.0], "linear", tmp_path / "neg")
    want = {k: -v for k, v in llama["delta"]["plain"].items()}
    _assert_close(_our_deltas(tmp_path / "neg"), want)


# --------------------------------------------------------------------------------------------
# Dense methods: combine_dense against the definitions, written independently here


def _prune_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * x.numel())
    thr = x.abs().flatten().sort(descending=True).values[k - 1] if k else math.inf
    return torch.where(x.abs() >= thr, x, torch.zeros_like(x))


def _ties_reference(
    deltas: list[torch.Tensor], weights: list[float], density: float, sign: str, convention: str,
    prune: bool = True,
) -> torch.Tensor:  # fmt: skip
    """TIES elementwise, in float64, as the README defines both conventions."""
    p = [_prune_magnitude(d, density) if prune else d for d in deltas]
    t = [w * x for w, x in zip(weights, p, strict=True)]
    voters = t if convention == "adapterctl" else p
    vote = sum(v if sign == "total" else v.sign() for v in voters)
    elected = torch.where(vote >= 0, 1.0, -1.0).double()
    agree = [(v.sign() == elected).double() for v in voters]
    num = sum(ti * a for ti, a in zip(t, agree, strict=True))
    if convention == "adapterctl":
        den = sum(abs(w) * a for w, a in zip(weights, agree, strict=True))
        return num / torch.where(den == 0, 1.0, den)
    return num / sum(agree).clamp_min(1.0)


def _rand_deltas(
    n: int = 3, shape: tuple[int, int] = (24, 20), seed: int = 0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("convention", ["adapterctl", "peft"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_combine_dense_equals_definition(convention: str, sign: str) -> None:
    deltas, weights = _rand_deltas(), [0.5, 1.0, -0.7]
    ties = get_method("ties")
    opts = parse_options(ties, {"density": 0.4, "majority_sign": sign, "convention": convention})
    got = ties.combine_dense([d.float() for d in deltas], weights, opts)
    assert got.dtype == torch.float32
    want = _ties_reference(deltas, weights, 0.4, sign, convention)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_magnitude_prune_and_linear_combine_dense() -> None:
    deltas, weights = _rand_deltas(), [0.5, 1.0, -0.7]
    mp = get_method("magnitude_prune")
    got = mp.combine_dense(
        [d.float() for d in deltas], weights, parse_options(mp, {"density": 0.3})
    )
    want = sum(w * _prune_magnitude(d, 0.3) for w, d in zip(weights, deltas, strict=True))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for name in ("linear", "cat", "svd"):
        m = get_method(name)
        got = m.combine_dense([d.float() for d in deltas], weights, parse_options(m, {}))
        want = sum(w * d for w, d in zip(weights, deltas, strict=True))
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_dare_is_reproducible_and_unbiased() -> None:
    """E[DARE] = Σ wᵢΔᵢ: with independent masks the total error over n entries is a sum of n
    independent zero-mean terms of known variance Σ wᵢ²Δᵢ²(1−d)/d, so z = Σ err / sqrt(Σ var)
    is ~N(0, 1); |z| < 5 has probability 1 − 6e-7, and the seed is fixed, so it never flakes.
    The variance itself must match too (Σ err² / Σ var ≈ 1 within 3%)."""
    deltas, weights, density = _rand_deltas(2, (300, 400), seed=1), [0.8, -0.5], 0.3
    dare = get_method("dare_linear")
    opts = parse_options(dare, {"density": density})
    x = [d.float() for d in deltas]
    first = dare.combine_dense(x, weights, opts, torch.Generator().manual_seed(7))
    again = dare.combine_dense(x, weights, opts, torch.Generator().manual_seed(7))
    other = dare.combine_dense(x, weights, opts, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    exact = sum(w * d for w, d in zip(weights, deltas, strict=True))
    var = sum(w**2 * d**2 for w, d in zip(weights, deltas, strict=True)) * (1 - density) / density
    err = first.double() - exact
    z = float(err.sum() / var.sum().sqrt())
    assert abs(z) < 5, z
    assert abs(float(err.square().sum() / var.sum()) - 1) < 0.03
    # Each entry kept is rescaled by 1/density; each dropped is zero.
    single = dare.combine_dense([x[0]], [1.0], opts, torch.Generator().manual_seed(3))
    kept = single != 0
    torch.testing.assert_close(single[kept], x[0][kept] / density)
    assert abs(float(kept.double().mean()) - density) < 0.01


def test_dare_ties_combine_dense_is_ties_on_the_dare_masks() -> None:
    deltas, weights, density = _rand_deltas(), [0.5, 1.0, -0.7], 0.5
    dt = get_method("dare_ties")
    opts = parse_options(dt, {"density": density, "convention": "peft"})
    got = dt.combine_dense(
        [d.float() for d in deltas], weights, opts, torch.Generator().manual_seed(1)
    )
    g = torch.Generator().manual_seed(1)
    masked = [d * (torch.rand(d.shape, generator=g) < density) / density for d in deltas]
    want = _ties_reference(masked, weights, 1.0, "total", "peft", prune=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("convention", ["adapterctl", "peft"])
def test_compose_ties_with_full_rank_equals_dense_definition(
    llama: dict[str, Any], tmp_path: Path, convention: str
) -> None:
    names, weights = ["plain", "small", "rslora"], [0.6, 0.9, -0.4]
    for method in ("ties", "magnitude_prune"):
        opts: dict[str, Any] = {"density": 0.5, "rank": 64}
        if method == "ties":
            opts["convention"] = convention
        report = _compose(llama, names, weights, method, tmp_path / method, **opts)
        assert report.energy_kept == pytest.approx(1.0, abs=1e-6)
        got = _our_deltas(tmp_path / method)
        for k, v in got.items():
            ds = [llama["delta"][n].get(k, torch.zeros_like(v)) for n in names]
            if method == "ties":
                want = _ties_reference(ds, weights, 0.5, "total", convention)
            else:
                want = sum(w * _prune_magnitude(d, 0.5) for w, d in zip(weights, ds, strict=True))
            torch.testing.assert_close(v, want, rtol=0, atol=2e-6 * float(want.abs().max()))


def test_compose_dare_reproducible_with_seed(llama: dict[str, Any], tmp_path: Path) -> None:
    args = [str(llama["path"][n]) for n in ("plain", "plain2")]
    outs = []
    for i, seed in enumerate(["1", "1", "2"]):
        out = tmp_path / f"d{i}"
        r = CliRunner().invoke(
            cli, ["compose", *args, "--method", "dare_ties", "--density", "0.5", "--seed", seed,
                  "-o", str(out), "--json"],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        outs.append(load_file(str(out / "adapter_model.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_low_energy_warns_and_points_to_merge(llama: dict[str, Any], tmp_path: Path) -> None:
    args = [str(llama["path"][n]) for n in ("plain", "rslora")]
    r = CliRunner().invoke(
        cli, ["compose", *args, "--method", "ties", "--density", "0.3", "--rank", "1",
              "-o", str(tmp_path / "t")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "--method ties" in r.output and "adapterctl merge" in r.output
    assert "energy kept:" in r.output


# --------------------------------------------------------------------------------------------
# Against PEFT 0.21's add_weighted_adapter


def _peft_combined(llama: dict[str, Any], names: list[str], weights: list[float], kind: str,
                   **kw: Any) -> dict[str, torch.Tensor]:  # fmt: skip
    """PEFT's own combination, as the ΔW its new adapter applies (its own scaling included)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(copy.deepcopy(llama["base"]), llama["path"][names[0]],
                                      adapter_name=names[0])  # fmt: skip
    for n in names[1:]:
        model.load_adapter(llama["path"][n], adapter_name=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(names, weights, "mix", combination_type=kind, **kw)
    out = {}
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "mix" in layer.lora_A:
            with torch.no_grad():
                out[f"{name}.weight"] = layer.get_delta_weight("mix").double()
    return out


def test_cat_and_svd_equal_peft_on_plain_lora(llama: dict[str, Any], tmp_path: Path) -> None:
    names, weights = ["plain", "plain2"], [0.7, 0.4]
    _compose(llama, names, weights, "cat", tmp_path / "cat")
    _assert_close(_our_deltas(tmp_path / "cat"), _peft_combined(llama, names, weights, "cat"))
    _compose(llama, names, weights, "svd", tmp_path / "svd", rank=3)
    peft_svd = _peft_combined(llama, names, weights, "svd", svd_rank=3)
    _assert_close(_our_deltas(tmp_path / "svd"), peft_svd, rel=2e-5)


def test_ties_peft_convention_equals_peft_ties_svd(llama: dict[str, Any], tmp_path: Path) -> None:
    names, weights = ["qo1", "qo2"], [0.7, 0.4]
    for sign in ("total", "frequency"):
        _compose(llama, names, weights, "ties", tmp_path / sign, density=0.5, rank=16,
                 convention="peft", majority_sign=sign)  # fmt: skip
        peft = _peft_combined(llama, names, weights, "ties_svd", svd_rank=16, density=0.5,
                              majority_sign_method=sign)  # fmt: skip
        _assert_close(_our_deltas(tmp_path / sign), peft, rel=2e-5)


def test_rslora_inputs_we_are_right_peft_is_not(tmp_path: Path, llama: dict[str, Any]) -> None:
    """PEFT copies use_rslora into the combined adapter whose factors already hold the scale:
    its ΔW comes out sqrt(r_new) too large (PEFT #3761). Ours is the weighted sum."""
    rs = {}
    for name, seed in (("rs1", 11), ("rs2", 12)):
        pm, path = _quiet_peft_adapter(copy.deepcopy(llama["base"]), tmp_path / name, seed=seed,
                                       use_rslora=True)  # fmt: skip
        llama["path"][name] = path
        rs[name] = _deltas(pm, llama["base"])
    names, weights = ["rs1", "rs2"], [0.7, 0.4]
    want = _weighted([rs[n] for n in names], weights)
    _compose(llama, names, weights, "cat", tmp_path / "ours")
    _assert_close(_our_deltas(tmp_path / "ours"), want)
    peft = _peft_combined(llama, names, weights, "cat")
    for k, v in want.items():
        ratio = float(torch.linalg.matrix_norm(peft[k]) / torch.linalg.matrix_norm(v))
        assert ratio == pytest.approx(math.sqrt(8), rel=1e-5), k  # r_new = 4 + 4, alpha = 8


# --------------------------------------------------------------------------------------------
# lora bias, modules_to_save, refusals


def test_lora_bias_combines_linearly_and_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    base = gpt2_model()
    kw = {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "lora_bias": True}
    pm1, p1 = _quiet_peft_adapter(copy.deepcopy(base), tmp_path / "g1", seed=1, **kw)
    pm2, p2 = _quiet_peft_adapter(copy.deepcopy(base), tmp_path / "g2", seed=2, r=2, **kw)
    weights = [0.6, -0.5]
    result = compose([read(p1), read(p2)], weights, "linear")
    write_peft(result.adapter, tmp_path / "out")
    want = _weighted([_deltas(pm1, base), _deltas(pm2, base)], weights)
    assert any(k.endswith(".bias") for k in want)
    ref = copy.deepcopy(base).double()
    ref.load_state_dict({k: v + want[k] if k in want else v for k, v in ref.state_dict().items()})
    model = PeftModel.from_pretrained(copy.deepcopy(base).double(), tmp_path / "out")
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_refusals_and_exit_codes(llama: dict[str, Any], tmp_path: Path) -> None:
    p = {k: str(v) for k, v in llama["path"].items()}
    out = str(tmp_path / "o")
    dora = _quiet_peft_adapter(copy.deepcopy(llama["base"]), tmp_path / "dora", use_dora=True)[1]
    r = _run("compose", p["plain"], str(dora), "--method", "linear", "-o", out)
    assert r.exit_code == 3 and "DoRA" in r.output and "not linear" in r.output
    r = _run("compose", p["plain"], p["small"], "-w", "1", "--method", "linear", "-o", out)
    assert r.exit_code == 2 and "-w once per SOURCE" in r.output
    r = _run("compose", p["plain"], p["small"], "--method", "nope", "-o", out)
    assert r.exit_code == 4 and "adapterctl methods" in r.output
    r = _run("compose", p["plain"], p["small"], "--method", "ties", "-o", out)
    assert r.exit_code == 2 and "needs --density" in r.output
    r = _run("compose", p["plain"], p["small"], "--method", "cat", "--rank", "2", "-o", out)
    assert r.exit_code == 2 and "does not take --rank" in r.output
    r = _run("compose", p["plain"], p["small"], "--method", "linear", "--density", "0.5", "-o", out)
    assert r.exit_code == 2 and "does not take --density" in r.output
    r = _run("compose", p["plain"], p["small"], "--method", "ties", "--density", "1.5", "-o", out)
    assert r.exit_code == 2 and "--density" in r.output
    r = _run("compose", p["plain"], str(tmp_path / "missing"), "--method", "linear", "-o", out)
    assert r.exit_code == 4
    (tmp_path / "exists").mkdir()
    r = _run("compose", p["plain"], "--method", "linear", "-o", str(tmp_path / "exists"))
    assert r.exit_code == 5 and "--force" in r.output
    r = _run("compose", p["plain"], "--method", "linear", "-o", str(tmp_path / "exists"), "--force")
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob(".exists*"))  # no temporary siblings left


def test_base_mismatch_is_a_conflict_unless_allowed(llama: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    a = shutil.copytree(llama["path"]["plain"], tmp_path / "a")
    b = shutil.copytree(llama["path"]["small"], tmp_path / "b")
    c = shutil.copytree(llama["path"]["plain2"], tmp_path / "c")
    edit_config(a, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    edit_config(b, base_model_name_or_path="Qwen/Qwen2.5-0.5B")
    edit_config(c, base_model_name_or_path="/models/llama-3.2-1b")  # loosely the same as a
    r = _run("compose", str(a), str(b), "--method", "linear", "-o", str(tmp_path / "o"))
    assert r.exit_code == 5 and "--allow-base-mismatch" in r.output
    r = _run("compose", str(a), str(c), "--method", "linear", "-o", str(tmp_path / "o1"))
    assert r.exit_code == 0, r.output
    r = _run("compose", str(a), str(b), "--method", "linear", "-o", str(tmp_path / "o2"),
             "--allow-base-mismatch")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "different base models" in r.output
    cfg = json.loads((tmp_path / "o2" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"


def test_modules_to_save_carried_or_refused(llama: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    base = llama["base"]
    pm1, m1 = _quiet_peft_adapter(copy.deepcopy(base), tmp_path / "m1", modules_to_save=["lm_head"])
    with torch.no_grad():
        pm1.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    pm1.save_pretrained(m1)
    _, m2 = _quiet_peft_adapter(copy.deepcopy(base), tmp_path / "m2", seed=7,
                                modules_to_save=["lm_head"])  # fmt: skip
    r = _run("compose", str(m1), str(m2), "--method", "linear", "-o", str(tmp_path / "o"))
    assert r.exit_code == 3 and "lm_head.weight" in r.output
    out = tmp_path / "o1"
    r = _run("compose", str(m1), str(llama["path"]["small"]), "--method", "linear", "-o", str(out),
             "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["carried"] == ["lm_head.weight"]
    model = PeftModel.from_pretrained(copy.deepcopy(base), out)
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    torch.testing.assert_close(head, pm1.base_model.model.lm_head.modules_to_save["default"].weight)


def test_methods_are_registered_through_the_hook() -> None:
    names = [m.name for m in methods()]
    assert names[:7] == [
        "linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    ]  # fmt: skip
    r = _run("methods", "--json")
    assert r.exit_code == 0
    data = {m["name"]: m for m in json.loads(r.output)}
    ties = {o["name"]: o for o in data["ties"]["options"]}
    assert ties["density"]["required"] and ties["convention"]["choices"] == ["adapterctl", "peft"]
    assert data["ties"]["reference"].startswith("https://")
    r = _run("methods")
    assert r.exit_code == 0 and "--majority-sign total|frequency" in r.output


def test_merge_method_ties_equals_base_plus_dense_ties(
    llama: dict[str, Any], tmp_path: Path
) -> None:
    """Full-rank method merges: W + dense TIES (needs ``merge --method``)."""
    from builders import save_base

    if "--method" not in _run("merge", "--help").output:
        pytest.skip("merge --method not wired yet")
    base = save_base(llama["base"], tmp_path / "base")
    names, weights = ["plain", "small"], [0.6, 0.9]
    r = _run("merge", str(base), *[str(llama["path"][n]) for n in names], "-w", "0.6", "-w",
             "0.9", "--method", "ties", "--density", "0.5", "-o", str(tmp_path / "m"))  # fmt: skip
    assert r.exit_code == 0, r.output
    state: dict[str, torch.Tensor] = {}
    for f in (tmp_path / "m").glob("*.safetensors"):
        state.update(load_file(str(f)))
    ref = llama["base"].state_dict()
    for k, got in state.items():
        ds = [llama["delta"][n].get(k) for n in names]
        if all(d is None for d in ds):
            continue
        ds = [torch.zeros_like(ref[k].double()) if d is None else d for d in ds]
        want = ref[k].double() + _ties_reference(ds, weights, 0.5, "total", "adapterctl")
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_agrees_with_cpu(llama: dict[str, Any]) -> None:
    adapters = [read(llama["path"][n]) for n in ("plain", "plain2")]
    opts = {"density": 0.5, "rank": 16}
    cpu = compose(adapters, [0.5, 0.5], "dare_ties", opts, device="cpu").adapter
    gpu = compose(adapters, [0.5, 0.5], "dare_ties", opts, device="cuda").adapter
    for name, m in cpu.modules.items():
        torch.testing.assert_close(gpu.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)
