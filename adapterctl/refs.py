"""Turning a SOURCE string into a local adapter path.

A SOURCE is, in this order:

1. ``hf://owner/repo[@revision]``: a Hub adapter, pulled into the registry first
   (``adapterctl.hub.pull``: checked against the Hub's hashes; a commit already pulled is
   not downloaded again), then read from its checkout.
2. A local path that exists: a PEFT folder or a bare ``.safetensors``. A local folder wins
   over a registry name spelled the same.
3. A registry reference: ``name`` (newest live version), ``name@3``, ``name@prod`` (an
   alias), ``sha256:<prefix>`` (of a version digest or an adapter digest). It resolves to a
   read-only checkout of the version under ``$ADAPTERCTL_HOME/checkouts/``.
4. Anything else is returned unchanged, for the reader to report as a missing path.

Resolving never creates a registry: with no database, a reference is simply not found.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from adapterctl.errors import NotFound, UsageError

if TYPE_CHECKING:
    from adapterctl.adapter import Adapter
    from adapterctl.registry import Registry, Version

HUB_SCHEME = "hf://"
T = TypeVar("T")


def resolve(source: str | os.PathLike[str], *, registry: Registry | None = None) -> Path:
    """The local path to read SOURCE from.

    Args:
        source: a local path, a registry reference or an ``hf://`` reference.
        registry: the registry to resolve references in (default: the one at
            ``$ADAPTERCTL_HOME``, opened only if it exists).

    Returns:
        A local folder or file: the path itself, or the checkout of a registry version.
        A path that does not exist and is not spelled like a reference comes back
        unchanged (the format reader reports it).

    Raises:
        NotFound: an unknown name, version or alias, or an ambiguous digest prefix (the
            message lists what exists); an ``hf://`` repository or revision that does not
            exist.
        RemoteError: the Hub cannot be reached, refuses the token, or sends a file that does
            not match its hash (exit 6).
        VersionRemoved: the reference names a removed version (the message names the
            tombstone).

    Example:
        >>> resolve("out/checkpoint-500")
        PosixPath('out/checkpoint-500')
        >>> resolve("chat@prod")
        PosixPath('/home/me/.local/share/adapterctl/checkouts/5f0c…')
    """
    text = os.fspath(source)
    if text.startswith(HUB_SCHEME):
        return _with_registry(registry, lambda reg: reg.checkout(_pulled(text, reg)))
    path = Path(text)
    if registry is not None:
        return registry.local_source(text)
    if path.exists():  # no need to look for a registry
        return path
    from adapterctl.registry import Registry, is_ref

    if not is_ref(text):
        return path
    try:
        registry = Registry(create=False)
    except NotFound:
        raise NotFound(
            f"{text}: no such adapter file or folder, and the registry is empty; "
            "check the path, or add it with: adapterctl add PATH --name NAME"
        ) from None
    with registry:
        return registry.local_source(text)


def registry_versions(
    sources: list[str], *, registry: Registry | None = None
) -> list[Version | None]:
    """The registry version each SOURCE names (None for a local path).

    Raises:
        NotFound: a reference that does not resolve.
    """
    missing = [s for s in sources if not Path(s).exists()]
    if not missing:  # all local paths: no need to load the registry at all
        return [None] * len(sources)
    from adapterctl.registry import is_ref

    refs = [s for s in missing if is_ref(s) or s.startswith(HUB_SCHEME)]
    if not refs:
        return [None] * len(sources)

    def lookup(reg: Registry) -> dict[str, Version]:
        return {r: _pulled(r, reg) if r.startswith(HUB_SCHEME) else reg.resolve(r) for r in refs}

    by_ref = _with_registry(registry, lookup, create=any(r.startswith(HUB_SCHEME) for r in refs))
    return [by_ref.get(s) for s in sources]


def _pulled(text: str, reg: Registry) -> Version:
    """The registry version of the Hub adapter ``text`` (``hf://…``), pulled if need be."""
    from adapterctl.hub import pull

    return reg.show(pull(text, home=reg.home).version)


def _with_registry(
    registry: Registry | None, use: Callable[[Registry], T], *, create: bool = True
) -> T:
    """``use(registry)``, or with the default registry opened (and closed) for the call."""
    if registry is not None:
        return use(registry)
    from adapterctl.registry import Registry

    with Registry(create=create) as reg:
        return use(reg)


def read_source(
    source: str | os.PathLike[str] | Adapter, *, alpha: float | None = None, rank: int | None = None
) -> Adapter:
    """SOURCE read as an adapter (an ``Adapter`` passes through).

    Args:
        source: a local path, a registry reference, or an adapter already read.
        alpha: LoRA alpha of a bare ``.safetensors``.
        rank: its rank.

    Raises:
        NotFound: no such path or reference (4).
    """
    from adapterctl.adapter import Adapter
    from adapterctl.formats import read

    if isinstance(source, Adapter):
        return source
    return read(resolve(source), alpha=alpha, rank=rank)


def read_inputs(
    sources: Sequence[str | os.PathLike[str] | Adapter],
    *,
    alpha: float | None = None,
    register_as: str | None = None,
) -> tuple[list[Adapter], list[Version | None]]:
    """The adapters a workflow combines, and the registry version each came from (None for a
    local path or an adapter already read), whose base pins and lineage the workflow records.

    Raises:
        UsageError: ``register_as`` with a source that is not a registry reference (lineage
            links versions) (2).
        NotFound: no such path or reference (4).
    """
    from adapterctl.adapter import Adapter

    texts = [None if isinstance(s, Adapter) else os.fspath(s) for s in sources]
    found = iter(registry_versions([t for t in texts if t is not None]))
    versions = [None if t is None else next(found) for t in texts]
    if register_as and any(v is None for v in versions):
        raise UsageError(
            "--register records lineage, so every SOURCE must be a registry reference; "
            "add local adapters first with: adapterctl add PATH --name NAME"
        )
    if not any(versions):
        return [read_source(s, alpha=alpha) for s in sources], versions

    def read_all(reg: Registry) -> list[Adapter]:
        # a version already resolved (an hf:// source already pulled) is read from its
        # checkout, not resolved (or asked of the Hub) a second time
        return [
            read_source(s, alpha=alpha) if v is None else read(reg.checkout(v), alpha=alpha)
            for s, v in zip(sources, versions, strict=True)
        ]

    from adapterctl.formats import read

    return _with_registry(None, read_all, create=False), versions
