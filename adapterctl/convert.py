"""Converting an adapter between formats: read in whichever format it is, write with a
registered writer (``adapterctl.formats.writers``; plugins add theirs)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from adapterctl.errors import UsageError
from adapterctl.files import refuse_overlap
from adapterctl.formats import writers
from adapterctl.refs import read_source


class ConvertReport(BaseModel):
    """What ``convert`` read and wrote."""

    source: str
    source_format: str
    to: str
    out: str
    modules: int


def convert(
    source: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    alpha: float | None = None,
    rank: int | None = None,
) -> ConvertReport:
    """Read the adapter ``source`` in whichever format it is and write it with the writer
    ``to``: every module's ΔW unchanged (the writer decides how its format carries scales).

    Args:
        source: a SOURCE as the commands take it (path, registry ref, ``hf://``).
        to: a writer's name (``adapterctl plugins`` lists them; built in: ``peft``).
        out: where to write; never one of the inputs.
        force: replace ``out`` if it exists.
        alpha, rank: for a source with no config (a bare ``.safetensors``).

    Raises:
        UsageError: no writer of that name (the message lists the ones there are).
        Conflict: ``out`` exists without ``force``, or is (or holds, or lies in) the source.
        UnsupportedAdapter: the format cannot carry something the adapter has.

    Example:
        >>> convert("lora.safetensors", "peft", "lora-peft", alpha=16).modules
        28
    """

    by_name = {w.name: w for w in writers()}
    if to not in by_name:
        known = ", ".join(sorted(by_name)) or "none"
        raise UsageError(
            f"--to {to!r}: no such writer (there are: {known}); a plugin may add it, see: "
            "adapterctl plugins"
        )
    adapter = read_source(str(source), alpha=alpha, rank=rank)
    refuse_overlap(Path(out), [adapter.path])
    written = by_name[to].write(adapter, Path(out), force=force)
    return ConvertReport(
        source=str(source),
        source_format=adapter.format,
        to=to,
        out=str(written),
        modules=len(adapter.modules),
    )
