-- Generated from adapterctl/migrations.py; do not edit.
-- Regenerate with: python -m adapterctl.migrations --schema > registry/schema.sql

CREATE TABLE adapters (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);

CREATE TABLE base_hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    hashed_at TEXT NOT NULL
);

CREATE TABLE derivations (
    version_id INTEGER PRIMARY KEY REFERENCES versions(id),
    method TEXT NOT NULL,
    options TEXT NOT NULL,
    tool TEXT NOT NULL
);

CREATE TABLE files (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (version_id, path)
);

CREATE TABLE lineage (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    position INTEGER NOT NULL,
    parent_id INTEGER NOT NULL REFERENCES versions(id),
    weight REAL,
    PRIMARY KEY (version_id, position)
);

CREATE TABLE remotes (
    id INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    url TEXT NOT NULL,
    revision TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE tag_events (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL REFERENCES adapters(name),
    alias TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    created_at TEXT NOT NULL
);

CREATE TABLE tombstones (
    version_id INTEGER PRIMARY KEY REFERENCES versions(id),
    removed_at TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0
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

CREATE INDEX files_sha256 ON files(sha256);

CREATE INDEX lineage_parent ON lineage(parent_id);

CREATE INDEX tag_events_alias ON tag_events(name, alias, id);

CREATE INDEX versions_base_fingerprint ON versions(base_fingerprint);

CREATE INDEX versions_digest ON versions(digest);

CREATE VIEW current_tags AS
    SELECT t.name, t.alias, t.version_id, t.created_at
    FROM tag_events t
    WHERE t.id = (SELECT max(u.id) FROM tag_events u WHERE u.name = t.name AND u.alias = t.alias);

CREATE TRIGGER adapters_no_delete BEFORE DELETE ON adapters
BEGIN
    SELECT RAISE(ABORT, 'adapters rows are immutable (append-only registry)');
END;

CREATE TRIGGER adapters_no_replace BEFORE INSERT ON adapters
WHEN EXISTS (SELECT 1 FROM adapters o WHERE (o.name IS NEW.name))
BEGIN
    SELECT RAISE(IGNORE);
END;

CREATE TRIGGER adapters_no_update BEFORE UPDATE ON adapters
BEGIN
    SELECT RAISE(ABORT, 'adapters rows are immutable (append-only registry)');
END;

CREATE TRIGGER derivations_no_delete BEFORE DELETE ON derivations
BEGIN
    SELECT RAISE(ABORT, 'derivations rows are immutable (append-only registry)');
END;

CREATE TRIGGER derivations_no_replace BEFORE INSERT ON derivations
WHEN EXISTS (SELECT 1 FROM derivations o WHERE (o.version_id IS NEW.version_id))
BEGIN
    SELECT RAISE(ABORT, 'derivations rows are immutable (append-only registry)');
END;

CREATE TRIGGER derivations_no_update BEFORE UPDATE ON derivations
BEGIN
    SELECT RAISE(ABORT, 'derivations rows are immutable (append-only registry)');
END;

CREATE TRIGGER files_no_delete BEFORE DELETE ON files
BEGIN
    SELECT RAISE(ABORT, 'files rows are immutable (append-only registry)');
END;

CREATE TRIGGER files_no_replace BEFORE INSERT ON files
WHEN EXISTS (SELECT 1 FROM files o WHERE (o.version_id IS NEW.version_id AND o.path IS NEW.path))
BEGIN
    SELECT RAISE(ABORT, 'files rows are immutable (append-only registry)');
END;

CREATE TRIGGER files_no_update BEFORE UPDATE ON files
BEGIN
    SELECT RAISE(ABORT, 'files rows are immutable (append-only registry)');
END;

CREATE TRIGGER lineage_no_delete BEFORE DELETE ON lineage
BEGIN
    SELECT RAISE(ABORT, 'lineage rows are immutable (append-only registry)');
END;

CREATE TRIGGER lineage_no_replace BEFORE INSERT ON lineage
WHEN EXISTS (SELECT 1 FROM lineage o WHERE (o.version_id IS NEW.version_id AND o.position IS NEW.position))
BEGIN
    SELECT RAISE(ABORT, 'lineage rows are immutable (append-only registry)');
END;

CREATE TRIGGER lineage_no_update BEFORE UPDATE ON lineage
BEGIN
    SELECT RAISE(ABORT, 'lineage rows are immutable (append-only registry)');
END;

CREATE TRIGGER remotes_no_delete BEFORE DELETE ON remotes
BEGIN
    SELECT RAISE(ABORT, 'remotes rows are immutable (append-only registry)');
END;

CREATE TRIGGER remotes_no_replace BEFORE INSERT ON remotes
WHEN EXISTS (SELECT 1 FROM remotes o WHERE (o.id IS NEW.id))
BEGIN
    SELECT RAISE(ABORT, 'remotes rows are immutable (append-only registry)');
END;

CREATE TRIGGER remotes_no_update BEFORE UPDATE ON remotes
BEGIN
    SELECT RAISE(ABORT, 'remotes rows are immutable (append-only registry)');
END;

CREATE TRIGGER tag_events_no_delete BEFORE DELETE ON tag_events
BEGIN
    SELECT RAISE(ABORT, 'tag_events rows are immutable (append-only registry)');
END;

CREATE TRIGGER tag_events_no_replace BEFORE INSERT ON tag_events
WHEN EXISTS (SELECT 1 FROM tag_events o WHERE (o.id IS NEW.id))
BEGIN
    SELECT RAISE(ABORT, 'tag_events rows are immutable (append-only registry)');
END;

CREATE TRIGGER tag_events_no_update BEFORE UPDATE ON tag_events
BEGIN
    SELECT RAISE(ABORT, 'tag_events rows are immutable (append-only registry)');
END;

CREATE TRIGGER tombstones_no_delete BEFORE DELETE ON tombstones
BEGIN
    SELECT RAISE(ABORT, 'tombstones rows are immutable (append-only registry)');
END;

CREATE TRIGGER tombstones_no_replace BEFORE INSERT ON tombstones
WHEN EXISTS (SELECT 1 FROM tombstones o WHERE (o.version_id IS NEW.version_id))
BEGIN
    SELECT RAISE(ABORT, 'tombstones rows are immutable (append-only registry)');
END;

CREATE TRIGGER tombstones_no_update BEFORE UPDATE ON tombstones
BEGIN
    SELECT RAISE(ABORT, 'tombstones rows are immutable (append-only registry)');
END;

CREATE TRIGGER versions_no_delete BEFORE DELETE ON versions
BEGIN
    SELECT RAISE(ABORT, 'versions rows are immutable (append-only registry)');
END;

CREATE TRIGGER versions_no_replace BEFORE INSERT ON versions
WHEN EXISTS (SELECT 1 FROM versions o WHERE (o.id IS NEW.id) OR (o.name IS NEW.name AND o.number IS NEW.number))
BEGIN
    SELECT RAISE(ABORT, 'versions rows are immutable (append-only registry)');
END;

CREATE TRIGGER versions_no_update BEFORE UPDATE ON versions
BEGIN
    SELECT RAISE(ABORT, 'versions rows are immutable (append-only registry)');
END;
