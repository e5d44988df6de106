"""Hardening, one test per class: results that are not finite. An update s·B·A beyond float32's
range (a finite but huge lora_alpha, weight or factor) is an AC104 error in ``validate``, a
flag in ``inspect`` (never a crash) and exit 3 in merge/compose/resize before anything is
written; a merged value that comes out inf or NaN is refused (exit 3, nothing left behind);
``--verify`` tells such data from a bug; a 4-bit delta error above 1 is a loud warning and
``--max-delta-error`` an error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import edit_config, llama_model, peft_adapter, save_base
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from adapterctl.cli import cli
from adapterctl.errors import ValidationFailed

MODULES = [
    f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
]  # what peft_adapter targets on llama_model()
Q0 = "model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


def _scale_factors(path: Path, factor: float) -> Path:
    """Multiply every LoRA factor of the adapter at ``path`` by ``factor`` (stays finite)."""
    tensors = load_file(str(path / WEIGHTS))
    save_file({k: v * np.float32(factor) for k, v in tensors.items()}, str(path / WEIGHTS))
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, a good adapter and its overflowing variants: lora_alpha 1e308 (scale 2.5e307),
    factors ×1e30 (B·A ~1e60), and both (‖ΔW‖ beyond even float64)."""
    root = tmp_path_factory.mktemp("finite")
    model = llama_model()
    save_base(model, root / "base")
    peft_adapter(model, root / "ad")
    for name in ("alpha", "big", "alpha+big"):
        shutil.copytree(root / "ad", root / name)
    edit_config(root / "alpha", lora_alpha=1e308)
    _scale_factors(root / "big", 1e30)
    _scale_factors(edit_config(root / "alpha+big", lora_alpha=1e308), 1e30)
    return root


@pytest.fixture
def work(tree: Path, tmp_path: Path) -> Path:
    shutil.copytree(tree, tmp_path / "w")
    return tmp_path / "w"


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused(r: Any, code: int, work: Path, before: dict[str, str], *names: str) -> None:
    """Exit ``code`` with one ``Error:`` line naming ``names``; inputs unchanged; no output
    or staging folder left anywhere."""
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output and "bug" not in r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert _hashes(work) == before
    left = {p.name for p in work.iterdir()} - {"base", "ad", "alpha", "big", "alpha+big"}
    assert not left, left


# --- validate: AC104 ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpha", "big", "alpha+big"])
def test_validate_refuses_an_update_beyond_float32(tree: Path, name: str) -> None:
    r = _run("validate", tree / name, "--base", tree / "base", "--json")
    assert r.exit_code == 3, r.output
    data = json.loads(r.stdout)
    found = [f for f in data["findings"] if f["code"] == "AC104"]
    assert sorted(f["module"] for f in found) == MODULES
    assert all("beyond float32's range" in f["message"] for f in found), found
    assert all(f["severity"] == "error" for f in found)
    assert "RuntimeWarning" not in r.stderr
    good = _run("validate", tree / "ad", "--base", tree / "base")
    assert good.exit_code == 0, good.output


# --- inspect: flagged, never a crash -----------------------------------------------------------


@pytest.mark.parametrize("name", ["alpha", "big", "alpha+big"])
def test_inspect_flags_an_overflowing_update(tree: Path, name: str) -> None:
    text = _run("inspect", tree / name)
    assert text.exit_code == 0, text.output
    assert "Error" not in text.stderr and "RuntimeWarning" not in text.stderr, text.stderr
    assert text.stdout.count("[overflows float32]") == len(MODULES)
    assert "4 module(s) have an update scale·B·A that can exceed float32's range" in text.stdout
    r = _run("inspect", tree / name, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["overflow_modules"] == MODULES and data["nonfinite_modules"] == []
    if name == "alpha+big":  # ‖ΔW‖ ≈ 1e367: beyond float64, shown as inf, null in JSON
        assert {m["norm"] for m in data["modules"]} == {None} and data["total_norm"] is None
        assert " inf " in text.stdout
    else:
        assert all(0 < m["norm"] < float("inf") for m in data["modules"])
    quiet = json.loads(_run("inspect", tree / "ad", "--json").stdout)
    assert quiet["overflow_modules"] == [] and not any(m["overflow"] for m in quiet["modules"])


# --- merge: refused at plan time, before any output is opened ----------------------------------


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["alpha"], 3, ["AC104", Q0, "beyond float32's range"]),
        (["big"], 3, ["AC104", Q0, "beyond float32's range"]),
        (["ad", "-w", "1e39"], 3, [Q0, "its update w·s·B·A can reach", "-w"]),
        (["ad", "ad", "-w", "3e38", "-w", "3e38"], 3, [f"{Q0}.weight", "sum of its 2 updates"]),
        (["ad", "-w", "inf"], 2, ["finite"]),
        (["ad", "-w", "nan"], 2, ["finite"]),
    ],
    ids=["alpha-1e308", "factors-1e30", "weight-1e39", "sum-of-two", "weight-inf", "weight-nan"],
)
def test_merge_refuses_an_update_beyond_float32(
    work: Path, args: list[str], code: int, named: list[str]
) -> None:
    before = _hashes(work)
    sources = [work / a if (work / a).exists() else a for a in args]
    r = _run("merge", work / "base", *sources, "-o", work / "out")
    _refused(r, code, work, before, *named)


# --- merge: values that come out non-finite while writing ---------------------------------------


def _base_near_max(work: Path) -> Path:
    """The base with row 0 of q_proj at 3.3e38: finite, but any push upwards overflows."""
    f = work / "base" / "model.safetensors"
    state = load_file(str(f))
    state[f"{Q0}.weight"][0, :] = 3.3e38
    save_file(state, str(f), metadata={"format": "pt"})
    return work / "base"


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("case", ["fp16", "fp32"])
def test_merge_refuses_values_that_come_out_non_finite(work: Path, engine: str, case: str) -> None:
    """No update is beyond float32 at plan time, but the written values are not finite: in an
    fp16 output (±65504), or a float32 base already near float32's limit."""
    from adapterctl.checkpoint import open_checkpoint
    from adapterctl.formats import read
    from adapterctl.merge import merge

    base = _base_near_max(work) if case == "fp32" else work / "base"
    weight, dtype = (1e6, "fp16") if case == "fp16" else (1e38, "auto")
    out = work / "out"
    with pytest.raises(ValidationFailed, match=r"merged value.*came out as inf or NaN") as err:
        merge(open_checkpoint(base), [read(work / "ad")], out, [weight], dtype=dtype,
              engine=engine, device="cpu")  # fmt: skip
    msg = str(err.value)
    assert msg.startswith("model.layers.") and "\n" not in msg
    assert ("--dtype bf16" in msg) == (case == "fp16"), msg
    if case == "fp32":
        assert msg.startswith(f"{Q0}.weight: ")
    assert not out.exists() and not list(work.glob(".out.partial-*"))
    before = _hashes(work)
    r = _run("merge", base, work / "ad", "-w", weight, "--dtype", dtype, "-o", out)
    _refused(r, 3, work, before, "came out as inf or NaN")


# --- --verify: data problems are not bugs ------------------------------------------------------


def test_verify_tells_non_finite_data_from_a_bug(work: Path) -> None:
    from adapterctl.checkpoint import open_checkpoint
    from adapterctl.formats import read
    from adapterctl.merge import plan_merge, run_merge
    from adapterctl.merge.verify import verify_output

    # A base that already holds inf: the merge keeps it, and --verify agrees.
    f = work / "base" / "model.safetensors"
    state = load_file(str(f))
    state[f"{Q0}.weight"][1, 2] = np.inf
    save_file(state, str(f), metadata={"format": "pt"})
    r = _run("merge", work / "base", work / "ad", "-o", work / "out", "--verify")
    assert r.exit_code == 0, r.output
    assert np.isposinf(load_file(str(work / "out" / "model.safetensors"))[f"{Q0}.weight"][1, 2])
    # An output value that is inf where the reference is finite: exit 3, named, not a bug.
    plan = plan_merge(open_checkpoint(work / "base"), [read(work / "ad")])
    run_merge(plan, work / "out2", device="cpu")
    g = work / "out2" / "model.safetensors"
    written = load_file(str(g))
    written[f"{Q0}.weight"][:, :] = np.nan
    save_file(written, str(g), metadata={"format": "pt"})
    with pytest.raises(ValidationFailed, match=f"{Q0}.weight holds inf or NaN") as err:
        verify_output(plan, work / "out2")
    assert "data problem" in str(err.value)
    assert not any(w in str(err.value) for w in ("ADAPTERCTL_DEBUG", "report", "bug"))


# --- compose and resize: inputs and results checked before writing ------------------------------


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["compose", "alpha", "ad", "--method", "linear"], 3, ["AC104", Q0]),
        (["compose", "ad", "big", "--method", "svd", "--rank", "2"], 3, ["AC104", Q0]),
        (["compose", "ad", "ad", "-w", "3e38", "-w", "3e38", "--method", "linear"], 3,
         [Q0, "weighted sum", "beyond float32's range"]),
        (["compose", "ad", "ad", "-w", "1e38", "-w", "1e38", "--method", "dare_linear",
          "--density", "0.01"], 3, ["dare_linear result leaves float32's range"]),
        (["compose", "ad", "ad", "-w", "inf", "-w", "1", "--method", "linear"], 2, ["finite"]),
        (["resize", "alpha", "--rank", "2"], 3, ["AC104", Q0]),
        (["resize", "big", "--energy", "0.9"], 3, ["AC104", Q0]),
    ],
    ids=["compose-alpha", "compose-big", "compose-sum", "compose-dare", "compose-inf-weight",
         "resize-alpha", "resize-big"],
)  # fmt: skip
def test_compose_and_resize_refuse_non_finite_results(
    work: Path, args: list[str], code: int, named: list[str]
) -> None:
    before = _hashes(work)
    argv = [work / a if (work / a).exists() else a for a in args]
    r = _run(*argv, "-o", work / "out")
    _refused(r, code, work, before, *named)


def test_a_non_finite_result_module_is_refused() -> None:
    """The result check compose and resize share, on modules they could produce."""
    from adapterctl.adapter import LoraModule, MemoryTensor
    from adapterctl.compose import check_result

    def module(b: torch.Tensor, bias: torch.Tensor | None = None, a: float = 2.0) -> LoraModule:
        return LoraModule(
            name=Q0, a=MemoryTensor("a", torch.full((1, 4), a)), b=MemoryTensor("b", b),
            alpha=1.0, scale=1.0, config_rank=1,
            bias=None if bias is None else MemoryTensor("c", bias),
        )  # fmt: skip

    check_result({Q0: module(torch.full((4, 1), 1.5e38))}, "resized", "fix")  # 3e38: fits
    for bad in (
        module(torch.full((4, 1), 3e38)),  # B·A = 6e38: finite factors, beyond float32
        module(torch.tensor([[1.0], [float("nan")], [1.0], [1.0]])),
        module(torch.ones(4, 1), torch.tensor([1.0, float("inf"), 0.0, 0.0])),
    ):
        with pytest.raises(ValidationFailed, match=f"^{Q0}: the resized .*; nothing was written"):
            check_result({Q0: bad}, "resized", "fix")


# --- --quantize nf4: a delta error above 1 is loud; --max-delta-error refuses ---------------------


@pytest.fixture(scope="module")
def nf4_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-bit base (hidden 64: real 4-bit blocks) and an adapter whose ΔW is far below the
    NF4 step (lora_alpha 1e-4): re-quantisation erases it and moves the weights further."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("nf4")
    model = llama_model(hidden=64, vocab=96)
    save_base(model, root / "base")
    peft_adapter(model, root / "tiny")
    edit_config(root / "tiny", lora_alpha=1e-4)
    return root


def test_nf4_delta_error_above_one_is_a_loud_warning(nf4_tiny: Path, tmp_path: Path) -> None:
    base, tiny = nf4_tiny / "base", nf4_tiny / "tiny"
    r = _run("merge", base, tiny, "-o", tmp_path / "o", "--quantize", "nf4", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    layers = data["layers"]
    worst = max(layers, key=lambda x: x["delta_error"])
    over = [x["name"] for x in layers if x["delta_error"] > 1.0]
    assert worst["delta_error"] > 10 and len(over) == len(MODULES)
    alerts = [w for w in data["warnings"] if "worse than not merging the adapter" in w]
    assert len(alerts) == 1, data["warnings"]
    assert f"worst {worst['delta_error']:.3g} in {worst['name']}" in alerts[0]
    assert f"in {len(over)} of {len(layers)} layer(s)" in alerts[0] and over[0] in alerts[0]
    text = _run("merge", base, tiny, "-o", tmp_path / "t", "--quantize", "nf4")
    assert text.exit_code == 0, text.output
    loud = [line for line in text.stderr.splitlines() if line.startswith("WARNING: ")]
    assert len(loud) == 1 and worst["name"] in loud[0], text.stderr
    assert "Warning: 4-bit" not in text.stderr  # said once, loudly
    # --max-delta-error: a layer above the limit fails, leaving nothing.
    out = tmp_path / "limited"
    refused = _run("merge", base, tiny, "-o", out, "--quantize", "nf4", "--max-delta-error", 1)
    assert refused.exit_code == 3, refused.output
    assert worst["name"] in refused.stderr and "--max-delta-error 1" in refused.stderr
    assert not out.exists() and not list(tmp_path.glob(".limited.partial-*"))
    lenient = _run("merge", base, tiny, "-o", out, "--quantize", "nf4", "--max-delta-error", 1e9)
    assert lenient.exit_code == 0, lenient.output


@pytest.mark.parametrize(
    "case", ["normal", "tiny", "huge", "squares-overflow", "subnormal", "nan", "inf"]
)
def test_entry_bound_bounds_the_exact_largest_entry(case: str) -> None:
    """``lowrank.entry_bound`` (the merge's range check) is never below max |s·B·A| computed
    exactly enough (float64 products of float32 factors), through its float32 pass and its
    scaled float64 fallback (squares that overflow or underflow float32, NaN, Inf)."""
    from adapterctl.lowrank import entry_bound

    rng = np.random.default_rng(7)
    scale = {"normal": 1.0, "tiny": 1e-25, "huge": 1e18, "squares-overflow": 3e20,
             "subnormal": 1e-42, "nan": 1.0, "inf": 1.0}[case]  # fmt: skip
    b = (rng.standard_normal((300, 16)) * scale).astype(np.float32)  # (out, r)
    a = rng.standard_normal((16, 500)).astype(np.float32)  # (r, in)
    if case in ("nan", "inf"):
        a[3, 7] = np.nan if case == "nan" else np.inf
        assert entry_bound(b, a, 2.0) == float("inf")
        return
    exact = float(np.abs(2.0 * (b.astype(np.float64) @ a.astype(np.float64))).max())
    bound = entry_bound(b, a, 2.0)
    assert exact <= bound <= exact * 20  # Cauchy–Schwarz: loose, never below
    col = float(np.sqrt((a.astype(np.float64) ** 2).sum(0).max()))
    row = float(np.sqrt((b.astype(np.float64) ** 2).sum(1).max()))
    assert bound >= 2.0 * row * col  # at least the exact product of the largest norms
