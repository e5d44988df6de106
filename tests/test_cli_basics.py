"""CLI contract: help without torch, exit codes documented."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from adapterctl.cli import COMMAND_MODULES, cli


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from adapterctl.cli import cli\n"
        "try:\n"
        "    cli(['--help'], prog_name='adapterctl')\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("ok")


def test_every_command_has_help() -> None:
    runner = CliRunner()
    for name in cli.list_commands(click.Context(cli)):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


def test_unknown_flag_is_usage_error() -> None:
    result = CliRunner().invoke(cli, ["inspect", "--nope", "x"])
    assert result.exit_code == 2


def test_missing_source_is_not_found(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 4
    assert "no such adapter" in result.output


def test_commands_are_imported_on_demand() -> None:
    """``COMMAND_MODULES`` names each command's module (and every command is in it), and a
    command imports its own module only."""
    import importlib

    for module in set(COMMAND_MODULES.values()):
        importlib.import_module(f"adapterctl.cli.{module}")
    builtin = {n: c for n, c in cli.commands.items() if not hasattr(c, "adapterctl_plugin")}
    assert set(builtin) == set(COMMAND_MODULES)  # (plugins' commands are marked as theirs)
    for name, command in builtin.items():
        assert command.callback is not None
        assert command.callback.__module__ == f"adapterctl.cli.{COMMAND_MODULES[name]}", name
    code = (
        "import sys\n"
        "from adapterctl.cli import cli\n"
        "try:\n"
        "    cli(['merge', '--help'], prog_name='adapterctl')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.endswith('_cmd')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['adapterctl.cli.merge_cmd']"
