"""Versions materialised as ordinary files: the read-only checkout cache under
``checkouts/<hex>`` (so any command can read a registry reference) and ``export`` into a new
folder of the user's.

A checkout is a cache of blobs, so it is never trusted blindly. When one is written, the
identity of each of its files is stamped into ``.adapterctl-checkout.json`` inside it: size,
``st_mtime_ns``, ``st_ctime_ns`` and inode. Each use compares the files against that stamp
(one ``lstat`` per file, and a listing of the folder for files that should not be there): a
file whose identity still matches is trusted; any other is re-hashed, and a checkout whose
bytes no longer give the version's sha256s (or that gained or lost a file) is made again
from the blobs, with a warning on the ``adapterctl.registry`` logger (stderr, from the CLI).
The ctime is what makes the stamp worth having: writing to a file always changes it, and no
user call sets it back, so restoring a file's mtime after editing it does not pass for
intact. ``registry verify`` and ``registry gc`` ignore the stamps and re-hash everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from adapterctl.errors import Conflict, UsageError
from adapterctl.files import staged_dir, write_text_atomic
from adapterctl.registry.blobs import BlobStore
from adapterctl.registry.models import FileEntry, Version

STAMP = ".adapterctl-checkout.json"  # hidden: no reader lists it as a file of the adapter
log = logging.getLogger("adapterctl.registry")

# (size, mtime_ns, ctime_ns, inode) of a checked-out file, as stamped when it was verified.
_Identity = list[int]


def checkout_dir(checkouts: Path, v: Version) -> Path:
    """Where the checkout of ``v`` lives (named by its digest's hex)."""
    return checkouts / v.digest.split(":", 1)[1]


def checkout(store: BlobStore, checkouts: Path, v: Version) -> Path:
    """A local, read-only copy of ``v`` whose files are the version's (see
    ``Registry.checkout``): made from the blobs when missing, checked against its stamp when
    present, and made again from the blobs (with a warning) when its files were changed.

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
    if dest.exists() and not intact(dest, v.files, trust_stamp=True):
        log.warning(
            "registry checkout %s of %s no longer holds the version's files (changed since it "
            "was written); made it again from the stored blobs",
            dest,
            v.ref,
        )
        _discard(dest)
    if not dest.exists():
        _materialise(store, dest, v.files)
    if v.format != "peft" and len(v.files) == 1:
        return dest / v.files[0].path
    return dest


def _materialise(store: BlobStore, dest: Path, files: Sequence[FileEntry]) -> None:
    """Copy ``files`` from the blobs into a temporary sibling of ``dest``, stamp it and rename
    it into place, all under the blobs' shared lock (so ``gc`` never deletes the temporary
    folder half-way). Another process that wins the race keeps its copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with store.lock(exclusive=False):
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
        try:
            store.copy_out(files, tmp, 0o444)
            _write_stamp(tmp, {e.path: _identity(os.lstat(tmp / e.path)) for e in files})
            with contextlib.suppress(OSError):  # another process won the race: use its copy
                os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _discard(dest: Path) -> None:
    """Move an altered checkout out of the way (a reader that has it open keeps its files),
    then delete it."""
    trash = dest.parent / f".old-{dest.name}-{os.getpid()}"
    try:
        os.replace(dest, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    remove(trash)


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


def intact(d: Path, files: Sequence[FileEntry], *, trust_stamp: bool) -> bool:
    """True if the checkout ``d`` holds exactly ``files``: no file missing or added (hidden
    names aside), each a regular file with its size and sha256.

    Args:
        d: the checkout folder.
        files: the version's files.
        trust_stamp: skip re-hashing a file whose size, mtime, ctime and inode are those
            stamped when it was last verified (and re-stamp the files it had to re-hash);
            False re-hashes every file (``registry verify`` and ``gc``).
    """
    from adapterctl.identity import file_sha256

    if not d.is_dir() or _listing(d) != {e.path for e in files}:
        return False
    stamp = _read_stamp(d) if trust_stamp else {}
    seen: dict[str, _Identity] = {}
    for e in files:
        p = d / e.path
        try:
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
                return False
            seen[e.path] = _identity(st)
            if stamp.get(e.path) != seen[e.path] and file_sha256(p) != e.sha256:
                return False
        except OSError:  # gone, or unreadable: not a copy anyone can use
            return False
    if trust_stamp and seen != stamp:
        with contextlib.suppress(OSError):  # a read-only cache is still usable, only slower
            _write_stamp(d, seen)
    return True


def _listing(d: Path) -> set[str]:
    """The relative paths of everything under ``d`` that is not a folder, hidden names left
    out (as the adapter readers leave them out)."""
    out = set()
    for p in d.rglob("*"):
        rel = p.relative_to(d)
        hidden = any(part.startswith(".") for part in rel.parts)
        if (not p.is_dir() or p.is_symlink()) and not hidden:
            out.add(rel.as_posix())
    return out


def _identity(st: os.stat_result) -> _Identity:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamp(d: Path) -> dict[str, _Identity]:
    """The stamp of checkout ``d``; empty when it is missing or unreadable (everything is
    then re-hashed)."""
    try:
        data = json.loads((d / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(d: Path, identities: dict[str, _Identity]) -> None:
    write_text_atomic(d / STAMP, json.dumps(identities, sort_keys=True), "checkout stamp")


def remove(p: Path) -> None:
    """Delete a file or a folder tree, whichever ``p`` is; nothing if it is gone."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
