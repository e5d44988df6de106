"""The streaming merge against float64 math (PEFT's own merge on a float64 copy) and PEFT."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import gpt2_model, llama_model, peft_adapter, save_base
from click.testing import CliRunner
from safetensors.torch import load_file

from adapterctl.checkpoint import open_checkpoint
from adapterctl.cli import cli
from adapterctl.formats import read
from adapterctl.merge import merge, plan_merge


def _state(out: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _peft_merged64(pm: Any) -> dict[str, torch.Tensor]:
    """PEFT's merge on a float64 copy: the exact reference."""
    return {k: v for k, v in copy.deepcopy(pm).double().merge_and_unload().state_dict().items()}


def _assert_rounded_once(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Every tensor equals the float64 reference rounded once (0.5 ulp + float32 noise)."""
    worst = 0.0
    for name, got in ours.items():
        r = ref[name].double()
        eps = torch.finfo(got.dtype).eps
        err = (got.double() - r).abs()
        tol = r.abs() * eps / 2 + r.abs().max() * 2e-6 + 1e-12
        assert bool((err <= tol).all()), f"{name}: max err {float(err.max())}"
        worst = max(worst, float(err.max()))
    return worst


def _max_err(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((v.double() - ref[k].double()).abs().max()) for k, v in ours.items())


@dataclass(frozen=True)
class Engine:
    """How a test asks for one CPU engine: ``name`` as the report gives it, ``kwargs`` for
    ``merge``/``run_merge``."""

    name: str
    kwargs: dict[str, str]


@pytest.fixture(params=["numpy", "numpy-no-kernel", "torch"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """Run a test with each CPU engine, chosen by ``merge``'s arguments — ``numpy_engine`` with
    its compiled kernel (chunks of up to 1000 elements: several rows, tiles of 4 rows cut
    short), ``numpy_engine`` on NumPy alone and ``torch_engine`` (chunks of 64 elements) — so
    that every tensor spans several chunks."""
    from adapterctl.merge import numpy_engine, torch_engine

    monkeypatch.setattr(torch_engine, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(numpy_engine, "CHUNK_ELEMENTS", 64)
    if request.param == "numpy":
        if numpy_engine.choose_kernel("auto") is None:
            pytest.skip("no compiled merge kernel (adapterctl-fused not installed or not built)")
        monkeypatch.setattr(numpy_engine, "CHUNK_ELEMENTS", 1000)
        monkeypatch.setattr(numpy_engine, "KERNEL_BLOCK_ELEMENTS", 1000)
        return Engine("numpy", {"engine": "numpy", "kernel": "auto"})
    if request.param == "numpy-no-kernel":
        return Engine("numpy", {"engine": "numpy", "kernel": "none"})
    return Engine("torch", {"engine": "torch"})


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A bf16 Llama base, and the same weights as a float32 model for PEFT."""
    d = tmp_path_factory.mktemp("llama")
    m = llama_model()
    save_base(m, d / "base", torch.bfloat16)
    model32 = llama_model().to(torch.bfloat16).float()
    return model32, d / "base"


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {
        "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        "alpha_pattern": {"q_proj": 3},
    },
    "dora": {"use_dora": True},
    "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "all_linear": {"target_modules": "all-linear"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_float64_rounded_once(
    case: str, engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    from adapterctl.merge import numpy_engine

    model32, base = llama_base
    pm, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a", **CASES[case])
    plan = plan_merge(open_checkpoint(base), [read(adapter)])
    assert numpy_engine.supports(plan)  # every case runs on either engine
    report = merge(
        open_checkpoint(base), [read(adapter)], tmp_path / "out", device="cpu", **engine.kwargs
    )
    assert report.tensors_merged and report.engine == engine.name
    if engine.name == "numpy":
        assert report.kernel == merge_cpu_kernel_name(engine)
    ours = _state(tmp_path / "out")
    ref = _peft_merged64(pm)
    assert set(ours) == set(ref)
    ours_err = _assert_rounded_once(ours, ref)
    # PEFT's own merge in the weight dtype is a cross-check: we are never worse.
    peft16 = copy.deepcopy(pm).to(torch.bfloat16).merge_and_unload().state_dict()
    assert ours_err <= _max_err({k: peft16[k] for k in ours}, ref)


def merge_cpu_kernel_name(engine: Engine) -> str:
    """What the NumPy engine's report names as having summed, for ``engine``'s choice."""
    from adapterctl.merge import numpy_engine

    kernel = numpy_engine.choose_kernel(engine.kwargs.get("kernel"))
    return "numpy" if kernel is None else kernel.label


def test_kernel_vector_width_can_be_chosen(
    llama_base: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ADAPTERCTL_FUSED=<width> runs the compiled kernel's narrower code (exact as well); a
    width the CPU lacks is refused before anything is written (exit 2)."""
    fused = pytest.importorskip("adapterctl_fused._fused", reason="no compiled merge kernel")
    model32, base = llama_base
    pm, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a", target_modules="all-linear")
    monkeypatch.setenv("ADAPTERCTL_FUSED", fused.ISAS[-1])
    report = merge(open_checkpoint(base), [read(adapter)], tmp_path / "out", device="cpu")
    assert report.kernel == f"fused-{fused.ISAS[-1]}"
    _assert_rounded_once(_state(tmp_path / "out"), _peft_merged64(pm))
    monkeypatch.setenv("ADAPTERCTL_FUSED", "avx1024")
    out = tmp_path / "out2"
    res = CliRunner().invoke(
        cli, ["merge", str(base), str(adapter), "-o", str(out), "--device", "cpu"]
    )
    assert res.exit_code == 2, res.output
    assert f"ADAPTERCTL_FUSED=avx1024: this CPU runs {', '.join(fused.ISAS)}" in res.output
    assert not out.exists() and not list(tmp_path.glob(".out2*"))


def test_gpt2_conv1d_lora_bias(engine: Engine, tmp_path: Path) -> None:
    base = save_base(gpt2_model(), tmp_path / "base", torch.bfloat16)
    model32 = gpt2_model().to(torch.bfloat16).float()
    pm, adapter = peft_adapter(
        model32, tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True, lora_bias=True,
    )  # fmt: skip
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "out", device="cpu", **engine.kwargs)
    ours = _state(tmp_path / "out")
    ref = _peft_merged64(pm)
    _assert_rounded_once(ours, {k: ref[k] for k in ours})
    before = gpt2_model().state_dict()["transformer.h.0.attn.c_attn.bias"]
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.bias"].float(), before)


def test_two_adapters_weighted(
    engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    pm1, a1 = peft_adapter(copy.deepcopy(model32), tmp_path / "a1", seed=1)
    pm2, a2 = peft_adapter(
        copy.deepcopy(model32), tmp_path / "a2", seed=2, r=2, target_modules=["q_proj", "o_proj"]
    )
    merge(
        open_checkpoint(base),
        [read(a1), read(a2)],
        tmp_path / "out",
        [0.7, -0.3],
        device="cpu",
        **engine.kwargs,
    )
    base64 = {k: v.double() for k, v in model32.state_dict().items()}
    d1 = {k: v - base64[k] for k, v in _peft_merged64(pm1).items()}
    d2 = {k: v - base64[k] for k, v in _peft_merged64(pm2).items()}
    ref = {k: base64[k] + 0.7 * d1[k] - 0.3 * d2[k] for k in base64}
    _assert_rounded_once(_state(tmp_path / "out"), ref)


def test_merged_model_loads_and_matches_peft_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = llama_model()
    base = save_base(model, tmp_path / "base")  # float32: logits comparable to 1e-5
    pm, adapter = peft_adapter(copy.deepcopy(model), tmp_path / "a", target_modules="all-linear")
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = copy.deepcopy(pm).merge_and_unload()(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    provenance = json.loads((tmp_path / "o" / "adapterctl.json").read_text())
    assert provenance["adapters"][0]["digest"].startswith("sha256:")
    assert provenance["base"]["fingerprint"].startswith("sha256:")


def test_sharded_base_keeps_sharding_and_max_shard_size_repacks(tmp_path: Path) -> None:
    model = llama_model(layers=4, hidden=32)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="40KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    pm, adapter = peft_adapter(copy.deepcopy(model), tmp_path / "a")
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "o1", device="cpu")
    assert sorted(p.name for p in (tmp_path / "o1").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "o1" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    _assert_rounded_once(_state(tmp_path / "o1"), _peft_merged64(pm))
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "o2", max_shard_size=10**9)
    assert [p.name for p in (tmp_path / "o2").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "o2" / "model.safetensors.index.json").exists()


def test_out_exists_needs_force_and_dry_run_writes_nothing(
    llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert (
        "would write" in r.output and "merge    model.layers.0.self_attn.q_proj.weight" in r.output
    )
    assert not out.exists()
    out.mkdir()
    r = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(out)])
    assert r.exit_code == 5
    assert "already exists" in r.output and "--force" in r.output
    r = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(out), "--force", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tensors_merged"] and (out / "model.safetensors").exists()


def test_dora_with_other_adapters_is_refused(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    model32, base = llama_base
    _, dora = peft_adapter(copy.deepcopy(model32), tmp_path / "d", use_dora=True)
    _, plain = peft_adapter(copy.deepcopy(model32), tmp_path / "p")
    r = CliRunner().invoke(
        cli, ["merge", str(base), str(dora), str(plain), "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 3  # as compose refuses a DoRA input (tests/test_exit_codes.py)
    assert "a DoRA adapter (use_dora) cannot be merged" in r.output and "not linear" in r.output
    assert not (tmp_path / "o").exists()


def test_wrong_base_is_refused_before_writing(tmp_path: Path) -> None:
    base = save_base(llama_model(hidden=32), tmp_path / "base")
    _, adapter = peft_adapter(llama_model(), tmp_path / "a")
    r = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "o")])
    assert r.exit_code == 3
    assert "does not fit" in r.output and "AC202" in r.output
    assert not (tmp_path / "o").exists()


def test_weight_count_mismatch_is_usage_error(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    r = CliRunner().invoke(
        cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "-w", "1", "-w", "2"]
    )
    assert r.exit_code == 2


def test_tokenizer_files_and_resized_vocab_come_from_adapter(
    engine: Engine, tmp_path: Path
) -> None:
    model = llama_model()
    base = save_base(model, tmp_path / "base")
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    (base / "generation_config.json").exists()
    grown = copy.deepcopy(model)
    grown.resize_token_embeddings(70)
    pm, adapter = peft_adapter(grown, tmp_path / "a", target_modules=["q_proj"],
                               modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "o", device="cpu", **engine.kwargs)
    out = tmp_path / "o"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 70
    state = _state(out)
    assert state["model.embed_tokens.weight"].shape == (70, 16)
    _assert_rounded_once(state, _peft_merged64(pm))


def test_plan_is_planned_before_writing(
    engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    plan = plan_merge(open_checkpoint(base), [read(adapter)], dtype="fp32")
    assert plan.bytes_out == sum(e[3] for s in plan.shards for e in s.entries())
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "o", dtype="fp32", **engine.kwargs)
    header_size = (tmp_path / "o" / "model.safetensors").stat().st_size
    assert header_size > plan.bytes_out  # header + exactly the planned bytes
    assert all(v.dtype == torch.float32 for v in _state(tmp_path / "o").values())
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_output_dtypes_round_once(
    dtype: str, engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    pm, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a", target_modules="all-linear")
    merge(
        open_checkpoint(base),
        [read(adapter)],
        tmp_path / "o",
        dtype=dtype,
        device="cpu",
        **engine.kwargs,
    )
    ours = _state(tmp_path / "o")
    want = torch.float16 if dtype == "fp16" else torch.float32
    assert {v.dtype for v in ours.values()} == {want}
    _assert_rounded_once(ours, _peft_merged64(pm))


def test_legacy_bin_adapter_merges_like_its_safetensors_twin(
    engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    """A pickled adapter's tensors are in memory, a safetensors adapter's are mapped from its
    file: the same adapter gives the same bytes either way (LoRA and a saved lm_head)."""
    import shutil

    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a", modules_to_save=["lm_head"])
    legacy = tmp_path / "legacy"
    shutil.copytree(adapter, legacy)
    torch.save(load_file(str(legacy / "adapter_model.safetensors")), legacy / "adapter_model.bin")
    (legacy / "adapter_model.safetensors").unlink()
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "o1", device="cpu", **engine.kwargs)
    merge(open_checkpoint(base), [read(legacy)], tmp_path / "o2", device="cpu", **engine.kwargs)
    ours, theirs = _state(tmp_path / "o1"), _state(tmp_path / "o2")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merge_without_kernel_copies(
    engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where copy_file_range is refused (another filesystem, another OS), untouched tensors
    are copied by reads and writes, with the same result."""

    def refuse(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    model32, base = llama_base
    pm, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    report = merge(
        open_checkpoint(base), [read(adapter)], tmp_path / "o", device="cpu", **engine.kwargs
    )
    assert report.tensors_copied > 0
    _assert_rounded_once(_state(tmp_path / "o"), _peft_merged64(pm))


def test_progress_once_per_tensor(
    engine: Engine, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    from adapterctl.merge import run_merge

    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    plan = plan_merge(open_checkpoint(base), [read(adapter)])
    calls: list[tuple[int, int]] = []
    run_merge(plan, tmp_path / "o", device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert len(calls) == len(plan.jobs)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    written = sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors"))
    assert calls[-1] == (written, written)  # headers included: the bar ends at 100%


def test_dtype_casts_scalars_and_vectors(engine: Engine, tmp_path: Path) -> None:
    """--dtype casts every floating tensor, 0-d scalars and 1-d vectors included."""
    from safetensors.torch import save_file

    model = llama_model()
    base = save_base(model, tmp_path / "base", torch.bfloat16)
    state = load_file(str(base / "model.safetensors"))
    state["logit_scale"] = torch.tensor(2.5, dtype=torch.bfloat16)  # 0-d, as in CLIP-style heads
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    pm, adapter = peft_adapter(model.to(torch.bfloat16).float(), tmp_path / "a")
    merge(
        open_checkpoint(base),
        [read(adapter)],
        tmp_path / "o",
        dtype="fp16",
        device="cpu",
        **engine.kwargs,
    )
    ours = _state(tmp_path / "o")
    assert ours["logit_scale"].dtype == torch.float16 and float(ours["logit_scale"]) == 2.5
    assert ours["model.norm.weight"].dtype == torch.float16
    ref = _peft_merged64(pm)
    _assert_rounded_once({k: v for k, v in ours.items() if k in ref}, ref)


def test_float16_overflow_is_refused(engine: Engine, tmp_path: Path) -> None:
    """A bf16 value beyond float16's range would become inf in an fp16 output: the merge
    refuses it (exit 3), naming the tensor and the count, and leaves nothing behind (PEFT and a
    plain cast do it silently)."""
    from safetensors.torch import save_file

    from adapterctl.errors import ValidationFailed

    model = llama_model()
    base = save_base(model, tmp_path / "base", torch.bfloat16)
    state = load_file(str(base / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name][0, :3] = 1e5
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    _, adapter = peft_adapter(model.to(torch.bfloat16).float(), tmp_path / "a")
    with pytest.raises(ValidationFailed, match=f"{name}: 3 merged value.*--dtype bf16"):
        merge(open_checkpoint(base), [read(adapter)], tmp_path / "o", dtype="fp16", **engine.kwargs)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
    clean = merge(
        open_checkpoint(base), [read(adapter)], tmp_path / "o2", dtype="bf16", **engine.kwargs
    )
    assert not any("float16" in w for w in clean.warnings)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
@pytest.mark.parametrize("method", [False, True], ids=["numpy-engine", "torch-engine"])
def test_interrupted_merge_leaves_no_output_and_rerun_works(
    sig: signal.Signals, method: bool, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    out, marker = tmp_path / "out", tmp_path / "paused"
    args = ["merge", str(base), str(adapter), "-o", str(out)]
    if method:  # --method runs on the torch engine
        args += [str(adapter), "--method", "ties", "--density", "0.5"]
    # The fault is injected from outside: the CLI runs with the library's run_merge wrapped so
    # that its progress callback (called between tensors) stops after the third tensor.
    pause = (
        "import sys, threading, pathlib, signal\n"
        # a shell's background job starts with SIGINT ignored, and so would this child:
        # Ctrl-C at a terminal reaches a process that has Python's default handler
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import adapterctl.merge as m\n"
        "real = m.run_merge\n"
        "def run_merge(plan, out, **kw):\n"
        "    calls = []\n"
        "    def progress(done, total):\n"
        "        calls.append(done)\n"
        "        if len(calls) == 3:\n"
        f"            pathlib.Path({str(marker)!r}).write_text('')\n"
        "            threading.Event().wait(600)\n"
        "    return real(plan, out, **{**kw, 'progress': progress})\n"
        "m.run_merge = run_merge\n"
        "from adapterctl.cli import main\n"
        "sys.argv = ['adapterctl', *sys.argv[1:]]\n"
        "main()\n"
    )
    cmd = [sys.executable, "-c", pause, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    (partial,) = tmp_path.glob(".out.partial-*")
    assert (partial / "model.safetensors").exists()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    if sig == signal.SIGINT:  # Ctrl-C: one line, exit 130, the partial folder removed
        assert proc.returncode == 130
        assert b"Error: interrupted" in err and b"Traceback" not in err
        assert not partial.exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "adapterctl", *args], capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "model.safetensors").exists()
    assert not partial.exists()  # a killed run's leftovers are cleaned up by the next


@pytest.mark.parametrize("kind", ["lora", "dora", "ties", "gpt2-dora"])
def test_verify_catches_a_corrupted_tensor(
    kind: str, llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    """--verify recomputes sampled rows (row by row for LoRA and DoRA; from whole tensors for
    --method and Conv1D DoRA): a tensor zeroed after writing must fail it."""
    from adapterctl.errors import ValidationFailed
    from adapterctl.merge import run_merge
    from adapterctl.merge.verify import verify_output
    from adapterctl.tensorfile import read_header

    model32, base = llama_base
    options: dict[str, Any] = {}
    name = "model.layers.1.self_attn.q_proj.weight"
    if kind == "gpt2-dora":
        base = save_base(gpt2_model(), tmp_path / "gpt2")
        lora = {"target_modules": ["c_attn"], "fan_in_fan_out": True, "use_dora": True}
        _, a = peft_adapter(gpt2_model(), tmp_path / "a", **lora)
        adapters = [read(a)]
        name = "transformer.h.1.attn.c_attn.weight"
    else:
        _, a = peft_adapter(copy.deepcopy(model32), tmp_path / "a", use_dora=kind == "dora")
        adapters = [read(a)]
    if kind == "ties":
        _, a2 = peft_adapter(copy.deepcopy(model32), tmp_path / "a2", seed=2)
        adapters.append(read(a2))
        options = {"method": "ties", "method_options": {"density": 0.5}}
    plan = plan_merge(open_checkpoint(base), adapters, **options)
    out = tmp_path / "o"
    run_merge(plan, out, device="cpu")
    assert verify_output(plan, out) > 0
    info = read_header(out / "model.safetensors").tensors[name]
    with open(info.path, "r+b") as fh:
        fh.seek(info.start)
        fh.write(bytes(info.nbytes))  # every row of one merged tensor zeroed
    with pytest.raises(ValidationFailed, match=name):
        verify_output(plan, out)


def test_verify_flag(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a", use_dora=True)
    r = CliRunner().invoke(
        cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--verify", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verified"] > 0
    # DoRA has no exact value to round to: the report says what it got instead
    assert "DoRA, lora bias and --method tensors: float32" in json.loads(r.stdout)["rounding"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_agrees_with_cpu(llama_base: tuple[Any, Path], tmp_path: Path) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a", target_modules="all-linear")
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "cpu", device="cpu")
    merge(open_checkpoint(base), [read(adapter)], tmp_path / "gpu", device="cuda")
    cpu, gpu = _state(tmp_path / "cpu"), _state(tmp_path / "gpu")
    for k in cpu:
        torch.testing.assert_close(gpu[k].float(), cpu[k].float(), rtol=1e-2, atol=1e-5)


def _dense_ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES written out in float64 (adapterctl convention: weight, elect by total, disjoint
    mean over the agreeing weights' magnitudes)."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        threshold = d.abs().reshape(-1).sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    tasks = [w * t for w, t in zip(weights, trimmed, strict=True)]
    sign = torch.where(sum(tasks) >= 0, 1.0, -1.0).double()
    num = sum(t * (t.sign() == sign) for t in tasks)
    den = sum(abs(w) * (t.sign() == sign) for w, t in zip(weights, tasks, strict=True))
    return num / torch.where(den == 0, torch.ones_like(den), den)


def test_merge_method_ties_equals_base_plus_dense_ties(
    llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    pm1, a1 = peft_adapter(copy.deepcopy(model32), tmp_path / "a1", seed=1)
    pm2, a2 = peft_adapter(copy.deepcopy(model32), tmp_path / "a2", seed=2, r=2)
    r = CliRunner().invoke(
        cli,
        ["merge", str(base), str(a1), str(a2), "-w", "0.6", "-w", "0.4", "-o",
         str(tmp_path / "o"), "--method", "ties", "--density", "0.5", "--verify"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    base64 = {k: v.double() for k, v in model32.state_dict().items()}
    d1 = {k: v - base64[k] for k, v in _peft_merged64(pm1).items()}
    d2 = {k: v - base64[k] for k, v in _peft_merged64(pm2).items()}
    ref = {}
    for k, w in base64.items():
        touched = bool(d1[k].abs().max() > 0 or d2[k].abs().max() > 0)
        ref[k] = w + _dense_ties([d1[k], d2[k]], [0.6, 0.4], 0.5) if touched else w
    _assert_rounded_once(_state(tmp_path / "o"), ref)
    provenance = json.loads((tmp_path / "o" / "adapterctl.json").read_text())
    assert provenance["method"]["name"] == "ties"


def test_merge_method_dare_is_reproducible_with_seed(
    llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    _, a1 = peft_adapter(copy.deepcopy(model32), tmp_path / "a1", seed=1)
    _, a2 = peft_adapter(copy.deepcopy(model32), tmp_path / "a2", seed=2)
    outs = []
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        merge(
            open_checkpoint(base), [read(a1), read(a2)], tmp_path / name,
            method="dare_linear", method_options={"density": 0.3, "seed": seed},
        )  # fmt: skip
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


@pytest.mark.parametrize(
    "args",
    [["--method", "cat"], ["--density", "0.5"], ["--method", "ties", "--seed", "1", "--rank", "2"],
     ["--method", "nope"]],
)  # fmt: skip
def test_merge_method_bad_flags(
    args: list[str], llama_base: tuple[Any, Path], tmp_path: Path
) -> None:
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    r = CliRunner().invoke(
        cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), *args]
    )
    assert r.exit_code in (2, 4), r.output
    assert r.output.startswith("Error") or "Usage:" in r.output
    assert not (tmp_path / "o").exists()


def test_registry_sources_pin_check_and_register(
    llama_base: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERCTL_HOME", str(tmp_path / "home"))
    model32, base = llama_base
    _, adapter = peft_adapter(copy.deepcopy(model32), tmp_path / "a")
    runner = CliRunner()
    r = runner.invoke(cli, ["add", str(adapter), "--name", "chat", "--base", str(base)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "o"
    r = runner.invoke(
        cli, ["merge", str(base), "chat@1", "-o", str(out), "--register", "chat-merged", "--json"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["base_pin_checks"] == ["chat@1: base pin checked by fingerprint"]
    assert report["registered"] == "chat-merged@1"
    shown = json.loads(runner.invoke(cli, ["show", "chat-merged@1", "--json"]).stdout)
    assert [p["ref"] for p in shown["parents"]] == ["chat@1"]
    assert shown["method"] == "merge:linear"
    # Same shapes, other dtype: a different fingerprint, so the pin refuses it.
    other = save_base(llama_model(), tmp_path / "other")  # float32
    r = runner.invoke(cli, ["merge", str(other), "chat@1", "-o", str(tmp_path / "x")])
    assert r.exit_code == 5, r.output
    assert "--allow-base-mismatch" in r.output
    assert not (tmp_path / "x").exists()
    r = runner.invoke(
        cli, ["merge", str(other), "chat@1", "-o", str(tmp_path / "x"), "--allow-base-mismatch"]
    )
    assert r.exit_code == 0, r.output
    assert "--allow-base-mismatch" in r.stderr
    r = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "y"),
                            "--register", "nope"])  # fmt: skip
    assert r.exit_code == 2
    assert "registry reference" in r.output


def test_float32_base_is_never_written_through(tmp_path: Path) -> None:
    """float32 bases are read through read-only memory maps: the DoRA-on-Conv1D and --method
    paths, which work on a whole float32 weight in place, must copy it first."""
    base = save_base(gpt2_model(), tmp_path / "base")  # float32
    before = (base / "model.safetensors").read_bytes()
    pm, dora = peft_adapter(gpt2_model(), tmp_path / "d", target_modules=["c_attn", "c_proj"],
                            fan_in_fan_out=True, use_dora=True)  # fmt: skip
    merge(open_checkpoint(base), [read(dora)], tmp_path / "o1", verify=True)
    _assert_rounded_once(_state(tmp_path / "o1"), _peft_merged64(pm))
    _, a1 = peft_adapter(gpt2_model(), tmp_path / "a1", target_modules=["c_attn"], seed=1)
    _, a2 = peft_adapter(gpt2_model(), tmp_path / "a2", target_modules=["c_attn"], seed=2)
    merge(open_checkpoint(base), [read(a1), read(a2)], tmp_path / "o2", method="ties",
          method_options={"density": 0.5}, verify=True)  # fmt: skip
    assert (base / "model.safetensors").read_bytes() == before
