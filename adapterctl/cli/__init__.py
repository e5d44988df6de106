"""The ``adapterctl`` command line: a thin skin over the library.

Each command parses its flags, calls one library function and renders the result. Errors
are mapped to exit codes here, in one place (see ``AdapterctlGroup.invoke``). Library modules
(and torch) are imported inside commands so ``adapterctl --help`` stays fast.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback
from typing import Any

import click

from adapterctl import __version__
from adapterctl.errors import AdapterctlError

# The module of each command, under adapterctl.cli (commands attach themselves to ``cli`` when
# it is imported): a command imports only its own module, ``--help`` imports them all.
COMMAND_MODULES = {
    "add": "registry_cmd",
    "compose": "compose_cmd",
    "convert": "convert_cmd",
    "demo": "demo_cmd",
    "diff": "diff_cmd",
    "export": "registry_cmd",
    "inspect": "inspect_cmd",
    "list": "registry_cmd",
    "log": "registry_cmd",
    "merge": "merge_cmd",
    "methods": "methods_cmd",
    "plugins": "plugins_cmd",
    "pull": "hub_cmd",
    "push": "hub_cmd",
    "registry": "registry_cmd",
    "resize": "resize_cmd",
    "rm": "registry_cmd",
    "show": "registry_cmd",
    "tag": "registry_cmd",
    "validate": "validate_cmd",
}


class AdapterctlGroup(click.Group):
    """A click group that turns every error into a one-line message and an exit code, and
    imports a command's module when the command is looked up."""

    plugins_added = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:
            self.add_plugin_commands()
        except AdapterctlError as exc:  # --help still lists the built-in commands
            warn_plugins([str(exc)])
        return sorted(set(COMMAND_MODULES) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            importlib.import_module(f"adapterctl.cli.{module}")
        elif module is None:  # not built in: a plugin's, perhaps (loaded only then)
            self.add_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def add_plugin_commands(self) -> None:
        """Let plugins add their commands (``register_commands``), once."""
        if not self.plugins_added:
            self.plugins_added = True
            from adapterctl.plugins import add_commands

            add_commands(self, set(COMMAND_MODULES))

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
            from adapterctl.extras import EXTRAS, missing

            if isinstance(exc, ModuleNotFoundError) and exc.name in EXTRAS:  # an optional part
                err = missing(exc.name, f"`adapterctl {ctx.invoked_subcommand}`")
                _die(str(err), err.exit_code)
            if os.environ.get("ADAPTERCTL_DEBUG"):
                traceback.print_exc()
            detail = str(exc).splitlines()[0] if str(exc) else ""
            _die(
                f"internal error: {type(exc).__name__}: {detail}; "
                "set ADAPTERCTL_DEBUG=1 for a traceback and report it",
                70,
            )
        finally:
            warn_plugins()  # plugins that failed to load, once (_die has printed them already)


def warn_plugins(extra: list[str] | None = None) -> None:
    """Print, once, a warning line for each plugin that failed to load (and ``extra``)."""
    plugins = sys.modules.get("adapterctl.plugins")  # loaded only by commands that use plugins
    lines = (extra or []) + (plugins.take_warnings() if plugins is not None else [])
    if lines:
        from adapterctl.cli.render import printable

        for line in lines:
            click.echo(f"warning: {printable(line)}", err=True)


def _die(message: str, code: int) -> None:
    warn_plugins()
    if os.environ.get("ADAPTERCTL_DEBUG") and code != 130 and sys.exc_info()[0] is not None:
        traceback.print_exc()
    from adapterctl.cli.render import printable  # messages name files, tensors, keys

    click.echo(f"Error: {printable(message)}", err=True)
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
    try:
        cli(prog_name="adapterctl")
    finally:
        # The process ends here: spare the interpreter's last garbage collections over every
        # object still alive (about 0.07 s after a merge; files are closed by then).
        gc.freeze()


__all__ = ["COMMAND_MODULES", "cli", "main"]
