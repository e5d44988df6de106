"""Keeping the registry sound: ``registry verify`` (database integrity, every live blob
re-hashed, checkouts checked), ``registry gc`` (unused blobs, leftover temporary files, stale
checkouts) and ``registry path`` (where the state lives, and how much there is).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from adapterctl.errors import OperationalError
from adapterctl.identity import manifest_digest, version_digest
from adapterctl.migrations import expected_triggers
from adapterctl.registry.blobs import BlobStore
from adapterctl.registry.checkouts import checkout_dir, intact, remove
from adapterctl.registry.db import LazyDatabase, retry
from adapterctl.registry.lookups import build
from adapterctl.registry.models import (
    BlobProblem,
    GcReport,
    RegistryInfo,
    VerifyReport,
    Version,
)


def verify(database: LazyDatabase, store: BlobStore, checkouts: Path) -> VerifyReport:
    """Check the database, re-hash every blob a live version uses, and check cached
    checkouts (see ``Registry.verify``).

    Args:
        database: the registry's database.
        store: its blobs.
        checkouts: its checkout cache folder.

    Returns:
        The report; ``ok`` is True when nothing is wrong.
    """

    db = retry(lambda: _check_database(database), "verifying the registry")
    integrity, fk, triggers, versions, bad_digests = db
    users: dict[tuple[str, int], list[str]] = {}
    for v in versions:
        for e in v.files:
            users.setdefault((e.sha256, e.size), []).append(v.ref)
    from adapterctl.identity import file_sha256

    missing: list[BlobProblem] = []
    altered: list[BlobProblem] = []
    nbytes = 0
    for (sha, size), refs in sorted(users.items()):
        p = store.path(sha)
        if not p.is_file():
            missing.append(BlobProblem(sha256=sha, path=str(p), problem="missing", versions=refs))
            continue
        got = file_sha256(p)
        nbytes += p.stat().st_size
        if got != sha or p.stat().st_size != size:
            altered.append(
                BlobProblem(sha256=sha, path=str(p), problem=f"sha256 is {got}", versions=refs)
            )
    checkouts_altered = []
    for v in versions:
        d = checkout_dir(checkouts, v)
        if d.is_dir() and not intact(d, v.files, deep=True):
            checkouts_altered.append(str(d))
    ok = _sound(db) and not missing and not altered
    return VerifyReport(
        ok=ok and not checkouts_altered,
        integrity=integrity,
        foreign_key_errors=fk,
        missing_triggers=triggers,
        versions_checked=len(versions),
        blobs_checked=len(users),
        bytes_checked=nbytes,
        missing=missing,
        altered=altered,
        bad_digests=bad_digests,
        checkouts_altered=checkouts_altered,
    )


_Check = tuple[list[str], int, list[str], list[Version], list[str]]


def _check_database(database: LazyDatabase) -> _Check:
    """The database's own checks: SQLite's integrity check, foreign-key errors, append-only
    triggers that were dropped, the live versions, and those whose recorded files no longer
    give their digest (a ``files`` row deleted or edited)."""
    with database.read() as conn:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        fk = len(conn.execute("PRAGMA foreign_key_check").fetchall())
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        triggers = sorted(expected_triggers() - have)
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM versions v WHERE NOT EXISTS "
                "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id) ORDER BY id"
            )
        ]
        versions = [build(conn, i, depth=99) for i in ids]
    bad: list[str] = []
    for v in versions:
        raw: list[dict[str, object]] = [e.model_dump() for e in v.files]
        if manifest_digest(raw) != v.files_digest or (
            version_digest(raw, v.base.identity()) != v.digest
        ):
            bad.append(v.ref)
    return integrity, fk, triggers, versions, bad


def _sound(check: _Check) -> bool:
    integrity, fk, triggers, _, bad = check
    return integrity == ["ok"] and not fk and not triggers and not bad


def gc(database: LazyDatabase, store: BlobStore, checkouts: Path) -> GcReport:
    """Delete blobs no live version uses, leftover temporary files, and checkouts of removed
    versions or whose files were changed (see ``Registry.gc``).

    Args:
        database: the registry's database.
        store: its blobs (their lock is taken alone for the whole run).
        checkouts: its checkout cache folder.

    Returns:
        What was deleted.

    Raises:
        OperationalError: the database fails its own checks (``verify``'s database part):
            what it says is unused cannot be trusted, so nothing is deleted (exit 1).
    """
    with store.lock(exclusive=True):
        check = retry(lambda: _check_database(database), "checking the registry")
        if not _sound(check):
            integrity, fk, triggers, _, bad = check
            why = [
                *([] if integrity == ["ok"] else [f"integrity: {integrity[0]}"]),
                *([f"{fk} foreign key error(s)"] if fk else []),
                *([f"{len(triggers)} append-only trigger(s) dropped"] if triggers else []),
                *([f"files of {', '.join(bad)} do not match their digest"] if bad else []),
            ]
            raise OperationalError(
                f"{database.path}: the registry database is damaged ({'; '.join(why)}); gc "
                "deleted nothing: run `adapterctl registry verify` and restore registry.db "
                "from a backup"
            )

        def read_db() -> tuple[set[str], list[Version]]:
            with database.read() as conn:
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
                return live, [build(conn, i, depth=99) for i in ids]

        live, versions = retry(read_db, "collecting garbage")
        removed = freed = temp = 0
        if store.root.is_dir():
            for sub in sorted(store.root.iterdir()):
                if not sub.is_dir():
                    continue
                for blob in sub.iterdir():
                    if blob.name not in live:
                        freed += blob.stat().st_size
                        blob.unlink()
                        removed += 1
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only when empty
        if store.tmp.is_dir():
            for f in store.tmp.iterdir():
                remove(f)
                temp += 1
        wanted = {checkout_dir(checkouts, v).name: v for v in versions}
        stale = 0
        if checkouts.is_dir():
            for d in checkouts.iterdir():
                v = wanted.get(d.name)
                if v is None or not intact(d, v.files, deep=False):
                    remove(d)
                    stale += 1
    return GcReport(
        blobs_removed=removed, bytes_freed=freed, temp_removed=temp, checkouts_removed=stale
    )


def info(database: LazyDatabase, store: BlobStore, checkouts: Path) -> RegistryInfo:
    """Where the registry's state lives and how much it holds (see ``Registry.info``).

    Args:
        database: the registry's database (not created when missing).
        store: its blobs.
        checkouts: its checkout cache folder.

    Returns:
        The paths and counts (zero when no database exists yet).
    """
    out = RegistryInfo(
        home=str(database.home),
        database=str(database.path),
        blobs=str(store.root),
        checkouts=str(checkouts),
        exists=database.path.exists(),
    )
    if not out.exists:
        return out

    def counts() -> tuple[int, int, int]:
        with database.read() as conn:
            a = conn.execute("SELECT count(*) FROM adapters").fetchone()[0]
            v = conn.execute("SELECT count(*) FROM versions").fetchone()[0]
            r = conn.execute("SELECT count(*) FROM tombstones").fetchone()[0]
            return a, v, r

    out.adapters, out.versions, out.removed = retry(counts, "counting")
    return out
