"""Hub sync: publish registry versions (``push``) and bring Hub adapters into the registry
(``pull``), checked against the Hub's own hashes; publish ``-o hf://…`` outputs.

The Hub is the shared store; the local registry is the index and cache in front of it:

- ``push REF OWNER/NAME`` publishes one version as ONE commit made on top of the commit it
  read (``parent_commit``: a concurrent push is refused, never overwritten): the adapter's
  files, with ``base_model_name_or_path`` set to the base's Hub id (never a local path), a
  model card and ``adapterctl.json`` (digest, base pin, lineage); then tags it ``v<N>``, N the
  next number among the repository's own tags, and records the remote on the version.
  Pushing a version again is a no-op.
- ``pull OWNER/NAME[@REV]`` resolves REV to a commit, downloads that commit's adapter files
  into a staging folder, checks each against the Hub's hashes (sha256 of LFS files, git blob
  ids of the others) and only then adds it to the registry with its origin and base pin.
  Pulling a commit again is a no-op; a failed or interrupted pull registers nothing.

The client (``huggingface_hub``) is imported only by the commands that need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from adapterctl.errors import RemoteError, UsageError, ValidationFailed
from adapterctl.hub.client import api, hub_errors
from adapterctl.hub.remote import REPO_ID, HubRef, is_hub_ref, parse_ref

if TYPE_CHECKING:
    from adapterctl.registry import BasePin, Registry, Version

META_NAME = "adapterctl.json"
CARD_NAME = "README.md"
# Files of a Hub repository that are not the adapter's own.
NOT_ADAPTER_FILES = frozenset({".gitattributes", CARD_NAME, META_NAME})
_VERSION_TAG = re.compile(r"v(\d+)")


class PushReport(BaseModel):
    """What ``push`` published."""

    version: str
    repo: str
    url: str
    commit: str
    tag: str
    digest: str
    files: list[str] = Field(default_factory=list)
    already: bool = False


class PullReport(BaseModel):
    """What ``pull`` brought into the registry."""

    repo: str
    revision: str
    commit: str
    version: str
    digest: str
    files: list[str] = Field(default_factory=list)
    pin: str
    already: bool = False
    warnings: list[str] = Field(default_factory=list)


def push(
    ref: str,
    repo: str,
    *,
    private: bool = False,
    branch: str = "main",
    base_id: str | None = None,
    token: str | None = None,
    home: str | os.PathLike[str] | None = None,
) -> PushReport:
    """Publish the registry version ``ref`` to the Hub repository ``repo`` (created if needed).

    Args:
        ref: a registry reference (``chat@3``, ``chat@prod``).
        repo: ``owner/name``.
        private: create the repository private (an existing one keeps its visibility).
        branch: the branch to commit to.
        base_id: the base model's Hub id, when the version's pin does not name one.
        token: a Hub token (default: the client's: ``HF_TOKEN``, the token file).
        home: the registry's folder (default ``$ADAPTERCTL_HOME``).

    Returns:
        The report: the commit, the tag ``v<N>``, and ``already`` when this version was
        published there before (nothing is written then).

    Raises:
        UsageError: the base is known only by a local path and ``base_id`` is not given (2).
        NotFound: no such version (4).
        Conflict: the repository changed during the push (5); nothing was written by it.
        RemoteError: auth, network or Hub failure (6).
    """
    from adapterctl.registry import Registry

    target = _push_target(repo)
    with Registry(home) as reg:
        v = reg.show(ref)
        published = _published_files(reg, v, base_id)
        with hub_errors(target.repo_id, "push"):
            hf = api(token)
            done = _already_pushed(hf, v, target)
            if done is None:
                commit, tag = _publish(hf, target, published, f"{v.ref}", branch, private)
        if done is not None:
            commit, tag = done
        else:
            reg.record_remote(v, target.url, commit)
    return PushReport(
        version=v.ref, repo=target.repo_id, url=target.url, commit=commit, tag=tag,
        digest=published.digest, files=sorted(published.files), already=done is not None,
    )  # fmt: skip


def publish_folder(
    folder: str | os.PathLike[str],
    repo: str,
    *,
    kind: str,
    source: str,
    private: bool = False,
    branch: str = "main",
    token: str | None = None,
) -> PushReport:
    """Publish a folder just written (``-o hf://…`` of merge, compose, resize) as one commit
    tagged ``v<N>``, as ``push`` publishes a registry version.

    Args:
        folder: a PEFT adapter (``kind="adapter"``) or a merged checkpoint (``"model"``).
        repo: ``owner/name`` (``hf://`` optional).
        kind: ``adapter`` (an adapter card; its config must name a Hub base) or ``model`` (a
            full-model card).
        source: what produced it, for the card and the commit message (``compose``…).
        private: create the repository private (if new).
        branch: the branch to commit to.
        token: a Hub token (default: the client's).

    Raises:
        UsageError: an adapter whose config names no Hub base (2).
        Conflict: the repository changed during the publish (5).
        RemoteError: auth, network or Hub failure (6).
    """
    from adapterctl.hub import card
    from adapterctl.identity import manifest_digest, version_digest

    target = _push_target(repo)
    root = Path(folder)
    files: dict[str, bytes | Path] = {
        f.relative_to(root).as_posix(): f for f in sorted(root.rglob("*")) if f.is_file()
    }
    files.pop(CARD_NAME, None)
    if kind == "adapter":
        config, base_id = _config_base(root)
        if base_id is None:
            raise UsageError(
                f"{target.url}: the adapter names its base as "
                f"{config.get('base_model_name_or_path')!r}, not a Hub id; write it to a "
                "folder, `adapterctl add` it, then `adapterctl push REF OWNER/NAME --base-id "
                "OWNER/MODEL`"
            )
        revision = config.get("revision")
        from adapterctl.registry.models import BasePin

        pin = BasePin(level="name only", name=base_id, revision=revision)
        digest = version_digest(_manifest(files), pin.identity())

        def readme(repo_id: str, tag: str) -> str:
            return card.adapter_card(
                repo=repo_id, base_id=base_id, base_revision=revision, config=config, tag=tag,
                digest=digest, source=source,
            )  # fmt: skip

    else:
        digest = manifest_digest(_manifest(files))
        model_config = root / "config.json"
        name = None
        if model_config.exists():
            name = json.loads(model_config.read_text(encoding="utf-8")).get("_name_or_path")

        def readme(repo_id: str, tag: str) -> str:
            return card.model_card(
                repo=repo_id, base_id=_hub_id(name), tag=tag, digest=digest, source=source
            )

    published = _Published(files, digest, readme)
    with hub_errors(target.repo_id, "publish"):
        commit, tag = _publish(api(token), target, published, source, branch, private)
    return PushReport(
        version=source, repo=target.repo_id, url=target.url, commit=commit, tag=tag,
        digest=digest, files=sorted(files),
    )  # fmt: skip


@dataclass
class Output:
    """Where a command writes its OUT: ``path`` locally; for ``-o hf://…`` a staging folder
    that ``publish`` publishes (``publish_folder``) and ``output`` removes afterwards."""

    path: Path
    target: HubRef | None = None
    published: PushReport | None = None

    @property
    def shown(self) -> str:
        """OUT as the user gave it: the folder, or ``hf://owner/name``."""
        return self.target.url if self.target is not None else os.fspath(self.path)

    def publish(self, kind: str, source: str, token: str | None = None) -> PushReport | None:
        """Publish the staging folder (``hf://`` outputs; a no-op for local ones)."""
        if self.target is not None:
            self.published = publish_folder(
                self.path, self.target.repo_id, kind=kind, source=source, token=token
            )
        return self.published


@contextlib.contextmanager
def output(out: str | os.PathLike[str]) -> Iterator[Output]:
    """The ``Output`` for OUT: a local path as it is; ``hf://owner/name`` as a staging folder
    (never a local folder named ``hf:…``), removed when the block ends.

    Raises:
        UsageError: ``hf://owner/name@rev`` (the tag is chosen) or not ``owner/name`` (2).
    """
    if not is_hub_ref(out):
        yield Output(Path(out))
        return
    target = _push_target(os.fspath(out))
    staging = Path(tempfile.mkdtemp(prefix=".adapterctl-publish-", dir="."))  # room for a model
    try:
        yield Output(staging / target.repo_id.split("/")[-1], target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _push_target(repo: str) -> HubRef:
    target = parse_ref(repo)
    if target.revision is not None:
        raise UsageError(f"{repo}: publish to OWNER/NAME (the tag is chosen: v<N>; --branch)")
    return target


def _publish(
    hf: Any, target: HubRef, published: _Published, what: str, branch: str, private: bool
) -> tuple[str, str]:
    """Create the repository if need be, make one commit on ``branch`` on top of the commit
    read (files no longer published are deleted), and tag it ``v<N>``: (commit, tag)."""
    hf.create_repo(target.repo_id, private=private, exist_ok=True)
    head = hf.repo_info(target.repo_id, revision=branch).sha
    refs = hf.list_repo_refs(target.repo_id)
    numbers = [int(m.group(1)) for t in refs.tags if (m := _VERSION_TAG.fullmatch(t.name))]
    tag = f"v{max(numbers, default=0) + 1}"
    stale = set(hf.list_repo_files(target.repo_id, revision=head)) - {".gitattributes"}
    commit = _commit(hf, target.repo_id, branch, head, tag, what, published, stale)
    hf.create_tag(target.repo_id, tag=tag, revision=commit, tag_message=what)
    return commit, tag


@dataclass
class _Published:
    """What a push writes: the adapter's files and ``adapterctl.json`` (path in the repository
    → bytes or a local file), the digest of the adapter files with the published pin, and the
    model card once the repository and tag are known."""

    files: dict[str, bytes | Path]
    digest: str
    card: Callable[[str, str], str]


def _published_files(reg: Registry, v: Version, base_id: str | None) -> _Published:
    from adapterctl.hub import card
    from adapterctl.identity import version_digest

    if v.format != "peft":
        raise UsageError(
            f"{v.ref}: push publishes PEFT adapters (this version is {v.format}); "
            "-o hf://… publishes merged checkpoints"
        )
    base_id = base_id or _hub_id(v.base.name)
    if base_id is None:
        known = v.base.path or v.base.name or "nothing"
        raise UsageError(
            f"{v.ref}: its base is known only as {known}; a Hub adapter must name its base's "
            "Hub id: pass --base-id OWNER/MODEL"
        )
    folder = reg.checkout(v)
    files: dict[str, bytes | Path] = {}
    config: dict[str, Any] = {}
    for f in v.files:
        if f.path in NOT_ADAPTER_FILES:
            continue
        if f.path == "adapter_config.json":
            config = json.loads((folder / f.path).read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_id
            config["revision"] = v.base.revision
            files[f.path] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        else:
            files[f.path] = folder / f.path
    pin = v.base.model_copy(update={"name": base_id, "path": None})
    digest = version_digest(_manifest(files), pin.identity())
    parents = [(p.ref, p.weight) for p in v.parents]
    meta = {
        "adapterctl": 1,
        "digest": digest,
        "source": {"version": v.ref, "digest": v.digest},
        "base": pin.model_dump(mode="json", exclude={"path", "label"}),
        "lineage": {"method": v.method, "options": v.options, "parents": parents},
    }
    files[META_NAME] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()

    def readme(repo: str, tag: str) -> str:
        return card.adapter_card(
            repo=repo, base_id=base_id, base_revision=v.base.revision, config=config, tag=tag,
            digest=digest, source=v.ref, lineage=parents, method=v.method,
        )  # fmt: skip

    return _Published(files, digest, readme)


def _manifest(files: dict[str, bytes | Path]) -> list[dict[str, object]]:
    """The canonical manifest (path, size, sha256) of the adapter files among ``files``."""
    import hashlib

    from adapterctl.identity import file_sha256

    out: list[dict[str, object]] = []
    for path, data in sorted(files.items()):
        if path in NOT_ADAPTER_FILES:
            continue  # adapterctl.json is written after the digest it holds
        if isinstance(data, Path):
            out.append({"path": path, "size": data.stat().st_size, "sha256": file_sha256(data)})
        else:
            out.append(
                {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
    return out


def _config_base(folder: Path) -> tuple[dict[str, Any], str | None]:
    """A PEFT folder's ``adapter_config.json`` and the base's Hub id it names (None when it
    names a local path or nothing)."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return config, _hub_id(config.get("base_model_name_or_path"))


def _hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub id (``owner/model``, not an existing local path)."""
    if name is None or not REPO_ID.fullmatch(name) or Path(name).exists():
        return None
    return name


def _already_pushed(hf: Any, v: Version, target: HubRef) -> tuple[str, str] | None:
    """(commit, tag) when ``v`` was pushed to ``target`` before and that tag still points at
    the recorded commit."""
    commits = {r.revision for r in v.remotes if r.url == target.url and r.revision}
    if not commits:
        return None
    from huggingface_hub import errors as hf_errors

    try:
        refs = hf.list_repo_refs(target.repo_id)
    except hf_errors.RepositoryNotFoundError:
        return None  # deleted on the Hub since: publish again
    for t in refs.tags:
        if t.target_commit in commits and _VERSION_TAG.fullmatch(t.name):
            return str(t.target_commit), str(t.name)
    return None


def _commit(
    hf: Any,
    repo: str,
    branch: str,
    head: str | None,
    tag: str,
    what: str,
    published: _Published,
    stale: set[str],
) -> str:
    """Make the push's one commit on ``branch``, on top of ``head``; its id."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    files = {**published.files, CARD_NAME: published.card(repo, tag).encode()}
    ops: list[Any] = [
        CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(d) if isinstance(d, Path) else d)
        for p, d in sorted(files.items())
    ]
    ops += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale - set(files))]
    info = hf.create_commit(
        repo, ops, commit_message=f"{what} as {tag}",
        commit_description=f"Published by adapterctl push (digest {published.digest}).",
        revision=branch, parent_commit=head,
    )  # fmt: skip
    return str(info.oid)


def pull(
    source: str,
    *,
    name: str | None = None,
    token: str | None = None,
    home: str | os.PathLike[str] | None = None,
) -> PullReport:
    """Bring the adapter at ``source`` (``owner/name[@rev]``, ``hf://`` optional) into the
    registry, checked against the Hub's hashes.

    Args:
        source: the repository and revision (default ``main``).
        name: the registry name (default: the repository's name).
        token: a Hub token (default: the client's).
        home: the registry's folder (default ``$ADAPTERCTL_HOME``).

    Returns:
        The report: the commit, the new (or, ``already``, the existing) version.

    Raises:
        NotFound: no such repository, revision or file (4).
        ValidationFailed: not a PEFT adapter, or not one the registry accepts (3).
        RemoteError: auth, network or Hub failure, or a file that does not match the Hub's
            hash (6); nothing is registered.
    """
    from adapterctl.registry import Registry

    ref = parse_ref(source)
    revision = ref.revision or "main"
    with hub_errors(ref.repo_id, "pull"):
        hf = api(token)
        info = hf.model_info(ref.repo_id, revision=revision, files_metadata=True)
    commit = str(info.sha)
    with Registry(home) as reg:
        found = reg.find_remote(ref.url, commit)
        if found is not None:
            return _pull_report(ref, revision, commit, found, already=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        if "adapter_config.json" not in siblings:
            raise ValidationFailed(
                f"{ref.url}@{commit[:12]}: no adapter_config.json: not a PEFT adapter "
                "repository (pull brings adapters; pass a merged model as a --base)"
            )
        wanted = sorted(p for p in siblings if p not in NOT_ADAPTER_FILES)
        staging = Path(tempfile.mkdtemp(prefix="adapterctl-pull-"))
        try:
            files = staging / "files"
            with hub_errors(ref.repo_id, "pull"):
                for path in [*wanted, *([META_NAME] if META_NAME in siblings else [])]:
                    _download(hf, ref.repo_id, commit, path, siblings[path], staging, files)
            meta = _read_meta(files / META_NAME) if META_NAME in siblings else None
            if meta is not None:
                (files / META_NAME).unlink()
            pin = _pin(meta, files, ref, commit, token)
            v = reg.add(
                files, name or ref.repo_id.split("/")[-1], pin=pin,
                message=f"pulled from {ref.url}@{commit}", remote=(ref.url, commit),
            )  # fmt: skip
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report = _pull_report(ref, revision, commit, v)
    if meta is not None and meta.get("digest") != v.digest:
        report.warnings.append(
            f"{ref.url}@{commit[:12]}: its {META_NAME} names digest {meta.get('digest')} but "
            f"the files pulled give {v.digest}: the repository was edited outside adapterctl"
        )
    return report


def _pull_report(
    ref: HubRef, revision: str, commit: str, v: Version, *, already: bool = False
) -> PullReport:
    return PullReport(
        repo=ref.repo_id, revision=revision, commit=commit, version=v.ref, digest=v.digest,
        files=[f.path for f in v.files], pin=v.base.label, already=already,
    )  # fmt: skip


def _download(
    hf: Any, repo: str, commit: str, path: str, sibling: Any, staging: Path, dest: Path
) -> None:
    """Download ``path`` at ``commit`` and check it against the Hub's hash for it (sha256 of
    an LFS file, git blob id of a regular one) before placing it under ``dest``."""
    got = Path(
        hf.hf_hub_download(repo, path, revision=commit, cache_dir=str(staging / "cache"))
    ).resolve()
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None:
        from adapterctl.identity import file_sha256

        want, have, kind = lfs.sha256, file_sha256(got), "sha256"
    else:
        want, have, kind = sibling.blob_id, _git_blob_id(got), "git blob id"
    if want is None or have != want:
        raise RemoteError(
            f"hf://{repo}@{commit[:12]}: {path} does not match the Hub's {kind} "
            f"({have[:12]} against {str(want)[:12]}): the download was corrupted; pull again"
        )
    target = dest / path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(got, target)


def _git_blob_id(path: Path) -> str:
    """The git blob id (sha1 of ``blob <size>\\0`` + content) of a file."""
    import hashlib

    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pin(
    meta: dict[str, Any] | None, files: Path, ref: HubRef, commit: str, token: str | None
) -> BasePin:
    """The pulled version's base pin: the one its ``adapterctl.json`` records, else its
    config's base resolved on the Hub (commit and per-file sha256, headers only)."""
    from adapterctl.registry import BasePin

    if meta is not None and isinstance(meta.get("base"), dict):
        try:
            return BasePin.model_validate(meta["base"])
        except ValueError:
            pass  # an edited file: resolve the base as for a foreign repository
    config, base_id = _config_base(files)
    if base_id is None:
        raise ValidationFailed(
            f"{ref.url}@{commit[:12]}: its adapter_config.json names no Hub base "
            f"({config.get('base_model_name_or_path')!r}); it cannot be pinned"
        )
    from adapterctl.hub.base import pin_hub_base

    return pin_hub_base(base_id, config.get("revision"), token=token)
