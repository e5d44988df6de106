"""The content-addressed store: every stored file once, under ``blobs/sha256/<2>/<hex>``,
written to a temporary name, fsynced, renamed into place and made read-only; and the
``gc.lock`` that keeps ``gc`` from deleting a blob an ``add`` has written but not committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from adapterctl.errors import OperationalError
from adapterctl.files import fsync_dir
from adapterctl.registry.models import FileEntry

_CHUNK = 1 << 20


def copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to a new file ``dst``, fsync it; return (hex sha256, size) of what was
    copied."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(src, "rb", buffering=0) as fi, open(dst, "xb") as fo:
        while n := fi.readinto(buf):
            h.update(view[:n])
            fo.write(view[:n])
            size += n
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), size


class BlobStore:
    """The blobs under one registry home.

    Args:
        home: the registry's folder; blobs live in ``blobs/sha256/``, files being written in
            ``tmp/``, the lock in ``gc.lock``.
    """

    def __init__(self, home: Path):
        self.home = home
        self.root = home / "blobs" / "sha256"
        self.tmp = home / "tmp"

    def path(self, sha256: str) -> Path:
        """Where the blob with this hex sha256 lives."""
        return self.root / sha256[:2] / sha256

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Writers of blobs share this lock; ``gc`` takes it alone, so it never deletes a blob
        an ``add`` has written but not yet committed. Released by the kernel if we die."""
        try:
            import fcntl
        except ImportError:  # Windows: gc relies on being run alone
            yield
            return
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.home / "gc.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def put(self, src: Path, sha256: str) -> bool:
        """Copy ``src`` into the store unless a blob with its hash is there.

        Args:
            src: the file.
            sha256: its hex sha256, as hashed for the manifest.

        Returns:
            True if the blob was written, False if it was already stored.

        Raises:
            OperationalError: ``src`` changed since it was hashed (1).
        """
        dest = self.path(sha256)
        if dest.exists():
            return False
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()
            got, _ = copy_hashed(src, tmp)
            if got != sha256:
                raise OperationalError(
                    f"{src}: changed while it was being added (sha256 differs); "
                    "add it again once it is no longer being written"
                )
            os.chmod(tmp, 0o444 & os.stat(src).st_mode)  # read-only; never wider than src
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            if tmp.exists():
                tmp.unlink()
        return True

    def copy_out(self, entries: Sequence[FileEntry], dest: Path, mode: int) -> None:
        """Write ``entries`` from the store into the new folder ``dest``, checking hashes.

        Args:
            entries: the files (relative path and sha256).
            dest: the folder to write them under.
            mode: the permissions of each written file.

        Raises:
            OperationalError: a blob is missing or altered (1).
        """
        for e in entries:
            target = dest / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = self.path(e.sha256)
            if not blob.exists():
                raise OperationalError(
                    f"blob {e.sha256[:12]}… of {e.path} is missing from the store; "
                    "check the registry with: adapterctl registry verify"
                )
            got, _ = copy_hashed(blob, target)
            if got != e.sha256:
                raise OperationalError(
                    f"blob {e.sha256[:12]}… of {e.path} was altered on disk; "
                    "check the registry with: adapterctl registry verify"
                )
            os.chmod(target, mode & (os.stat(blob).st_mode | 0o200))  # never wider than stored
