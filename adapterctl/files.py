"""Writing files safely and fast: everything adapterctl writes goes to a hidden sibling first
and is renamed into place only when complete; byte ranges are copied in the kernel and written
at planned offsets."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from adapterctl.errors import Conflict, OperationalError


def refuse_existing(out: str | os.PathLike[str], *, force: bool) -> None:
    """Refuse an output path that exists, unless ``force`` (the one wording everywhere).

    Raises:
        Conflict: ``out`` exists and ``force`` is False (exit 5).
    """
    if not force and os.path.lexists(out):
        raise Conflict(f"{os.fspath(out)}: already exists; choose another -o or pass --force")


def refuse_overlap(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]
) -> None:
    """Refuse an OUT that is, contains, or lies inside one of ``inputs`` — whatever ``--force``
    says: writing it would destroy an input. Paths are compared by device and inode, so
    symlinks, ``..`` and other spellings of the same place are caught.

    Raises:
        Conflict: OUT overlaps an input (exit 5), naming both.
    """
    target = Path(os.path.abspath(out))
    around = {_identity(a): a for a in (target, *target.parents) if _identity(a) is not None}
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        src = Path(os.path.abspath(given))
        ident = _identity(src)
        if ident in around:
            where = "is" if around[ident] == target else "lies inside"
            raise Conflict(
                f"{os.fspath(out)}: {where} the input {os.fspath(given)}; writing it would "
                "destroy the input (--force never does): choose another -o"
            )
        if target.exists() and target.is_dir():
            ancestors = {_identity(a) for a in src.resolve().parents}
            if _identity(target) in ancestors:
                raise Conflict(
                    f"{os.fspath(out)}: contains the input {os.fspath(given)}; writing it would "
                    "destroy the input (--force never does): choose another -o"
                )


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names (symlinks followed), or None when nothing is
    there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be
    opened (not POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside first
    and deleted after, so ``out`` is always either the old folder or the complete new one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)  # a file (or link) replaced by --force: no leftover
    else:
        tmp.rename(out)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A new hidden sibling folder of ``out`` to write into; renamed to ``out`` when the block
    ends (``replace_dir``), deleted with its contents when it raises (or is interrupted), so
    ``out`` is never half-written."""
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """A new hidden sibling file of ``out`` to write (by name); renamed to ``out`` when the
    block ends, deleted when it raises (or is interrupted), so ``out`` is never half-written."""
    parent = out.parent if str(out.parent) else Path(".")
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """Write ``text`` (UTF-8) to a hidden sibling of ``path``, flush it to disk, then rename it
    into place: readers see the old file or the new one, never part of it.

    Raises:
        OperationalError: the folder cannot be written (exit 1), naming ``what`` was written.
    """
    parent = path.parent if str(path.parent) else Path(".")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OperationalError(
            f"{path}: cannot write the {what} ({exc.strerror or exc}); check the folder"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


POSITIONED_WRITES = hasattr(os, "pwrite")  # POSIX; not on Windows


def pwrite_all(fd: int, data: Any, offset: int) -> int:
    """Write every byte of ``data`` (any buffer) into ``fd`` at ``offset``; returns the count.

    Positioned writes leave the file position alone, so several threads can fill disjoint
    ranges of one file. Where the system has none (``POSITIONED_WRITES`` is False) this seeks
    and writes, which moves the position: one writer per file at a time there.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    if not POSITIONED_WRITES:
        os.lseek(fd, offset, os.SEEK_SET)
    while view:
        n = os.pwrite(fd, view, offset) if POSITIONED_WRITES else os.write(fd, view)
        view = view[n:]
        offset += n
    return total


def copy_range(src: Path, start: int, count: int, dst_fd: int, offset: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``start`` into ``dst_fd`` at ``offset``: in the
    kernel where the system can (``copy_file_range``), else by reads and positioned writes.

    Raises:
        EOFError: ``src`` ends before ``start + count``.
    """
    with open(src, "rb", buffering=0) as fh:
        use_kernel = hasattr(os, "copy_file_range")
        while count:
            n = 0
            if use_kernel:
                try:
                    n = os.copy_file_range(fh.fileno(), dst_fd, min(count, 1 << 30), start, offset)
                except OSError:
                    use_kernel = False
            if not use_kernel:
                fh.seek(start)
                chunk = fh.read(min(count, 1 << 24))
                n = pwrite_all(dst_fd, chunk, offset) if chunk else 0
            if n == 0:
                raise EOFError(f"{src} ends inside the range to copy")
            count -= n
            start += n
            offset += n
