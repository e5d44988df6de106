"""The plugin system: built-ins register through the same hooks; name clashes are errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from adapterctl import plugins
from adapterctl.cli import cli
from adapterctl.errors import Conflict
from adapterctl.hookspecs import hookimpl


class _Plugin:
    """A third-party plugin registering one format called ``name``."""

    def __init__(self, name: str) -> None:
        self.format_name = name

    @hookimpl
    def register_formats(self, register: Any) -> None:
        class Fmt:
            name = self.format_name
            description = "test format"

            def detect(self, path: Path) -> bool:
                return False

            def read(self, path: Path, options: Any) -> Any:
                raise AssertionError("never detected")

        register(Fmt())


@pytest.fixture
def extra_plugin() -> Iterator[list[object]]:
    added: list[object] = []
    yield added
    for p in added:
        plugins.manager().unregister(p)


def test_builtins_come_first_then_plugins(extra_plugin: list[object]) -> None:
    plugin = _Plugin("kohya")
    plugins.manager().register(plugin, name="test-kohya")
    extra_plugin.append(plugin)
    names = [f.name for f in plugins.collect("register_formats")]
    assert names == ["peft", "safetensors", "kohya"]
    data = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).stdout)
    assert "test-kohya" in data["plugins"]
    assert [f["name"] for f in data["formats"]] == names


def test_name_clash_is_an_error(extra_plugin: list[object]) -> None:
    plugin = _Plugin("peft")
    plugins.manager().register(plugin, name="test-clash")
    extra_plugin.append(plugin)
    with pytest.raises(Conflict, match="two plugins register formats 'peft'"):
        plugins.collect("register_formats")
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 5
    assert "uninstall one of them" in result.output
