"""A BASE as commands take it: a local checkpoint, or a Hub model ``hf://OWNER/NAME[@REV]`` read
from its headers, without its weights.

For a Hub model, one ``model_info`` call resolves the revision to a commit and lists the
repository's files with their sizes and LFS sha256s; ``config.json`` and the shard index are
fetched whole (kilobytes); each shard's header costs two HTTP range requests (its 8-byte
length, then the JSON), the shards read side by side. The checkpoint is assembled as a local
one is (``adapterctl.checkpoint.assemble``: the same refusals, the same 4-bit quant-state
reading, whose few hundred bytes come by range requests too), so checking an adapter against
a 70B base takes seconds and kilobytes. Every request goes to the commit the revision
resolved to (``adapterctl.hub.remote``).

It is pinned the same way, with nothing hashed: the Hub stores each weight file's sha256 (its
LFS object id), which is what a local copy of the file hashes to.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from adapterctl.checkpoint import (
    Checkpoint,
    CheckpointFiles,
    assemble,
    find_shards,
)
from adapterctl.errors import RemoteError
from adapterctl.hub.client import api, hub_errors
from adapterctl.hub.remote import ACTION, SCHEME, HubFile, HubOrigin, parse_ref
from adapterctl.hub.remote import weights_needed as refuse
from adapterctl.tensorfile import SafetensorsHeader, read_header

if TYPE_CHECKING:
    from adapterctl.registry.models import BasePin, FileEntry

# Shard headers read at once (each is two small requests; a 70B base has about 30 shards).
_PARALLEL_READS = 8


def open_hub_base(
    source: str, *, token: str | None = None, needs_weights: str | None = None
) -> Checkpoint:
    """``hf://owner/name[@revision]`` as a BASE (``adapterctl.checkpoint.open_base`` sends
    ``hf://`` bases here, through the Hub remote): ``open_hub_checkpoint``, or, for a command
    that reads whole tensors (``needs_weights``: ``merge``), a refusal before anything is
    fetched.

    Raises:
        UsageError: ``needs_weights`` (exit 2: the message names the download that makes it a
            local BASE), or a malformed reference.
    """
    if needs_weights:
        ref = parse_ref(source)
        raise refuse(ref.repo_id, ref.revision, needs_weights)
    return open_hub_checkpoint(source, token=token)


def open_hub_checkpoint(source: str, token: str | None = None) -> Checkpoint:
    """Open ``hf://owner/name[@revision]`` as a base checkpoint from its headers only.

    Args:
        source: the repository and revision (a branch, tag or commit; default ``main``);
            ``hf://`` may be left out.
        token: a Hub token (default: the client's own lookup: ``HF_TOKEN``, the token file).

    Returns:
        The checkpoint, as ``open_checkpoint`` gives a local one, with ``origin`` set (the
        commit and each weight file's size and LFS sha256) and no local ``path``; its
        tensors' reads are ranged requests to that commit's files.

    Raises:
        UsageError: not ``owner/name[@revision]`` (2).
        NotFound: no such repository (or a private one the token cannot see) or revision, a
            shard the index names is missing, or no safetensors weights (4).
        BrokenFile, UnsupportedBase: as for a local base (3).
        RemoteError: ``HF_HUB_OFFLINE``, auth, network or Hub failure (6).

    Example:
        >>> ckpt = open_hub_checkpoint("hf://meta-llama/Llama-3.1-70B")
        >>> ckpt.origin.revision, ckpt.num_layers
        ('main', 80)
    """
    ref = parse_ref(source)
    revision = ref.revision or "main"
    with hub_errors(ref.repo_id, ACTION):
        hf = api(token)
        info = hf.model_info(ref.repo_id, revision=revision, files_metadata=True)
        commit = str(info.sha)
        files = _RepoFiles(ref.repo_id, commit, hf.endpoint, token, info.siblings or [])
        where = f"{SCHEME}{ref.repo_id}@{commit}"
        shards = find_shards(files, where)
        origin = HubOrigin(ref.repo_id, revision, commit, tuple(files.shard(n) for n in shards))
        return assemble(files, where, shards, origin=origin)


def origin_file_hashes(origin: HubOrigin) -> list[FileEntry] | None:
    """A Hub base's weight files with the sha256 the Hub stores for each (its LFS object id),
    spelled as a local copy's are (``Registry.base_file_hashes``: the path in the repository
    is the path under the folder); None when one of them is not in LFS (no sha256 known)."""
    from adapterctl.registry.models import FileEntry

    if any(f.sha256 is None for f in origin.files):
        return None
    entries = [FileEntry(path=f.path, size=f.size, sha256=str(f.sha256)) for f in origin.files]
    return sorted(entries, key=lambda e: e.path)


def pin_hub_base(base_id: str, revision: str | None, *, token: str | None = None) -> BasePin:
    """Pin the Hub model ``base_id`` at ``revision`` without downloading it.

    Args:
        base_id: ``owner/name`` (``hf://`` may be written).
        revision: a branch, tag or commit (None: ``main``).
        token: a Hub token (default: the client's own).

    Returns:
        The pin: level ``content digest`` (over each weight file's name and the LFS sha256
        the Hub stores for it: the digest a local copy of the same files hashes to), the
        fingerprint of its headers, ``name`` the repository, ``revision`` the commit. A
        repository whose weight files are not all in LFS is pinned by fingerprint.

    Raises:
        As ``open_hub_checkpoint``.
    """
    from adapterctl.registry.models import BasePin

    ckpt = open_hub_checkpoint(base_id + (f"@{revision}" if revision else ""), token=token)
    assert ckpt.origin is not None
    return BasePin.of_checkpoint(ckpt, origin_file_hashes(ckpt.origin))


class _RepoFiles(CheckpointFiles):
    """A Hub repository's files at one commit, as ``assemble`` reads them (small files whole,
    shards by ranges)."""

    missing_fix = "the repository is incomplete at this revision; pass another @REVISION"

    def __init__(
        self, repo_id: str, commit: str, endpoint: str, token: str | None, siblings: list[Any]
    ) -> None:
        self.repo_id, self.commit, self.endpoint, self.token = repo_id, commit, endpoint, token
        self.siblings = {s.rfilename: s for s in siblings}

    def describe(self, name: str) -> str:
        return f"{SCHEME}{self.repo_id}@{self.commit}/{name}"

    def exists(self, name: str) -> bool:
        return name in self.siblings

    def names(self) -> list[str]:
        return sorted(n for n in self.siblings if "/" not in n)

    def read_text(self, name: str) -> str:
        return self.shard(name).read().decode("utf-8")

    def shard(self, name: str) -> HubFile:
        s = self.siblings[name]
        if s.size is None:
            raise RemoteError(f"{self.describe(name)}: the Hub listed no size for it; try again")
        lfs = getattr(s, "lfs", None)
        sha256 = lfs.sha256 if lfs is not None else None
        return HubFile(
            self.repo_id, self.commit, name, int(s.size), sha256, self.endpoint, self.token
        )

    def read_headers(self, names: Sequence[str]) -> list[SafetensorsHeader]:
        shards = [self.shard(n) for n in names]
        if len(shards) <= 1:
            return [read_header(s) for s in shards]
        with ThreadPoolExecutor(min(_PARALLEL_READS, len(shards))) as pool:
            return list(pool.map(read_header, shards))
