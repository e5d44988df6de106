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
- Pin comparison: a checkpoint against a version's base pin (``check_pin``), the pins of
  several versions against each other (``check_same_base``, ``shared_pin``), and a new
  version's pin against its name's latest (``check_successor``).

Everything here is hashlib, json and re: registering an adapter never needs torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from adapterctl.errors import Conflict

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


def short_digest(digest: str | None) -> str:
    """A digest shortened for messages (``sha256:`` and 12 hex digits), ``-`` for none."""
    return "-" if not digest else digest[:19]


class Pin(Protocol):
    """What pin comparison reads of a base pin (``adapterctl.registry.BasePin``)."""

    @property
    def level(self) -> str: ...
    @property
    def fingerprint(self) -> str | None: ...
    @property
    def content_digest(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def path(self) -> str | None: ...
    @property
    def architecture(self) -> str | None: ...


P = TypeVar("P", bound=Pin)


def check_pin(
    ref: str,
    pin: Pin,
    checkpoint: Checkpoint,
    content_digest: Callable[[], str | None],
) -> str:
    """Check that ``checkpoint`` is the base the version ``ref`` is pinned to.

    The content digest is compared where the pin has one and ``content_digest()`` gives the
    checkpoint's (None: its files are not hashed; the fingerprint is compared instead).

    Returns:
        The level that was checked: ``content digest``, ``fingerprint``, or the pin's own level
        when it holds nothing to check (``name only``, ``none``).

    Raises:
        Conflict: the checkpoint is another base (exit 5).
    """
    if pin.level in ("none", "name only"):
        return pin.level
    fix = "merge into the base it was trained on, or pass --allow-base-mismatch"
    got = content_digest() if pin.content_digest else None
    if got is not None:
        if got != pin.content_digest:
            raise Conflict(
                f"{ref} is pinned to base content {short_digest(pin.content_digest)} "
                f"({pin.path or pin.name or '?'}) but {checkpoint.location} has "
                f"{short_digest(got)} (other weights); {fix}"
            )
        return "content digest"
    got_fp = base_fingerprint(checkpoint)
    if got_fp != pin.fingerprint:
        raise Conflict(
            f"{ref} is pinned to base fingerprint {short_digest(pin.fingerprint)} "
            f"({pin.architecture or '?'}, {pin.path or pin.name or '?'}) but "
            f"{checkpoint.location} has {short_digest(got_fp)} (other tensor names, shapes or "
            f"dtypes); {fix}"
        )
    return "fingerprint"


def check_same_base(pins: Sequence[tuple[str, Pin]], *, allow_mismatch: bool = False) -> list[str]:
    """Refuse combining versions pinned to different bases (DESIGN: "Identity").

    Fingerprints are compared, and content digests where every pin has one; name-only pins
    cannot be compared and are skipped.

    Args:
        pins: (ref, base pin) of each registry input of a compose or merge.
        allow_mismatch: report a mismatch as a warning instead of refusing.

    Returns:
        Warnings (a mismatch that was allowed).

    Raises:
        Conflict: the pins differ and ``allow_mismatch`` is False (exit 5).
    """
    pinned = [(ref, p) for ref, p in pins if p.fingerprint]
    if _agreement([p for _, p in pinned]) != "differ":
        return []
    listing = ", ".join(
        f"{ref} → {short_digest(p.content_digest or p.fingerprint)}" for ref, p in pinned
    )
    message = f"the inputs are pinned to different bases ({listing})"
    if not allow_mismatch:
        raise Conflict(f"{message}; combine adapters of one base, or pass --allow-base-mismatch")
    return [f"--allow-base-mismatch: {message}"]


def check_successor(
    name: str, latest_ref: str, latest: Pin, pin: Pin, *, allow_mismatch: bool = False
) -> list[str]:
    """Refuse a new version of ``name`` pinned to another base than its latest version.

    The pins are compared as ``check_same_base`` compares them (fingerprints, and content
    digests where both have one). Where one of them has no fingerprint, only their base names
    can be compared, as a hint (``model_key``): a difference is a warning, never a refusal.

    Args:
        name: the adapter name the new version is added under.
        latest_ref: its latest live version (``chat@2``).
        latest: that version's base pin.
        pin: the new version's base pin.
        allow_mismatch: report a mismatch as a warning instead of refusing.

    Returns:
        Warnings (an allowed mismatch, or base names that differ).

    Raises:
        Conflict: the pins name different bases and ``allow_mismatch`` is False (exit 5).

    Example:
        >>> check_successor("chat", "chat@2", llama_pin, gpt2_pin)
        Traceback (most recent call last):
        adapterctl.errors.Conflict: chat@2 is pinned to base sha256:… (LlamaForCausalLM, …) …
    """
    if latest.fingerprint and pin.fingerprint:
        if _agreement([latest, pin]) != "differ":
            return []
        was, now = _describe(latest), _describe(pin)
        if not allow_mismatch:
            raise Conflict(
                f"{latest_ref} is pinned to base {was} but this adapter's base is {now}; add it "
                f"under another name, or pass --allow-base-mismatch to make it the next version "
                f"of {name} anyway"
            )
        return [f"--allow-base-mismatch: {name}'s new version is pinned to {now}, {latest_ref} "
                f"to {was}"]  # fmt: skip
    if latest.name and pin.name and model_key(latest.name) != model_key(pin.name):
        return [
            f"{latest_ref} names its base {latest.name!r} but this adapter names {pin.name!r} "
            "(names are only a hint: add with --base BASE to compare the bases themselves)"
        ]
    return []


def _describe(pin: Pin) -> str:
    """A pinned base for messages: its digest (content, else fingerprint), architecture and
    where it was (path, else name)."""
    digest = short_digest(pin.content_digest or pin.fingerprint)
    return f"{digest} ({pin.architecture or '?'}, {pin.path or pin.name or '?'})"


def shared_pin(pins: Sequence[P]) -> tuple[P, bool] | None:
    """The pin all ``pins`` agree on, and whether they agree on its content digest too (else
    on the fingerprint only, and the content digest must be dropped); None when they name
    different bases, or one has no fingerprint."""
    if not pins or any(not p.fingerprint for p in pins):
        return None
    agreement = _agreement(pins)
    if agreement == "differ":
        return None
    if agreement == "content":
        return pins[0], True
    return next((p for p in pins if p.content_digest is None), pins[0]), False


def _agreement(pins: Sequence[Pin]) -> str:
    """How far fingerprinted ``pins`` agree: ``content`` (one fingerprint, one content digest
    that all have), ``fingerprint`` (one fingerprint; content digests missing somewhere, or
    none), or ``differ`` (other fingerprints, or content digests that all have and differ)."""
    if len({p.fingerprint for p in pins}) > 1:
        return "differ"
    contents = {p.content_digest for p in pins}
    if None in contents or not contents:
        return "fingerprint"
    return "content" if len(contents) == 1 else "differ"
