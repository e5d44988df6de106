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
  registry reference (a cache, checked on each use against a stat stamp and made again from
  the blobs when its bytes changed: see ``checkouts``; ``registry gc`` prunes it).

Adding, hashing and bookkeeping use hashlib, json and sqlite only; only the pre-flight check
against a base (``validate``'s rules) imports torch. Writers take ``BEGIN IMMEDIATE`` and
retry while another process holds the lock, so concurrent ``add``s all succeed.

This module is the facade: ``Registry`` and a few conveniences on the default registry. The
work is done by its submodules, one per concern:

- ``models``: what the registry returns (``Version``, ``BasePin``, reports…);
- ``grammar``: how names, aliases and references are spelled (``is_ref``);
- ``db``: the connection, transactions and retries on a locked database;
- ``blobs``: the content-addressed store and its lock;
- ``pins``: base pins and the checks against them;
- ``intake``: reading an artifact and inserting a new version;
- ``lookups``: a reference to its version, ``list``;
- ``history``: the event log, aliases, removals and lineage;
- ``checkouts``: the checkout cache and ``export``;
- ``maintenance``: ``verify``, ``gc`` and ``info``.

See ``registry/README.md`` for the rules and ``registry/schema.sql`` for the tables.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.errors import NotFound
from adapterctl.registry import checkouts, history, intake, lookups, maintenance, pins
from adapterctl.registry.blobs import BlobStore
from adapterctl.registry.db import (
    BUSY_TIMEOUT_S,
    DB_NAME,
    LOCK_DEADLINE_S,
    LazyDatabase,
    retry,
)
from adapterctl.registry.grammar import RESERVED_ALIASES, check_alias, check_name, is_ref
from adapterctl.registry.intake import Lineage
from adapterctl.registry.models import (
    PIN_LABELS,
    AdapterSummary,
    BaseCheck,
    BasePin,
    BlobProblem,
    FileEntry,
    GcReport,
    LineageNode,
    LogEntry,
    PinChecks,
    PinLevel,
    RegistryInfo,
    Remote,
    TagResult,
    Tombstone,
    VerifyReport,
    Version,
)
from adapterctl.registry.pins import check_same_base

if TYPE_CHECKING:
    from sqlite_utils import Database

    from adapterctl.checkpoint import Checkpoint

__all__ = [
    "BUSY_TIMEOUT_S",
    "DB_NAME",
    "HOME_ENV",
    "LOCK_DEADLINE_S",
    "PIN_LABELS",
    "RESERVED_ALIASES",
    "AdapterSummary",
    "BaseCheck",
    "BasePin",
    "BlobProblem",
    "FileEntry",
    "GcReport",
    "LineageNode",
    "LogEntry",
    "PinChecks",
    "PinLevel",
    "Registry",
    "RegistryInfo",
    "Remote",
    "TagResult",
    "Tombstone",
    "VerifyReport",
    "Version",
    "check_base_pin",
    "check_same_base",
    "default_home",
    "is_ref",
    "open_registry",
    "record_lineage",
]

HOME_ENV = "ADAPTERCTL_HOME"


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
        self._store = BlobStore(self.home)
        self.blobs = self._store.root
        self.checkouts = self.home / "checkouts"
        self.tmp = self._store.tmp
        if not create and not self.db_path.exists():
            raise NotFound(
                f"no registry at {self.home} yet; add an adapter with: "
                "adapterctl add PATH --name NAME"
            )
        self._database = LazyDatabase(self.home, self.db_path)

    # -- connection ------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """The open database, migrated to the latest schema."""
        return self._database.db

    def close(self) -> None:
        """Close the database connection (the object can be used again: it reopens)."""
        self._database.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: the write lock is taken up front)."""
        return self._database.write()

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        return self._database.read()

    # -- blobs -----------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this hex sha256 lives."""
        return self._store.path(sha256)

    def _store_blob(self, src: Path, sha256: str) -> bool:
        """Copy ``src`` into the store unless a blob with its hash is there; True if written."""
        return self._store.put(src, sha256)

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
        return pins.base_file_hashes(self._database, ckpt, compute=compute)

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
        return pins.pin_base(
            self._database, base, name=name, revision=revision, hash_base=hash_base
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
        return pins.check_pin(self._database, v, checkpoint, hash_base=hash_base)

    def check_pins(
        self,
        versions: Sequence[Version | None],
        checkpoint: Checkpoint,
        *,
        hash_base: bool = False,
        allow_mismatch: bool = False,
    ) -> PinChecks:
        """Check the base pin of each input of a merge against ``checkpoint``, and say how
        far the base was checked: ``content`` (weight-file hashes compared), ``fingerprint``
        (tensor names, shapes, dtypes and architecture), ``unpinned`` (some input has nothing
        to compare: a local path, a name-only pin) or ``mismatch`` (a differing pin let
        through), the weakest input deciding.

        Without ``hash_base``, a content pin is compared only where the base hash cache
        already knows the checkpoint's files (else its fingerprint is); with it, the files are
        hashed (and cached) so that every content pin is enforced.

        Args:
            versions: the registry version of each input; None for a local path.
            checkpoint: the base about to be merged into.
            hash_base: hash the checkpoint's weight files where a pin has a content digest.
            allow_mismatch: report a differing pin as a warning instead of refusing.

        Returns:
            The overall level, one line per registry input, and warnings.

        Raises:
            Conflict: a pin differs from ``checkpoint`` and not ``allow_mismatch`` (exit 5).

        Example:
            >>> reg.check_pins([reg.resolve("chat@prod")], ckpt, hash_base=True).level
            'content'
        """
        return pins.check_pins(
            self._database,
            versions,
            checkpoint,
            hash_base=hash_base,
            allow_mismatch=allow_mismatch,
        )

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
        lineage: Lineage | None = None,
        pin: BasePin | None = None,
        remote: tuple[str, str | None] | None = None,
        allow_base_mismatch: bool = False,
    ) -> Version:
        """Add an adapter as the next version of ``name``.

        With a base, the adapter is first checked against it with ``validate``'s rules
        (an error refuses it) and pinned to it; without one, the pin is the config's base
        name and revision, marked unverified. A name keeps to one base: a pin that differs
        from the latest live version's (``identity.check_successor``) is refused before
        anything is stored, unless ``allow_base_mismatch``.

        Args:
            source: a local adapter (PEFT folder or bare ``.safetensors``) or a registry ref.
            name: the adapter's name in the registry.
            base: the base it belongs to (a local checkpoint folder, or ``hf://owner/name[@rev]``:
                pinned by commit and the Hub's sha256s, nothing downloaded), or None.
            hash_base: also hash the base's weight files (content digest; cached after).
            tags: aliases to point at the new version.
            message: a note kept with the version.
            alpha: LoRA alpha of a bare ``.safetensors``.
            rank: its rank.
            lineage: (parents with weights, method, options) for a composed or merged
                artifact (see ``record_lineage``); the source may then be a checkpoint.
            pin: a ready base pin (overrides ``base``).
            remote: (url, revision) it was pulled from (``adapterctl pull``), recorded with it.
            allow_base_mismatch: add it although ``name``'s latest version is pinned to
                another base (the new version's ``warnings`` say so).

        Returns:
            The new version; its ``warnings`` (not stored) name an allowed base mismatch, or
            base names that differ where the bases could not be compared.

        Raises:
            ValidationFailed: the adapter does not fit the base, or its files are broken (3).
            NotFound: no such source or base (4).
            Conflict: this name already holds these exact files on this base, or its latest
                version is pinned to another base (5).

        Example:
            >>> reg.add("out/chat-lora", "chat", base="models/Llama-3.2-1B", tags=["prod"]).ref
            'chat@1'
        """
        check_name(name)
        for t in tags:
            check_alias(t)
        path = self.local_source(source)
        adapter, fmt = intake.read_artifact(path, alpha, rank, allow_checkpoint=lineage is not None)
        config = adapter.config if adapter is not None else None
        base_name = config.base_model_name_or_path if config else None
        revision = config.revision if config else None
        if pin is None:
            from adapterctl.checkpoint import open_base

            ckpt = open_base(base) if base is not None else None
            if ckpt is not None and adapter is not None:
                intake.preflight(adapter, ckpt, str(source))
            pin = self.pin_base(ckpt, name=base_name, revision=revision, hash_base=hash_base)
        contents = intake.contents(adapter, path)
        digest = contents.version_digest(pin)
        resolved_pin: BasePin = pin

        def check_base(conn: sqlite3.Connection) -> builtins.list[str]:
            return intake.check_base_of_name(
                conn, name, resolved_pin, allow_mismatch=allow_base_mismatch
            )

        def precheck() -> None:
            with self._read() as conn:  # refuse before any blob is stored
                check_base(conn)

        retry(precheck, f"reading {name}")
        warnings: builtins.list[str] = []
        with self._store.lock(exclusive=False):
            for e in contents.entries:
                self._store_blob(contents.sources[e.path], e.sha256)

            def insert() -> int:
                with self._write() as conn:
                    warnings[:] = check_base(conn)  # again: another add may have come first
                    return self._insert_version(
                        conn,
                        name=name,
                        entries=contents.entries,
                        files_digest=contents.files_digest,
                        digest=digest,
                        fmt=fmt,
                        size=contents.size,
                        pin=pin,
                        message=message,
                        source=str(source),
                        tags=tags,
                        lineage=lineage,
                        remote=remote,
                    )

            vid = retry(insert, f"adding {name}")
        return self._version_by_id(vid).model_copy(update={"warnings": warnings})

    def _insert_version(self, conn: sqlite3.Connection, **fields: Any) -> int:
        """Insert the rows of a new version in the open write transaction ``conn``; its row id
        (``intake.insert_version``, whose keyword arguments ``fields`` are; a method so tests
        can inject faults around it)."""
        return intake.insert_version(conn, **fields)

    def record_remote(self, v: Version, url: str, revision: str | None) -> Version:
        """Record that ``v`` was published at ``url`` (``hf://owner/name``) in ``revision``
        (a commit); returns the version with its remotes."""

        def write() -> None:
            with self._write() as conn:
                intake.insert_remote(conn, v.id, url, revision)

        retry(write, f"recording the remote of {v.ref}")
        return self._version_by_id(v.id)

    def find_remote(self, url: str, revision: str) -> Version | None:
        """The live version recorded at ``url`` in ``revision`` (pushed or pulled), or None."""
        vid = retry(lambda: lookups.find_remote(self.db.conn, url, revision), "reading remotes")
        return None if vid is None else self._version_by_id(vid)

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
        share one, else the output config's base name (unverified). A pin that differs from
        ``name``'s latest version's is not refused here (the artifact is already written):
        the new version's ``warnings`` say so.

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
        pin = pins.shared_pin([v.base for v, _ in resolved]) if base is None else None
        return self.add(
            out_dir,
            name,
            base=base,
            message=message,
            tags=tags,
            pin=pin,
            lineage=([(v, w) for v, w in resolved], method, options),
            allow_base_mismatch=True,
        )

    # -- lookups ---------------------------------------------------------------------------

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
                return int(lookups.lookup(conn, ref)["id"])

        return self._version_by_id(retry(get, f"resolving {ref}"))

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
                return int(lookups.lookup(conn, ref, allow_removed=True)["id"])

        return self._version_by_id(retry(get, f"reading {ref}"))

    def _version_by_id(self, vid: int) -> Version:
        def get() -> Version:
            with self._read() as conn:
                return lookups.build(conn, vid, depth=0)

        return retry(get, "reading a version")

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

        def get() -> builtins.list[LogEntry]:
            with self._read() as conn:
                lookups.lookup(conn, name, allow_removed=True)  # NotFound for an unknown name
                return history.log(conn, name)

        return retry(get, f"reading the history of {name}")

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
        check_alias(alias)

        def write() -> TagResult:
            with self._write() as conn:
                return history.tag(conn, lookups.lookup(conn, ref), alias)

        return retry(write, f"tagging {ref}")

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

        def write() -> Version:
            with self._write() as conn:
                vid = history.remove(conn, lookups.lookup(conn, ref), force=force)
                return lookups.build(conn, vid, depth=0)  # a damaged row undoes the removal

        return retry(write, f"removing {ref}")

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
        return checkouts.export(self._store, self.resolve(ref), dest)

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
        ``checkouts/``). A cached copy is checked first (a stat per file against the stamp
        taken when it was written, a re-hash of any file that changed); one whose bytes no
        longer match the version is made again from the blobs, with a warning logged on
        ``adapterctl.registry``.

        Args:
            ref: the version or its reference.

        Returns:
            The folder (PEFT adapter) or the single file (bare ``.safetensors``).

        Raises:
            NotFound: ``ref`` does not resolve (4).
            OperationalError: a blob it needs is missing or altered (1).

        Example:
            >>> read(reg.checkout("chat@prod")).format
            'peft'
        """
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        return checkouts.checkout(self._store, self.checkouts, v)

    # -- maintenance -----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the database (``PRAGMA integrity_check``, dangling references, version rows
        missing from a name's numbering, every live version's digests recomputed from its
        rows), re-hash every blob a live version uses, and re-hash cached checkouts.

        Returns:
            The report; ``ok`` is True when nothing is wrong.

        Example:
            >>> reg.verify().ok
            True
        """
        return maintenance.verify(self._database, self._store, self.checkouts)

    def gc(self) -> GcReport:
        """Delete blobs no live version uses (removed versions' files, orphans of an
        interrupted ``add``), leftover temporary files, and checkouts of removed versions or
        whose files no longer hash to the version's (every checkout is re-hashed).

        Returns:
            What was deleted.

        Example:
            >>> reg.gc().blobs_removed
            2
        """
        return maintenance.gc(self._database, self._store, self.checkouts)

    def info(self) -> RegistryInfo:
        """Where the registry's state lives and how many adapters and versions it holds.

        Returns:
            The paths and counts (zero when no database exists yet; none is created).

        Example:
            >>> reg.info().database
            '/home/me/.local/share/adapterctl/registry.db'
        """
        return maintenance.info(self._database, self._store, self.checkouts)

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
            where, params = lookups.base_filter(base)

        def get() -> builtins.list[AdapterSummary]:
            with self._read() as conn:
                return lookups.summaries(conn, where, params, base is None)

        return retry(get, "listing the registry")


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
