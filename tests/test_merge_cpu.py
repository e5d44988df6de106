"""The NumPy CPU engine: rounding identical to torch's, torch never imported for a plain
merge, routing to the torch engine, and bad input mid-merge."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import gpt2_model, llama_model, peft_adapter, save_base

from adapterctl import device
from adapterctl.checkpoint import open_checkpoint
from adapterctl.device import _nvidia_driver_present
from adapterctl.errors import OperationalError, UsageError
from adapterctl.formats import read
from adapterctl.merge import merge, numpy_engine, plan_merge, run_merge


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bf16 base, plain adapter, DoRA adapter)."""
    d = tmp_path_factory.mktemp("tiny")
    model = llama_model()
    base = save_base(model, d / "base", torch.bfloat16)
    model32 = llama_model().to(torch.bfloat16).float()
    _, plain = peft_adapter(copy.deepcopy(model32), d / "plain", target_modules="all-linear")
    _, dora = peft_adapter(copy.deepcopy(model32), d / "dora", use_dora=True)
    return base, plain, dora


def test_rounding_matches_torch_bit_for_bit() -> None:
    """float32 -> bfloat16/float16 as the engine rounds (``floats.round_bf16``, NumPy's cast)
    and as torch does: every bit pattern class, exact ties (to even), subnormals, infinities;
    NaN stays NaN of the same sign (tests/test_floats.py has the full sweep)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2**16, size=20_000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    special = np.array(
        [0x7F800000, 0xFF800000, 0x00000001, 0x00008000, 0x00018000, 0x7F7FFFFF, 0x80000000],
        dtype=np.uint32,
    )
    f = np.concatenate([bits, ties, special]).view(np.float32)
    nan = np.isnan(f)
    with np.errstate(over="ignore", invalid="ignore"):
        for dtype, torch_dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
            chunk = f.reshape(1, -1).copy()  # one row, as the engine's chunks come
            ours, _ = numpy_engine._round_rows(chunk, dtype)
            theirs = torch.from_numpy(f.copy()).to(torch_dtype)
            ours_bits = ours.reshape(-1).view(np.uint16)
            theirs_bits = theirs.view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(ours_bits[~nan], theirs_bits[~nan]), dtype
            assert np.isnan(theirs.float().numpy()[nan]).all()
            assert ((ours_bits[nan] & 0x7FFF) > (0x7F80 if dtype == "BF16" else 0x7C00)).all()
            assert np.array_equal(ours_bits[nan] >> 15, f[nan].view(np.uint32) >> 31)  # sign


def test_routing(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, plain, dora = tiny
    ckpt = open_checkpoint(base)
    assert numpy_engine.supports(plan_merge(ckpt, [read(plain)]))
    assert numpy_engine.supports(plan_merge(ckpt, [read(plain)], dtype="fp16"))
    assert numpy_engine.supports(plan_merge(ckpt, [read(dora)]))
    gpt2 = save_base(gpt2_model(), tmp_path / "gpt2", torch.bfloat16)
    lora = {"target_modules": ["c_attn"], "fan_in_fan_out": True, "use_dora": True}
    _, gpt2_dora = peft_adapter(gpt2_model(), tmp_path / "gd", **lora)
    assert not numpy_engine.supports(plan_merge(open_checkpoint(gpt2), [read(gpt2_dora)]))
    assert not numpy_engine.supports(
        plan_merge(ckpt, [read(plain), read(plain)], method="ties", method_options={"density": 0.5})
    )
    base64 = save_base(llama_model(), tmp_path / "b64", torch.float64)
    assert not numpy_engine.supports(plan_merge(open_checkpoint(base64), [read(plain)]))


_NO_TORCH = """
import sys
from adapterctl.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code)
"""


def _run_without_torch(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, timeout=120
    )
    return proc.stdout.strip().splitlines()[-1]


def test_plain_cpu_merge_and_validate_never_import_torch(
    tiny: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, plain, dora = tiny
    out = tmp_path / "o"
    assert _run_without_torch(
        "merge", str(base), str(plain), "-o", str(out), "--device", "cpu"
    ) == ("NO-TORCH 0")
    assert json.loads((out / "adapterctl.json").read_text())["result"]["tensors_merged"] > 0
    assert _run_without_torch("validate", str(plain), "--base", str(base)) == "NO-TORCH 0"
    if not _nvidia_driver_present():  # --device auto on a machine without CUDA
        args = ["merge", str(base), str(plain), "-o", str(tmp_path / "o2")]
        assert _run_without_torch(*args) == "NO-TORCH 0"
    args = ["merge", str(base), str(dora), "-o", str(tmp_path / "o3"), "--device", "cpu"]
    assert _run_without_torch(*args) == "NO-TORCH 0"  # DoRA (row norms) too
    # --method needs torch (and gets it).
    args = ["merge", str(base), str(plain), str(plain), "-o", str(tmp_path / "o4"),
            "--method", "ties", "--density", "0.5", "--device", "cpu"]  # fmt: skip
    assert _run_without_torch(*args) == "TORCH 0"


@pytest.mark.parametrize("use_numpy", [True, False])
def test_base_truncated_after_planning_is_refused_cleanly(
    use_numpy: bool, tiny: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import shutil

    base, plain, _ = tiny
    copy_of_base = tmp_path / "base"
    shutil.copytree(base, copy_of_base)
    plan = plan_merge(open_checkpoint(copy_of_base), [read(plain)])
    shard = copy_of_base / "model.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    with pytest.raises(OperationalError, match="shrank while the merge read"):
        run_merge(plan, tmp_path / "out", device="cpu", engine="numpy" if use_numpy else "torch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # nothing left behind


# Run in a child process: if the kernel's guard failed, SIGBUS would end it, not pytest.
_TRUNCATE_MAPPED = """
import sys
from adapterctl.cli import main
from adapterctl.merge import numpy_engine
shard = sys.argv[1]
real = numpy_engine._BaseFiles.mapped
def mapped_then_truncate(*args, **kwargs):
    view = real(*args, **kwargs)  # mapped and paged in: the kernel reads it next
    with open(shard, "r+b") as fh:
        fh.truncate(4096)
    return view
numpy_engine._BaseFiles.mapped = mapped_then_truncate
sys.argv = ["adapterctl", "merge", *sys.argv[2:]]
main()
"""


def test_base_truncated_while_the_kernel_reads_its_map(
    tiny: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The compiled kernel reads the base through a memory map; the file is truncated right
    after it is mapped, so the kernel's reads fault (SIGBUS): the kernel's guard turns that
    into the same one-line error, exit 1, nothing left behind."""
    import shutil
    import subprocess
    import sys

    if numpy_engine.choose_kernel("auto") is None:
        pytest.skip("no compiled merge kernel")
    base, plain, _ = tiny
    copy_of_base = tmp_path / "base"
    shutil.copytree(base, copy_of_base)
    shard = copy_of_base / "model.safetensors"
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-c", _TRUNCATE_MAPPED, str(shard), str(copy_of_base), str(plain),
         "-o", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "ADAPTERCTL_FUSED": "1"},
    )  # fmt: skip
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "shrank while the merge read" in res.stderr and str(shard) in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # nothing left behind


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_base_truncated_while_the_merge_reads_it(
    engine: str, tiny: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process truncates the base mid-merge: the read that comes after it fails
    cleanly (exit 1 naming the file; no SIGBUS, no traceback, nothing left behind). The
    truncation happens at a known point: right after the merge's first read of the base
    (NumPy alone: positioned reads; the kernel's memory maps are the test above)."""
    import shutil

    from click.testing import CliRunner

    from adapterctl.cli import cli
    from adapterctl.merge import torch_engine

    base, plain, _ = tiny
    copy_of_base = tmp_path / "base"
    shutil.copytree(base, copy_of_base)
    shard = copy_of_base / "model.safetensors"
    module, name = (
        (numpy_engine._BaseFiles, "read_rows")
        if engine == "numpy"
        else (torch_engine, "_read_tensor")
    )
    real = getattr(module, name)
    reads = [0]

    def read_then_truncate(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        reads[0] += 1
        if reads[0] == 1:
            with open(shard, "r+b") as fh:
                fh.truncate(4096)
        return result

    monkeypatch.setattr(module, name, read_then_truncate)
    out = tmp_path / "out"
    if engine == "numpy":  # what the command line runs for this merge, without the kernel
        monkeypatch.setenv("ADAPTERCTL_FUSED", "0")
        res = CliRunner().invoke(cli, ["merge", str(copy_of_base), str(plain), "-o", str(out)])
        assert res.exit_code == 1, res.output
        assert "shrank while the merge read" in res.output and str(shard) in res.output
        assert "Traceback" not in res.output
    else:
        with pytest.raises(OperationalError, match="shrank while the merge read"):
            merge(copy_of_base, [plain], out, engine="torch", device="cpu")
    assert reads[0] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # nothing left behind


def test_full_disk_mid_merge_names_the_output_and_leaves_nothing(
    tiny: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from click.testing import CliRunner

    from adapterctl.cli import cli

    base, plain, _ = tiny
    real_pwrite, calls = os.pwrite, [0]

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setenv("ADAPTERCTL_FUSED", "0")  # NumPy's path writes with os.pwrite
    out = tmp_path / "merged"
    r = CliRunner().invoke(cli, ["merge", str(base), str(plain), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert f"{out}: writing the merged model failed (No space left on device)" in r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []  # no OUT, no partial folder


def test_failed_write_in_the_kernel_names_the_output_and_leaves_nothing(
    tiny: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The compiled kernel writes the merged blocks itself: a write the system refuses there
    (here: past a file-size limit, EFBIG) ends the merge as a full disk does."""
    import resource
    import signal

    base, plain, _ = tiny
    out = tmp_path / "merged"

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
        # 10 kB of the 13 kB shard: the write that crosses it is a merged tensor's.
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    cmd = [sys.executable, "-m", "adapterctl", "merge", str(base), str(plain), "-o", str(out)]
    proc = subprocess.run(
        [*cmd, "--device", "cpu"], capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"Error: {out}: writing the merged model failed (File too large); nothing was left "
        "behind; free some space or choose another -o"
    )
    assert list(tmp_path.iterdir()) == []


def test_cgroup_quota_limits_workers(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("200000 100000\n")
    assert device._cgroup_cpu_quota(str(cpu_max)) == 2
    cpu_max.write_text("50000 100000\n")
    assert device._cgroup_cpu_quota(str(cpu_max)) == 1
    cpu_max.write_text("max 100000\n")
    assert device._cgroup_cpu_quota(str(cpu_max)) is None
    assert device._cgroup_cpu_quota(str(tmp_path / "missing")) is None
    assert 1 <= device.workers() <= device.MAX_WORKERS


def test_the_install_built_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a C compiler exists, ``make install`` must have installed and built the kernel
    plugin (a broken build would otherwise pass unnoticed, with every merge on the slower
    NumPy path), and the engine must find it through the plugin hook."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    try:
        from adapterctl_fused import _fused
    except ImportError as exc:
        pytest.fail(f"{cc} is installed but the merge kernel plugin was not built: {exc}")
    monkeypatch.delenv("ADAPTERCTL_FUSED", raising=False)
    kernel = numpy_engine.choose_kernel()
    assert kernel is not None and kernel.module is _fused
    assert kernel.label == f"fused-{_fused.ISAS[0]}"
    assert _fused.DTYPES == ("bfloat16", "float16", "float32")


def test_the_kernel_can_be_chosen_or_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``none`` (or ADAPTERCTL_FUSED=0) leaves the kernel unused: an escape hatch, and how the
    benchmark measures the NumPy path in the same run; a width nobody runs is refused."""
    monkeypatch.setenv("ADAPTERCTL_FUSED", "0")
    assert numpy_engine.choose_kernel() is None
    assert numpy_engine.choose_kernel("none") is None
    with pytest.raises(UsageError, match="ADAPTERCTL_FUSED=avx1024: this CPU runs"):
        numpy_engine.choose_kernel("avx1024")


def test_schedule_alternates_files_largest_first() -> None:
    """Workers take the jobs largest first, alternating between output files (two workers on
    one file wait on its lock)."""

    class J:
        def __init__(self, n: int) -> None:
            self.nbytes_out = n

    tasks = [(J(n), fd, 0) for fd, n in [(3, 10), (3, 50), (3, 30), (4, 40), (4, 5), (4, 20)]]
    order = [(t[1], t[0].nbytes_out) for t in numpy_engine._schedule(tasks)]  # type: ignore[arg-type]
    assert order == [(3, 50), (4, 40), (3, 30), (4, 20), (3, 10), (4, 5)]


def test_the_report_names_what_summed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors whose summed rank the kernel loses at go to NumPy, and the report says which
    summed: the kernel, NumPy, or both (a width that loses at rank 128: AVX2, or generic)."""
    widest = numpy_engine.choose_kernel("auto")
    if widest is None:
        pytest.skip("no compiled merge kernel")
    monkeypatch.setenv("ADAPTERCTL_FUSED", "avx2" if "avx2" in widest.module.ISAS else "generic")
    kernel = numpy_engine.choose_kernel()
    if kernel is None:
        pytest.skip("no compiled merge kernel")
    assert not kernel.pays(128, 16)
    isa = kernel.isa
    model = llama_model()
    base = open_checkpoint(save_base(model, tmp_path / "base", torch.bfloat16))
    _, low = peft_adapter(copy.deepcopy(model), tmp_path / "low", target_modules="all-linear")
    _, high = peft_adapter(copy.deepcopy(model), tmp_path / "high", r=128)  # q_proj, v_proj
    merged = {}
    for name, adapters in {"low": [low], "high": [high], "mixed": [low, high]}.items():
        report = run_merge(plan_merge(base, [read(a) for a in adapters]), tmp_path / f"o-{name}")
        merged[name] = report.kernel
    assert merged == {"low": f"fused-{isa}", "high": "numpy", "mixed": f"fused-{isa}+numpy"}
