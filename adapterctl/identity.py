"""Identity, defined once: the adapter digest and the base fingerprint (see README, "Identity").

- Adapter digest: sha256 of a canonical manifest listing every file of the adapter
  (relative path, size, sha256), sorted by path. Needs no torch.
- Base fingerprint: sha256 over the logical tensor names, shapes and dtypes plus the
  architecture from ``config.json``: "same family and size", not "same weights".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterctl.checkpoint import Checkpoint

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(files: Iterable[Path], root: Path) -> list[dict[str, object]]:
    """The canonical manifest: one entry per file, sorted by relative path."""
    entries = []
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        entries.append({"path": rel, "size": f.stat().st_size, "sha256": file_sha256(f)})
    return sorted(entries, key=lambda e: str(e["path"]))


def adapter_digest(files: Iterable[Path], root: Path) -> str:
    """``sha256:<hex>`` of the canonical manifest of an adapter's files."""
    data = json.dumps(manifest(files, root), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def base_fingerprint(ckpt: Checkpoint) -> str:
    """``sha256:<hex>`` over the architecture and every logical tensor's name, shape, dtype."""
    h = hashlib.sha256()
    h.update(f"architecture={ckpt.architecture or ''}\n".encode())
    for name, (shape, dtype) in sorted(ckpt.weights.items()):
        h.update(f"{name}|{','.join(map(str, shape))}|{dtype}\n".encode())
    return "sha256:" + h.hexdigest()
