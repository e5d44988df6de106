"""Identity, defined once: the adapter digest and the base fingerprint (see README, "Identity").

- Adapter digest: sha256 of a canonical manifest listing every file of the adapter
  (relative path, size, sha256), sorted by path. Needs no torch.
- Base fingerprint: sha256 over the logical tensor names, shapes and dtypes plus the
  architecture from ``config.json``: "same family and size", not "same weights".
- Base content digest: sha256 over each weight file's name and sha256 (the value the Hub
  stores as an LFS file's sha256), so a Hub base can be pinned without downloading it.
- Version digest (the registry's key): sha256 of the canonical manifest plus the base pin.
- Model key: a base *name* reduced to what identifies the model, for comparing names as a
  hint (a name mismatch is a warning, never a refusal).

Everything here is hashlib, json and re: registering an adapter never needs torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapterctl.checkpoint import Checkpoint

_CHUNK = 1 << 20  # large enough that the per-call overhead vanishes
_QUANT_SUFFIX = re.compile(r"(?:-unsloth)?(?:-bnb)?-(?:4bit|8bit|nf4)$")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed through one reused buffer (hashlib drops the GIL)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
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
    return manifest_digest(manifest(files, root))


def manifest_digest(entries: list[dict[str, object]]) -> str:
    """``sha256:<hex>`` of a manifest already computed (``adapter_digest`` without re-hashing)."""
    data = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def base_fingerprint(ckpt: Checkpoint) -> str:
    """``sha256:<hex>`` over the architecture and every logical tensor's name, shape, dtype."""
    h = hashlib.sha256()
    h.update(f"architecture={ckpt.architecture or ''}\n".encode())
    for name, (shape, dtype) in sorted(ckpt.weights.items()):
        h.update(f"{name}|{','.join(map(str, shape))}|{dtype}\n".encode())
    return "sha256:" + h.hexdigest()


def canonical_json(data: object) -> str:
    """The one JSON spelling digests are taken over: sorted keys, no spaces."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def base_content_digest(files: Iterable[tuple[str, str]]) -> str:
    """``sha256:<hex>`` over a base's weight files: (file name, hex sha256) pairs, sorted.

    Each file's sha256 is what the Hub stores as the LFS object id, so the digest of a Hub
    repository can be computed from its file listing, without downloading the weights.
    """
    data = canonical_json([{"path": p, "sha256": h} for p, h in sorted(files)])
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def version_digest(entries: list[dict[str, object]], pin: dict[str, object]) -> str:
    """``sha256:<hex>`` of a registry version: the canonical manifest plus the base pin.

    Args:
        entries: the manifest (``manifest``'s output: path, size, sha256 per file).
        pin: the base pin's identifying fields (fingerprint, content digest, name, revision).

    Returns:
        The digest; the same files pinned to another base give another digest.
    """
    files = sorted(entries, key=lambda e: str(e["path"]))
    data = canonical_json({"files": files, "base": pin})
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def model_key(name: str) -> str:
    """A base name reduced to what identifies the model: the last path part (or the repo name
    of a Hugging Face cache path), lower-cased, without a ``-bnb-4bit``-style suffix.

    Example:
        >>> model_key("unsloth/Llama-3.2-1B-Instruct-bnb-4bit")
        'llama-3.2-1b-instruct'
    """
    parts = [p for p in re.split(r"[/\\]", name.strip()) if p]
    if not parts:
        return ""
    key = parts[-1]
    for p in reversed(parts):
        if p.startswith("models--"):
            key = p.split("--")[-1]
            break
    return _QUANT_SUFFIX.sub("", key.lower())
