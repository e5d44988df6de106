"""Option groups shared by several commands, as decorators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def json_option(f: F) -> F:
    """``--json``: print data only, on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON data only.")(f)


def source_options(f: F) -> F:
    """``--alpha``/``--rank``: the scale of a bare .safetensors that has no config."""
    f = click.option(
        "--rank", type=click.IntRange(min=1), default=None,
        help="Rank a bare .safetensors was trained with (checked against its tensors).",
    )(f)  # fmt: skip
    f = click.option(
        "--alpha", type=float, default=None,
        help="LoRA alpha of a bare .safetensors (it has no adapter_config.json).",
    )(f)  # fmt: skip
    return f


def base_option(f: F) -> F:
    """``--base BASE``: a base checkpoint folder."""
    return click.option(
        "--base", "base", metavar="BASE", default=None,
        help="Base checkpoint folder (safetensors; read from headers only).",
    )(f)  # fmt: skip


def load_source(source: str, alpha: float | None, rank: int | None) -> Any:
    """Read SOURCE as an adapter (imports the library lazily)."""
    from adapterctl.formats import read

    return read(source, alpha=alpha, rank=rank)


def load_base(base: str | None) -> Any:
    """Open BASE as a checkpoint, or None."""
    if base is None:
        return None
    from adapterctl.checkpoint import open_checkpoint

    return open_checkpoint(base)


def warn(message: str) -> None:
    """A warning, on stderr."""
    click.echo(f"Warning: {message}", err=True)
