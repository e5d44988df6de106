"""``resize``: re-factor each module of an adapter to a lower rank with the small-core SVD.

For ΔW = s·B·A the best rank-k approximation (Eckart–Young) comes from the SVD of the r×r
core (QR of B and Aᵀ), so resizing costs O((out + in)·r²) per module, never a dense SVD.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from adapterctl.adapter import Adapter, LoraModule, natural_key
from adapterctl.errors import UsageError


class ModuleResize(BaseModel):
    """One module: its rank before and after, and the energy kept."""

    name: str
    rank_before: int
    rank: int
    norm: float  # ‖ΔW‖_F before
    energy_kept: float  # fraction of ‖ΔW‖²_F kept


class ResizeReport(BaseModel):
    """What ``resize`` did, as ``adapterctl resize --json`` prints it."""

    source: str
    out: str | None = None
    published: str | None = None  # hf://owner/name@v<N> for an -o hf://… output
    rank: int | None  # --rank, if given
    energy: float | None  # --energy, if given
    ranks: list[int]  # the distinct ranks written (several: written as rank_pattern)
    energy_kept: float  # over all modules
    parameters_before: int
    parameters_after: int
    modules: list[ModuleResize]
    warnings: list[str]
    seconds: float


@dataclass
class Resized:
    """The resized adapter (in memory, scale folded into B) and the report."""

    adapter: Adapter
    report: ResizeReport


def resize(adapter: Adapter, *, rank: int | None = None, energy: float | None = None) -> Resized:
    """Re-factor every module to rank ``rank``, or to the smallest rank that keeps fraction
    ``energy`` of its ‖ΔW‖²_F; write the result with ``formats.peft.write_peft`` (modules of
    different ranks get ``rank_pattern`` entries).

    A module already at or below ``rank`` is re-factored exactly (same ΔW). lora biases and
    full tensors are carried as they are.

    Args:
        adapter: from ``adapterctl.formats.read`` (no DoRA: its magnitude is tied to ΔW).
        rank: the target rank (≥ 1).
        energy: the fraction of energy to keep per module, in (0, 1].

    Returns:
        The resized adapter and its report.

    Raises:
        UsageError: neither or both of ``rank`` and ``energy``, or a value out of range.
        UnsupportedAdapter: a DoRA adapter.
        ValidationFailed: the adapter fails ``validate``'s structure rules (an update beyond
            float32's range among them), or a resized module would hold inf or NaN.

    Example:
        >>> r = resize(read("big-adapter"), energy=0.99)
        >>> r.report.ranks
        [5, 7, 12]
    """
    from adapterctl.extras import require

    require("torch", "resize")
    import torch

    from adapterctl.compose import check_inputs, check_result, factors_module
    from adapterctl.lowrank import core_svd, rank_for_energy

    if (rank is None) == (energy is None):
        raise UsageError("resize needs exactly one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"--energy {energy}: must be in (0, 1], e.g. 0.99")
    start = time.perf_counter()
    warnings = check_inputs([adapter])
    out: dict[str, LoraModule] = {}
    rows: list[ModuleResize] = []
    kept_total = energy_total = 0.0
    before = after = 0
    for name, mod in sorted(adapter.modules.items(), key=lambda nm: natural_key(nm[0])):
        svd = core_svd(mod.B(torch.float64), mod.A(torch.float64) * mod.scale)
        k = rank if rank is not None else rank_for_energy(svd.s, energy or 1.0)
        k = max(1, min(k, int(svd.s.shape[0])))
        b, a = svd.factors(k)  # (out, k), (k, in)
        bias = None
        if mod.bias is not None:
            bias = mod.bias.load().to(torch.float32).reshape(-1) * mod.scale  # (out,)
        out[name] = factors_module(mod, b.float(), a.float(), bias)
        norm2 = float(svd.s.square().sum())
        kept = svd.energy(k)
        kept_total += kept * norm2
        energy_total += norm2
        before += mod.rank * (mod.in_features + mod.out_features)
        after += k * (mod.in_features + mod.out_features)
        rows.append(
            ModuleResize(name=name, rank_before=mod.rank, rank=k, norm=norm2**0.5, energy_kept=kept)
        )
    check_result(out, "resized", "check the adapter with: adapterctl validate SOURCE")
    resized = Adapter(
        path=Path("<resized>"),
        format="peft",
        config=adapter.config,
        modules=out,
        extras=list(adapter.extras),
    )
    report = ResizeReport(
        source=str(adapter.path),
        rank=rank,
        energy=energy,
        ranks=sorted({r.rank for r in rows}),
        energy_kept=1.0 if energy_total == 0.0 else kept_total / energy_total,
        parameters_before=before,
        parameters_after=after,
        modules=rows,
        warnings=warnings,
        seconds=time.perf_counter() - start,
    )
    return Resized(adapter=resized, report=report)


def resize_to(
    source: str | os.PathLike[str] | Adapter,
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    alpha: float | None = None,
    force: bool = False,
) -> ResizeReport:
    """Resize SOURCE and write the result as a PEFT folder at ``out``: ``adapterctl resize``
    in one call (``out`` is refused before any work if it exists, unless ``force``).

    Args:
        source: a local path, a registry reference or a read ``Adapter``.
        out: the output folder, or ``hf://owner/name`` to publish it (``hub.publish_folder``).
        rank, energy: as for :func:`resize` (exactly one).
        alpha: LoRA alpha of a bare ``.safetensors`` source.
        force: replace an existing ``out``.

    Returns:
        The report, with ``out`` set and the source's reading warnings included.

    Raises:
        UsageError: not exactly one of ``rank`` and ``energy`` (2).
        Conflict: ``out`` exists (5).

    Example:
        >>> resize_to("chat@1", "chat-r4", rank=4).energy_kept
        0.91
    """
    from adapterctl.files import refuse_existing, refuse_overlap
    from adapterctl.formats.peft import write_peft
    from adapterctl.hub import output
    from adapterctl.refs import read_source

    if (rank is None) == (energy is None):
        raise UsageError("pass exactly one of --rank R or --energy E")
    refuse_existing(out, force=force)
    adapter = read_source(source, alpha=alpha)
    refuse_overlap(out, [adapter.path])
    result = resize(adapter, rank=rank, energy=energy)
    with output(out) as dest:
        write_peft(result.adapter, dest.path, force=force)
        published = dest.publish("adapter", "resize")
    result.report.out = dest.shown
    result.report.published = None if published is None else f"{published.url}@{published.tag}"
    result.report.warnings = adapter.warnings + result.report.warnings
    return result.report
