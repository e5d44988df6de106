"""What a merge writes besides the tensors: config, tokenizer, index, provenance, the report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from adapterctl.checkpoint import STEMS, weight_stem
from adapterctl.merge.plan import TOKENIZER_FILES, LayerError, MergePlan, MergeReport


def write_side_files(plan: MergePlan, tmp: Path, report: MergeReport) -> None:
    base_dir = plan.base.folder
    skip = {f"{stem}.safetensors.index.json" for stem in STEMS} | {"adapterctl.json"}
    tokenizer_names = set(TOKENIZER_FILES)
    for f in sorted(base_dir.iterdir()):
        if not f.is_file() or f.name in skip or f.suffix in (".safetensors", ".bin", ".pt"):
            continue
        if f.name.startswith("."):
            continue
        if plan.tokenizer_from is not None and f.name in tokenizer_names:
            continue
        if f.name == "config.json" and plan.config:
            continue
        shutil.copy2(f, tmp / f.name)
    if plan.tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = plan.tokenizer_from / name
            if src.exists():
                shutil.copy2(src, tmp / name)
    if plan.config:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": sum(e[3] for s in plan.shards for e in s.entries())},
            "weight_map": {e[0]: s.name for s in plan.shards for e in s.entries()},
        }
        stem = weight_stem([s.name for s in plan.shards])  # as plan named the shards
        (tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "adapterctl.json").write_text(provenance_json(plan, report))


def provenance_json(plan: MergePlan, report: MergeReport) -> str:
    data = dict(plan.provenance)
    data["result"] = {
        "tensors_merged": len(report.tensors_merged),
        "delta_error": report.delta_error,
        "verified_rows": report.verified,
    }
    return json.dumps(data, indent=2) + "\n"


# A layer's delta error above this is worse than not merging the adapter at all: the 4-bit
# weights lie further from W + ΔW than W itself does.
DELTA_ERROR_ALERT = 1.0


def _worst(layers: list[LayerError], limit: float) -> list[LayerError]:
    """The layers whose delta error is above ``limit``, worst first."""
    return sorted((x for x in layers if x.delta_error > limit), key=lambda x: -x.delta_error)


def delta_error_alert(layers: list[LayerError]) -> str | None:
    """The warning for layers whose 4-bit delta error is above 1.0 (naming them and the
    worst value), or None: the report's ``warnings`` carry it and the CLI shows it loudly."""
    from adapterctl.validate.context import list_names

    over = _worst(layers, DELTA_ERROR_ALERT)
    if not over:
        return None
    return (
        f"4-bit re-quantisation is worse than not merging the adapter in {len(over)} of "
        f"{len(layers)} layer(s) (delta error above {DELTA_ERROR_ALERT:g}: "
        f"{list_names([x.name for x in over])}); worst {over[0].delta_error:.3g} in "
        f"{over[0].name}; merge without --quantize to keep the adapter, or refuse such "
        f"output with --max-delta-error {DELTA_ERROR_ALERT:g}"
    )


def check_delta_error(layers: list[LayerError], limit: float | None) -> None:
    """Refuse a 4-bit output with a layer whose delta error is above ``limit``
    (``--max-delta-error``; None: no limit).

    Raises:
        ValidationFailed: naming the worst layer and how many are over (exit 3).
    """
    over = [] if limit is None else _worst(layers, limit)
    if not over:
        return
    from adapterctl.errors import ValidationFailed

    more = f" (and {len(over) - 1} more layer(s))" if len(over) > 1 else ""
    raise ValidationFailed(
        f"4-bit re-quantisation kept too little of the adapter: delta error "
        f"{over[0].delta_error:.3g} in {over[0].name}{more} > --max-delta-error {limit:g}; "
        "nothing was written; merge without --quantize"
    )


def build_report(
    plan: MergePlan, out: Path, dev: Any, layers: list[LayerError], seconds: float
) -> MergeReport:
    import math

    jobs = plan.jobs
    total_delta = math.sqrt(sum(layer.delta_norm**2 for layer in layers))
    total_err = (
        math.sqrt(sum((layer.delta_error * layer.delta_norm) ** 2 for layer in layers))
        / total_delta
        if layers and total_delta > 0
        else None
    )
    warnings = list(plan.warnings)
    alert = delta_error_alert(layers)
    if alert is not None:
        warnings.append(alert)
    elif total_err is not None and total_err > 0.5:
        warnings.append(
            f"4-bit re-quantisation erased most of the adapter: delta error {total_err:.2f} "
            "(1.0 = nothing of ΔW survives); merge without --quantize to keep it"
        )
    return MergeReport(
        out=str(out),
        dry_run=False,
        device=str(dev),
        shards=[s.name for s in plan.shards],
        tensors_total=len(jobs),
        tensors_merged=[j.name for j in jobs if j.deltas or j.dora or j.bias_add],
        tensors_replaced=[j.name for j in jobs if j.replace is not None and j.source is not None],
        tensors_added=[j.name for j in jobs if j.source is None],
        tensors_copied=sum(1 for j in jobs if j.copy_bytes),
        bytes_read=plan.bytes_in,
        bytes_written=plan.bytes_out,
        peak_memory_estimate=plan.peak_memory_estimate(),
        seconds=seconds,
        quantize=None if plan.quantize is None else plan.quantize.quant_type,
        delta_error=total_err,
        layers=layers,
        warnings=warnings,
        provenance=plan.provenance,
    )


def dry_run_report(plan: MergePlan, out: str | os.PathLike[str]) -> MergeReport:
    """The report of a merge that is planned but not written (``--dry-run``)."""
    report = build_report(plan, Path(out), "-", [], 0.0)
    report.dry_run = True
    return report
