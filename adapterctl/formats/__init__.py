"""Adapter formats: readers that turn files on disk into an ``Adapter``, and writers that
turn an ``Adapter`` back into files (``adapterctl.convert``).

Readers are registered through the ``register_formats`` plugin hook, writers through
``register_writers``; the built-in ones (PEFT folder, bare ``.safetensors``; the PEFT-folder
writer) use the same hooks as third-party plugins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterctl.adapter import Adapter
from adapterctl.errors import BrokenFile, NotFound


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need beyond the path: alpha and rank for files without a config."""

    alpha: float | None = None
    rank: int | None = None


class AdapterFormat(Protocol):
    """What a format plugin provides."""

    name: str
    description: str

    def detect(self, path: Path) -> bool:
        """True if ``path`` looks like this format (cheap: names and headers only)."""
        ...

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        """Read the adapter at ``path`` lazily (tensors stay on disk)."""
        ...


class AdapterWriter(Protocol):
    """What a writer plugin provides: ``adapterctl convert --to <name>``."""

    name: str
    description: str

    def write(self, adapter: Adapter, out: Path, *, force: bool) -> Path:
        """Write ``adapter`` at ``out`` (a folder or a file, as the format has it), atomically,
        and return what was written; ``force`` replaces an existing ``out``."""
        ...


def writers() -> list[AdapterWriter]:
    """Every registered writer, plugins' first, then the built-ins (``plugins.collect``)."""
    from adapterctl.plugins import collect

    return collect("register_writers")


def formats() -> list[AdapterFormat]:
    """Every registered format, plugins' first, then the built-ins (``plugins.collect``)."""
    from adapterctl.plugins import collect

    return collect("register_formats")


def read(
    path: str | os.PathLike[str], *, alpha: float | None = None, rank: int | None = None
) -> Adapter:
    """Read an adapter from a local path in whichever registered format recognises it.

    Args:
        path: a PEFT adapter folder or a bare ``.safetensors`` of PEFT keys.
        alpha: LoRA alpha, for files that carry no config (a bare ``.safetensors``).
        rank: the rank those files were trained with (optional, checked against the tensors).

    Returns:
        The adapter, with tensors still on disk.

    Raises:
        NotFound: nothing at ``path``.
        BrokenFile: the files are malformed, empty, or no format recognises them.
        UnsupportedAdapter: a PEFT type other than LoRA.

    Example:
        >>> adapter = read("out/checkpoint-500")
        >>> sorted(adapter.modules)[:1]
        ['model.layers.0.self_attn.q_proj']
    """
    p = Path(path)
    if not p.exists():
        raise NotFound(f"{p}: no such adapter file or folder; check the path")
    options = ReadOptions(alpha=alpha, rank=rank)
    for fmt in formats():
        if fmt.detect(p):
            return fmt.read(p, options)
    if p.is_dir():
        raise BrokenFile(
            f"{p}: no adapter weights found (expected adapter_config.json with "
            "adapter_model.safetensors); point at the adapter folder"
        )
    raise BrokenFile(f"{p}: not an adapter format adapterctl knows (PEFT folder or .safetensors)")
