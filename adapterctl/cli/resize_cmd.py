"""``adapterctl resize``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import emit, examples, force_option, json_option


@cli.command(
    "resize",
    epilog=examples(
        "adapterctl resize adapters/chat-lora --rank 4 -o chat-r4",
        "adapterctl resize chat@1 --energy 0.99 -o chat-99",
    ),
)
@click.argument("source", metavar="SOURCE")
@click.option("-o", "--out", required=True, metavar="OUT", help="Output adapter folder (PEFT).")
@click.option(
    "--rank", type=click.IntRange(min=1), default=None, metavar="R",
    help="Target rank of every module (modules already below it are kept exactly).",
)  # fmt: skip
@click.option(
    "--energy", type=float, default=None, metavar="E",
    help="Per module, the smallest rank keeping fraction E of ‖ΔW‖² (e.g. 0.99).",
)  # fmt: skip
@force_option
@click.option("--alpha", type=float, default=None, help="LoRA alpha of a bare .safetensors SOURCE.")
@json_option
def resize_command(
    source: str, out: str, rank: int | None, energy: float | None, force: bool,
    alpha: float | None, as_json: bool,
) -> None:  # fmt: skip
    """Re-factor every module of SOURCE to rank R (--rank), or to the smallest rank that keeps
    fraction E of its energy (--energy; per-module ranks are written as rank_pattern).

    Uses the SVD of each module's r×r core (best rank-R approximation, never a dense SVD);
    reports the energy kept. The output is a standard PEFT folder with the scale folded
    into lora_B (alpha = r).
    """
    from adapterctl.resize import resize_to

    report = resize_to(source, out, rank=rank, energy=energy, alpha=alpha, force=force)
    if report.published:
        click.echo(f"published as {report.published}", err=True)
    from adapterctl.cli.render import render_resize

    emit(report, as_json, render_resize)
