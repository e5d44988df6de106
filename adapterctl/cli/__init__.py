"""The ``adapterctl`` command line: a thin skin over the library.

Each command parses its flags, calls one library function and renders the result. Errors
are mapped to exit codes here, in one place (see ``AdapterctlGroup.invoke``). Library modules
(and torch) are imported inside commands so ``adapterctl --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click

from adapterctl import __version__
from adapterctl.errors import AdapterctlError


class AdapterctlGroup(click.Group):
    """A click group that turns every error into a one-line message and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterctlError as exc:
            _die(str(exc), exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            _die("interrupted", 130)
        except BrokenPipeError:
            sys.exit(1)
        except OSError as exc:
            # A file we could not read or write (a folder where a file should be, permissions,
            # a full disk): operational, not a bug.
            where = f"{exc.filename}: " if exc.filename else ""
            why = exc.strerror or str(exc) or type(exc).__name__
            _die(f"{where}{why}; check the path, its permissions and free space", 1)
        except Exception as exc:
            if os.environ.get("ADAPTERCTL_DEBUG"):
                traceback.print_exc()
            detail = str(exc).splitlines()[0] if str(exc) else ""
            _die(
                f"internal error: {type(exc).__name__}: {detail}; "
                "set ADAPTERCTL_DEBUG=1 for a traceback and report it",
                70,
            )


def _die(message: str, code: int) -> None:
    if os.environ.get("ADAPTERCTL_DEBUG") and code != 130 and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


@click.group(cls=AdapterctlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterctl")
def cli() -> None:
    """Inspect, validate, version, compose, diff and merge LoRA adapters.

    SOURCE is a PEFT adapter folder or a bare .safetensors (with --alpha).
    BASE is a base checkpoint folder (safetensors, sharded or not, 16/32-bit or NF4).

    Exit codes: 0 ok, 1 operational error, 2 usage, 3 validation failed,
    4 not found, 5 conflict, 6 remote, 70 internal error, 130 interrupted.
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="adapterctl")


# Commands attach themselves to ``cli`` on import.
from adapterctl.cli import (  # noqa: E402
    compose_cmd,
    demo_cmd,
    diff_cmd,
    inspect_cmd,
    merge_cmd,
    methods_cmd,
    plugins_cmd,
    registry_cmd,
    resize_cmd,
    validate_cmd,
)

__all__ = [
    "cli", "compose_cmd", "demo_cmd", "diff_cmd", "inspect_cmd", "main", "merge_cmd",
    "methods_cmd", "plugins_cmd", "registry_cmd", "resize_cmd", "validate_cmd",
]  # fmt: skip
