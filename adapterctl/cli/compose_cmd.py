"""``adapterctl compose``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import (
    allow_base_mismatch_option,
    check_weights,
    device_option,
    emit,
    force_option,
    json_option,
    load_source,
    method_options,
    register_option,
    registry_inputs,
    warn,
    weights_option,
)


@cli.command("compose")
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True)
@click.option("-o", "--out", required=True, metavar="OUT", help="Output adapter folder (PEFT).")
@weights_option
@click.option(
    "--method", "method", required=True, metavar="M",
    help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (adapterctl methods).",
)  # fmt: skip
@method_options
@click.option(
    "--rank", type=click.IntRange(min=1), default=None, metavar="R",
    help="Output rank (SVD of the result). linear: default exact (rank Σrᵢ); svd and the "
    "dense methods: default the largest input rank.",
)  # fmt: skip
@device_option
@allow_base_mismatch_option
@force_option
@register_option
@click.option("--alpha", type=float, default=None, help="LoRA alpha for bare .safetensors sources.")
@json_option
def compose_command(
    sources: tuple[str, ...], out: str, weights: tuple[float, ...], method: str,
    density: float | None, rank: int | None, majority_sign: str | None, convention: str | None,
    seed: int | None, device: str, allow_base_mismatch: bool, force: bool,
    register_as: str | None,
    alpha: float | None, as_json: bool,
) -> None:  # fmt: skip
    """Combine adapters into one PEFT adapter at OUT, by a method defined on ΔW.

    linear/cat write Σ wᵢ·ΔWᵢ exactly (factors concatenated, scale folded into B);
    svd (or linear --rank R) the best rank-R approximation of that sum, from the small core
    (never a dense SVD); ties, dare_* and magnitude_prune apply the method to each module's
    dense ΔWᵢ and compress the result to --rank, reporting the energy kept.

    Inputs may differ in rank, targets (a missing module counts as zero), rsLoRA and
    rank/alpha patterns. DoRA inputs are refused (exit 3). Inputs whose configs name
    different base models (compared loosely), or registry inputs pinned to different bases,
    are refused (exit 5) unless --allow-base-mismatch. modules_to_save copies are
    carried over unweighted (different copies of one tensor: exit 3).
    """
    from pathlib import Path

    from adapterctl.compose import compose
    from adapterctl.errors import Conflict
    from adapterctl.formats.peft import write_peft

    weight_list = check_weights(weights, sources)
    if Path(out).exists() and not force:
        raise Conflict(f"{out}: already exists; choose another -o or pass --force")
    versions = registry_inputs(sources, register_as)
    pin_warnings: list[str] = []
    if any(v is not None for v in versions):
        from adapterctl.registry import check_same_base

        pin_warnings = check_same_base(
            [v for v in versions if v is not None], allow_mismatch=allow_base_mismatch
        )
    adapters = [load_source(s, alpha, None) for s in sources]
    for a in adapters:
        for w in a.warnings:
            warn(w)
    options = {
        "density": density, "rank": rank, "majority_sign": majority_sign,
        "convention": convention, "seed": seed,
    }  # fmt: skip
    result = compose(
        adapters, weight_list, method, options, device=device,
        allow_base_mismatch=allow_base_mismatch,
    )  # fmt: skip
    write_peft(result.adapter, out, force=force, metadata=_provenance(result.report))
    result.report.out = str(out)
    result.report.warnings = pin_warnings + result.report.warnings
    if register_as:
        from adapterctl.registry import Registry

        weights_used = weight_list or [1.0] * len(sources)
        with Registry() as reg:
            registered = reg.record_lineage(
                register_as,
                [(v, w) for v, w in zip(versions, weights_used, strict=True) if v is not None],
                method,
                {k: v for k, v in options.items() if v is not None},
                out,
            )
        click.echo(f"registered as {registered.ref}", err=True)
    from adapterctl.cli.render import render_compose

    emit(result.report, as_json, render_compose)


def _provenance(report: object) -> dict[str, str]:
    import json

    from adapterctl import __version__

    data = {
        "adapterctl": __version__,
        "method": getattr(report, "method", None),
        "options": getattr(report, "options", None),
        "weights": getattr(report, "weights", None),
        "inputs": getattr(report, "inputs", None),
    }
    return {"adapterctl": json.dumps(data, sort_keys=True)}
