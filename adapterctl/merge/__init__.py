"""The streaming merge of LoRA adapters into a base checkpoint.

Every output header is planned before the first byte is written (``plan.plan_merge``); then
each tensor is read once, merged in float32 on the chosen device and rounded once into its
output dtype, and written (``run_merge``). Tensors no adapter touches are copied as bytes. The
output goes to a temporary sibling folder that is renamed into place only when complete.

Two engines write the plan: ``numpy_engine`` (one worker thread per core, no torch import) for
16/32-bit merges on the CPU (calling a compiled kernel where one is installed and pays: the
``adapterctl-fused`` plugin), and ``torch_engine`` for everything else (CUDA, bitsandbytes
4-bit in or out, ``--method``, DoRA on GPT-2 Conv1D). Both take their arithmetic from
``math``. ``output`` writes the side files and the report; ``verify`` checks the result.

For a target weight W: W' = W + Σᵢ wᵢ·scaleᵢ·ΔWᵢ, ΔW = B·A in the weight's layout. A DoRA
adapter (merged alone) gives W' = m / ‖W + s·B·A‖_row · (W + s·B·A), the norm taken per output
row as PEFT takes it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.adapter import Adapter
from adapterctl.checkpoint import Checkpoint
from adapterctl.device import resolve_device
from adapterctl.errors import (
    AdapterctlError,
    OperationalError,
    UsageError,
)
from adapterctl.files import fsync_dir, refuse_existing, refuse_overlap, replace_dir
from adapterctl.merge import rounding
from adapterctl.merge.output import (
    build_report,
    check_delta_error,
    dry_run_report,
    provenance_json,
    write_side_files,
)
from adapterctl.merge.plan import (
    DTYPE_CHOICES,
    LayerError,
    MergePlan,
    MergeReport,
    plan_merge,
)
from adapterctl.merge.writing import Overflow
from adapterctl.tensorfile import BYTES_READ

if TYPE_CHECKING:
    from adapterctl.merge.numpy_engine import Kernel

ENGINES = ("auto", "numpy", "torch")

__all__ = [
    "DTYPE_CHOICES",
    "ENGINES",
    "LayerError",
    "MergePlan",
    "MergeReport",
    "check_base_pins",
    "choose_engine",
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
    engine: str = "auto",
    kernel: str | None = None,
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
        engine: ``auto`` (``choose_engine``), ``numpy`` or ``torch``.
        kernel: the NumPy engine's compiled kernel: ``auto``, ``none`` or a vector width
            (``numpy_engine.choose_kernel``; default ``ADAPTERCTL_FUSED``, else ``auto``).
        force: replace an existing ``out``.
        verify: re-read the output and check sampled rows of every merged tensor against a
            fresh float64 computation.
        max_delta_error: with 4-bit output, fail (exit 3) when any layer's delta error is
            above this; nothing is left behind.
        progress: called once per tensor written, with (bytes written so far, total bytes).
        fsync: flush every shard to the disk before the rename (survives a power loss, at
            the disk's write speed). Without it, as with ``cp`` and ``save_pretrained``, the
            OS writes the data back in its own time; the rename still guarantees that an
            interrupted process never leaves a half-written OUT.

    Returns:
        The report (also written, with the provenance, to ``out/adapterctl.json``).

    Raises:
        Conflict: ``out`` exists and ``force`` is False, or ``out`` is, contains or lies
            inside the base or an adapter (``--force`` never overrides that).
        OperationalError: not enough free disk space, or an I/O error.
        ValidationFailed: a layer's delta error exceeded ``max_delta_error``, or merged values
            came out as inf or NaN (an update too large for the output dtype); nothing is
            left behind.
        MissingExtra: the merge needs torch, which is not installed (exit 4).
    """
    out_path = Path(out)
    dev = resolve_device(device)
    engine = choose_engine(plan, dev, engine)
    fused = None
    if engine == "numpy":
        from adapterctl.merge import numpy_engine

        fused = numpy_engine.choose_kernel(kernel)
    refuse_existing(out_path, force=force)
    refuse_overlap(out_path, [plan.base.path, *(a.path for a in plan.adapters)])
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
        summed, layers = _execute(plan, tmp, dev, engine, fused, progress, fsync, overflow)
        overflow.check({j.name: j.out_dtype for j in plan.jobs})  # inf/NaN written: refused
        check_delta_error(layers, max_delta_error)
        report = build_report(plan, out_path, dev, layers, time.perf_counter() - start)
        report.engine, report.kernel = engine, summed
        report.rounding = rounding.describe(plan.jobs)
        report.bytes_read = BYTES_READ.value - read_before + _copied_bytes(plan)
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


def choose_engine(plan: MergePlan, dev: str, engine: str = "auto") -> str:
    """The engine that writes ``plan`` on ``dev``: ``numpy`` (CPU, plain 16/32-bit merges, no
    torch) where it can, else ``torch`` (4-bit in or out, ``--method``, DoRA on Conv1D,
    float64, CUDA).

    Args:
        plan: from ``plan_merge``.
        dev: a resolved device (``resolve_device``).
        engine: ``auto``, or ``numpy``/``torch`` to insist on one.

    Raises:
        UsageError: the engine asked for cannot write this plan on this device.
        MissingExtra: the plan needs torch and it is not installed (exit 4).
    """
    from adapterctl.merge import numpy_engine

    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    numpy_ok = dev == "cpu" and numpy_engine.supports(plan)
    if engine == "numpy" and not numpy_ok:
        raise UsageError(
            "the numpy engine writes plain 16/32-bit merges on the CPU only; use engine auto"
        )
    if engine != "torch" and numpy_ok:
        return "numpy"
    from adapterctl.extras import require

    four_bit = plan.quantize is not None or any(j.quant_in is not None for j in plan.jobs)
    purpose = "a 4-bit merge" if four_bit else "this merge (--method, DoRA, float64 or CUDA)"
    require("torch", purpose, extra="nf4" if four_bit else "torch")
    return "torch"


def _execute(
    plan: MergePlan,
    tmp: Path,
    dev: str,
    engine: str,
    kernel: Kernel | None,
    progress: Callable[[int, int], None] | None,
    durable: bool,
    overflow: Overflow,
) -> tuple[str | None, list[LayerError]]:
    """Write the plan's shards into ``tmp`` with ``engine`` (the NumPy engine calling
    ``kernel`` where it pays). Returns what summed in the NumPy engine (None for torch) and
    the 4-bit layers' delta errors."""
    if engine == "numpy":
        from adapterctl.merge import numpy_engine

        return numpy_engine.write_shards(plan, tmp, progress, durable, overflow, kernel), []
    from adapterctl.merge import torch_engine

    return None, torch_engine.write_shards(plan, tmp, dev, progress, durable, overflow)


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
    versions: list[Any],
    base: Checkpoint,
    *,
    allow_mismatch: bool = False,
    hash_base: bool = False,
) -> tuple[str, list[str], list[str]]:
    """Check each registry input's base pin against ``base`` (DESIGN: "Identity";
    ``Registry.check_pins``).

    Args:
        versions: ``adapterctl.refs.registry_versions`` of the SOURCEs (None: a local path,
            which has no pin to check).
        base: the checkpoint about to be merged into.
        allow_mismatch: report a mismatch as a warning instead of refusing.
        hash_base: hash ``base``'s weight files so content pins are compared by content.

    Returns:
        (the weakest level checked: ``content``, ``fingerprint``, ``unpinned`` or
        ``mismatch``; what was checked, one line per registry input; warnings).

    Raises:
        Conflict: a pin differs from ``base`` and ``allow_mismatch`` is False (exit 5).
    """
    if not any(v is not None for v in versions):  # no registry input: the registry stays shut
        unused = ["--hash-base: no SOURCE is a registry version, so no base pin was compared"]
        return "unpinned", [], unused if hash_base else []
    from adapterctl.registry import Registry

    with Registry(create=False) as reg:
        checked = reg.check_pins(versions, base, hash_base=hash_base, allow_mismatch=allow_mismatch)
    return checked.level, checked.lines, checked.warnings


def merge(
    base: str | os.PathLike[str] | Checkpoint,
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    *,
    dtype: str = "auto",
    quantize: str | None = None,
    quant_method: str = "optimal",
    max_shard_size: int | None = None,
    method: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    device: str = "auto",
    engine: str = "auto",
    kernel: str | None = None,
    force: bool = False,
    verify: bool = False,
    max_delta_error: float | None = None,
    fsync: bool = False,
    dry_run: bool = False,
    allow_base_mismatch: bool = False,
    hash_base: bool = False,
    alpha: float | None = None,
    register_as: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergeReport:
    """Merge adapters into a base checkpoint, from SOURCE strings to a written (and, if asked,
    registered) OUT, in one call.

    Registry inputs have their base pins checked against ``base``; every adapter passes
    ``validate``'s pre-flight; the merge is planned from headers, written atomically, and with
    ``register_as`` recorded as the next version of that name with its lineage.

    Args:
        base: a base checkpoint folder (or an open ``Checkpoint``); an ``hf://`` base is
            refused (exit 2): merging needs its weights on disk (``hf download``).
        adapters: SOURCEs (local paths or registry references) or read ``Adapter`` objects.
        out: the output folder, or ``hf://owner/name`` to publish the merged model there
            (``hub.publish_folder``: one commit tagged ``v<N>``, a full-model card).
        weights: one weight per adapter (default 1.0 each).
        dtype: ``auto`` (the base's), ``bf16``, ``fp16`` or ``fp32``.
        quantize: ``"nf4"``/``"fp4"``: write the linear weights in bitsandbytes 4-bit.
        quant_method: ``optimal`` or ``absmax`` (bitsandbytes' own) 4-bit scales.
        max_shard_size: repack the output into shards of at most this many bytes.
        method: a composition method applied at full rank per module (``ties``, ``dare_*``,
            ``magnitude_prune``); None or ``linear`` for the exact weighted sum.
        method_options: its options (``density``, ``majority_sign``, ``convention``, ``seed``).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        engine: ``auto``, ``numpy`` or ``torch`` (see ``choose_engine``).
        kernel: the NumPy engine's compiled kernel: ``auto``, ``none`` or a vector width.
        force: replace an existing ``out``.
        verify: re-read ``out`` and check sampled rows against float64 math.
        max_delta_error: with 4-bit output, fail when a layer loses more of ΔW than this.
        fsync: flush the output to the disk before the rename.
        dry_run: plan only; write nothing (the report says what would be written).
        allow_base_mismatch: report a base-pin mismatch as a warning instead of refusing.
        hash_base: hash ``base``'s weight files (cached by path, size and mtime) so that a
            content pin is compared by content, not only by fingerprint; the report's
            ``base_check`` says which level was compared.
        alpha: LoRA alpha of bare ``.safetensors`` sources.
        register_as: record ``out`` in the registry as the next version of this name (every
            adapter must then be a registry reference, since lineage links versions).
        progress: called once per tensor written with (bytes written, total bytes).

    Returns:
        The report; ``registered`` names the new version when ``register_as`` was given.

    Raises:
        UsageError: bad arguments, or an ``hf://`` base (2). ValidationFailed: an adapter
        does not fit ``base`` (3). NotFound: a missing source, base or version, or a missing
        extra (4). Conflict: ``out`` exists, or a base pin differs (5). OperationalError: I/O
        (1).

    Example:
        >>> report = merge("models/Llama-3.2-1B", ["chat@prod"], "merged", register_as="chat-m")
        >>> report.registered
        'chat-m@1'
    """
    from threadpoolctl import threadpool_limits

    from adapterctl.checkpoint import open_base
    from adapterctl.refs import read_inputs

    # One BLAS thread throughout: the merge fills the cores with its own workers, and the
    # checks before it (validate's small factorisations) would otherwise wake BLAS's threads,
    # which then spin beside the workers (about 4% of a CPU merge's time).
    with threadpool_limits(limits=1, user_api="blas"):
        ckpt = open_base(base, needs_weights="merge")  # a Hub base: refused, nothing fetched
        read_in, inputs = read_inputs(adapters, alpha=alpha, register_as=register_as)
        base_check, pin_checks, pin_warnings = check_base_pins(
            inputs, ckpt, allow_mismatch=allow_base_mismatch, hash_base=hash_base
        )
        plan = plan_merge(
            ckpt, read_in, None if weights is None else list(weights), dtype=dtype,
            quantize=quantize, quant_method=quant_method, max_shard_size=max_shard_size,
            method=method, method_options=None if method_options is None else dict(method_options),
        )  # fmt: skip
        if dry_run:
            report = dry_run_report(plan, out)
            report.base_pin_checks = pin_checks
            report.base_check = base_check
            report.warnings = (
                [w for a in read_in for w in a.warnings] + pin_warnings + report.warnings
            )
            return report
        from adapterctl.hub import output

        with output(out) as dest:
            report = run_merge(
                plan, dest.path, device=device, engine=engine, kernel=kernel, force=force,
                verify=verify, max_delta_error=max_delta_error, progress=progress, fsync=fsync,
            )  # fmt: skip
            report.base_pin_checks = pin_checks
            report.base_check = base_check
            report.warnings = (
                [w for a in read_in for w in a.warnings] + pin_warnings + report.warnings
            )
            if register_as:
                from adapterctl.registry import Registry

                with Registry() as reg:
                    registered = reg.record_lineage(
                        register_as,
                        [
                            (v, w)
                            for v, w in zip(inputs, plan.weights, strict=True)
                            if v is not None
                        ],
                        f"merge:{method}",
                        {k: v for k, v in plan.provenance.get("method", {}).items() if k != "name"},
                        dest.path,
                        base=ckpt,
                    )
                report.registered = registered.ref
            published = dest.publish("model", "merge")
        report.out = dest.shown
        report.published = None if published is None else f"{published.url}@{published.tag}"
        return report
