"""CLI contract: help without torch, exit codes documented."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from adapterctl.cli import cli


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
    for name in cli.commands:
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
