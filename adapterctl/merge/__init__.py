"""The streaming merge of LoRA adapters into a base checkpoint.

Every output header is planned before the first byte is written (``plan.plan_merge``); then
each tensor is read once, merged in float32 on the chosen device and rounded once into its
output dtype, and written (``run_merge``). Tensors no adapter touches are copied as bytes. The
output goes to a temporary sibling folder that is renamed into place only when complete.

Two engines write the plan: ``numpy_engine`` (one worker thread per core, no torch import) for
16/32-bit merges on the CPU, and ``torch_engine`` for everything else (CUDA, bitsandbytes
4-bit in or out, ``--method``, DoRA on GPT-2 Conv1D). ``output`` writes the side files and the
report; ``verify`` checks the result.

For a target weight W: W' = W + Σᵢ wᵢ·scaleᵢ·ΔWᵢ, ΔW = B·A in the weight's layout. A DoRA
adapter (merged alone) gives W' = m / ‖W + s·B·A‖_row · (W + s·B·A), the norm taken per output
row as PEFT takes it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterctl.adapter import Adapter
from adapterctl.checkpoint import Checkpoint
from adapterctl.device import resolve_device
from adapterctl.errors import AdapterctlError, Conflict, OperationalError, ValidationFailed
from adapterctl.files import fsync_dir, replace_dir
from adapterctl.merge.output import build_report, dry_run_report, provenance_json, write_side_files
from adapterctl.merge.plan import (
    DTYPE_CHOICES,
    LayerError,
    MergePlan,
    MergeReport,
    plan_merge,
)
from adapterctl.merge.writing import Overflow
from adapterctl.tensorfile import BYTES_READ

__all__ = [
    "DTYPE_CHOICES",
    "LayerError",
    "MergePlan",
    "MergeReport",
    "check_base_pins",
    "dry_run_report",
    "merge",
    "plan_merge",
    "run_merge",
]


def run_merge(
    plan: MergePlan,
    out: str | os.PathLike[str],
    *,
    device: str = "auto",
    force: bool = False,
    verify: bool = False,
    max_delta_error: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    fsync: bool = False,
) -> MergeReport:
    """Write the planned checkpoint to ``out``, atomically.

    Args:
        plan: from ``plan_merge``.
        out: the output folder; refused if it exists unless ``force``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``: where the float32 math runs.
        force: replace an existing ``out``.
        verify: re-read the output and check sampled rows of every merged tensor against a
            fresh float64 computation.
        max_delta_error: with 4-bit output, fail (exit 3) when the overall delta error is
            above this; nothing is left behind.
        progress: called once per tensor written, with (bytes written so far, total bytes).
        fsync: flush every shard to the disk before the rename (survives a power loss, at
            the disk's write speed). Without it, as with ``cp`` and ``save_pretrained``, the
            OS writes the data back in its own time; the rename still guarantees that an
            interrupted process never leaves a half-written OUT.

    Returns:
        The report (also written, with the provenance, to ``out/adapterctl.json``).

    Raises:
        Conflict: ``out`` exists and ``force`` is False.
        OperationalError: not enough free disk space, or an I/O error.
        ValidationFailed: the delta error exceeded ``max_delta_error``.
    """
    out_path = Path(out)
    dev = resolve_device(device)
    if out_path.exists() and not force:
        raise Conflict(f"{out_path} already exists; pass --force to replace it")
    parent = out_path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_path)
    free = shutil.disk_usage(parent).free
    need = plan.bytes_out + (1 << 20)
    if free < need:
        raise OperationalError(
            f"not enough free space in {parent}: the merge writes {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free some space or choose another -o"
        )
    tmp = parent / f".{out_path.name}.partial-{os.getpid()}"
    tmp.mkdir()
    _keep_heap_small()
    start = time.perf_counter()
    read_before = BYTES_READ.value
    try:
        overflow = Overflow()
        engine, kernel, layers = _execute(plan, tmp, dev, progress, fsync, overflow)
        report = build_report(plan, out_path, dev, layers, time.perf_counter() - start)
        report.engine, report.kernel = engine, kernel
        overflowed = overflow.warning()
        if overflowed:
            report.warnings.append(overflowed)
        report.bytes_read = BYTES_READ.value - read_before + _copied_bytes(plan)
        err = report.delta_error
        if max_delta_error is not None and err is not None and err > max_delta_error:
            raise ValidationFailed(
                f"4-bit re-quantisation kept too little of the adapter: delta error "
                f"{report.delta_error:.3f} > --max-delta-error {max_delta_error}; "
                "merge without --quantize"
            )
        write_side_files(plan, tmp, report)
        if verify:
            from adapterctl.merge.verify import verify_output

            report.verified = verify_output(plan, tmp)
            (tmp / "adapterctl.json").write_text(provenance_json(plan, report))
        if fsync:
            fsync_dir(tmp)
        replace_dir(tmp, out_path)
        return report
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, AdapterctlError) or exc.filename:
            raise
        # A write that failed mid-merge (a full disk, a quota, an I/O error) names no file.
        raise OperationalError(
            f"{out_path}: writing the merged model failed ({exc.strerror or exc}); nothing "
            "was left behind; free some space or choose another -o"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _execute(
    plan: MergePlan,
    tmp: Path,
    dev: str,
    progress: Callable[[int, int], None] | None,
    durable: bool,
    overflow: Overflow,
) -> tuple[str, str | None, list[LayerError]]:
    """Write the plan's shards into ``tmp`` with the engine that fits: NumPy on the CPU for
    plain 16/32-bit merges (``numpy_engine``: no torch import), torch otherwise. Returns the
    engine's name, the NumPy engine's kernel (None for torch) and the 4-bit layers' delta
    errors."""
    from adapterctl.merge import numpy_engine

    if dev == "cpu" and numpy_engine.supports(plan):
        return "numpy", numpy_engine.write_shards(plan, tmp, progress, durable, overflow), []
    from adapterctl.merge import torch_engine

    layers = torch_engine.write_shards(plan, tmp, dev, progress, durable, overflow)
    return "torch", None, layers


def _keep_heap_small() -> None:
    """Make glibc hand big tensor buffers back to the OS when freed.

    glibc raises its mmap threshold after large frees, after which freed tensor memory stays
    in the heap (per thread) and the process's anonymous memory grows with each tensor;
    fixing the threshold keeps peak memory at the few tensors actually alive.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _remove_stale_partials(out_path: Path) -> None:
    """Delete partial outputs of earlier runs that were killed (their process is gone)."""
    parent = out_path.resolve().parent
    for p in parent.glob(f".{out_path.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copied_bytes(plan: MergePlan) -> int:
    return sum(j.source.nbytes for j in plan.jobs if j.copy_bytes and j.source is not None)


# ------------------------------------------------------------------- shared by the engines


def check_base_pins(
    versions: list[Any], base: Checkpoint, *, allow_mismatch: bool = False
) -> tuple[list[str], list[str]]:
    """Check each registry input's base pin against ``base`` (DESIGN: "Identity").

    Args:
        versions: ``adapterctl.refs.registry_versions`` of the SOURCEs (None: a local path,
            which has no pin to check).
        base: the checkpoint about to be merged into.
        allow_mismatch: report a mismatch as a warning instead of refusing.

    Returns:
        (what was checked, one line per input; warnings for allowed mismatches).

    Raises:
        Conflict: a pin differs from ``base`` and ``allow_mismatch`` is False (exit 5).
    """
    if not any(v is not None for v in versions):
        return [], []
    from adapterctl.registry import Registry

    checks: list[str] = []
    warnings: list[str] = []
    with Registry(create=False) as reg:
        for v in versions:
            if v is None:
                continue
            try:
                checks.append(f"{v.ref}: base pin checked by {reg.check_base_pin(v, base)}")
            except Conflict as exc:
                if not allow_mismatch:
                    raise
                warnings.append(f"--allow-base-mismatch: {exc}")
    return checks, warnings


def merge(
    base: Checkpoint,
    adapters: list[Adapter],
    out: str | os.PathLike[str],
    weights: list[float] | None = None,
    **options: Any,
) -> MergeReport:
    """Plan and run a merge in one call (see ``plan_merge`` and ``run_merge`` for options).

    Example:
        >>> from adapterctl.checkpoint import open_checkpoint
        >>> from adapterctl.formats import read
        >>> report = merge(open_checkpoint("base"), [read("adapter")], "merged")
        >>> report.tensors_merged[:1]
        ['model.layers.0.self_attn.q_proj.weight']
    """
    plan_keys = {"dtype", "quantize", "quant_method", "max_shard_size", "method", "method_options"}
    plan = plan_merge(
        base, adapters, weights, **{k: v for k, v in options.items() if k in plan_keys}
    )
    return run_merge(plan, out, **{k: v for k, v in options.items() if k not in plan_keys})
