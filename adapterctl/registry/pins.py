"""Base pins: which base a version belongs to, how strongly that is known, and the checks
against it (a checkpoint about to be merged into; several versions about to be combined).

The weight-file hashes behind a content digest are cached in the ``base_hashes`` table, keyed
by absolute path, size and mtime. A base read from the Hub (``hf://``) needs no hashing: the
Hub stores each weight file's sha256 (its LFS object id), so it is pinned by content digest
and commit without downloading it, and a local copy of the same files hashes to that digest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from adapterctl import identity
from adapterctl.errors import Conflict, UsageError
from adapterctl.identity import base_content_digest
from adapterctl.registry.db import LazyDatabase, now, retry, rows
from adapterctl.registry.models import (
    BASE_CHECK_ORDER,
    PIN_LABELS,
    BaseCheck,
    BasePin,
    FileEntry,
    PinChecks,
    Version,
)

if TYPE_CHECKING:
    from adapterctl.checkpoint import Checkpoint


def base_file_hashes(
    database: LazyDatabase, ckpt: Checkpoint, *, compute: bool
) -> list[FileEntry] | None:
    """The sha256 of each of a base's weight files, from the cache or, with ``compute``,
    hashed now and cached (see ``Registry.base_file_hashes``); for a base read from the Hub,
    the sha256s the Hub stores (``hub.base.origin_file_hashes``), nothing hashed."""
    from adapterctl.identity import file_sha256

    if ckpt.origin is not None:
        from adapterctl.hub.base import origin_file_hashes

        return origin_file_hashes(ckpt.origin)
    root = ckpt.folder
    out: list[FileEntry] = []
    for shard in ckpt.local_shards:
        st = shard.stat()
        key = str(shard.resolve())

        def lookup(key: str = key) -> list[dict]:
            return rows(database.db.conn, "SELECT * FROM base_hashes WHERE path = ?", [key])

        found = retry(lookup, "reading the base hash cache")
        row = found[0] if found else None
        if row and row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns:
            sha = str(row["sha256"])
        elif compute:
            sha = file_sha256(shard)

            def store(key: str = key, sha: str = sha, st: os.stat_result = st) -> None:
                with database.write() as conn:
                    conn.execute(
                        "INSERT OR REPLACE INTO base_hashes VALUES (?, ?, ?, ?, ?)",
                        [key, st.st_size, st.st_mtime_ns, sha, now()],
                    )

            retry(store, "caching a base hash")
        else:
            return None
        out.append(FileEntry(path=shard.relative_to(root).as_posix(), size=st.st_size, sha256=sha))
    return sorted(out, key=lambda e: e.path)


def pin_base(
    database: LazyDatabase,
    base: str | os.PathLike[str] | Checkpoint | None,
    *,
    name: str | None = None,
    revision: str | None = None,
    hash_base: bool = False,
) -> BasePin:
    """Pin a base: fingerprint always, content digest when asked or cached (see
    ``Registry.pin_base``); a Hub base by content digest and commit, from the Hub's hashes.

    Raises:
        UsageError: ``hash_base`` without a base (2).
    """
    if base is None:
        if hash_base:
            raise UsageError("--hash-base needs a local base; pass --base BASE")
        return BasePin(level="name only" if name else "none", name=name, revision=revision)
    from adapterctl.checkpoint import open_base

    ckpt = open_base(base)
    files = base_file_hashes(database, ckpt, compute=hash_base)
    return BasePin.of_checkpoint(ckpt, files, name=name, revision=revision)


def check_pin(
    database: LazyDatabase, v: Version, checkpoint: Checkpoint, *, hash_base: bool = False
) -> str:
    """Check that ``checkpoint`` is the base ``v`` is pinned to (see
    ``Registry.check_base_pin``; the comparison is ``identity.check_pin``).

    Returns:
        Which check ran (a ``PIN_LABELS`` value).

    Raises:
        Conflict: the checkpoint differs from the pin (5).
    """

    def content_digest() -> str | None:
        files = base_file_hashes(database, checkpoint, compute=hash_base)
        return None if files is None else base_content_digest((f.path, f.sha256) for f in files)

    return PIN_LABELS[identity.check_pin(v.ref, v.base, checkpoint, content_digest)]


def check_pins(
    database: LazyDatabase,
    versions: Sequence[Version | None],
    checkpoint: Checkpoint,
    *,
    hash_base: bool = False,
    allow_mismatch: bool = False,
) -> PinChecks:
    """Check each input's base pin against ``checkpoint`` (``check_pin``) and say how far the
    base was checked overall (see ``Registry.check_pins``).

    Args:
        database: the registry's database (its base hash cache).
        versions: the registry version of each input; None for a local path (no pin).
        checkpoint: the base about to be merged into.
        hash_base: hash the checkpoint's weight files where a pin has a content digest and the
            cache does not know them, so the content is compared, not only the fingerprint.
        allow_mismatch: report a differing pin as a warning instead of refusing.

    Returns:
        The weakest level checked, one line per registry input, and warnings.

    Raises:
        Conflict: a pin differs from ``checkpoint`` and ``allow_mismatch`` is False (5).
    """
    levels: list[BaseCheck] = []
    lines: list[str] = []
    warnings: list[str] = []
    for v in versions:
        if v is None:
            levels.append("unpinned")
            continue
        try:
            label = check_pin(database, v, checkpoint, hash_base=hash_base)
        except Conflict as exc:
            if not allow_mismatch:
                raise
            levels.append("mismatch")
            warnings.append(f"--allow-base-mismatch: {exc}")
            lines.append(f"{v.ref}: base pin differs (allowed by --allow-base-mismatch)")
            continue
        level = _CHECKS.get(label, "unpinned")
        levels.append(level)
        line = f"{v.ref}: base pin checked by {label}"
        if level == "fingerprint" and v.base.content_digest and not hash_base:
            line += " (the weights were not compared: pass --hash-base to compare its content)"
        elif hash_base and level == "fingerprint":
            warnings.append(
                f"--hash-base: {v.ref} is pinned by fingerprint only (its base was not hashed "
                "when it was added), so only tensor names, shapes and dtypes were compared"
            )
        lines.append(line)
    level = min(levels, key=BASE_CHECK_ORDER.index) if levels else "unpinned"
    return PinChecks(level=level, lines=lines, warnings=warnings)


# The level of each check_pin result.
_CHECKS: dict[str, BaseCheck] = {
    PIN_LABELS["content digest"]: "content",
    PIN_LABELS["fingerprint"]: "fingerprint",
}


def check_same_base(versions: Sequence[Version], *, allow_mismatch: bool = False) -> list[str]:
    """``identity.check_same_base`` over registry versions' pins."""
    return identity.check_same_base(
        [(v.ref, v.base) for v in versions], allow_mismatch=allow_mismatch
    )


def shared_pin(pins: Sequence[BasePin]) -> BasePin | None:
    """The pin all ``pins`` agree on (``identity.shared_pin``): their fingerprint, with their
    content digest when they all have the same one; None when they name different bases."""
    found = identity.shared_pin(pins)
    if found is None:
        return None
    pin, with_content = found
    if with_content:
        return pin
    return pin.model_copy(update={"level": "fingerprint", "content_digest": None, "files": []})
