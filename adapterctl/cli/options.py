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
    """Read SOURCE (a path, a registry reference or hf://…) as an adapter (imports the
    library lazily)."""
    from adapterctl.formats import read
    from adapterctl.refs import resolve

    return read(resolve(source), alpha=alpha, rank=rank)


def load_base(base: str | None) -> Any:
    """Open BASE as a checkpoint, or None."""
    if base is None:
        return None
    from adapterctl.checkpoint import open_checkpoint

    return open_checkpoint(base)


def warn(message: str) -> None:
    """A warning, on stderr."""
    click.echo(f"Warning: {message}", err=True)


def device_option(f: F) -> F:
    """``--device auto|cpu|cuda[:N]``: where the float32 math runs."""
    return click.option(
        "--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."
    )(f)


def force_option(f: F) -> F:
    """``--force``: allow replacing an existing OUT (and nothing else)."""
    return click.option("--force", is_flag=True, help="Replace OUT if it exists.")(f)


def allow_base_mismatch_option(f: F) -> F:
    """``--allow-base-mismatch``: override a base-identity refusal."""
    return click.option(
        "--allow-base-mismatch", is_flag=True,
        help="Go on although the inputs name different base models (compared loosely by "
        "name for now; registry base pins come later).",
    )(f)  # fmt: skip
