"""``adapterctl demo``: build a tiny base and adapters, then run the commands on them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from adapterctl.cli import cli
from adapterctl.cli.options import examples, json_option
from adapterctl.cli.render import human_bytes

if TYPE_CHECKING:
    from adapterctl.demo import Step


@cli.command(
    "demo",
    epilog=examples(
        "adapterctl demo",
        "adapterctl demo --keep /tmp/adapterctl-demo",
        "adapterctl demo --json    # each step's command, exit code and output",
    ),
)
@click.option(
    "--keep", "keep", metavar="DIR", default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the demo files to DIR (new or empty) and keep them.",
)  # fmt: skip
@json_option
def demo_command(keep: Path | None, as_json: bool) -> None:
    """Walk through adapterctl on a tiny Llama-shaped base and three adapters.

    The files are written with torch and safetensors from fixed seeds (no download, no
    transformers), into a temporary folder removed at the end unless --keep is given.
    """
    from adapterctl.demo import build, steps
    from adapterctl.errors import Conflict

    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise Conflict(f"{keep}: not empty; choose a new folder for --keep or remove it")
        keep.mkdir(parents=True, exist_ok=True)
        root_cm: contextlib.AbstractContextManager[str] = contextlib.nullcontext(str(keep))
    else:
        root_cm = tempfile.TemporaryDirectory(prefix="adapterctl-demo-")
    with root_cm as root_str:
        root = Path(root_str)
        files = build(root)
        written = sorted(p for p in root.rglob("*") if p.is_file())
        if not as_json:
            click.echo(f"adapterctl demo: files in {root}")
            for f in written:
                rel = f.relative_to(root).as_posix()
                click.echo(f"  {rel:<52} {human_bytes(f.stat().st_size)}")
        unexpected: list[str] = []
        ran: list[dict[str, object]] = []
        # The registry steps use a registry inside the demo folder, never the user's.
        with _cwd(root), _env("ADAPTERCTL_HOME", str(root / "registry")):
            for step in steps(files):
                if as_json:  # each step's output captured into the report
                    out, err = io.StringIO(), io.StringIO()
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        code = _run_step(step)
                    ran.append({"command": step.command, "note": step.note, "exit_code": code,
                                "expected_exit": step.expect_exit, "stdout": out.getvalue(),
                                "stderr": err.getvalue()})  # fmt: skip
                else:
                    code = _run_step(step)
                if code != step.expect_exit:
                    unexpected.append(
                        f"`{step.command}` exited {code}, expected {step.expect_exit}"
                    )
        if as_json:
            listed = [
                {"path": f.relative_to(root).as_posix(), "size": f.stat().st_size} for f in written
            ]
            report = {"root": str(root), "kept": keep is not None, "files": listed, "steps": ran}
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo()
            if keep is not None:
                click.echo(f"Demo files kept in {root}")
            else:
                click.echo("Demo files removed (keep them with --keep DIR).")
    if unexpected:
        # A step that should have worked did not: that is a bug in adapterctl, not in the demo.
        raise RuntimeError("demo step " + "; ".join(unexpected))


def _run_step(step: Step) -> int:
    """Print the step's header, run it through the CLI and return its exit code."""
    click.echo()
    click.echo(f"# {step.note}")
    click.echo(f"$ {step.command}")
    try:
        rv = cli.main(step.args, prog_name="adapterctl", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 130:
            raise
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    else:
        code = rv if isinstance(rv, int) else 0
    if code != 0:
        expected = " (expected)" if code == step.expect_exit else ""
        click.echo(f"[exit {code}{expected}]")
    return code


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the steps, then put back what was there."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Run the steps from the demo folder so the commands show short relative paths."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
