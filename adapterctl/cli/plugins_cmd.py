"""``adapterctl plugins``."""

from __future__ import annotations

import json

import click

from adapterctl.cli import cli
from adapterctl.cli.options import json_option


@cli.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List loaded plugins and the adapter formats they register."""
    from adapterctl.formats import formats
    from adapterctl.plugins import plugin_names

    names = plugin_names()
    fmts = [{"name": f.name, "description": f.description} for f in formats()]
    if as_json:
        click.echo(json.dumps({"plugins": names, "formats": fmts}, indent=2))
        return
    click.echo("plugins: " + ", ".join(names))
    for f in fmts:
        click.echo(f"format {f['name']}: {f['description']}")
