"""Reading versions: the row a reference names (with messages that list what exists), a row
built into a ``Version``, and the per-name summaries of ``list``.

Every function here works inside a transaction the caller holds.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from adapterctl.errors import NotFound, VersionRemoved
from adapterctl.identity import base_fingerprint, short_digest
from adapterctl.registry.db import damaged, first_row, rows
from adapterctl.registry.grammar import DigestRef, parse_ref
from adapterctl.registry.history import children, lineage_tree
from adapterctl.registry.models import (
    PIN_LABELS,
    AdapterSummary,
    BasePin,
    FileEntry,
    Remote,
    Tombstone,
    Version,
)

# A version row with its tombstone's columns (NULL when live).
_SELECT = (
    "SELECT v.*, t.removed_at, t.forced FROM versions v "
    "LEFT JOIN tombstones t ON t.version_id = v.id "
)


def lookup(conn: sqlite3.Connection, ref: str, *, allow_removed: bool = False) -> dict:
    """The version row ``ref`` names (with ``removed_at`` when it has a tombstone).

    Args:
        conn: an open transaction.
        ref: ``name``, ``name@latest``, ``name@3``, ``name@alias`` or ``sha256:<prefix>``.
        allow_removed: return a removed version's row instead of refusing it.

    Returns:
        The row, as a dict keyed by column.

    Raises:
        NotFound: not a reference, or unknown name, version or alias, or an ambiguous
            prefix (4); the message lists what exists.
        VersionRemoved: the version was removed and not ``allow_removed`` (4).
    """
    parsed = parse_ref(ref)
    if isinstance(parsed, DigestRef):
        return _lookup_digest(conn, ref, parsed.prefix, allow_removed)
    if parsed is None:
        raise NotFound(
            f"{ref!r} is not a registry reference (name, name@3, name@alias, "
            "sha256:<prefix>); list adapters with: adapterctl list"
        )
    name, sel = parsed
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
        found = rows(
            conn,
            _SELECT + "WHERE v.name = ? AND t.version_id IS NULL ORDER BY v.number DESC LIMIT 1",
            [name],
        )
        if not found:
            newest = _SELECT + "WHERE v.name = ? ORDER BY v.number DESC LIMIT 1"
            last = first_row(conn, newest, [name], f"the adapter {name} has no version rows")
            if allow_removed:
                return last
            raise VersionRemoved(
                f"every version of {name} was removed (the last, {name}@{last['number']}, "
                f"at {last['removed_at']}); see its history with: adapterctl log {name}"
            )
        return found[0]
    if sel.isdigit():
        top = conn.execute("SELECT max(number) FROM versions WHERE name = ?", [name]).fetchone()[0]
        number = int(sel)
        if top is None:
            raise damaged(conn, f"the adapter {name} has no version rows")
        if not 1 <= number <= top:  # numbers run 1..top with no gap: nothing else to look up
            raise NotFound(
                f"{name} has no version {sel} (versions 1 to {top}); "
                f"list them with: adapterctl log {name}"
            )
        row = first_row(
            conn,
            _SELECT + "WHERE v.name = ? AND v.number = ?",
            [name, number],
            f"{name}@{number} has no version row (numbers are never skipped)",
        )
        if row["removed_at"] and not allow_removed:
            raise VersionRemoved(
                f"{name}@{sel} was removed at {row['removed_at']} (tombstone; the number is "
                f"never reused); list live versions with: adapterctl log {name}"
            )
        return row
    found = rows(
        conn,
        _SELECT + "JOIN current_tags c ON c.version_id = v.id WHERE c.name = ? AND c.alias = ?",
        [name, sel],
    )
    if not found:
        aliases = dict(
            conn.execute(
                "SELECT alias, version_id FROM current_tags WHERE name = ? ORDER BY alias", [name]
            ).fetchall()
        )
        if sel in aliases:
            raise damaged(
                conn, f"{name}@{sel} points at version id {aliases[sel]}, which has no row"
            )
        have = ("aliases: " + ", ".join(aliases)) if aliases else "it has no aliases"
        raise NotFound(
            f"{name} has no version or alias {sel!r} ({have}); "
            f"set one with: adapterctl tag {name}@N {sel}"
        )
    row = found[0]
    if row["removed_at"] and not allow_removed:
        raise VersionRemoved(
            f"{name}@{sel} points at {name}@{row['number']}, which was removed at "
            f"{row['removed_at']} (tombstone); move the alias with: "
            f"adapterctl tag {name}@N {sel}"
        )
    return row


def _lookup_digest(
    conn: sqlite3.Connection, ref: str, hex_prefix: str, allow_removed: bool
) -> dict:
    lo = "sha256:" + hex_prefix
    hi = lo + "g"  # hex digits sort below 'g': [lo, hi) is every digest with the prefix
    found = rows(
        conn,
        _SELECT + "WHERE (v.digest >= ? AND v.digest < ?) OR (v.files_digest >= ? AND "
        "v.files_digest < ?) ORDER BY t.version_id IS NOT NULL, v.id DESC",
        [lo, hi, lo, hi],
    )
    if not found:
        raise NotFound(
            f"no registry version has a digest starting with {ref}; "
            "list adapters with: adapterctl list"
        )
    distinct = {r["digest"] for r in found}
    if len(distinct) > 1:
        shown = ", ".join(
            f"{r['name']}@{r['number']} ({short_digest(r['digest'])})" for r in found[:8]
        )
        raise NotFound(
            f"{ref} is ambiguous: it matches {len(found)} versions ({shown}); use a longer prefix"
        )
    row = found[0]
    if row["removed_at"] and not allow_removed:
        raise VersionRemoved(
            f"{ref} is {row['name']}@{row['number']}, which was removed at "
            f"{row['removed_at']} (tombstone); list live versions with: "
            f"adapterctl log {row['name']}"
        )
    return row


def pin_from_row(row: dict) -> BasePin:
    """The base pin stored in a version row."""
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


def build(conn: sqlite3.Connection, vid: int, depth: int) -> Version:
    """Everything about version ``vid``: files, pin, tags, tombstone, derivation, lineage
    tree, children and remotes.

    Args:
        conn: an open transaction.
        vid: the version's row id.
        depth: the lineage depth it is built at (0 for the version asked for).

    Returns:
        The version.
    """
    row = first_row(conn, _SELECT + "WHERE v.id = ?", [vid], f"version id {vid} has no row")
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
        base=pin_from_row(row),
        files=files,
        tags=tags,
        removed=Tombstone(removed_at=row["removed_at"], forced=bool(row["forced"]))
        if row["removed_at"]
        else None,
        method=deriv[0] if deriv else None,
        options=json.loads(deriv[1]) if deriv else None,
        parents=lineage_tree(conn, vid, depth),
        children=children(conn, vid),
        remotes=remotes,
    )


def base_filter(base: str) -> tuple[str, list[Any]]:
    """The SQL condition (and its parameters) keeping versions pinned to ``base``: a local
    base folder (its fingerprint), a ``sha256:<prefix>`` of a fingerprint or content digest,
    or a base name."""
    if base.startswith("sha256:"):
        lo = base.lower()
        return (
            " AND ((v.base_fingerprint >= ? AND v.base_fingerprint < ?) OR "
            "(v.base_content_digest >= ? AND v.base_content_digest < ?))",
            [lo, lo + "g", lo, lo + "g"],
        )
    if Path(base).exists():
        from adapterctl.checkpoint import open_base

        return " AND v.base_fingerprint = ?", [base_fingerprint(open_base(base))]
    return " AND v.base_name = ?", [base]


def summaries(
    conn: sqlite3.Connection, where: str, params: list[Any], include_removed: bool
) -> list[AdapterSummary]:
    """One summary per name: its newest live version (see ``Registry.list``).

    Args:
        conn: an open transaction.
        where: an extra condition on the versions (from ``base_filter``), or "".
        params: its parameters.
        include_removed: also list names whose versions were all removed.

    Returns:
        The summaries, sorted by name.
    """
    found = rows(
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
        for r in found
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


def find_remote(conn: sqlite3.Connection, url: str, revision: str) -> int | None:
    """The row id of the live version last recorded at ``url`` in ``revision``, or None."""
    found = conn.execute(
        "SELECT r.version_id FROM remotes r WHERE r.url = ? AND r.revision = ? AND NOT EXISTS "
        "(SELECT 1 FROM tombstones t WHERE t.version_id = r.version_id) "
        "ORDER BY r.id DESC LIMIT 1",
        [url, revision],
    ).fetchone()
    return None if found is None else int(found[0])
