"""The registry: versioned, content-addressed adapters pinned to their base model.

State lives under ``$ADAPTERCTL_HOME`` (default: the platform's user data dir for
"adapterctl"):

- ``registry.db``: SQLite (WAL, busy timeout, foreign keys on), schema from
  ``adapterctl.migrations``. Versions are numbered per name (1, 2, 3…), never reused and never
  edited: SQL triggers refuse UPDATE and DELETE of version rows. Removing a version inserts a
  tombstone; aliases move by appending tag events.
- ``blobs/sha256/<2>/<hex>``: every stored file once, named by its sha256, written to a
  temporary name, fsynced and renamed into place, read-only.
- ``checkouts/<hex>``: versions materialised as ordinary folders so any command can read a
  registry reference (a cache: ``registry gc`` prunes it).

Adding, hashing and bookkeeping use hashlib, json and sqlite only; only the pre-flight check
against a base (``validate``'s rules) imports torch. Writers take ``BEGIN IMMEDIATE`` and
retry while another process holds the lock, so concurrent ``add``s all succeed.

See ``registry/README.md`` for the rules and ``registry/schema.sql`` for the tables.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, Field, computed_field

from adapterctl import __version__
from adapterctl.errors import (
    AdapterctlError,
    BrokenFile,
    Conflict,
    NotFound,
    OperationalError,
    UsageError,
    VersionRemoved,
)
from adapterctl.files import fsync_dir
from adapterctl.identity import (
    base_content_digest,
    base_fingerprint,
    manifest,
    manifest_digest,
    version_digest,
)

if TYPE_CHECKING:
    from sqlite_utils import Database

    from adapterctl.adapter import Adapter
    from adapterctl.checkpoint import Checkpoint

HOME_ENV = "ADAPTERCTL_HOME"
DB_NAME = "registry.db"
BUSY_TIMEOUT_S = 30.0  # SQLite's own wait for a lock, per statement
LOCK_DEADLINE_S = 120.0  # our retries on top of it, per operation
_CHUNK = 1 << 20

PinLevel = Literal["content digest", "fingerprint", "name only", "none"]
PIN_LABELS: dict[str, str] = {
    "content digest": "content digest",
    "fingerprint": "fingerprint",
    "name only": "name only (unverified)",
    "none": "none (no base recorded)",
}
RESERVED_ALIASES = ("latest",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<sel>[A-Za-z0-9][A-Za-z0-9._-]*))?$"
)
_DIGEST_REF = re.compile(r"^sha256:(?P<hex>[0-9a-fA-F]{1,64})$")

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Data returned to callers


class FileEntry(BaseModel):
    """One file of a version (or of a pinned base): relative path, size, hex sha256."""

    path: str
    size: int
    sha256: str


class BasePin(BaseModel):
    """Which base a version belongs to, and how strongly that is known.

    ``level`` is ``content digest`` (the base's weight files were hashed), ``fingerprint``
    (tensor names, shapes, dtypes and architecture, from headers), ``name only`` (the adapter
    config's ``base_model_name_or_path`` and revision: unverified) or ``none``.
    """

    level: PinLevel
    fingerprint: str | None = None
    content_digest: str | None = None
    files: list[FileEntry] = Field(default_factory=list)
    name: str | None = None
    revision: str | None = None
    path: str | None = None
    architecture: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        """The level as shown to users (``name only (unverified)``…)."""
        return PIN_LABELS[self.level]

    def identity(self) -> dict[str, object]:
        """The fields that enter the version digest."""
        return {
            "fingerprint": self.fingerprint,
            "content_digest": self.content_digest,
            "name": self.name,
            "revision": self.revision,
        }


class Tombstone(BaseModel):
    """A removed version: when, and whether ``--force`` overrode a lineage guard."""

    removed_at: str
    forced: bool = False


class Remote(BaseModel):
    """Where a version was pushed (the Hub sync records these)."""

    url: str
    revision: str | None = None
    created_at: str


class LineageNode(BaseModel):
    """A parent in a version's lineage tree: its weight in the child, and its own parents."""

    ref: str
    digest: str
    weight: float | None = None
    removed: bool = False
    method: str | None = None
    parents: list[LineageNode] = Field(default_factory=list)


class Version(BaseModel):
    """Everything about one registry version."""

    id: int = Field(exclude=True)
    name: str
    number: int
    digest: str
    files_digest: str
    format: str
    size: int
    created_at: str
    message: str | None = None
    source: str | None = None
    base: BasePin
    files: list[FileEntry] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    removed: Tombstone | None = None
    method: str | None = None
    options: dict[str, Any] | None = None
    parents: list[LineageNode] = Field(default_factory=list)
    children: list[str] = Field(default_factory=list)
    remotes: list[Remote] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ref(self) -> str:
        """``name@number``."""
        return f"{self.name}@{self.number}"


class AdapterSummary(BaseModel):
    """One line of ``list``: a name and its latest live version."""

    name: str
    latest: int | None
    versions: int
    removed: int
    digest: str | None = None
    base: str | None = None
    base_fingerprint: str | None = None
    pin: str | None = None
    size: int | None = None
    tags: dict[str, int] = Field(default_factory=dict)
    updated_at: str | None = None


class LogEntry(BaseModel):
    """One event in a name's history."""

    at: str
    event: Literal["added", "tagged", "removed"]
    ref: str
    number: int
    alias: str | None = None
    digest: str
    message: str | None = None


class TagResult(BaseModel):
    """An alias moved (or set for the first time)."""

    name: str
    alias: str
    number: int
    previous: int | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"


class BlobProblem(BaseModel):
    """A stored file that is missing or no longer has its sha256."""

    sha256: str
    path: str
    problem: str
    versions: list[str]


class VerifyReport(BaseModel):
    """``registry verify``: database integrity, every live blob re-hashed, checkouts checked."""

    ok: bool
    integrity: list[str]
    foreign_key_errors: int
    versions_checked: int
    blobs_checked: int
    bytes_checked: int
    missing: list[BlobProblem] = Field(default_factory=list)
    altered: list[BlobProblem] = Field(default_factory=list)
    bad_digests: list[str] = Field(default_factory=list)
    checkouts_altered: list[str] = Field(default_factory=list)


class GcReport(BaseModel):
    """``registry gc``: what was deleted."""

    blobs_removed: int
    bytes_freed: int
    temp_removed: int
    checkouts_removed: int


class RegistryInfo(BaseModel):
    """``registry path``: where the state lives, and how much there is."""

    home: str
    database: str
    blobs: str
    checkouts: str
    exists: bool
    adapters: int = 0
    versions: int = 0
    removed: int = 0


LineageNode.model_rebuild()


# ----------------------------------------------------------------------------------------------
# Helpers


def default_home() -> Path:
    """``$ADAPTERCTL_HOME``, else the platform's user data dir for "adapterctl".

    Returns:
        The folder holding ``registry.db`` and ``blobs/`` (not created here).
    """
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("adapterctl", appauthor=False))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _short(digest: str | None) -> str:
    return "-" if not digest else digest[:19]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsageError(
            f"{name!r} is not a valid adapter name; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)"
        )


def _check_alias(alias: str) -> None:
    if alias in RESERVED_ALIASES:
        raise UsageError(
            f"'{alias}' always means the newest live version and cannot be set; pick another alias"
        )
    if not _ALIAS.match(alias):
        raise UsageError(
            f"{alias!r} is not a valid alias; start with a letter, then letters, digits, "
            "'.', '_' or '-' (a number would clash with version numbers)"
        )


def is_ref(text: str) -> bool:
    """True if ``text`` is spelled like a registry reference (``name``, ``name@3``,
    ``name@prod``, ``sha256:<prefix>``)."""
    return bool(_REF.match(text) or _DIGEST_REF.match(text))


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
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


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _retry(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` (a whole transaction), again while SQLite says another process holds the
    lock, with jittered backoff, up to ``LOCK_DEADLINE_S``."""
    deadline = time.monotonic() + LOCK_DEADLINE_S
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise OperationalError(
                    f"registry database error while {what} ({exc}); "
                    "check it with: adapterctl registry verify"
                ) from None
            if time.monotonic() > deadline:
                raise OperationalError(
                    f"the registry stayed locked by another process for {LOCK_DEADLINE_S:.0f} s "
                    f"while {what}; try again when it is done"
                ) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        except sqlite3.DatabaseError as exc:
            raise OperationalError(
                f"registry database error while {what} ({exc}); "
                "check it with: adapterctl registry verify"
            ) from None


# ----------------------------------------------------------------------------------------------
# The registry


class Registry:
    """The adapter registry under one home folder.

    Args:
        home: the state folder (default: ``default_home()``).
        create: create the folder and database when missing; with False, a missing
            database raises ``NotFound`` (used to resolve refs without creating state).

    Raises:
        NotFound: ``create`` is False and there is no database.

    Example:
        >>> reg = Registry(tmp_path)
        >>> v = reg.add("out/chat-lora", "chat", base="models/Llama-3.2-1B", tags=["prod"])
        >>> v.ref, v.base.label
        ('chat@1', 'fingerprint')
        >>> reg.checkout("chat@prod")
        PosixPath('.../checkouts/…')
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *, create: bool = True):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_path = self.home / DB_NAME
        self.blobs = self.home / "blobs" / "sha256"
        self.checkouts = self.home / "checkouts"
        self.tmp = self.home / "tmp"
        if not create and not self.db_path.exists():
            raise NotFound(
                f"no registry at {self.home} yet; add an adapter with: "
                "adapterctl add PATH --name NAME"
            )
        self._db: Database | None = None

    # -- connection ------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """The open database, migrated to the latest schema."""
        if self._db is None:
            self._db = _retry(self._connect, "opening the registry")
        return self._db

    def _connect(self) -> Database:
        from sqlite_utils import Database

        from adapterctl import migrations

        self.home.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.db_path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            db = Database(conn, execute_plugins=False)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            if migrations.pending(db):
                conn.execute("BEGIN IMMEDIATE")  # one migrator at a time
                try:
                    if migrations.pending(db):
                        migrations.apply(db)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except BaseException:
            conn.close()
            raise
        return db

    def close(self) -> None:
        """Close the database connection (the object can be used again: it reopens)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``BEGIN IMMEDIATE`` takes the write lock up front, so a
        transaction never fails half-way on a lock upgrade."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        conn = self.db.conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _rows(self, conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        cur = conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    @contextlib.contextmanager
    def _blob_lock(self, exclusive: bool) -> Iterator[None]:
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

    # -- blobs -----------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this hex sha256 lives."""
        return self.blobs / sha256[:2] / sha256

    def _store_blob(self, src: Path, sha256: str) -> bool:
        """Copy ``src`` into the store unless a blob with its hash is there; True if written."""
        dest = self.blob_path(sha256)
        if dest.exists():
            return False
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="blob-", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            tmp.unlink()
            got, _ = _copy_hashed(src, tmp)
            if got != sha256:
                raise OperationalError(
                    f"{src}: changed while it was being added (sha256 differs); "
                    "add it again once it is no longer being written"
                )
            os.chmod(tmp, 0o444)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            if tmp.exists():
                tmp.unlink()
        return True

    def _copy_out(self, entries: Sequence[FileEntry], dest: Path, mode: int) -> None:
        """Write ``entries`` from the store into the new folder ``dest``, checking hashes."""
        for e in entries:
            target = dest / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = self.blob_path(e.sha256)
            if not blob.exists():
                raise OperationalError(
                    f"blob {e.sha256[:12]}… of {e.path} is missing from the store; "
                    "check the registry with: adapterctl registry verify"
                )
            got, _ = _copy_hashed(blob, target)
            if got != e.sha256:
                raise OperationalError(
                    f"blob {e.sha256[:12]}… of {e.path} was altered on disk; "
                    "check the registry with: adapterctl registry verify"
                )
            os.chmod(target, mode)

    # -- base pins -------------------------------------------------------------------------

    def base_file_hashes(self, ckpt: Checkpoint, *, compute: bool) -> list[FileEntry] | None:
        """The sha256 of each of a base's weight files, from the cache (keyed by absolute
        path, size and mtime) or, with ``compute``, hashed now and cached.

        Args:
            ckpt: the base checkpoint.
            compute: hash files the cache does not know (costly: reads every weight byte).

        Returns:
            One entry per shard (path relative to the checkpoint folder), or None when some
            file is not cached and ``compute`` is False.
        """
        from adapterctl.identity import file_sha256

        root = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        out: list[FileEntry] = []
        for shard in ckpt.shards:
            st = shard.stat()
            key = str(shard.resolve())

            def lookup(key: str = key) -> list[dict]:
                return self._rows(self.db.conn, "SELECT * FROM base_hashes WHERE path = ?", [key])

            rows = _retry(lookup, "reading the base hash cache")
            row = rows[0] if rows else None
            if row and row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns:
                sha = str(row["sha256"])
            elif compute:
                sha = file_sha256(shard)

                def store(key: str = key, sha: str = sha, st: os.stat_result = st) -> None:
                    with self._write() as conn:
                        conn.execute(
                            "INSERT OR REPLACE INTO base_hashes VALUES (?, ?, ?, ?, ?)",
                            [key, st.st_size, st.st_mtime_ns, sha, _now()],
                        )

                _retry(store, "caching a base hash")
            else:
                return None
            out.append(
                FileEntry(path=shard.relative_to(root).as_posix(), size=st.st_size, sha256=sha)
            )
        return sorted(out, key=lambda e: e.path)

    def pin_base(
        self,
        base: str | os.PathLike[str] | Checkpoint | None,
        *,
        name: str | None = None,
        revision: str | None = None,
        hash_base: bool = False,
    ) -> BasePin:
        """Pin a base: fingerprint always (headers), content digest when asked or cached.

        Args:
            base: a local base folder or an open checkpoint; None pins by name only.
            name: the base's name (``base_model_name_or_path``) for the record.
            revision: the base's revision, if known.
            hash_base: hash the weight files when the cache does not know them.

        Returns:
            The pin.

        Raises:
            UsageError: ``hash_base`` without a base.
        """
        if base is None:
            if hash_base:
                raise UsageError("--hash-base needs a local base; pass --base BASE")
            return BasePin(level="name only" if name else "none", name=name, revision=revision)
        ckpt = _open_base(base)
        files = self.base_file_hashes(ckpt, compute=hash_base)
        return BasePin(
            level="content digest" if files else "fingerprint",
            fingerprint=base_fingerprint(ckpt),
            content_digest=base_content_digest((f.path, f.sha256) for f in files)
            if files
            else None,
            files=files or [],
            name=name,
            revision=revision,
            path=str(Path(ckpt.path).resolve()),
            architecture=ckpt.architecture,
        )

    def check_base_pin(
        self, version: Version | str, checkpoint: Checkpoint, *, hash_base: bool = False
    ) -> str:
        """Check that ``checkpoint`` is the base ``version`` is pinned to.

        The content digest is compared when the version has one and the checkpoint's files
        are hashed (cached, or ``hash_base``); otherwise the fingerprint; a name-only pin
        cannot be checked.

        Args:
            version: a version or a registry reference.
            checkpoint: the base about to be merged into.
            hash_base: hash the checkpoint's files if the cache does not know them.

        Returns:
            Which check ran: ``content digest``, ``fingerprint``, ``name only (unverified)``
            or ``none (no base recorded)``.

        Raises:
            Conflict: the checkpoint differs from the pin (exit 5).

        Example:
            >>> reg.check_base_pin("chat@prod", open_checkpoint("models/Llama-3.2-1B"))
            'fingerprint'
        """
        v = version if isinstance(version, Version) else self.resolve(version)
        pin = v.base
        if pin.level in ("none", "name only"):
            return pin.label
        if pin.content_digest:
            files = self.base_file_hashes(checkpoint, compute=hash_base)
            if files is not None:
                got = base_content_digest((f.path, f.sha256) for f in files)
                if got != pin.content_digest:
                    raise Conflict(
                        f"{v.ref} is pinned to base content {_short(pin.content_digest)} "
                        f"({pin.path or pin.name or '?'}) but {checkpoint.path} has "
                        f"{_short(got)} (other weights); merge into the base it was trained "
                        "on, or pass --allow-base-mismatch"
                    )
                return PIN_LABELS["content digest"]
        got_fp = base_fingerprint(checkpoint)
        if got_fp != pin.fingerprint:
            raise Conflict(
                f"{v.ref} is pinned to base fingerprint {_short(pin.fingerprint)} "
                f"({pin.architecture or '?'}, {pin.path or pin.name or '?'}) but "
                f"{checkpoint.path} has {_short(got_fp)} (other tensor names, shapes or "
                "dtypes); merge into the base it was trained on, or pass --allow-base-mismatch"
            )
        return PIN_LABELS["fingerprint"]

    # -- add -------------------------------------------------------------------------------

    def add(
        self,
        source: str | os.PathLike[str],
        name: str,
        *,
        base: str | os.PathLike[str] | Checkpoint | None = None,
        hash_base: bool = False,
        tags: Sequence[str] = (),
        message: str | None = None,
        alpha: float | None = None,
        rank: int | None = None,
        lineage: tuple[Sequence[tuple[Version | str, float | None]], str, dict[str, Any]]
        | None = None,
        pin: BasePin | None = None,
    ) -> Version:
        """Add an adapter as the next version of ``name``.

        With a base, the adapter is first checked against it with ``validate``'s rules
        (an error refuses it) and pinned to it; without one, the pin is the config's base
        name and revision, marked unverified.

        Args:
            source: a local adapter (PEFT folder or bare ``.safetensors``) or a registry ref.
            name: the adapter's name in the registry.
            base: the base it belongs to (a local checkpoint folder), or None.
            hash_base: also hash the base's weight files (content digest; cached after).
            tags: aliases to point at the new version.
            message: a note kept with the version.
            alpha: LoRA alpha of a bare ``.safetensors``.
            rank: its rank.
            lineage: (parents with weights, method, options) for a composed or merged
                artifact (see ``record_lineage``); the source may then be a checkpoint.
            pin: a ready base pin (overrides ``base``).

        Returns:
            The new version.

        Raises:
            ValidationFailed: the adapter does not fit the base, or its files are broken (3).
            NotFound: no such source or base (4).
            Conflict: this name already holds these exact files on this base (5).

        Example:
            >>> reg.add("out/chat-lora", "chat", base="models/Llama-3.2-1B", tags=["prod"]).ref
            'chat@1'
        """
        _check_name(name)
        for t in tags:
            _check_alias(t)
        path = self.local_source(source)
        adapter, fmt = _read_artifact(path, alpha, rank, allow_checkpoint=lineage is not None)
        config = adapter.config if adapter is not None else None
        base_name = config.base_model_name_or_path if config else None
        revision = config.revision if config else None
        if pin is None:
            ckpt = _open_base(base) if base is not None else None
            if ckpt is not None and adapter is not None:
                _preflight(adapter, ckpt, str(source))
            pin = self.pin_base(ckpt, name=base_name, revision=revision, hash_base=hash_base)
        root = Path(adapter.path) if adapter is not None else path
        files = adapter.files if adapter is not None else _artifact_files(path)
        raw = manifest(files, root)
        entries = [FileEntry.model_validate(e) for e in raw]
        files_digest = manifest_digest(raw)
        digest = version_digest(raw, pin.identity())
        size = sum(e.size for e in entries)
        sources = {e.path: (root if root.is_file() else root / e.path) for e in entries}

        with self._blob_lock(exclusive=False):
            for e in entries:
                self._store_blob(sources[e.path], e.sha256)

            def insert() -> int:
                with self._write() as conn:
                    return self._insert_version(
                        conn,
                        name=name,
                        entries=entries,
                        files_digest=files_digest,
                        digest=digest,
                        fmt=fmt,
                        size=size,
                        pin=pin,
                        message=message,
                        source=str(source),
                        tags=tags,
                        lineage=lineage,
                    )

            vid = _retry(insert, f"adding {name}")
        return self._version_by_id(vid)

    def _insert_version(
        self,
        conn: sqlite3.Connection,
        *,
        name: str,
        entries: list[FileEntry],
        files_digest: str,
        digest: str,
        fmt: str,
        size: int,
        pin: BasePin,
        message: str | None,
        source: str,
        tags: Sequence[str],
        lineage: tuple[Sequence[tuple[Version | str, float | None]], str, dict[str, Any]] | None,
    ) -> int:
        now = _now()
        conn.execute("INSERT OR IGNORE INTO adapters (name, created_at) VALUES (?, ?)", [name, now])
        dup = conn.execute(
            "SELECT v.number FROM versions v WHERE v.name = ? AND v.digest = ? AND NOT EXISTS "
            "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id)",
            [name, digest],
        ).fetchone()
        if dup:
            raise Conflict(
                f"{name}@{dup[0]} already holds this adapter ({_short(digest)}…); "
                f"give it an alias with: adapterctl tag {name}@{dup[0]} ALIAS"
            )
        parents: list[tuple[int, float | None]] = []
        if lineage is not None:
            for parent, weight in lineage[0]:
                ref = parent.ref if isinstance(parent, Version) else parent
                parents.append((self._lookup(conn, ref)["id"], weight))
        number = conn.execute(
            "SELECT coalesce(max(number), 0) + 1 FROM versions WHERE name = ?", [name]
        ).fetchone()[0]
        cur = conn.execute(
            "INSERT INTO versions (name, number, digest, files_digest, format, size, pin_level, "
            "base_fingerprint, base_content_digest, base_files, base_name, base_revision, "
            "base_path, base_architecture, message, source, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                name,
                number,
                digest,
                files_digest,
                fmt,
                size,
                pin.level,
                pin.fingerprint,
                pin.content_digest,
                json.dumps([f.model_dump() for f in pin.files]) if pin.files else None,
                pin.name,
                pin.revision,
                pin.path,
                pin.architecture,
                message,
                source,
                now,
            ],
        )
        vid = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT INTO files (version_id, path, size, sha256) VALUES (?, ?, ?, ?)",
            [(vid, e.path, e.size, e.sha256) for e in entries],
        )
        for alias in tags:
            conn.execute(
                "INSERT INTO tag_events (name, alias, version_id, created_at) VALUES (?, ?, ?, ?)",
                [name, alias, vid, now],
            )
        if lineage is not None:
            conn.executemany(
                "INSERT INTO lineage (version_id, position, parent_id, weight) VALUES (?, ?, ?, ?)",
                [(vid, i, pid, w) for i, (pid, w) in enumerate(parents)],
            )
            conn.execute(
                "INSERT INTO derivations (version_id, method, options, tool) VALUES (?, ?, ?, ?)",
                [
                    vid,
                    lineage[1],
                    json.dumps(lineage[2], sort_keys=True, default=str),
                    f"adapterctl {__version__}",
                ],
            )
        return vid

    def record_lineage(
        self,
        name: str,
        parents: Sequence[tuple[Version | str, float | None]],
        method: str,
        options: dict[str, Any],
        out_dir: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | Checkpoint | None = None,
        message: str | None = None,
        tags: Sequence[str] = (),
    ) -> Version:
        """Register a composed or merged artifact as the next version of ``name``, with its
        parents, their weights, the method and its options.

        The new version's base pin is ``base``'s when given, else the parents' when they all
        share one, else the output config's base name (unverified).

        Args:
            name: the name to register under.
            parents: (version or ref, weight) for each input, in order.
            method: the composition or merge method (``linear``, ``ties``, ``merge:linear``…).
            options: the method's options (density, rank, seed…), as JSON-ready data.
            out_dir: the written artifact (an adapter, or a merged checkpoint folder).
            base: the base to pin to (optional).
            message: a note kept with the version.
            tags: aliases to point at it.

        Returns:
            The new version, its ``parents`` filled in.

        Raises:
            NotFound: a parent reference does not resolve (4).
            Conflict: ``name`` already holds these exact files (5).

        Example:
            >>> v = reg.record_lineage("mix", [("chat@1", 0.7), ("code@2", 0.3)], "ties",
            ...                        {"density": 0.5}, "out/mix")
            >>> [p.ref for p in v.parents]
            ['chat@1', 'code@2']
        """
        resolved = [(p if isinstance(p, Version) else self.resolve(p), w) for p, w in parents]
        pin = _shared_pin([v.base for v, _ in resolved]) if base is None else None
        return self.add(
            out_dir,
            name,
            base=base,
            message=message,
            tags=tags,
            pin=pin,
            lineage=([(v, w) for v, w in resolved], method, options),
        )

    # -- lookups ---------------------------------------------------------------------------

    def _lookup(self, conn: sqlite3.Connection, ref: str, *, allow_removed: bool = False) -> dict:
        """The version row ``ref`` names (with ``removed_at`` when it has a tombstone)."""
        select = (
            "SELECT v.*, t.removed_at, t.forced FROM versions v "
            "LEFT JOIN tombstones t ON t.version_id = v.id "
        )
        m = _DIGEST_REF.match(ref)
        if m:
            return self._lookup_digest(conn, select, ref, m["hex"].lower(), allow_removed)
        r = _REF.match(ref)
        if not r:
            raise NotFound(
                f"{ref!r} is not a registry reference (name, name@3, name@alias, "
                "sha256:<prefix>); list adapters with: adapterctl list"
            )
        name, sel = r["name"], r["sel"]
        if not conn.execute("SELECT 1 FROM adapters WHERE name = ?", [name]).fetchone():
            names = [x[0] for x in conn.execute("SELECT name FROM adapters ORDER BY name")]
            have = (
                "the registry is empty"
                if not names
                else "registry has: " + ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
            )
            raise NotFound(
                f"no adapter file or folder {name!r} and no registry adapter named {name!r} "
                f"({have}); list them with: adapterctl list"
            )
        if sel is None or sel == "latest":
            rows = self._rows(
                conn,
                select + "WHERE v.name = ? AND t.version_id IS NULL ORDER BY v.number DESC LIMIT 1",
                [name],
            )
            if not rows:
                last = self._rows(
                    conn, select + "WHERE v.name = ? ORDER BY v.number DESC LIMIT 1", [name]
                )[0]
                if allow_removed:
                    return last
                raise VersionRemoved(
                    f"every version of {name} was removed (the last, {name}@{last['number']}, "
                    f"at {last['removed_at']}); see its history with: adapterctl log {name}"
                )
            return rows[0]
        if sel.isdigit():
            rows = self._rows(conn, select + "WHERE v.name = ? AND v.number = ?", [name, int(sel)])
            if not rows:
                top = conn.execute(
                    "SELECT max(number) FROM versions WHERE name = ?", [name]
                ).fetchone()[0]
                raise NotFound(
                    f"{name} has no version {sel} (versions 1 to {top}); "
                    f"list them with: adapterctl log {name}"
                )
            row = rows[0]
            if row["removed_at"] and not allow_removed:
                raise VersionRemoved(
                    f"{name}@{sel} was removed at {row['removed_at']} (tombstone; the number is "
                    f"never reused); list live versions with: adapterctl log {name}"
                )
            return row
        rows = self._rows(
            conn,
            select + "JOIN current_tags c ON c.version_id = v.id WHERE c.name = ? AND c.alias = ?",
            [name, sel],
        )
        if not rows:
            aliases = [
                x[0]
                for x in conn.execute(
                    "SELECT alias FROM current_tags WHERE name = ? ORDER BY alias", [name]
                )
            ]
            have = ("aliases: " + ", ".join(aliases)) if aliases else "it has no aliases"
            raise NotFound(
                f"{name} has no version or alias {sel!r} ({have}); "
                f"set one with: adapterctl tag {name}@N {sel}"
            )
        row = rows[0]
        if row["removed_at"] and not allow_removed:
            raise VersionRemoved(
                f"{name}@{sel} points at {name}@{row['number']}, which was removed at "
                f"{row['removed_at']} (tombstone); move the alias with: "
                f"adapterctl tag {name}@N {sel}"
            )
        return row

    def _lookup_digest(
        self, conn: sqlite3.Connection, select: str, ref: str, hex_prefix: str, allow_removed: bool
    ) -> dict:
        lo = "sha256:" + hex_prefix
        hi = lo + "g"  # hex digits sort below 'g': [lo, hi) is every digest with the prefix
        rows = self._rows(
            conn,
            select + "WHERE (v.digest >= ? AND v.digest < ?) OR (v.files_digest >= ? AND "
            "v.files_digest < ?) ORDER BY t.version_id IS NOT NULL, v.id DESC",
            [lo, hi, lo, hi],
        )
        if not rows:
            raise NotFound(
                f"no registry version has a digest starting with {ref}; "
                "list adapters with: adapterctl list"
            )
        distinct = {r["digest"] for r in rows}
        if len(distinct) > 1:
            shown = ", ".join(
                f"{r['name']}@{r['number']} ({_short(r['digest'])})" for r in rows[:8]
            )
            raise NotFound(
                f"{ref} is ambiguous: it matches {len(rows)} versions ({shown}); "
                "use a longer prefix"
            )
        row = rows[0]
        if row["removed_at"] and not allow_removed:
            raise VersionRemoved(
                f"{ref} is {row['name']}@{row['number']}, which was removed at "
                f"{row['removed_at']} (tombstone); list live versions with: "
                f"adapterctl log {row['name']}"
            )
        return row

    def resolve(self, ref: str) -> Version:
        """The live version ``ref`` names.

        Args:
            ref: ``name`` (newest live version), ``name@latest``, ``name@3``, ``name@prod``
                or ``sha256:<prefix>`` (of the version digest or of the adapter digest).

        Returns:
            The version.

        Raises:
            NotFound: unknown name, version or alias, or an ambiguous prefix (4); the
                message lists what exists.
            VersionRemoved: the version was removed (4); the message names the tombstone.

        Example:
            >>> reg.resolve("chat@prod").number
            3
        """

        def get() -> int:
            with self._read() as conn:
                return int(self._lookup(conn, ref)["id"])

        return self._version_by_id(_retry(get, f"resolving {ref}"))

    def show(self, ref: str) -> Version:
        """Everything about a version: files, digests, base pin, tags, lineage tree,
        children, remotes; removed versions too (with their tombstone).

        Args:
            ref: any reference ``resolve`` accepts.

        Returns:
            The version.

        Raises:
            NotFound: nothing matches (4).

        Example:
            >>> reg.show("chat@1").base.label
            'fingerprint'
        """

        def get() -> int:
            with self._read() as conn:
                return int(self._lookup(conn, ref, allow_removed=True)["id"])

        return self._version_by_id(_retry(get, f"reading {ref}"))

    def _version_by_id(self, vid: int) -> Version:
        def get() -> Version:
            with self._read() as conn:
                return self._build(conn, vid, depth=0)

        return _retry(get, "reading a version")

    def _build(self, conn: sqlite3.Connection, vid: int, depth: int) -> Version:
        row = self._rows(
            conn,
            "SELECT v.*, t.removed_at, t.forced FROM versions v "
            "LEFT JOIN tombstones t ON t.version_id = v.id WHERE v.id = ?",
            [vid],
        )[0]
        files = [
            FileEntry(path=p, size=s, sha256=h)
            for p, s, h in conn.execute(
                "SELECT path, size, sha256 FROM files WHERE version_id = ? ORDER BY path", [vid]
            )
        ]
        tags = [
            a
            for (a,) in conn.execute(
                "SELECT alias FROM current_tags WHERE version_id = ? ORDER BY alias", [vid]
            )
        ]
        deriv = conn.execute(
            "SELECT method, options FROM derivations WHERE version_id = ?", [vid]
        ).fetchone()
        children = [
            f"{n}@{k}"
            for n, k in conn.execute(
                "SELECT DISTINCT v.name, v.number FROM lineage l JOIN versions v "
                "ON v.id = l.version_id WHERE l.parent_id = ? ORDER BY v.name, v.number",
                [vid],
            )
        ]
        remotes = [
            Remote(url=u, revision=r, created_at=c)
            for u, r, c in conn.execute(
                "SELECT url, revision, created_at FROM remotes WHERE version_id = ? ORDER BY id",
                [vid],
            )
        ]
        return Version(
            id=vid,
            name=row["name"],
            number=row["number"],
            digest=row["digest"],
            files_digest=row["files_digest"],
            format=row["format"],
            size=row["size"],
            created_at=row["created_at"],
            message=row["message"],
            source=row["source"],
            base=_pin_from_row(row),
            files=files,
            tags=tags,
            removed=Tombstone(removed_at=row["removed_at"], forced=bool(row["forced"]))
            if row["removed_at"]
            else None,
            method=deriv[0] if deriv else None,
            options=json.loads(deriv[1]) if deriv else None,
            parents=self._parents(conn, vid, depth),
            children=children,
            remotes=remotes,
        )

    def _parents(self, conn: sqlite3.Connection, vid: int, depth: int) -> list[LineageNode]:
        if depth > 32:  # lineage is acyclic (parents exist first); this only bounds the output
            return []
        out = []
        for pid, weight in conn.execute(
            "SELECT parent_id, weight FROM lineage WHERE version_id = ? ORDER BY position", [vid]
        ).fetchall():
            p = self._rows(
                conn,
                "SELECT v.name, v.number, v.digest, t.removed_at, d.method FROM versions v "
                "LEFT JOIN tombstones t ON t.version_id = v.id "
                "LEFT JOIN derivations d ON d.version_id = v.id WHERE v.id = ?",
                [pid],
            )[0]
            out.append(
                LineageNode(
                    ref=f"{p['name']}@{p['number']}",
                    digest=p["digest"],
                    weight=weight,
                    removed=p["removed_at"] is not None,
                    method=p["method"],
                    parents=self._parents(conn, pid, depth + 1),
                )
            )
        return out

    # -- history ---------------------------------------------------------------------------

    def log(self, name: str) -> list[LogEntry]:
        """A name's history, newest first: versions added, aliases moved, versions removed.

        Args:
            name: the adapter name.

        Returns:
            The events.

        Raises:
            NotFound: no such name (4).

        Example:
            >>> [(e.event, e.ref) for e in reg.log("chat")][:2]
            [('tagged', 'chat@2'), ('added', 'chat@2')]
        """

        def get() -> list[LogEntry]:
            with self._read() as conn:
                self._lookup(conn, name, allow_removed=True)  # NotFound for an unknown name
                rows = conn.execute(
                    "SELECT * FROM ("
                    "SELECT created_at AS at, 0 AS rank, id AS seq, 'added' AS event, number, "
                    "NULL AS alias, digest, message FROM versions WHERE name = :n "
                    "UNION ALL SELECT t.created_at, 1, t.id, 'tagged', v.number, t.alias, "
                    "v.digest, NULL FROM tag_events t JOIN versions v ON v.id = t.version_id "
                    "WHERE t.name = :n "
                    "UNION ALL SELECT s.removed_at, 2, v.id, 'removed', v.number, NULL, "
                    "v.digest, NULL FROM tombstones s JOIN versions v ON v.id = s.version_id "
                    "WHERE v.name = :n"
                    ") ORDER BY at DESC, rank DESC, seq DESC",
                    {"n": name},
                ).fetchall()
            return [
                LogEntry(
                    at=at,
                    event=event,
                    ref=f"{name}@{number}",
                    number=number,
                    alias=alias,
                    digest=digest,
                    message=message,
                )
                for at, _, _, event, number, alias, digest, message in rows
            ]

        return _retry(get, f"reading the history of {name}")

    # -- tags, removal ---------------------------------------------------------------------

    def tag(self, ref: str, alias: str) -> TagResult:
        """Point ``name@alias`` at the version ``ref`` names (moving it if it was set).

        Args:
            ref: the version.
            alias: the alias (``prod``, ``staging``…; ``latest`` is reserved).

        Returns:
            The alias, its version and the version it pointed at before.

        Raises:
            UsageError: an invalid or reserved alias (2).
            NotFound: ``ref`` does not resolve (4).

        Example:
            >>> reg.tag("chat@3", "prod").previous
            2
        """
        _check_alias(alias)

        def write() -> TagResult:
            with self._write() as conn:
                row = self._lookup(conn, ref)
                prev = conn.execute(
                    "SELECT v.number FROM current_tags c JOIN versions v ON v.id = c.version_id "
                    "WHERE c.name = ? AND c.alias = ?",
                    [row["name"], alias],
                ).fetchone()
                conn.execute(
                    "INSERT INTO tag_events (name, alias, version_id, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    [row["name"], alias, row["id"], _now()],
                )
                return TagResult(
                    name=row["name"],
                    alias=alias,
                    number=row["number"],
                    previous=prev[0] if prev else None,
                )

        return _retry(write, f"tagging {ref}")

    def rm(self, ref: str, *, force: bool = False) -> Version:
        """Remove a version: a tombstone is recorded, its number is never reused, refs to it
        say it was removed; its blobs go at the next ``gc``.

        Args:
            ref: the version.
            force: remove it even if live versions were composed or merged from it.

        Returns:
            The removed version (with ``removed`` set).

        Raises:
            NotFound: ``ref`` does not resolve, or names a removed version (4).
            Conflict: the version is a lineage parent of a live version and not ``force`` (5).

        Example:
            >>> reg.rm("chat@1").removed is not None
            True
        """

        def write() -> int:
            with self._write() as conn:
                row = self._lookup(conn, ref)
                kids = [
                    f"{n}@{k}"
                    for n, k in conn.execute(
                        "SELECT DISTINCT v.name, v.number FROM lineage l JOIN versions v "
                        "ON v.id = l.version_id WHERE l.parent_id = ? AND NOT EXISTS "
                        "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id)",
                        [row["id"]],
                    )
                ]
                if kids and not force:
                    raise Conflict(
                        f"{row['name']}@{row['number']} is a lineage parent of "
                        f"{', '.join(kids)}; pass --force to remove it anyway "
                        "(their lineage records stay)"
                    )
                conn.execute(
                    "INSERT INTO tombstones (version_id, removed_at, forced) VALUES (?, ?, ?)",
                    [row["id"], _now(), int(bool(kids))],
                )
                return int(row["id"])

        return self._version_by_id(_retry(write, f"removing {ref}"))

    # -- materialising ---------------------------------------------------------------------

    def export(self, ref: str, dest: str | os.PathLike[str]) -> Path:
        """Write a version's files, byte for byte, into a new folder (a normal PEFT folder
        for a PEFT adapter).

        Args:
            ref: the version.
            dest: a folder that does not exist yet (or is empty).

        Returns:
            ``dest``.

        Raises:
            NotFound: ``ref`` does not resolve (4).
            Conflict: ``dest`` exists and is not empty (5).
            OperationalError: a blob is missing or altered (1).

        Example:
            >>> reg.export("chat@prod", "out/chat-prod")
            PosixPath('out/chat-prod')
        """
        v = self.resolve(ref)
        out = Path(dest)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise Conflict(f"{out}: exists and is not empty; choose a new folder")
        parent = out.parent if str(out.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            with self._blob_lock(exclusive=False):
                self._copy_out(v.files, tmp, 0o644)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    def local_source(self, source: str | os.PathLike[str]) -> Path:
        """The local path of a SOURCE this registry can answer: the path itself where it
        exists (a local folder wins over a reference spelled the same), else the checkout of
        the version a reference names, else the path unchanged (the reader reports it).

        Raises:
            NotFound: a reference that does not resolve (4).
        """
        path = Path(source)
        if path.exists() or not is_ref(os.fspath(source)):
            return path
        return self.checkout(os.fspath(source))

    def checkout(self, ref: str | Version) -> Path:
        """A local, read-only copy of a version that any reader can open (cached under
        ``checkouts/``).

        Args:
            ref: the version or its reference.

        Returns:
            The folder (PEFT adapter) or the single file (bare ``.safetensors``).

        Raises:
            NotFound: ``ref`` does not resolve (4).

        Example:
            >>> read(reg.checkout("chat@prod")).format
            'peft'
        """
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        hexd = v.digest.split(":", 1)[1]
        dest = self.checkouts / hexd
        if not dest.exists():
            self.checkouts.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.checkouts, prefix=".tmp-"))
            try:
                with self._blob_lock(exclusive=False):
                    self._copy_out(v.files, tmp, 0o444)
                with contextlib.suppress(OSError):  # another process won the race: use its
                    os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        if v.format != "peft" and len(v.files) == 1:
            return dest / v.files[0].path
        return dest

    # -- maintenance -----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the database (``PRAGMA integrity_check``, foreign keys, every live version's
        digests recomputed from its rows), re-hash every blob a live version uses, and check
        cached checkouts.

        Returns:
            The report; ``ok`` is True when nothing is wrong.

        Example:
            >>> reg.verify().ok
            True
        """

        def read_db() -> tuple[list[str], int, list[Version]]:
            with self._read() as conn:
                integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
                fk = len(conn.execute("PRAGMA foreign_key_check").fetchall())
                ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT id FROM versions v WHERE NOT EXISTS "
                        "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id) ORDER BY id"
                    )
                ]
                return integrity, fk, [self._build(conn, i, depth=99) for i in ids]

        integrity, fk, versions = _retry(read_db, "verifying the registry")
        users: dict[tuple[str, int], list[str]] = {}
        bad_digests: list[str] = []
        for v in versions:
            raw: list[dict[str, object]] = [e.model_dump() for e in v.files]
            if manifest_digest(raw) != v.files_digest or (
                version_digest(raw, v.base.identity()) != v.digest
            ):
                bad_digests.append(v.ref)
            for e in v.files:
                users.setdefault((e.sha256, e.size), []).append(v.ref)
        from adapterctl.identity import file_sha256

        missing: list[BlobProblem] = []
        altered: list[BlobProblem] = []
        nbytes = 0
        for (sha, size), refs in sorted(users.items()):
            p = self.blob_path(sha)
            if not p.is_file():
                missing.append(
                    BlobProblem(sha256=sha, path=str(p), problem="missing", versions=refs)
                )
                continue
            got = file_sha256(p)
            nbytes += p.stat().st_size
            if got != sha or p.stat().st_size != size:
                altered.append(
                    BlobProblem(sha256=sha, path=str(p), problem=f"sha256 is {got}", versions=refs)
                )
        checkouts_altered = []
        for v in versions:
            d = self.checkouts / v.digest.split(":", 1)[1]
            if d.is_dir() and not _checkout_intact(d, v.files, deep=True):
                checkouts_altered.append(str(d))
        ok = integrity == ["ok"] and not fk and not missing and not altered and not bad_digests
        return VerifyReport(
            ok=ok and not checkouts_altered,
            integrity=integrity,
            foreign_key_errors=fk,
            versions_checked=len(versions),
            blobs_checked=len(users),
            bytes_checked=nbytes,
            missing=missing,
            altered=altered,
            bad_digests=bad_digests,
            checkouts_altered=checkouts_altered,
        )

    def gc(self) -> GcReport:
        """Delete blobs no live version uses (removed versions' files, orphans of an
        interrupted ``add``), leftover temporary files, and checkouts of removed versions or
        whose files were changed.

        Returns:
            What was deleted.

        Example:
            >>> reg.gc().blobs_removed
            2
        """
        with self._blob_lock(exclusive=True):

            def read_db() -> tuple[set[str], list[Version]]:
                with self._read() as conn:
                    live = {
                        r[0]
                        for r in conn.execute(
                            "SELECT DISTINCT f.sha256 FROM files f WHERE NOT EXISTS "
                            "(SELECT 1 FROM tombstones t WHERE t.version_id = f.version_id)"
                        )
                    }
                    ids = [
                        r[0]
                        for r in conn.execute(
                            "SELECT id FROM versions v WHERE NOT EXISTS "
                            "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id)"
                        )
                    ]
                    return live, [self._build(conn, i, depth=99) for i in ids]

            live, versions = _retry(read_db, "collecting garbage")
            removed = freed = temp = 0
            if self.blobs.is_dir():
                for sub in sorted(self.blobs.iterdir()):
                    if not sub.is_dir():
                        continue
                    for blob in sub.iterdir():
                        if blob.name not in live:
                            freed += blob.stat().st_size
                            blob.unlink()
                            removed += 1
                    with contextlib.suppress(OSError):
                        sub.rmdir()  # only when empty
            if self.tmp.is_dir():
                for f in self.tmp.iterdir():
                    _remove(f)
                    temp += 1
            wanted = {v.digest.split(":", 1)[1]: v for v in versions}
            checkouts = 0
            if self.checkouts.is_dir():
                for d in self.checkouts.iterdir():
                    v = wanted.get(d.name)
                    if v is None or not _checkout_intact(d, v.files, deep=False):
                        _remove(d)
                        checkouts += 1
        return GcReport(
            blobs_removed=removed, bytes_freed=freed, temp_removed=temp, checkouts_removed=checkouts
        )

    def info(self) -> RegistryInfo:
        """Where the registry's state lives and how many adapters and versions it holds.

        Returns:
            The paths and counts (zero when no database exists yet; none is created).

        Example:
            >>> reg.info().database
            '/home/me/.local/share/adapterctl/registry.db'
        """
        out = RegistryInfo(
            home=str(self.home),
            database=str(self.db_path),
            blobs=str(self.blobs),
            checkouts=str(self.checkouts),
            exists=self.db_path.exists(),
        )
        if not out.exists:
            return out

        def counts() -> tuple[int, int, int]:
            with self._read() as conn:
                a = conn.execute("SELECT count(*) FROM adapters").fetchone()[0]
                v = conn.execute("SELECT count(*) FROM versions").fetchone()[0]
                r = conn.execute("SELECT count(*) FROM tombstones").fetchone()[0]
                return a, v, r

        out.adapters, out.versions, out.removed = _retry(counts, "counting")
        return out

    # list() comes last: inside the class body its name shadows the builtin.
    def list(self, base: str | None = None) -> list[AdapterSummary]:
        """Every name with its newest live version, base, size and aliases.

        Args:
            base: only versions pinned to this base: a local base folder (its fingerprint),
                a fingerprint or content digest (``sha256:<prefix>``), or a base name.

        Returns:
            One summary per name, sorted by name (names whose versions were all removed are
            listed with ``latest`` None, unless filtering by base).

        Example:
            >>> [(s.name, s.latest, s.tags) for s in reg.list()]
            [('chat', 3, {'prod': 3})]
        """
        where, params = "", builtins.list[Any]()
        if base is not None:
            where, params = self._base_filter(base)

        def get() -> list[AdapterSummary]:
            with self._read() as conn:
                return self._list(conn, where, params, base is None)

        return _retry(get, "listing the registry")

    def _base_filter(self, base: str) -> tuple[str, builtins.list[Any]]:
        if base.startswith("sha256:"):
            lo = base.lower()
            return (
                " AND ((v.base_fingerprint >= ? AND v.base_fingerprint < ?) OR "
                "(v.base_content_digest >= ? AND v.base_content_digest < ?))",
                [lo, lo + "g", lo, lo + "g"],
            )
        if Path(base).exists():
            return " AND v.base_fingerprint = ?", [base_fingerprint(_open_base(base))]
        return " AND v.base_name = ?", [base]

    def _list(
        self,
        conn: sqlite3.Connection,
        where: str,
        params: builtins.list[Any],
        include_removed: bool,
    ) -> builtins.list[AdapterSummary]:
        rows = self._rows(
            conn,
            # The newest live number per name from the (name, number) index, then its row.
            "SELECT v.*, agg.n FROM (SELECT v.name, max(v.number) AS number, count(*) AS n "
            "FROM versions v WHERE NOT EXISTS "
            "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id)" + where + " GROUP BY v.name) "
            "agg JOIN versions v ON v.name = agg.name AND v.number = agg.number ORDER BY v.name",
            params,
        )
        removed = dict(
            conn.execute(
                "SELECT v.name, count(*) FROM tombstones t JOIN versions v ON v.id = t.version_id "
                "GROUP BY v.name"
            ).fetchall()
        )
        tags: dict[str, dict[str, int]] = {}
        for n, alias, number in conn.execute(
            "SELECT c.name, c.alias, v.number FROM current_tags c "
            "JOIN versions v ON v.id = c.version_id ORDER BY c.alias"
        ):
            tags.setdefault(n, {})[alias] = number
        out = [
            AdapterSummary(
                name=r["name"],
                latest=r["number"],
                versions=r["n"],
                removed=removed.get(r["name"], 0),
                digest=r["digest"],
                base=r["base_name"] or r["base_path"],
                base_fingerprint=r["base_fingerprint"],
                pin=PIN_LABELS[r["pin_level"]],
                size=r["size"],
                tags=tags.get(r["name"], {}),
                updated_at=r["created_at"],
            )
            for r in rows
        ]
        if include_removed:
            seen = {s.name for s in out}
            for (n,) in conn.execute("SELECT name FROM adapters ORDER BY name"):
                if n not in seen:
                    out.append(
                        AdapterSummary(name=n, latest=None, versions=0, removed=removed.get(n, 0))
                    )
            out.sort(key=lambda s: s.name)
        return out


# ----------------------------------------------------------------------------------------------
# Module helpers


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _checkout_intact(d: Path, files: Sequence[FileEntry], *, deep: bool) -> bool:
    from adapterctl.identity import file_sha256

    for e in files:
        p = d / e.path
        if not p.is_file() or p.stat().st_size != e.size:
            return False
        if deep and file_sha256(p) != e.sha256:
            return False
    return True


def _pin_from_row(row: dict) -> BasePin:
    files = [FileEntry.model_validate(f) for f in json.loads(row["base_files"] or "[]")]
    return BasePin(
        level=row["pin_level"],
        fingerprint=row["base_fingerprint"],
        content_digest=row["base_content_digest"],
        files=files,
        name=row["base_name"],
        revision=row["base_revision"],
        path=row["base_path"],
        architecture=row["base_architecture"],
    )


def check_same_base(versions: Sequence[Version], *, allow_mismatch: bool = False) -> list[str]:
    """Refuse combining versions pinned to different bases (DESIGN: "Identity").

    Fingerprints are compared, and content digests where every pin has one; name-only pins
    cannot be compared and are skipped.

    Args:
        versions: the registry inputs of a compose or merge.
        allow_mismatch: report a mismatch as a warning instead of refusing.

    Returns:
        Warnings (a mismatch that was allowed).

    Raises:
        Conflict: the pins differ and ``allow_mismatch`` is False (exit 5).
    """
    pinned = [v for v in versions if v.base.fingerprint]
    fps = {v.base.fingerprint for v in pinned}
    contents = {v.base.content_digest for v in pinned}
    if len(fps) <= 1 and (None in contents or len(contents) <= 1):
        return []
    listing = ", ".join(
        f"{v.ref} → {_short(v.base.content_digest or v.base.fingerprint)}" for v in pinned
    )
    message = f"the inputs are pinned to different bases ({listing})"
    if not allow_mismatch:
        raise Conflict(f"{message}; combine adapters of one base, or pass --allow-base-mismatch")
    return [f"--allow-base-mismatch: {message}"]


def _shared_pin(pins: Sequence[BasePin]) -> BasePin | None:
    """The pin all ``pins`` agree on: their fingerprint, with their content digest when they
    all have the same one; None when they name different bases (or none)."""
    fps = {p.fingerprint for p in pins}
    if not pins or len(fps) != 1 or None in fps:
        return None
    contents = {p.content_digest for p in pins}
    if len(contents) == 1 and None not in contents:
        return pins[0]
    plain = next(p for p in pins if p.content_digest is None) if None in contents else pins[0]
    return plain.model_copy(update={"level": "fingerprint", "content_digest": None, "files": []})


def _open_base(base: str | os.PathLike[str] | Checkpoint) -> Checkpoint:
    from adapterctl.checkpoint import Checkpoint, open_checkpoint

    if isinstance(base, Checkpoint):
        return base
    if str(base).startswith("hf://"):
        raise NotFound(
            f"{base}: Hub bases are not available yet; download the base and pass its folder"
        )
    return open_checkpoint(base)


def _preflight(adapter: Adapter, ckpt: Checkpoint, source: str) -> None:
    """``validate``'s rules against the base; an error refuses the add (exit 3)."""
    from adapterctl.validate import require_fit

    require_fit(adapter, ckpt, source)


def _artifact_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )


def _read_artifact(
    path: Path, alpha: float | None, rank: int | None, *, allow_checkpoint: bool
) -> tuple[Adapter | None, str]:
    """(adapter, format); a merged checkpoint folder, when allowed, gives (None, 'checkpoint')."""
    from adapterctl.formats import read

    try:
        adapter = read(path, alpha=alpha, rank=rank)
    except (BrokenFile, NotFound) as exc:
        if not allow_checkpoint or not path.is_dir():
            raise
        from adapterctl.checkpoint import open_checkpoint

        try:
            open_checkpoint(path)
        except AdapterctlError:
            raise exc from None
        return None, "checkpoint"
    return adapter, adapter.format


# ----------------------------------------------------------------------------------------------
# Module-level conveniences on the default registry ($ADAPTERCTL_HOME)


def open_registry(home: str | os.PathLike[str] | None = None) -> Registry:
    """The registry at ``home`` (default: ``$ADAPTERCTL_HOME`` or the user data dir).

    Example:
        >>> open_registry().info().home
        '/home/me/.local/share/adapterctl'
    """
    return Registry(home)


def check_base_pin(
    version: Version | str,
    checkpoint: Checkpoint,
    *,
    hash_base: bool = False,
    home: str | os.PathLike[str] | None = None,
) -> str:
    """``Registry.check_base_pin`` on the default registry.

    Args:
        version: a version or a registry reference.
        checkpoint: the base about to be merged into.
        hash_base: hash the checkpoint's weight files if not cached.
        home: the registry folder (default: ``$ADAPTERCTL_HOME``).

    Returns:
        Which check ran: ``content digest``, ``fingerprint`` or ``name only (unverified)``.

    Raises:
        Conflict: the base differs from the pin (exit 5).

    Example:
        >>> check_base_pin("chat@prod", open_checkpoint("models/Llama-3.2-1B"))
        'fingerprint'
    """
    with Registry(home) as reg:
        return reg.check_base_pin(version, checkpoint, hash_base=hash_base)


def record_lineage(
    name: str,
    parents: Sequence[tuple[Version | str, float | None]],
    method: str,
    options: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | Checkpoint | None = None,
    message: str | None = None,
    home: str | os.PathLike[str] | None = None,
) -> Version:
    """``Registry.record_lineage`` on the default registry.

    Args:
        name: the name to register the output under.
        parents: (version or ref, weight) per input, in order.
        method: the composition or merge method.
        options: the method's options.
        out_dir: the written artifact (adapter folder or merged checkpoint).
        base: the base to pin to (default: the parents' shared pin).
        message: a note kept with the version.
        home: the registry folder (default: ``$ADAPTERCTL_HOME``).

    Returns:
        The new version.

    Raises:
        NotFound: a parent does not resolve (4).
        Conflict: ``name`` already holds these exact files (5).

    Example:
        >>> record_lineage("mix", [("chat@1", 0.5), ("code@1", 0.5)], "linear", {}, "out/mix").ref
        'mix@1'
    """
    with Registry(home) as reg:
        return reg.record_lineage(
            name, parents, method, options, out_dir, base=base, message=message
        )
