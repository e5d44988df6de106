"""A name's history and a version's lineage: alias moves (``tag_events``), removals
(``tombstones``), the event log, and the parents (with weights, method and options) that a
composed or merged version was made from.

Every function here works inside a transaction the caller holds; none commits.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from adapterctl import __version__
from adapterctl.errors import Conflict
from adapterctl.registry.db import damaged, first_row, now
from adapterctl.registry.models import LineageNode, LogEntry, TagResult


def lineage_tree(conn: sqlite3.Connection, vid: int, depth: int) -> list[LineageNode]:
    """The parents of version ``vid`` in order, each with its weight and its own parents.

    Args:
        conn: an open transaction.
        vid: the version's row id.
        depth: how deep this call is (the tree stops growing past 32).

    Returns:
        One node per parent (empty for a version that was added, not derived).
    """
    if depth > 32:  # lineage is acyclic (parents exist first); this only bounds the output
        return []
    out = []
    for pid, weight in conn.execute(
        "SELECT parent_id, weight FROM lineage WHERE version_id = ? ORDER BY position", [vid]
    ).fetchall():
        p = first_row(
            conn,
            "SELECT v.name, v.number, v.digest, t.removed_at, d.method FROM versions v "
            "LEFT JOIN tombstones t ON t.version_id = v.id "
            "LEFT JOIN derivations d ON d.version_id = v.id WHERE v.id = ?",
            [pid],
            f"a lineage parent of version id {vid}, version id {pid}, has no row",
        )
        out.append(
            LineageNode(
                ref=f"{p['name']}@{p['number']}",
                digest=p["digest"],
                weight=weight,
                removed=p["removed_at"] is not None,
                method=p["method"],
                parents=lineage_tree(conn, pid, depth + 1),
            )
        )
    return out


def children(conn: sqlite3.Connection, vid: int) -> list[str]:
    """``name@number`` of every version (removed ones too) made from version ``vid``."""
    return [
        f"{n}@{k}"
        for n, k in conn.execute(
            "SELECT DISTINCT v.name, v.number FROM lineage l JOIN versions v "
            "ON v.id = l.version_id WHERE l.parent_id = ? ORDER BY v.name, v.number",
            [vid],
        )
    ]


def record_parents(
    conn: sqlite3.Connection,
    vid: int,
    parents: Sequence[tuple[int, float | None]],
    method: str,
    options: dict[str, Any],
) -> None:
    """Record that version ``vid`` was made from ``parents`` (row id, weight) by ``method``.

    Args:
        conn: an open write transaction.
        vid: the new version's row id.
        parents: (row id, weight) per input, in order.
        method: the composition or merge method.
        options: its options (stored as JSON, keys sorted).
    """
    conn.executemany(
        "INSERT INTO lineage (version_id, position, parent_id, weight) VALUES (?, ?, ?, ?)",
        [(vid, i, pid, w) for i, (pid, w) in enumerate(parents)],
    )
    conn.execute(
        "INSERT INTO derivations (version_id, method, options, tool) VALUES (?, ?, ?, ?)",
        [
            vid,
            method,
            json.dumps(options, sort_keys=True, default=str),
            f"adapterctl {__version__}",
        ],
    )


def move_alias(conn: sqlite3.Connection, name: str, alias: str, vid: int, at: str) -> None:
    """Append a tag event: ``name@alias`` points at version ``vid`` from ``at`` on."""
    conn.execute(
        "INSERT INTO tag_events (name, alias, version_id, created_at) VALUES (?, ?, ?, ?)",
        [name, alias, vid, at],
    )


def tag(conn: sqlite3.Connection, row: dict, alias: str) -> TagResult:
    """Point ``alias`` of the version in ``row`` at it (see ``Registry.tag``).

    Args:
        conn: an open write transaction.
        row: the version's row, as ``lookups.lookup`` returns it.
        alias: a valid alias.

    Returns:
        The alias, its version and the version it pointed at before.
    """
    prev = conn.execute(
        "SELECT v.number FROM current_tags c JOIN versions v ON v.id = c.version_id "
        "WHERE c.name = ? AND c.alias = ?",
        [row["name"], alias],
    ).fetchone()
    move_alias(conn, row["name"], alias, row["id"], now())
    return TagResult(
        name=row["name"],
        alias=alias,
        number=row["number"],
        previous=prev[0] if prev else None,
    )


def remove(conn: sqlite3.Connection, row: dict, *, force: bool) -> int:
    """Record a tombstone for the version in ``row`` (see ``Registry.rm``).

    Args:
        conn: an open write transaction.
        row: the version's row, as ``lookups.lookup`` returns it.
        force: remove it even if live versions were made from it.

    Returns:
        The removed version's row id.

    Raises:
        Conflict: it is a lineage parent of a live version and not ``force`` (5).
    """
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
        [row["id"], now(), int(bool(kids))],
    )
    return int(row["id"])


def log(conn: sqlite3.Connection, name: str) -> list[LogEntry]:
    """The events of ``name``, newest first (see ``Registry.log``).

    Args:
        conn: an open transaction.
        name: an adapter name known to exist.

    Returns:
        Versions added, aliases moved, versions removed.
    """
    dangling = conn.execute(
        "SELECT t.alias, t.version_id FROM tag_events t WHERE t.name = ? AND NOT EXISTS "
        "(SELECT 1 FROM versions v WHERE v.id = t.version_id) LIMIT 1",
        [name],
    ).fetchone()
    if dangling:
        raise damaged(
            conn, f"{name}@{dangling[0]} was pointed at version id {dangling[1]}, which has no row"
        )
    found = conn.execute(
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
        for at, _, _, event, number, alias, digest, message in found
    ]
