"""``adapterctl compose``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import (
    allow_base_mismatch_option,
    check_weights,
    device_option,
    emit,
    examples,
    force_option,
    json_option,
    method_options,
    register_option,
    weights_option,
)


@cli.command(
    "compose",
    epilog=examples(
        "adapterctl compose adapters/chat-lora adapters/code-rslora -o composed  # linear: exact",
        "adapterctl compose chat@1 code@1 -w 0.7 -w 0.3 --method svd --rank 8 -o chat-code",
        "adapterctl compose a b --method ties --density 0.5 -o merged-ties",
    ),
)
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True)
@click.option("-o", "--out", required=True, metavar="OUT", help="Output adapter folder (PEFT).")
@weights_option
@click.option(
    "--method", "method", default="linear", show_default=True, metavar="M",
    help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (adapterctl methods); "
    "linear is also merge's default.",
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
    from adapterctl.compose import compose_to

    options = {
        "density": density, "rank": rank, "majority_sign": majority_sign,
        "convention": convention, "seed": seed,
    }  # fmt: skip
    report = compose_to(
        list(sources), out, check_weights(weights, sources), method, options, device=device,
        allow_base_mismatch=allow_base_mismatch, alpha=alpha, force=force,
        register_as=register_as,
    )  # fmt: skip
    if report.registered:
        click.echo(f"registered as {report.registered}", err=True)
    if report.published:
        click.echo(f"published as {report.published}", err=True)
    from adapterctl.cli.render import render_compose

    emit(report, as_json, render_compose)
