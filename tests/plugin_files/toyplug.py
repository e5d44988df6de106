"""A plugin for the tests, loaded from ADAPTERCTL_PLUGINS_DIR: it registers a format, a
writer, a composition method and a command, each through its hook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adapterctl.hookspecs import hookimpl

__version__ = "1.2.3"


class ToyFormat:
    """A ``.toy`` JSON file naming a PEFT folder next to it."""

    name = "toy"
    description = "toy: a .toy file naming a PEFT folder"

    def detect(self, path: Path) -> bool:
        return path.suffix == ".toy"

    def read(self, path: Path, options: Any) -> Any:
        from adapterctl.formats import read

        adapter = read(path.parent / json.loads(path.read_text())["folder"])
        adapter.format, adapter.path = "toy", path
        return adapter


class ToyWriter:
    name = "toy"
    description = "toy: a PEFT folder and a .toy file naming it"

    def write(self, adapter: Any, out: Path, *, force: bool) -> Path:
        from adapterctl.formats.peft import write_peft

        folder = write_peft(adapter, out.with_suffix(".peft"), force=force)
        out.write_text(json.dumps({"folder": folder.name}))
        return out


class First:
    """The first input's delta, times its weight."""

    name = "first"
    description = "the first input alone"
    reference = "https://example.org/first"
    factored = False
    truncates = True

    def __init__(self) -> None:
        from adapterctl.methods import MethodOptions

        self.options_model = MethodOptions

    def combine_dense(self, deltas: Any, weights: Any, options: Any, generator: Any = None) -> Any:
        return deltas[0] * weights[0]


@hookimpl
def register_formats(register: Any) -> None:
    register(ToyFormat())


@hookimpl
def register_writers(register: Any) -> None:
    register(ToyWriter())


@hookimpl
def register_methods(register: Any) -> None:
    register(First())


@hookimpl
def register_commands(cli: Any) -> None:
    @cli.command("toy-hello")
    @click.option("--fail", is_flag=True)
    def toy_hello(fail: bool) -> None:
        """Say hello (or fail as a plugin command should: one line, exit 2)."""
        from adapterctl.errors import UsageError

        if fail:
            raise UsageError("--fail: asked to fail")
        click.echo("hello from toy")
