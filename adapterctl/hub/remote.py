"""What names and reads things on the Hub, below the modules that read checkpoints and keep the
registry: ``hf://OWNER/NAME[@REV]`` references, a repository's file at one commit read by
HTTP range requests (``HubFile``), and the origin a checkpoint read from the Hub carries
(``HubOrigin``).

It imports no checkpoint, registry or Hub-sync module, so ``adapterctl.checkpoint`` can name
these types and ``adapterctl.hub.base`` (which the Hub sync and the registry both use) can
build on them without an import cycle. ``SCHEME``, ``HubRef``, ``is_hub_ref`` and
``parse_ref`` are the reference grammar: ``adapterctl.hub`` is meant to re-export these.

Requests go through the client's own URLs (``hf_hub_url``), headers (``build_hf_headers``: the
token) and session with back-off (``http_stream_backoff``), so ``HF_ENDPOINT``, ``HF_TOKEN``
and ``HF_HUB_OFFLINE`` apply as they do to the client; failures become adapterctl errors
through ``hub_errors``. ``huggingface_hub`` is imported only when a request is made.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from adapterctl.errors import BrokenFile, UsageError
from adapterctl.hub.client import hub_errors
from adapterctl.tensorfile import RemoteFile

SCHEME = "hf://"
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
ACTION = "reading the base"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class HubRef:
    """A Hub repository and an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    @property
    def url(self) -> str:
        """``hf://owner/name``: how the registry records the remote."""
        return f"{SCHEME}{self.repo_id}"


def is_hub_ref(text: str | os.PathLike[str]) -> bool:
    """True when ``text`` is spelled ``hf://…``."""
    return os.fspath(text).startswith(SCHEME)


def parse_ref(text: str | os.PathLike[str]) -> HubRef:
    """``hf://owner/name[@rev]`` or ``owner/name[@rev]`` as a ``HubRef``.

    Raises:
        UsageError: not ``owner/name`` (exit 2).
    """
    raw = os.fspath(text)
    body = raw.removeprefix(SCHEME)
    repo, _, revision = body.partition("@")
    if not REPO_ID.fullmatch(repo) or (revision == "" and "@" in body):
        raise UsageError(f"{raw}: not a Hub repository; write OWNER/NAME[@REVISION]")
    return HubRef(repo, revision or None)


def weights_needed(repo_id: str, revision: str | None, action: str) -> UsageError:
    """The refusal of a command that needs a Hub base's weights (a Hub BASE is read from its
    headers only): exit 2, naming the download that makes it a local BASE."""
    where = f"{SCHEME}{repo_id}" + (f"@{revision}" if revision else "")
    rev = f" --revision {revision}" if revision else ""
    return UsageError(
        f"{where}: {action} needs the base's weights, and a Hub BASE is read from its headers "
        f"only; download it with `hf download {repo_id}{rev} --local-dir DIR` and pass DIR"
    )


@dataclass(frozen=True)
class HubFile(RemoteFile):
    """One file of a Hub repository at one commit, read by HTTP range requests.

    ``path`` is its path in the repository, ``size`` its length in bytes, ``sha256`` the
    LFS object id the Hub stores for it (None for a file kept in git itself).
    """

    repo_id: str
    commit: str
    path: str
    size: int
    sha256: str | None
    endpoint: str = field(compare=False)
    token: str | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}@{self.commit}/{self.path}"

    @property
    def url(self) -> str:
        """The file's ``resolve`` URL at the commit, as the client builds it."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.path, revision=self.commit, endpoint=self.endpoint)

    def read(self) -> bytes:
        """The whole file (a small one: a config, an index), by one GET."""
        return fetch(self.url, self.token, self.repo_id)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` of the file, by one ranged GET.

        Raises:
            BrokenFile: the file ends before ``end``.
            NotFound, RemoteError: as ``hub_errors`` maps the client's failures (4, 6).
        """
        if end <= start:
            return b""
        data = fetch(self.url, self.token, self.repo_id, (start, end))
        if len(data) != end - start:
            raise BrokenFile(
                f"{self}: the Hub sent {len(data)} of the {end - start} bytes asked for at "
                f"{start}: truncated; check the repository"
            )
        return data


@dataclass(frozen=True)
class HubOrigin:
    """Where a checkpoint read from the Hub comes from: the repository, the revision asked
    for, the commit it resolved to, and its weight files (path, size, LFS sha256)."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[HubFile, ...]

    @property
    def url(self) -> str:
        """``hf://owner/name@commit``: the checkpoint's name in messages and reports, and a
        BASE that opens this very commit again."""
        return f"{SCHEME}{self.repo_id}@{self.commit}"

    def weights_needed(self, action: str) -> UsageError:
        """The refusal of ``action``, which needs this base's weights (``weights_needed``)."""
        return weights_needed(self.repo_id, self.commit, action)


def fetch(url: str, token: str | None, repo_id: str, span: tuple[int, int] | None = None) -> bytes:
    """A Hub file's bytes ``span`` (start, end), or the whole file: one GET through the
    client's session, headers and back-off. A server that ignores the range (answers 200
    with the whole file) is read only up to ``end`` and hung up on.

    Raises:
        NotFound, RemoteError: as ``hub_errors`` maps the client's failures (4, 6).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    headers = build_hf_headers(token=token)
    if span is not None:
        headers["Range"] = f"bytes={span[0]}-{span[1] - 1}"
    with (
        hub_errors(repo_id, ACTION),
        http_stream_backoff(
            "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
        ) as response,
    ):
        hf_raise_for_status(response)
        skip, want = 0, None
        if span is not None:
            want = span[1] - span[0]
            if response.status_code != 206:
                skip = span[0]
        out = bytearray()
        for chunk in response.iter_bytes(_CHUNK):
            out += chunk
            if want is not None and len(out) >= skip + want:
                break
        return bytes(out[skip:] if want is None else out[skip : skip + want])
