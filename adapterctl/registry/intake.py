"""Adding a version: reading the artifact (an adapter, or a merged checkpoint with lineage),
its pre-flight against the base, its manifest, and the rows one new version writes.

The blobs are stored (``blobs``) before the rows are inserted, in one transaction the caller
holds (``Registry.add``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.errors import AdapterctlError, BrokenFile, Conflict, NotFound, ValidationFailed
from adapterctl.identity import (
    check_successor,
    manifest,
    manifest_digest,
    short_digest,
    version_digest,
)
from adapterctl.registry.db import now, rows
from adapterctl.registry.history import move_alias, record_parents
from adapterctl.registry.lookups import lookup, pin_from_row
from adapterctl.registry.models import BasePin, FileEntry, Version

if TYPE_CHECKING:
    from adapterctl.adapter import Adapter
    from adapterctl.checkpoint import Checkpoint

# (parents with their weights, method, options) of a composed or merged artifact.
Lineage = tuple[Sequence[tuple[Version | str, float | None]], str, dict[str, Any]]


def read_artifact(
    path: Path, alpha: float | None, rank: int | None, *, allow_checkpoint: bool
) -> tuple[Adapter | None, str]:
    """Read what is being added.

    Args:
        path: a local adapter (PEFT folder or bare ``.safetensors``), or a checkpoint folder.
        alpha: LoRA alpha of a bare ``.safetensors``.
        rank: its rank.
        allow_checkpoint: accept a merged checkpoint folder (an artifact with lineage).

    Returns:
        (adapter, format); a merged checkpoint folder, when allowed, gives (None, 'checkpoint').

    Raises:
        BrokenFile, NotFound: as the adapter's reader raises them (3, 4).
    """
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


def preflight(adapter: Adapter, ckpt: Checkpoint, source: str) -> None:
    """``validate``'s rules against the base; an error refuses the add.

    Raises:
        ValidationFailed: the adapter does not fit the base (3).
    """
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


def _refuse_escaping_links(files: list[Path], root: Path) -> None:
    """Refuse a file of an adapter folder that is a link to somewhere outside it: adding it
    would copy a file the folder does not hold (and may not be meant to share) into the store.

    Raises:
        ValidationFailed: naming the link and its target (exit 3).
    """
    if root.is_file():
        return
    inside = root.resolve()
    for f in files:
        target = f.resolve()
        if target != inside and inside not in target.parents:
            raise ValidationFailed(
                f"{f}: a link to {target}, outside the adapter folder; copy the file into the "
                "folder if it belongs to the adapter"
            )


@dataclass(frozen=True)
class Contents:
    """The files of an artifact: their canonical manifest and its entries, where each file is
    read from, their digest (the adapter digest ``inspect`` shows) and total size."""

    manifest: list[dict[str, object]]
    entries: list[FileEntry]
    sources: dict[str, Path]
    files_digest: str
    size: int

    def version_digest(self, pin: BasePin) -> str:
        """The version's key: the manifest plus the base pin's identity."""
        return version_digest(self.manifest, pin.identity())


def contents(adapter: Adapter | None, path: Path) -> Contents:
    """Hash the files of an artifact read by ``read_artifact``.

    Args:
        adapter: the adapter, or None for a checkpoint folder.
        path: where it was read from.

    Returns:
        Its manifest entries, their sources, digest and size.
    """
    root = Path(adapter.path) if adapter is not None else path
    files = adapter.files if adapter is not None else _artifact_files(path)
    _refuse_escaping_links(files, root)
    raw = manifest(files, root)
    entries = [FileEntry.model_validate(e) for e in raw]
    return Contents(
        manifest=raw,
        entries=entries,
        sources={e.path: (root if root.is_file() else root / e.path) for e in entries},
        files_digest=manifest_digest(raw),
        size=sum(e.size for e in entries),
    )


def check_base_of_name(
    conn: sqlite3.Connection, name: str, pin: BasePin, *, allow_mismatch: bool
) -> list[str]:
    """Check a new version's base pin against the latest live version of ``name``
    (``identity.check_successor``); nothing to check for a new name.

    Args:
        conn: an open transaction.
        name: the adapter name.
        pin: the new version's base pin.
        allow_mismatch: warn about another base instead of refusing.

    Returns:
        Warnings.

    Raises:
        Conflict: the latest version is pinned to another base (5).
    """
    found = conn.execute(
        "SELECT v.id FROM versions v WHERE v.name = ? AND NOT EXISTS "
        "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id) ORDER BY v.number DESC LIMIT 1",
        [name],
    ).fetchone()
    if found is None:
        return []
    latest = rows(conn, "SELECT * FROM versions WHERE id = ?", [found[0]])[0]
    return check_successor(
        name,
        f"{name}@{latest['number']}",
        pin_from_row(latest),
        pin,
        allow_mismatch=allow_mismatch,
    )


def insert_version(
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
    lineage: Lineage | None,
    remote: tuple[str, str | None] | None = None,
) -> int:
    """Insert the next version of ``name`` and everything that comes with it: its files,
    aliases, lineage and the remote it came from (see ``Registry.add``).

    Args:
        conn: an open write transaction.
        name: a valid adapter name (created when new).
        entries: the version's files.
        files_digest: their manifest digest.
        digest: the version digest (manifest and base pin).
        fmt: the artifact's format (``peft``, ``checkpoint``…).
        size: the files' total size.
        pin: the base pin.
        message: a note kept with the version.
        source: where it was added from.
        tags: valid aliases to point at it.
        lineage: its parents, method and options, or None.
        remote: (url, revision) of the remote it was pulled from, or None.

    Returns:
        The new version's row id.

    Raises:
        Conflict: a live version of ``name`` has this digest (5).
        NotFound: a lineage parent does not resolve (4).
    """
    at = now()
    conn.execute("INSERT OR IGNORE INTO adapters (name, created_at) VALUES (?, ?)", [name, at])
    dup = conn.execute(
        "SELECT v.number FROM versions v WHERE v.name = ? AND v.digest = ? AND NOT EXISTS "
        "(SELECT 1 FROM tombstones t WHERE t.version_id = v.id)",
        [name, digest],
    ).fetchone()
    if dup:
        raise Conflict(
            f"{name}@{dup[0]} already holds this adapter ({short_digest(digest)}…); "
            f"give it an alias with: adapterctl tag {name}@{dup[0]} ALIAS"
        )
    parents: list[tuple[int, float | None]] = []
    if lineage is not None:
        for parent, weight in lineage[0]:
            ref = parent.ref if isinstance(parent, Version) else parent
            parents.append((lookup(conn, ref)["id"], weight))
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
            at,
        ],
    )
    vid = int(cur.lastrowid or 0)
    conn.executemany(
        "INSERT INTO files (version_id, path, size, sha256) VALUES (?, ?, ?, ?)",
        [(vid, e.path, e.size, e.sha256) for e in entries],
    )
    for alias in tags:
        move_alias(conn, name, alias, vid, at)
    if lineage is not None:
        record_parents(conn, vid, parents, lineage[1], lineage[2])
    if remote is not None:
        insert_remote(conn, vid, *remote)
    return vid


def insert_remote(conn: sqlite3.Connection, vid: int, url: str, revision: str | None) -> None:
    """Record that version ``vid`` is at ``url`` (``hf://owner/name``) in ``revision``."""
    conn.execute(
        "INSERT INTO remotes (version_id, url, revision, created_at) VALUES (?, ?, ?, ?)",
        [vid, url, revision, now()],
    )
