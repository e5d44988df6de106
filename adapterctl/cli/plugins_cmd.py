"""``adapterctl plugins``."""

from __future__ import annotations

import json

import click

from adapterctl.cli import cli
from adapterctl.cli.options import examples, json_option


@cli.command(
    "plugins",
    epilog=examples(
        "adapterctl plugins",
        "ADAPTERCTL_LOAD_PLUGINS= adapterctl plugins    # built-ins only",
    ),
)
@json_option
def plugins_command(as_json: bool) -> None:
    """List plugins (built-in, installed, from ADAPTERCTL_PLUGINS_DIR) with their versions,
    what each registers (formats, writers, methods, merge kernels, remotes, commands), and
    any that failed to load, with why.
    """
    from dataclasses import asdict

    from adapterctl.cli.render import json_text, printable
    from adapterctl.formats import formats, writers
    from adapterctl.merge.numpy_engine import available_kernels
    from adapterctl.plugins import collect, describe

    group = click.get_current_context().find_root().command
    if isinstance(group, click.Group) and hasattr(group, "add_plugin_commands"):
        group.add_plugin_commands()
    infos = describe(group)
    fmts = [{"name": f.name, "description": f.description} for f in formats()]
    outs = [{"name": w.name, "description": w.description} for w in writers()]
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
        data = {
            "plugins": [asdict(i) for i in infos],
            "formats": fmts,
            "writers": outs,
            "remotes": remotes,
            "kernels": kernels,
        }
        click.echo(json_text(json.dumps(data, indent=2)))
        return
    for i in infos:
        what = "; ".join(f"{kind} {', '.join(names)}" for kind, names in i.registers.items())
        state = f"NOT LOADED: {i.error}" if i.error else what or "registers nothing"
        click.echo(printable(f"plugin {i.name} ({i.source}, {i.version}): {state}"))
    for f in fmts:
        click.echo(printable(f"format {f['name']}: {f['description']}"))
    for w in outs:
        click.echo(printable(f"writer {w['name']}: {w['description']}"))
    for r in remotes:
        click.echo(printable(f"remote {r['scheme']}://: {r['description']}"))
    for k in kernels:
        runs = ", ".join(k["widths"]) if k["built"] else "not built (no C compiler at install)"
        click.echo(printable(f"merge kernel {k['name']}: {k['description']} [{runs}]"))
