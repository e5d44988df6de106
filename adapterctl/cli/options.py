"""Option groups shared by several commands, as decorators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def examples(*commands: str) -> str:
    """A command's ``--help`` epilog: its examples, one per line, printed as written."""
    return "\b\nExamples:\n" + "\n".join(f"  {c}" for c in commands)


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
    """``--base BASE``: a base checkpoint folder, or ``hf://OWNER/NAME[@REV]``."""
    return click.option(
        "--base", "base", metavar="BASE", default=None,
        help="Base checkpoint: a folder (safetensors) or hf://OWNER/NAME[@REV]; read from "
        "headers only (a Hub base by HTTP range requests, nothing downloaded).",
    )(f)  # fmt: skip


def load_source(source: str, alpha: float | None, rank: int | None) -> Any:
    """Read SOURCE (a path, a registry reference or hf://…) as an adapter (imports the
    library lazily)."""
    from adapterctl.refs import read_source

    return read_source(source, alpha=alpha, rank=rank)


def load_base(base: str | None) -> Any:
    """Open BASE (a folder or ``hf://…``, headers only) as a checkpoint, or None."""
    if base is None:
        return None
    from adapterctl.checkpoint import open_base

    return open_base(base)


def warn(message: str) -> None:
    """A warning, on stderr."""
    from adapterctl.cli.render import printable

    click.echo(f"Warning: {printable(message)}", err=True)


def device_option(f: F) -> F:
    """``--device auto|cpu|cuda[:N]``: where the float32 math runs."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when there is one), cpu or cuda[:N].",
    )(f)


def force_option(f: F) -> F:
    """``--force``: allow replacing an existing OUT (and nothing else)."""
    return click.option("--force", is_flag=True, help="Replace OUT if it exists.")(f)


def allow_base_mismatch_option(f: F) -> F:
    """``--allow-base-mismatch``: override a base-identity refusal."""
    return click.option(
        "--allow-base-mismatch", is_flag=True,
        help="Go on although the inputs' base identities differ (compose: the base names in "
        "their configs, compared loosely).",
    )(f)  # fmt: skip


def weights_option(f: F) -> F:
    """``-w/--weight W``, once per SOURCE."""
    return click.option(
        "-w", "--weight", "weights", type=float, multiple=True,
        help="Weight of each SOURCE, once per SOURCE in order (default 1.0 each; may be "
        "negative).",
    )(f)  # fmt: skip


def check_weights(weights: tuple[float, ...], sources: tuple[str, ...]) -> list[float] | None:
    """The weights as a list (None: 1.0 each); refuse a count that does not match SOURCE."""
    from adapterctl.errors import UsageError

    if weights and len(weights) != len(sources):
        raise UsageError(
            f"got {len(weights)} -w for {len(sources)} SOURCE(s); pass -w once per SOURCE"
        )
    return list(weights) or None


def method_options(f: F) -> F:
    """The options of the task-arithmetic methods: ``--density``, ``--majority-sign``,
    ``--convention``, ``--seed`` (see ``adapterctl methods``)."""
    f = click.option(
        "--seed", type=int, default=None, help="dare_*: seed of the drop masks (default 0)."
    )(f)
    f = click.option(
        "--convention", type=click.Choice(["adapterctl", "peft"]), default=None,
        help="ties/dare_ties: adapterctl (default; weight, then elect; divide by the agreeing "
        "weights, as mergekit) or peft (elect on unweighted deltas; divide by the agreeing "
        "count).",
    )(f)  # fmt: skip
    f = click.option(
        "--majority-sign", type=click.Choice(["total", "frequency"]), default=None,
        help="ties/dare_ties: elect each entry's sign by the sum (default) or the count of "
        "signs.",
    )(f)  # fmt: skip
    f = click.option(
        "--density", type=float, default=None, metavar="D",
        help="ties/dare/magnitude_prune: fraction of each delta's entries kept, in (0, 1].",
    )(f)  # fmt: skip
    return f


def register_option(f: F) -> F:
    """``--register NAME``: record OUT in the registry with its lineage."""
    return click.option(
        "--register", "register_as", metavar="NAME", default=None,
        help="Record OUT in the registry as the next version of NAME, with its lineage "
        "(every SOURCE must be a registry reference).",
    )(f)  # fmt: skip


def emit(report: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """Show a report: its warnings on stderr, then its JSON (``--json``) or ``render(report)``."""
    from adapterctl.cli.render import json_text

    for w in getattr(report, "warnings", []):
        warn(w)
    if as_json:
        click.echo(json_text(report.model_dump_json(indent=2)))
    else:
        render(report)
