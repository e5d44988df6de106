"""``adapterctl plugins``."""

from __future__ import annotations

import json

import click

from adapterctl.cli import cli
from adapterctl.cli.options import json_option


@cli.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, the adapter formats, remotes and merge kernels they register."""
    from adapterctl.formats import formats
    from adapterctl.merge.numpy_engine import available_kernels
    from adapterctl.plugins import collect, plugin_names

    names = plugin_names()
    fmts = [{"name": f.name, "description": f.description} for f in formats()]
    remotes = [
        {"scheme": r.scheme, "name": r.name, "description": r.description}
        for r in collect("register_remotes")
    ]
    kernels = [
        {
            "name": k.name,
            "description": k.description,
            "built": module is not None,
            "widths": list(module.ISAS) if module is not None else [],
        }
        for k, module in available_kernels()
    ]
    if as_json:
        data = {"plugins": names, "formats": fmts, "remotes": remotes, "kernels": kernels}
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("plugins: " + ", ".join(names))
    for f in fmts:
        click.echo(f"format {f['name']}: {f['description']}")
    for r in remotes:
        click.echo(f"remote {r['scheme']}://: {r['description']}")
    for k in kernels:
        runs = ", ".join(k["widths"]) if k["built"] else "not built (no C compiler at install)"
        click.echo(f"merge kernel {k['name']}: {k['description']} [{runs}]")
