"""The registry's schema, as append-only migrations (``m001_…``, ``m002_…``).

Rules (see ``registry/README.md``):

- Never edit or reorder a migration that has shipped; add a new ``m00N_…`` function.
- Versions, their files, tombstones, tag moves, lineage and remotes are append-only: SQL
  triggers refuse every UPDATE and DELETE of those rows, so no code path (ours or a user's
  ``sqlite3`` session) can rewrite history. Only ``base_hashes``, a cache, is mutable.
- ``registry/schema.sql`` is generated from these functions
  (``python -m adapterctl.migrations --schema > registry/schema.sql``); a test fails when it
  drifts.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from sqlite_utils import Migrations

if TYPE_CHECKING:
    from sqlite_utils import Database

migrations = Migrations("adapterctl.registry")

# Tables whose rows, once written, are never changed or removed.
APPEND_ONLY = ("adapters", "versions", "files", "tombstones", "tag_events", "lineage",
               "derivations", "remotes")  # fmt: skip


# The key each append-only table is looked up by: an INSERT that would replace an existing row
# (INSERT OR REPLACE deletes it first, without firing DELETE triggers unless the connection
# has recursive_triggers on) is refused too.
_KEYS: dict[str, list[tuple[str, ...]]] = {
    "adapters": [("name",)],
    "versions": [("id",), ("name", "number")],
    "files": [("version_id", "path")],
    "tombstones": [("version_id",)],
    "tag_events": [("id",)],
    "lineage": [("version_id", "position")],
    "derivations": [("version_id",)],
    "remotes": [("id",)],
}


def expected_triggers() -> set[str]:
    """The names of the triggers that keep the append-only tables append-only."""
    return {f"{t}_{k}" for t in APPEND_ONLY for k in ("no_replace", "no_update", "no_delete")}


def _immutable(table: str) -> str:
    match = " OR ".join(
        "(" + " AND ".join(f"o.{k} IS NEW.{k}" for k in key) + ")" for key in _KEYS[table]
    )
    # A name row carries nothing but the name: inserting it again is a no-op, not an error.
    action = (
        "RAISE(IGNORE)"
        if table == "adapters"
        else (f"RAISE(ABORT, '{table} rows are immutable (append-only registry)')")
    )
    return f"""
CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table}
WHEN EXISTS (SELECT 1 FROM {table} o WHERE {match})
BEGIN
    SELECT {action};
END;
CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table}
BEGIN
    SELECT RAISE(ABORT, '{table} rows are immutable (append-only registry)');
END;
CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table}
BEGIN
    SELECT RAISE(ABORT, '{table} rows are immutable (append-only registry)');
END;
"""


@migrations()
def m001_initial(db: Database) -> None:
    """Names, versions and their files, tombstones, tag history, lineage, remotes, hash cache."""
    db.executescript(
        """
CREATE TABLE adapters (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE versions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL REFERENCES adapters(name),
    number INTEGER NOT NULL CHECK (number >= 1),
    digest TEXT NOT NULL,
    files_digest TEXT NOT NULL,
    format TEXT NOT NULL,
    size INTEGER NOT NULL,
    pin_level TEXT NOT NULL
        CHECK (pin_level IN ('content digest', 'fingerprint', 'name only', 'none')),
    base_fingerprint TEXT,
    base_content_digest TEXT,
    base_files TEXT,
    base_name TEXT,
    base_revision TEXT,
    base_path TEXT,
    base_architecture TEXT,
    message TEXT,
    source TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (name, number)
);
CREATE INDEX versions_digest ON versions(digest);
CREATE INDEX versions_base_fingerprint ON versions(base_fingerprint);
CREATE TABLE files (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (version_id, path)
);
CREATE INDEX files_sha256 ON files(sha256);
CREATE TABLE tombstones (
    version_id INTEGER PRIMARY KEY REFERENCES versions(id),
    removed_at TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tag_events (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL REFERENCES adapters(name),
    alias TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    created_at TEXT NOT NULL
);
CREATE INDEX tag_events_alias ON tag_events(name, alias, id);
CREATE VIEW current_tags AS
    SELECT t.name, t.alias, t.version_id, t.created_at
    FROM tag_events t
    WHERE t.id = (SELECT max(u.id) FROM tag_events u WHERE u.name = t.name AND u.alias = t.alias);
CREATE TABLE lineage (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    position INTEGER NOT NULL,
    parent_id INTEGER NOT NULL REFERENCES versions(id),
    weight REAL,
    PRIMARY KEY (version_id, position)
);
CREATE INDEX lineage_parent ON lineage(parent_id);
CREATE TABLE derivations (
    version_id INTEGER PRIMARY KEY REFERENCES versions(id),
    method TEXT NOT NULL,
    options TEXT NOT NULL,
    tool TEXT NOT NULL
);
CREATE TABLE remotes (
    id INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    url TEXT NOT NULL,
    revision TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE base_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    hashed_at TEXT NOT NULL
);
"""
        + "".join(_immutable(t) for t in APPEND_ONLY)
    )


def apply(db: Database) -> None:
    """Bring ``db`` to the latest schema (each migration in its own transaction).

    Args:
        db: the database; the caller serialises concurrent callers (``Registry`` holds a
            write lock while it migrates).
    """
    migrations.apply(db)


def pending(db: Database) -> list[str]:
    """Names of the migrations not yet applied to ``db`` (read-only)."""
    return [m.name for m in migrations.pending(db)]


def schema_sql() -> str:
    """The latest schema, as ``registry/schema.sql`` holds it: a blank database migrated,
    then every table, index, view and trigger's SQL (sqlite-utils' own bookkeeping table
    left out).

    Returns:
        The SQL text, one statement per paragraph, ending in a newline.

    Example:
        >>> "CREATE TABLE versions" in schema_sql()
        True
    """
    from sqlite_utils import Database

    db = Database(memory=True, execute_plugins=False)
    apply(db)
    order = {"table": 0, "index": 1, "view": 2, "trigger": 3}
    rows = [
        r
        for r in db.query("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql NOT NULL")
        if not str(r["tbl_name"]).startswith(("_sqlite_", "sqlite_"))
    ]
    rows.sort(key=lambda r: (order.get(str(r["type"]), 9), str(r["name"])))
    header = (
        "-- Generated from adapterctl/migrations.py; do not edit.\n"
        "-- Regenerate with: python -m adapterctl.migrations --schema > registry/schema.sql\n"
    )
    return header + "\n" + "\n\n".join(f"{r['sql']};" for r in rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m adapterctl.migrations --schema``: print the generated schema."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--schema"]:
        sys.stderr.write("usage: python -m adapterctl.migrations --schema\n")
        return 2
    sys.stdout.write(schema_sql())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
