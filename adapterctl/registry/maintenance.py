"""Keeping the registry sound: ``registry verify`` (database integrity and dangling
references, every live blob and checkout re-hashed), ``registry gc`` (unused blobs, leftover
temporary files, stale checkouts) and ``registry path`` (where the state lives, and how much
there is).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import NamedTuple

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
    users: dict[tuple[str, int], list[str]] = {}
    for v in db.versions:
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
    for v in db.versions:
        d = checkout_dir(checkouts, v)
        if d.exists() and not intact(d, v.files, trust_stamp=False):
            checkouts_altered.append(str(d))
    ok = db.sound and not missing and not altered
    return VerifyReport(
        ok=ok and not checkouts_altered,
        integrity=db.integrity,
        foreign_key_errors=db.foreign_key_errors,
        dangling=db.dangling,
        missing_versions=db.missing_versions,
        missing_triggers=db.missing_triggers,
        versions_checked=len(db.versions),
        blobs_checked=len(users),
        bytes_checked=nbytes,
        missing=missing,
        altered=altered,
        bad_digests=db.bad_digests,
        checkouts_altered=checkouts_altered,
    )


class _DatabaseCheck(NamedTuple):
    """What the database's own checks found (``_check_database``)."""

    integrity: list[str]  # PRAGMA integrity_check: ["ok"] when sound
    foreign_key_errors: int
    dangling: list[str]  # the foreign key errors, described
    missing_versions: list[str]  # version rows a name's numbering says exist but do not
    missing_triggers: list[str]  # append-only guards dropped
    versions: list[Version]  # the live versions
    bad_digests: list[str]  # live versions whose recorded files no longer give their digest

    @property
    def sound(self) -> bool:
        return self.integrity == ["ok"] and not (
            self.foreign_key_errors
            or self.missing_versions
            or self.missing_triggers
            or self.bad_digests
        )

    def problems(self) -> list[str]:
        """One short phrase per kind of problem found."""
        n_fk, n_missing = self.foreign_key_errors, len(self.missing_versions)
        n_triggers, bad = len(self.missing_triggers), self.bad_digests
        return [
            *([] if self.integrity == ["ok"] else [f"integrity: {self.integrity[0]}"]),
            *([f"{n_fk} foreign key error(s)"] if n_fk else []),
            *([f"{n_missing} version row(s) missing"] if n_missing else []),
            *([f"{n_triggers} append-only trigger(s) dropped"] if n_triggers else []),
            *([f"files of {', '.join(bad)} do not match their digest"] if bad else []),
        ]


def _check_database(database: LazyDatabase) -> _DatabaseCheck:
    """The database's own checks: SQLite's integrity check, rows that refer to rows that are
    not there, version numbers with no row, append-only triggers that were dropped, the live
    versions, and those whose recorded files no longer give their digest (a ``files`` row
    deleted or edited)."""
    with database.read() as conn:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        dangling, fk = _dangling(conn)
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        triggers = sorted(expected_triggers() - have)
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM versions v WHERE NOT EXISTS "
                "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id) ORDER BY id"
            )
        ]
        versions = [build(conn, i, depth=99) for i in ids]  # depth 99: no lineage needed
        missing_versions = _missing_versions(conn)
    bad: list[str] = []
    for v in versions:
        raw: list[dict[str, object]] = [e.model_dump() for e in v.files]
        if manifest_digest(raw) != v.files_digest or (
            version_digest(raw, v.base.identity()) != v.digest
        ):
            bad.append(v.ref)
    return _DatabaseCheck(integrity, fk, dangling, missing_versions, triggers, versions, bad)


def _dangling(conn: sqlite3.Connection) -> tuple[list[str], int]:
    """SQLite's foreign key check, described: one line per table, column and missing key
    (``3 files row(s) refer to versions.id = 7, which has no row``), and the number of rows
    at fault."""
    columns: dict[str, dict[int, tuple[str, str, str]]] = {}
    counts: dict[tuple[str, str, str, str, object], int] = {}
    total = 0
    for table, rowid, parent, fkid in conn.execute("PRAGMA foreign_key_check").fetchall():
        if table not in columns:
            columns[table] = {
                r[0]: (r[2], r[3], r[4] or "rowid")
                for r in conn.execute(f'PRAGMA foreign_key_list("{table}")')
            }
        parent, col, to = columns[table].get(fkid, (parent, "?", "?"))
        value = (
            conn.execute(f'SELECT "{col}" FROM "{table}" WHERE rowid = ?', [rowid]).fetchone()
            if col != "?"
            else None
        )
        key = (table, col, parent, to, None if value is None else value[0])
        counts[key] = counts.get(key, 0) + 1
        total += 1
    lines = [
        f"{n} {table} row(s) refer by {col} to {parent}.{to} = {value!r}, which has no row"
        for (table, col, parent, to, value), n in sorted(counts.items(), key=str)
    ]
    return lines, total


def _missing_versions(conn: sqlite3.Connection) -> list[str]:
    """Version rows that must exist but do not: numbers run 1, 2, 3… per name with no gap
    and are never reused, so a gap is a deleted row, and so is a name with no version at
    all (a name is only ever created with its first version)."""
    out = []
    for (name,) in conn.execute(
        "SELECT a.name FROM adapters a WHERE NOT EXISTS "
        "(SELECT 1 FROM versions v WHERE v.name = a.name) ORDER BY a.name"
    ):
        out.append(f"{name}: no version rows at all")
    for name, top in conn.execute(
        "SELECT name, max(number) FROM versions GROUP BY name "
        "HAVING count(*) != max(number) ORDER BY name"
    ).fetchall():
        have = {n for (n,) in conn.execute("SELECT number FROM versions WHERE name = ?", [name])}
        out += [f"{name}@{n}: no version row" for n in range(1, top + 1) if n not in have]
    return out


def gc(database: LazyDatabase, store: BlobStore, checkouts: Path) -> GcReport:
    """Delete blobs no live version uses, leftover temporary files, and checkouts of removed
    versions or whose files no longer hash to the version's (see ``Registry.gc``).

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
        if not check.sound:
            raise OperationalError(
                f"{database.path}: the registry database is damaged "
                f"({'; '.join(check.problems())}); gc deleted nothing: run `adapterctl registry "
                "verify` and restore registry.db from a backup"
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
                if v is None or not intact(d, v.files, trust_stamp=False):
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
