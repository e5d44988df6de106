"""``adapterctl inspect``."""

from __future__ import annotations

import click

from adapterctl.cli import cli
from adapterctl.cli.options import (
    base_option,
    emit,
    examples,
    json_option,
    load_base,
    load_source,
    source_options,
)
from adapterctl.cli.render import render_inspect


@cli.command(
    "inspect",
    epilog=examples(
        "adapterctl inspect adapters/chat-lora",
        "adapterctl inspect chat@1 --base base/tiny-llama --json",
    ),
)
@click.argument("source")
@base_option
@json_option
@click.option(
    "--spectrum", is_flag=True, help="Add each module's singular values (from the r×r core)."
)
@source_options
def inspect_command(
    source: str,
    base: str | None,
    as_json: bool,
    spectrum: bool,
    alpha: float | None,
    rank: int | None,
) -> None:
    """Describe an adapter: type, ranks, alphas, scale rule, targets, digest, per-module norms.

    With --base, also the base's fingerprint and which base tensor each module updates.
    """
    from adapterctl.introspect import inspect_adapter

    adapter = load_source(source, alpha, rank)
    ckpt = load_base(base)
    report = inspect_adapter(adapter, base=ckpt, spectrum=spectrum)
    emit(report, as_json, render_inspect)
