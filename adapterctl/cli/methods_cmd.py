"""``adapterctl methods``."""

from __future__ import annotations

import json

import click

from adapterctl.cli import cli
from adapterctl.cli.options import examples, json_option


@cli.command(
    "methods",
    epilog=examples(
        "adapterctl methods",
        "adapterctl methods --json",
    ),
)
@json_option
def methods_command(as_json: bool) -> None:
    """List the composition methods (built-in and from plugins) and their options."""
    from adapterctl.methods import describe, methods

    infos = [describe(m) for m in methods()]
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
        return
    from adapterctl.cli.render import render_methods

    render_methods(infos)
