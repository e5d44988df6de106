"""``adapterctl diff``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import examples, json_option, load_source, warn


@cli.command(
    "diff",
    epilog=examples(
        "adapterctl diff adapters/chat-lora adapters/code-rslora",
        "adapterctl diff chat@1 chat@2 --tol 1e-6 --json",
    ),
)
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option(
    "--tol", type=click.FloatRange(min=0.0), default=1e-6, show_default=True, metavar="T",
    help="Relative difference ‖ΔW_A − ΔW_B‖/‖ΔW_A‖ below which a module counts as identical.",
)  # fmt: skip
@click.option("--alpha", type=float, default=None, help="LoRA alpha for bare .safetensors inputs.")
@json_option
def diff_command(a: str, b: str, tol: float, alpha: float | None, as_json: bool) -> None:
    """Compare two adapters: config differences, and per common module ‖ΔW_A‖, ‖ΔW_B‖,
    ‖ΔW_A − ΔW_B‖/‖ΔW_A‖, cosine similarity and the overlap of their column spaces.

    Computed from the factors in float64 (never the dense ΔW). The verdict is `identical`
    when every module is within --tol (two factorizations of one ΔW are identical),
    otherwise `different`, with the most different modules. Exit 0 either way.
    """
    from adapterctl.diff import diff

    left, right = load_source(a, alpha, None), load_source(b, alpha, None)
    for adapter in (left, right):
        for w in adapter.warnings:
            warn(w)
    report = diff(left, right, tol=tol)
    if as_json:
        from adapterctl.cli.render import json_text

        click.echo(json_text(report.model_dump_json(indent=2)))
        return
    from adapterctl.cli.render import render_diff

    render_diff(report)
