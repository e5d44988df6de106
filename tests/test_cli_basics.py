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


def _leaf_commands() -> list[tuple[list[str], click.Command]]:
    """Every command the CLI has (a group's subcommands, plugins' commands), by path."""
    ctx = click.Context(cli)
    found: list[tuple[list[str], click.Command]] = []

    def walk(group: click.Group, path: list[str]) -> None:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None, name
            if isinstance(command, click.Group):
                walk(command, [*path, name])
            else:
                found.append(([*path, name], command))

    walk(cli, [])
    return found


def test_every_command_has_examples_that_use_its_own_options_and_a_json_flag() -> None:
    """Each command's --help ends with 1–3 examples; each example runs that command with
    options it has (so the examples cannot drift); every command takes --json."""
    import shlex

    commands = _leaf_commands()
    assert {" ".join(p) for p, _ in commands} >= {"merge", "demo", "registry gc", "export"}
    runner = CliRunner()
    for path, command in commands:
        shown = runner.invoke(cli, [*path, "--help"]).output
        tail = shown.rstrip().split("\n\n")[-1].splitlines()
        assert tail[0].strip() == "Examples:", (path, shown)
        lines = [line.strip() for line in tail[1:]]
        assert 1 <= len(lines) <= 3, path
        opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        assert "--json" in opts, f"{' '.join(path)} has no --json"
        for line in lines:
            words = shlex.split(line.split("#")[0])
            words = words[words.index("adapterctl") + 1 :]  # after any VAR= prefix
            assert words[: len(path)] == path, line
            for word in words[len(path) :]:
                if word.startswith("-"):
                    assert word.split("=")[0] in opts, f"{line}: {word} is not an option"
