"""What the registry returns: versions, their files and base pins, lineage, history events,
and the reports of ``list``, ``verify``, ``gc`` and ``registry path`` (pydantic models, no I/O).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, computed_field

if TYPE_CHECKING:
    from adapterctl.checkpoint import Checkpoint

PinLevel = Literal["content digest", "fingerprint", "name only", "none"]
PIN_LABELS: dict[str, str] = {
    "content digest": "content digest",
    "fingerprint": "fingerprint",
    "name only": "name only (unverified)",
    "none": "none (no base recorded)",
}


class FileEntry(BaseModel):
    """One file of a version (or of a pinned base): relative path, size, hex sha256."""

    path: str
    size: int
    sha256: str


class BasePin(BaseModel):
    """Which base a version belongs to, and how strongly that is known.

    ``level`` is ``content digest`` (the base's weight files were hashed), ``fingerprint``
    (tensor names, shapes, dtypes and architecture, from headers), ``name only`` (the adapter
    config's ``base_model_name_or_path`` and revision: unverified) or ``none``.
    """

    level: PinLevel
    fingerprint: str | None = None
    content_digest: str | None = None
    files: list[FileEntry] = Field(default_factory=list)
    name: str | None = None
    revision: str | None = None
    path: str | None = None
    architecture: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        """The level as shown to users (``name only (unverified)``…)."""
        return PIN_LABELS[self.level]

    @classmethod
    def of_checkpoint(
        cls,
        ckpt: Checkpoint,
        files: list[FileEntry] | None,
        *,
        name: str | None = None,
        revision: str | None = None,
    ) -> BasePin:
        """The pin of an open checkpoint: its fingerprint, and its content digest when
        ``files`` (its weight files' sha256s) are known. A checkpoint read from the Hub is
        pinned to its repository and commit (they replace ``name`` and ``revision``) and has
        no local path."""
        from adapterctl.identity import base_content_digest, base_fingerprint

        if ckpt.origin is not None:
            name, revision = ckpt.origin.repo_id, ckpt.origin.commit
        digest = base_content_digest((f.path, f.sha256) for f in files) if files else None
        return cls(
            level="content digest" if files else "fingerprint",
            fingerprint=base_fingerprint(ckpt),
            content_digest=digest,
            files=files or [],
            name=name,
            revision=revision,
            path=str(ckpt.path.resolve()) if ckpt.path is not None else None,
            architecture=ckpt.architecture,
        )

    def identity(self) -> dict[str, object]:
        """The fields that enter the version digest."""
        return {
            "fingerprint": self.fingerprint,
            "content_digest": self.content_digest,
            "name": self.name,
            "revision": self.revision,
        }


# How far a merge's base was checked against its inputs' pins, weakest input first:
# "content" (weight-file hashes compared), "fingerprint" (tensor names, shapes, dtypes and
# architecture), "unpinned" (an input with nothing to compare: a local path, a name-only pin),
# "mismatch" (a pin that differs, let through by --allow-base-mismatch).
BaseCheck = Literal["content", "fingerprint", "unpinned", "mismatch"]
BASE_CHECK_ORDER: tuple[BaseCheck, ...] = ("mismatch", "unpinned", "fingerprint", "content")


class PinChecks(BaseModel):
    """The base pins of a merge's inputs checked against its base (``Registry.check_pins``)."""

    level: BaseCheck
    lines: list[str] = Field(default_factory=list)  # one per registry input: what was checked
    warnings: list[str] = Field(default_factory=list)


class Tombstone(BaseModel):
    """A removed version: when, and whether ``--force`` overrode a lineage guard."""

    removed_at: str
    forced: bool = False


class Remote(BaseModel):
    """Where a version was pushed (the Hub sync records these)."""

    url: str
    revision: str | None = None
    created_at: str


class LineageNode(BaseModel):
    """A parent in a version's lineage tree: its weight in the child, and its own parents."""

    ref: str
    digest: str
    weight: float | None = None
    removed: bool = False
    method: str | None = None
    parents: list[LineageNode] = Field(default_factory=list)


class Version(BaseModel):
    """Everything about one registry version."""

    id: int = Field(exclude=True)
    name: str
    number: int
    digest: str
    files_digest: str
    format: str
    size: int
    created_at: str
    message: str | None = None
    source: str | None = None
    base: BasePin
    files: list[FileEntry] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    removed: Tombstone | None = None
    method: str | None = None
    options: dict[str, Any] | None = None
    parents: list[LineageNode] = Field(default_factory=list)
    children: list[str] = Field(default_factory=list)
    remotes: list[Remote] = Field(default_factory=list)
    # What the call that returned it has to say (``add --allow-base-mismatch``); not stored.
    warnings: list[str] = Field(default_factory=list, exclude=True)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ref(self) -> str:
        """``name@number``."""
        return f"{self.name}@{self.number}"


class AdapterSummary(BaseModel):
    """One line of ``list``: a name and its latest live version."""

    name: str
    latest: int | None
    versions: int
    removed: int
    digest: str | None = None
    base: str | None = None
    base_fingerprint: str | None = None
    pin: str | None = None
    size: int | None = None
    tags: dict[str, int] = Field(default_factory=dict)
    updated_at: str | None = None


class LogEntry(BaseModel):
    """One event in a name's history."""

    at: str
    event: Literal["added", "tagged", "removed"]
    ref: str
    number: int
    alias: str | None = None
    digest: str
    message: str | None = None


class TagResult(BaseModel):
    """An alias moved (or set for the first time)."""

    name: str
    alias: str
    number: int
    previous: int | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"


class BlobProblem(BaseModel):
    """A stored file that is missing or no longer has its sha256."""

    sha256: str
    path: str
    problem: str
    versions: list[str]


class VerifyReport(BaseModel):
    """``registry verify``: database integrity, every live blob re-hashed, checkouts checked."""

    ok: bool
    integrity: list[str]
    foreign_key_errors: int
    # the foreign key errors, described: rows that refer to a row that is not there
    dangling: list[str] = Field(default_factory=list)
    # versions a name's numbering (1, 2, 3… never reused) says exist but that have no row
    missing_versions: list[str] = Field(default_factory=list)
    missing_triggers: list[str] = Field(default_factory=list)  # append-only guards dropped
    versions_checked: int
    blobs_checked: int
    bytes_checked: int
    missing: list[BlobProblem] = Field(default_factory=list)
    altered: list[BlobProblem] = Field(default_factory=list)
    bad_digests: list[str] = Field(default_factory=list)
    checkouts_altered: list[str] = Field(default_factory=list)


class GcReport(BaseModel):
    """``registry gc``: what was deleted."""

    blobs_removed: int
    bytes_freed: int
    temp_removed: int
    checkouts_removed: int


class RegistryInfo(BaseModel):
    """``registry path``: where the state lives, and how much there is."""

    home: str
    database: str
    blobs: str
    checkouts: str
    exists: bool
    adapters: int = 0
    versions: int = 0
    removed: int = 0


LineageNode.model_rebuild()
