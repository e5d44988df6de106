"""Versions materialised as ordinary files: the read-only checkout cache under
``checkouts/<hex>`` (so any command can read a registry reference) and ``export`` into a new
folder of the user's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adapterctl.errors import Conflict, UsageError
from adapterctl.files import staged_dir
from adapterctl.registry.blobs import BlobStore
from adapterctl.registry.models import FileEntry, Version


def checkout_dir(checkouts: Path, v: Version) -> Path:
    """Where the checkout of ``v`` lives (named by its digest's hex)."""
    return checkouts / v.digest.split(":", 1)[1]


def checkout(store: BlobStore, checkouts: Path, v: Version) -> Path:
    """A local, read-only copy of ``v`` (see ``Registry.checkout``).

    Args:
        store: the blobs to copy from.
        checkouts: the cache folder.
        v: the version.

    Returns:
        The folder (PEFT adapter) or the single file (bare ``.safetensors``).

    Raises:
        OperationalError: a blob is missing or altered (1).
    """
    dest = checkout_dir(checkouts, v)
    if not dest.exists():
        checkouts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=checkouts, prefix=".tmp-"))
        try:
            with store.lock(exclusive=False):
                store.copy_out(v.files, tmp, 0o444)
            with contextlib.suppress(OSError):  # another process won the race: use its
                os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if v.format != "peft" and len(v.files) == 1:
        return dest / v.files[0].path
    return dest


def export(store: BlobStore, v: Version, dest: str | os.PathLike[str]) -> Path:
    """Write ``v``'s files, byte for byte, into a new folder (see ``Registry.export``).

    Returns:
        ``dest``.

    Raises:
        Conflict: ``dest`` exists and is not empty (5).
        OperationalError: a blob is missing or altered (1).
    """
    if os.fspath(dest).startswith("hf:"):
        raise UsageError(f"{os.fspath(dest)}: export writes a local folder; publish with push")
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Conflict(f"{out}: exists and is not empty; choose a new folder")
    with staged_dir(out) as tmp, store.lock(exclusive=False):
        store.copy_out(v.files, tmp, 0o644)
    return out


def intact(d: Path, files: Sequence[FileEntry], *, deep: bool) -> bool:
    """True if the checkout ``d`` still holds ``files`` (sizes; with ``deep``, sha256s too)."""
    from adapterctl.identity import file_sha256

    for e in files:
        p = d / e.path
        if not p.is_file() or p.stat().st_size != e.size:
            return False
        if deep and file_sha256(p) != e.sha256:
            return False
    return True


def remove(p: Path) -> None:
    """Delete a file or a folder tree, whichever ``p`` is; nothing if it is gone."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
