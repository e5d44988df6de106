"""A local HTTP server speaking the part of the Hugging Face Hub protocol that ``huggingface_hub``
(checked against 2.4.0) uses, so tests can drive the *real* client against it, offline.

Usage::

    with HubServer(tmp_path / "hub") as server:      # starts at once, on 127.0.0.1:<free port>
        hub_env(server, monkeypatch)                 # point the client at it (see below)
        HfApi().create_repo("org/adapter")
        ...

Test-facing API
---------------
``HubServer(root, tokens={"hf_test_token"}, *, read_tokens=(), user="test-user")``
    Starts two ``ThreadingHTTPServer`` threads on 127.0.0.1: the Hub itself (``.url``) and a
    "CDN" (``.cdn_url``) that serves LFS blobs and takes LFS uploads through signed URLs, as
    S3/CloudFront do for the real Hub. It has to be another origin: the client follows the HEAD
    ``/resolve`` redirect only within the Hub's origin and reads the LFS metadata off the 302.
    ``tokens`` may read and write everything, ``read_tokens`` only read (writes get 403).
    Storage lives under ``root``: ``root/objects/<sha256>`` (content-addressed blobs) and
    ``root/repos/<type>s/<ns>/<name>/{repo.json,commits/<id>.json}``; a new ``HubServer`` on the
    same ``root`` sees the earlier repos. ``root/client-home`` is left to ``hub_env``.
``.stop()``, or leave the ``with`` block.
``.requests``
    every request, in order, as ``Request(method, path, range)`` named tuples (path without the
    query string; ``range`` is the ``Range`` header or ``None``).
``.bytes_served``
    a ``Counter`` of response body bytes actually written, per path; ``.bytes_served.total()``
    is the sum. ``.served(substring)`` sums the paths that contain ``substring``.
    ``.reset_counters()`` clears both.
``.fail_next(n=1, status=500, match=None)``
    the next ``n`` requests (whose path contains ``match``, if given) get ``status``.
``.fail_every(status=500, match=None)`` / ``.clear_faults()``
    every request fails until cleared.
``.drop_connection_on(path_substring, times=1)``
    the next ``times`` GETs with a body whose path contains ``path_substring`` send the headers
    and half the body, then close the socket. LFS bodies are served by the CDN at
    ``/cdn/<type>s/<ns>/<name>/<sha256>/<path in repo>``, so a file name matches both kinds.
``.corrupt(repo_id, path, repo_type="model")``
    from now on the file's bytes are served with two bytes flipped (the middle and the last),
    same length, same headers (ETag, X-Linked-Etag, sizes).
``.errors``
    tracebacks of exceptions inside the server (each was answered with a 500); assert it empty.
``hubserver.PAGE_SIZE`` (1000)
    entries per page of tree and commit listings; lower it to exercise ``Link`` pagination.
``.seed(repo_id, files, *, private=False, message="seed", repo_type="model") -> commit id``
    create the repo if needed and commit ``{path: bytes}`` without going through HTTP (same
    regular/LFS rule as the preupload endpoint).
``hub_env(server, monkeypatch, home=None) -> Path``
    see below; the client's token becomes the first of ``sorted(server.tokens)``; returns the
    client's ``HF_HOME`` (default ``root/client-home``).

Endpoints: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
``POST /api/validate-yaml``; under ``/api/{models,datasets,spaces}/<ns>/<name>``: ``GET`` info
(``/revision/<rev>``, ``?blobs=1`` for sizes/blob ids/LFS), ``refs``, ``tree/<rev>[/<path>]``,
``commits/<rev>``, ``POST paths-info/<rev>``, ``preupload/<rev>``, ``commit/<rev>`` (also
``?create_pr=1``: ``refs/pr/<n>``), ``POST/DELETE tag/…`` and ``branch/…``, ``PUT settings``;
``POST /<repo>.git/info/lfs/objects/{batch,verify}``; ``GET/HEAD /<repo>/resolve/<rev>/<path>``
(datasets/spaces prefixed). A new repo gets an "initial commit" with the Hub's default
``.gitattributes`` (``*.safetensors``, ``*.bin``, ... tracked by LFS), as on the Hub.

Pointing huggingface_hub 2.4.0 at the server (what ``hub_env`` does)
---------------------------------------------------------------------
Environment (for subprocesses, and for what the client reads at call time): ``HF_ENDPOINT``,
``HF_HUB_DISABLE_XET=1``, ``HF_TOKEN``, ``HF_HUB_OFFLINE=0``, ``HF_HOME`` (a fresh dir),
``HF_HUB_DISABLE_TELEMETRY=1``; removes ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
``HUGGING_FACE_HUB_TOKEN``, ``HF_OIDC_RESOURCE``, ``HUGGINGFACE_CO_STAGING``,
``TRANSFORMERS_OFFLINE``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN``.

In-process, ``huggingface_hub.constants`` is computed once at import, so these are patched too:

* ``constants.ENDPOINT`` (``HfApi()`` takes it when created; ``snapshot_download`` creates one)
  and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url``: every download and HEAD).
* ``huggingface_hub.hf_api.api.endpoint``: the module-level functions
  (``huggingface_hub.create_repo``, ``model_info``, ...) are methods of an ``HfApi`` built at
  import. An ``HfApi`` the product built *before* ``hub_env`` keeps its old endpoint.
* ``constants.HF_HUB_DISABLE_XET`` (``is_xet_available``: hf_xet is installed, so without it
  uploads and downloads would go through Xet), ``constants.HF_HUB_OFFLINE``
  (``is_offline_mode``), ``constants.HF_HUB_DISABLE_IMPLICIT_TOKEN``.
* ``constants.HF_HUB_DISABLE_TELEMETRY``: otherwise the first request builds a user agent that
  fetches ``GET /api/agent-harnesses`` once per process (the server answers it, never faults it).
* the cache/home paths: ``constants.HF_HOME``, ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
  ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``,
  ``AGENT_HARNESSES_PATH`` and ``huggingface_hub.utils._cache_manager.HF_HUB_CACHE``.
* fast back-off: ``time`` in ``huggingface_hub.utils._http`` (``http_backoff`` sleeps 1, 2, 4,
  8 s) and in ``huggingface_hub.file_download`` (``http_get`` sleeps 1 s before resuming) is
  replaced by a proxy whose ``sleep`` lasts at most 10 ms. Subprocesses back off at full speed.

Status codes (and what the client raises)
-----------------------------------------
* repo missing or private, no token: 401 + ``X-Error-Code: RepoNotFound``; with a valid token,
  missing: 404 + ``RepoNotFound`` -> ``RepositoryNotFoundError`` (``repo_exists`` -> False).
* invalid token: 401, ``X-Error-Message: Invalid credentials in Authorization header``, no code
  -> plain ``HfHubHTTPError`` (status 401).
* write without a token: 401 + ``RepoNotFound`` (what the client turns a bare 401 on a repo URL
  into against https://huggingface.co) -> ``RepositoryNotFoundError``; read-only token: 403 ->
  ``HfHubHTTPError``; ``create_repo`` without a token: 401 -> ``HfHubHTTPError``.
* gated repo (``update_repo_settings(gated="auto")``), file download without a token: 401 +
  ``GatedRepo`` -> ``GatedRepoError`` (repo metadata stays readable).
* unknown branch/tag/commit: 404 + ``RevisionNotFound`` -> ``RevisionNotFoundError``.
* missing file: 404 + ``EntryNotFound`` (with ``X-Repo-Commit``) -> ``RemoteEntryNotFoundError``
  (an ``EntryNotFoundError``); ``file_exists`` -> False.
* ``create_repo`` of an existing repo: 409 (``exist_ok=True`` swallows it); existing tag or
  branch: 409; invalid tag/branch name: 400 -> ``BadRequestError``.
* commit whose ``parentCommit`` is not the branch head: 412 ``A commit has happened since.
  Please refresh and try again.`` -> ``HfHubHTTPError`` with ``response.status_code == 412``
  (as huggingface_hub's own tests assert against the Hub); nothing changes.
* commit with an ``lfsFile`` never uploaded to this repo, or a ``file`` that the preupload rule
  makes LFS: 400; ``deletedFile`` of a missing path: 404 ``EntryNotFound``.
* bad or expired CDN signature: 403; unsatisfiable range: 416 with ``Content-Range: */size``.
* injected faults: the status asked for, body ``{"error": "Injected fault"}``.

What the 2.4.0 client retries (5xx/429/408, connection errors; up to 5 retries)
------------------------------------------------------------------------------
* retried (``http_backoff``): ``preupload``, the LFS ``batch`` call, LFS PUT and verify,
  paginated listings (``list_repo_tree``, ``list_repo_commits``), and the HEAD of
  ``hf_hub_download`` (its first HEAD does not retry; when it fails with a 5xx or a
  connection error and no cached copy exists, it is made again with retries).
* not retried: ``model_info``/``repo_info``, ``list_repo_refs``, ``create_repo``, the
  ``commit`` POST, ``create_tag``/``delete_tag``, ``file_exists`` (a 500 raises), the Range GETs
  of ``get_safetensors_metadata``, and the download GET's status (only 408/429).
* a download body cut short (or a connect error/timeout) is fetched again up to 5 times, with
  ``Range: bytes=<have>-``; but ``<have>`` counts only the ``constants.DOWNLOAD_CHUNK_SIZE``
  (10 MiB) pieces already written, so a file under 10 MiB starts over from byte 0, no Range.
* ``snapshot_download`` with a branch/tag: a 5xx on its ``repo_info`` is not retried and ends
  in ``LocalEntryNotFoundError`` when nothing is cached.
* the client checks only the size of what it downloads over plain HTTP, never the sha256/git
  sha1 (``corrupt`` goes unnoticed); ``HfApi.verify_repo_checksums`` or the product must check.
* ``get_safetensors_metadata``: one HEAD per candidate file (``file_exists``), the index
  downloaded into the HF cache, then per shard one GET ``Range: bytes=0-100000`` (followed
  from the 302 to the CDN) and, only when the header is larger, ``bytes=8-<len+7>``: it reads
  ~100 kB per shard, not just the header.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024  # regular files must be smaller (the Hub's 10 MiB rule)
PAGE_SIZE = 1000  # tree / commit listing page size (Link: rel="next" pagination)
URL_TTL_S = 3600  # lifetime of the signed CDN URLs
STALE_PARENT = "A commit has happened since. Please refresh and try again."
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

# The .gitattributes the Hub writes in the initial commit of a new model repo.
_LFS_PATTERNS = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "saved_model/**/*",
    "*.tar.*",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS)
_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REF_NAME = re.compile(r"^(?!.*\.\.)(?!.*//)(?!.*\.lock$)[A-Za-z0-9_][A-Za-z0-9._/-]*(?<!/)$")


class Request(NamedTuple):
    method: str
    path: str
    range: str | None


class HubError(Exception):
    """An error answer: status, message (JSON ``error`` and ``X-Error-Message``), error code."""

    def __init__(self, status: int, message: str, code: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> _Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _Response.json(self.status, {"error": self.message}, headers)


@dataclass
class _Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, status: int, data: Any, headers: dict[str, str] | None = None) -> _Response:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return cls(status, hdrs, json.dumps(data).encode())


@dataclass(frozen=True)
class _Entry:
    """A file in a commit's tree. ``blob_id`` is the git oid (of the LFS pointer for LFS files)."""

    sha256: str
    size: int
    blob_id: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return _lfs_pointer(self.sha256, self.size)


@dataclass
class _Repo:
    type: str
    id: str
    dir: Path
    private: bool = False
    gated: str | bool = False
    created_at: str = ""
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_oids: dict[str, int] = field(default_factory=dict)  # LFS objects uploaded to this repo
    pr_count: int = 0
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.type, self.id)

    def state(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "id": self.id,
            "private": self.private,
            "gated": self.gated,
            "created_at": self.created_at,
            "branches": self.branches,
            "tags": self.tags,
            "lfs_oids": self.lfs_oids,
            "pr_count": self.pr_count,
        }

    def tree(self, commit_id: str) -> dict[str, _Entry]:
        return {p: _Entry(**e) for p, e in self.commits[commit_id]["tree"].items()}


def git_blob_id(data: bytes) -> str:
    """The git blob oid of ``data``: sha1 of ``b"blob <len>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _is_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut by the 512-byte sample is fine
        return not (len(sample) >= 512 and err.start >= len(sample) - 3)
    return False


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _path_matches(pattern: str, path: str) -> bool:
    """gitignore/gitattributes matching (the common subset: globs, ``**``, anchors, dirs)."""
    if pattern.endswith("/"):  # a directory: matches everything under it
        name = pattern.rstrip("/")
        parents = path.split("/")[:-1]
        if "/" in name:
            regex = _pattern_regex(name.lstrip("/"))
            return any(regex.fullmatch("/".join(parents[: i + 1])) for i in range(len(parents)))
        return any(fnmatch.fnmatchcase(p, name) for p in parents)
    if "/" in pattern:
        return _pattern_regex(pattern.lstrip("/")).fullmatch(path) is not None
    return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)


def _gitattributes_lfs(content: str, path: str) -> bool:
    lfs = False
    for line in content.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#") or not _path_matches(parts[0], path):
            continue
        for attr in parts[1:]:
            if attr.startswith("filter="):
                lfs = attr == "filter=lfs"
            elif attr in ("-filter", "!filter"):
                lfs = False
    return lfs


def _gitignored(content: str, path: str) -> bool:
    ignored = False
    for line in content.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if _path_matches(line[1:] if negate else line, path):
            ignored = not negate
    return ignored


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive, None to serve everything, or "416"."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m[1] and not m[2]):
        return None  # multi-range or junk: ignore the header, as servers may
    if not m[1]:
        n = int(m[2])
        if n == 0 or size == 0:
            return "416"
        return max(size - n, 0), size - 1
    start = int(m[1])
    end = min(int(m[2]), size - 1) if m[2] else size - 1
    if start >= size or start > end:
        return "416"
    return start, end


def _serve_bytes(data: bytes, range_header: str | None, headers: dict[str, str]) -> _Response:
    rng = _parse_range(range_header, len(data))
    headers = {"Accept-Ranges": "bytes", **headers}
    if rng == "416":
        raise HubError(
            416, "Requested range not satisfiable", **{"Content-Range": f"bytes */{len(data)}"}
        )
    if rng is None:
        return _Response(200, headers, data)
    start, end = rng  # type: ignore[misc]
    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
    return _Response(206, headers, data[start : end + 1])


def _disposition(kind: str, path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "")
    return f"{kind}; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\";"


class _FastTime:
    """Proxy of the ``time`` module whose ``sleep`` is capped (for the client's back-off)."""

    def __init__(self, real: Any, cap: float) -> None:
        self._real, self._cap = real, cap

    def sleep(self, seconds: float) -> None:
        self._real.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubServer, role: str) -> None:
        self.hub, self.role = hub, role
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        self.server.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        path, query = split.path, {k: v[-1] for k, v in parse_qs(split.query).items()}
        hub._record(Request(self.command, path, self.headers.get("Range")))
        body = self._body()
        status = hub._take_fault(path)
        try:
            if status is not None:
                resp = _Response.json(status, {"error": "Injected fault"})
            else:
                resp = hub._route(self.server.role, self.command, path, query, self.headers, body)
        except HubError as err:
            resp = err.response()
        except Exception:  # a server bug: say so loudly, the client sees a 500
            hub.errors.append(traceback.format_exc())
            resp = _Response.json(500, {"error": "hubserver internal error"})
        self._send(resp, path)

    def _send(self, resp: _Response, path: str) -> None:
        hub = self.server.hub
        self.send_response(resp.status)
        headers = {"X-Request-Id": self.headers.get("X-Amzn-Trace-Id") or uuid.uuid4().hex}
        headers.update(resp.headers)
        headers["Content-Length"] = str(len(resp.body))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD" or not resp.body:
            return
        body = resp.body
        drop = self.command == "GET" and len(body) >= 2 and hub._take_drop(path)
        if drop:
            body = body[: len(body) // 2]
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return
        hub._count(path, len(body))
        if drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


class HubServer:
    """A fake Hugging Face Hub on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        root: Path | str,
        tokens: Iterable[str] = frozenset({"hf_test_token"}),
        *,
        read_tokens: Iterable[str] = frozenset(),
        user: str = "test-user",
    ) -> None:
        self.root = Path(root)
        self.tokens, self.read_tokens, self.user = set(tokens), set(read_tokens), user
        self.requests: list[Request] = []
        self.bytes_served: Counter[str] = Counter()
        self.errors: list[str] = []  # tracebacks of server bugs (answered with 500)
        self._lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self._faults: list[list[Any]] = []  # [remaining (None = forever), status, match]
        self._drops: list[list[Any]] = []  # [remaining, substring]
        self._corrupt: set[tuple[str, str, str]] = set()
        self._secret = secrets.token_bytes(16)
        self._connections: set[socket.socket] = set()
        self._repos: dict[tuple[str, str], _Repo] = {}
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self._load()
        self._servers = [_HTTPServer(self, "hub"), _HTTPServer(self, "cdn")]
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in self._servers
        ]
        for t in self._threads:
            t.start()
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)

    # -- counters and faults -------------------------------------------------------------------

    def _record(self, req: Request) -> None:
        with self._stats_lock:
            self.requests.append(req)

    def _count(self, path: str, n: int) -> None:
        with self._stats_lock:
            self.bytes_served[path] += n

    def served(self, substring: str) -> int:
        """Body bytes served for the paths containing ``substring``."""
        with self._stats_lock:
            return sum(n for p, n in self.bytes_served.items() if substring in p)

    def reset_counters(self) -> None:
        with self._stats_lock:
            self.requests.clear()
            self.bytes_served.clear()

    def fail_next(self, n: int = 1, status: int = 500, match: str | None = None) -> None:
        with self._stats_lock:
            self._faults.append([n, status, match])

    def fail_every(self, status: int = 500, match: str | None = None) -> None:
        with self._stats_lock:
            self._faults.append([None, status, match])

    def clear_faults(self) -> None:
        with self._stats_lock:
            self._faults.clear()
            self._drops.clear()

    def drop_connection_on(self, path_substring: str, times: int = 1) -> None:
        with self._stats_lock:
            self._drops.append([times, path_substring])

    def corrupt(self, repo_id: str, path: str, repo_type: str = "model") -> None:
        self._corrupt.add((repo_type, repo_id, path))

    def _take_fault(self, path: str) -> int | None:
        if path == "/api/agent-harnesses":
            return None
        with self._stats_lock:
            for fault in self._faults:
                remaining, status, match = fault
                if match is not None and match not in path:
                    continue
                if remaining is None:
                    return status
                if remaining > 0:
                    fault[0] -= 1
                    return status
        return None

    def _take_drop(self, path: str) -> bool:
        with self._stats_lock:
            for drop in self._drops:
                if drop[0] > 0 and drop[1] in path:
                    drop[0] -= 1
                    return True
        return False

    # -- storage -------------------------------------------------------------------------------

    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self._object_path(sha)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{sha}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        return sha

    def _content(self, repo: _Repo, path: str, sha256: str) -> bytes:
        data = self._object_path(sha256).read_bytes()
        if (repo.type, repo.id, path) in self._corrupt and data:
            buf = bytearray(data)
            for i in {len(buf) // 2, len(buf) - 1}:
                buf[i] ^= 0xFF
            data = bytes(buf)
        return data

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def _load(self) -> None:
        for state_file in sorted((self.root / "repos").glob("*/*/*/repo.json")):
            state = json.loads(state_file.read_text())
            repo = _Repo(dir=state_file.parent, **state)
            for cfile in (repo.dir / "commits").glob("*.json"):
                repo.commits[cfile.stem] = json.loads(cfile.read_text())
            self._repos[repo.key] = repo

    def _save(self, repo: _Repo) -> None:
        repo.dir.mkdir(parents=True, exist_ok=True)
        tmp = repo.dir / f"repo.json.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(repo.state(), indent=1, sort_keys=True))
        os.replace(tmp, repo.dir / "repo.json")

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(
            repo_type, repo_id, self._repo_dir(repo_type, repo_id), private, created_at=_now()
        )
        self._repos[repo.key] = repo
        gitattributes = DEFAULT_GITATTRIBUTES.encode()
        entry = _Entry(
            self._put_object(gitattributes), len(gitattributes), git_blob_id(gitattributes), False
        )
        repo.branches["main"] = self._store_commit(
            repo, [], {".gitattributes": entry}, "initial commit", ""
        )
        self._save(repo)
        return repo

    def _store_commit(
        self,
        repo: _Repo,
        parents: list[str],
        tree: dict[str, _Entry],
        summary: str,
        description: str,
    ) -> str:
        commit = {
            "repo": f"{repo.type}s/{repo.id}",
            "parents": parents,
            "tree": {p: e.__dict__ for p, e in sorted(tree.items())},
            "summary": summary,
            "description": description,
            "author": self.user,
            "date": _now(),
            "nonce": uuid.uuid4().hex,
        }
        canonical = json.dumps(commit, sort_keys=True, separators=(",", ":")).encode()
        commit_id = hashlib.sha1(canonical).hexdigest()
        (repo.dir / "commits").mkdir(parents=True, exist_ok=True)
        (repo.dir / "commits" / f"{commit_id}.json").write_bytes(canonical)
        repo.commits[commit_id] = commit
        return commit_id

    def _upload_mode(self, tree: dict[str, _Entry], path: str, size: int, sample: bytes) -> str:
        """The Hub's rule: LFS if tracked by .gitattributes, >= 10 MiB, or binary."""
        if size >= LFS_THRESHOLD or _is_binary(sample[:512]):
            return "lfs"
        attrs = tree.get(".gitattributes")
        if attrs is not None and not attrs.lfs:
            content = self._object_path(attrs.sha256).read_text(errors="replace")
            if _gitattributes_lfs(content, path):
                return "lfs"
        return "regular"

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        message: str = "seed",
        repo_type: str = "model",
    ) -> str:
        """Create ``repo_id`` if needed and commit ``files`` to ``main``; returns the commit id."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._new_repo(
                repo_type, repo_id, private
            )
            head = repo.branches["main"]
            tree = repo.tree(head)
            for path, data in files.items():
                sha = self._put_object(data)
                if data and self._upload_mode(tree, path, len(data), data[:512]) == "lfs":
                    repo.lfs_oids[sha] = len(data)
                    tree[path] = _Entry(
                        sha, len(data), git_blob_id(_lfs_pointer(sha, len(data))), True
                    )
                else:
                    tree[path] = _Entry(sha, len(data), git_blob_id(data), False)
            repo.branches["main"] = self._store_commit(repo, [head], tree, message, "")
            self._save(repo)
            return repo.branches["main"]

    # -- auth, lookups -------------------------------------------------------------------------

    def _access(self, headers: Any) -> str | None:
        auth = headers.get("Authorization")
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token in self.tokens:
            return "write"
        if token in self.read_tokens:
            return "read"
        raise HubError(401, INVALID_CREDENTIALS)

    def _repo(self, repo_type: str, repo_id: str, access: str | None, write: bool = False) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and access is None):
            if access is None:
                raise HubError(401, "Repository not found", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and access is None:
            raise HubError(
                401, "You must be authenticated to write to this repository", "RepoNotFound"
            )
        if write and access != "write":
            raise HubError(403, f"You don't have the rights to write to {repo_type} {repo_id}")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str:
        """A branch, a tag, refs/heads|tags|pr/..., or a (short) commit id -> commit id."""
        for name in (revision, revision.removeprefix("refs/heads/")):
            if name in repo.branches:
                return repo.branches[name]
        tag = revision.removeprefix("refs/tags/")
        if tag in repo.tags:
            return repo.tags[tag]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [c for c in repo.commits if c.startswith(revision)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- routing -------------------------------------------------------------------------------

    def _route(
        self, role: str, method: str, path: str, query: dict[str, str], headers: Any, body: bytes
    ) -> _Response:
        seg = [unquote(s) for s in path.strip("/").split("/")]
        if role == "cdn":
            return self._cdn(method, seg, query, headers, body)
        if seg[0] == "api":
            return self._api(method, seg[1:], query, headers, body)
        rtype = _PLURAL.get(seg[0]) if seg[0] in ("datasets", "spaces") else None
        rest = seg[1:] if rtype else seg
        rtype = rtype or "model"
        if len(rest) >= 2 and rest[1].endswith(".git") and rest[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{rest[0]}/{rest[1].removesuffix('.git')}"
            if method == "POST" and rest[5:] == ["batch"]:
                return self._lfs_batch(rtype, repo_id, headers, body)
            if method == "POST" and rest[5:] == ["verify"]:
                return self._lfs_verify(rtype, repo_id, headers, body)
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            raw = path.strip("/").split("/")[(1 if rtype != "model" else 0) + 3 :]
            revision, filename = unquote(raw[0]), unquote("/".join(raw[1:]))
            return self._resolve_file(rtype, f"{rest[0]}/{rest[1]}", revision, filename, headers)
        raise HubError(404, "Not Found")

    def _api(
        self, method: str, seg: list[str], query: dict[str, str], headers: Any, body: bytes
    ) -> _Response:
        if seg == ["agent-harnesses"]:
            return _Response.json(200, {"standardEnvVars": [], "harnesses": {}})
        if seg == ["whoami-v2"] and method == "GET":
            access = self._access(headers)
            if access is None:
                raise HubError(401, INVALID_CREDENTIALS)
            role = "write" if access == "write" else "read"
            return _Response.json(
                200,
                {
                    "type": "user",
                    "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
                    "name": self.user,
                    "fullname": self.user,
                    "orgs": [],
                    "auth": {
                        "type": "access_token",
                        "accessToken": {"displayName": "test", "role": role},
                    },
                },
            )
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if seg[:1] == ["repos"] and seg[1:] in (["create"], ["delete"]):
            access = self._access(headers)
            if access is None:
                raise HubError(401, "You must be authenticated to create or delete a repository")
            if access != "write":
                raise HubError(403, "You don't have the rights to create or delete a repository")
            payload = json.loads(body or b"{}")
            rtype = payload.get("type") or "model"
            if rtype not in _TYPE_PREFIX:
                raise HubError(400, f"Invalid repo type: {rtype}")
            if not payload.get("organization"):
                payload["organization"] = self.user
            repo_id = f"{payload['organization']}/{payload['name']}"
            if seg[1] == "create":
                return self._create_repo(rtype, repo_id, payload)
            with self._lock:
                repo = self._repo(rtype, repo_id, access, write=True)
                del self._repos[repo.key]
                shutil.rmtree(repo.dir)
            return _Response.json(200, {})
        if len(seg) < 3 or seg[0] not in _PLURAL:
            raise HubError(404, "Not Found")
        rtype, repo_id, op, args = _PLURAL[seg[0]], f"{seg[1]}/{seg[2]}", seg[3:4], seg[4:]
        access = self._access(headers)
        if method == "GET" and (not op or op == ["revision"]):
            repo = self._repo(rtype, repo_id, access)
            revision = args[0] if op == ["revision"] and args else "main"
            return self._info(repo, revision, blobs=_truthy(query.get("blobs")))
        if method == "GET" and op == ["refs"]:
            return self._refs(self._repo(rtype, repo_id, access), _truthy(query.get("include_prs")))
        if method == "GET" and op == ["tree"] and args:
            repo = self._repo(rtype, repo_id, access)
            return self._tree(repo, args[0], "/".join(args[1:]), query)
        if method == "POST" and op == ["paths-info"] and args:
            form = parse_qs(body.decode())
            return self._paths_info(self._repo(rtype, repo_id, access), args[0], form)
        if method == "GET" and op == ["commits"] and args:
            return self._commits(self._repo(rtype, repo_id, access), args[0], query)
        if method == "POST" and op == ["preupload"] and args:
            repo = self._repo(rtype, repo_id, access, write=True)
            return self._preupload(repo, args[0], json.loads(body or b"{}"))
        if method == "POST" and op == ["commit"] and args:
            repo = self._repo(rtype, repo_id, access, write=True)
            return self._commit(repo, args[0], body, create_pr=_truthy(query.get("create_pr")))
        if op in (["tag"], ["branch"]) and args and method in ("POST", "DELETE"):
            repo = self._repo(rtype, repo_id, access, write=True)
            payload = json.loads(body) if body else {}
            return self._ref_op(repo, op[0], method, "/".join(args), payload)
        if method == "PUT" and op == ["settings"]:
            repo = self._repo(rtype, repo_id, access, write=True)
            payload = json.loads(body or b"{}")
            with self._lock:
                if "visibility" in payload:
                    repo.private = payload["visibility"] == "private"
                if "private" in payload:
                    repo.private = bool(payload["private"])
                if "gated" in payload:
                    repo.gated = payload["gated"]
                self._save(repo)
            return _Response.json(200, {})
        raise HubError(404, "Not Found")

    # -- endpoints -----------------------------------------------------------------------------

    def _validate_yaml(self, payload: dict[str, Any]) -> _Response:
        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            try:
                import yaml

                data = yaml.safe_load(m[1])
                if data is not None and not isinstance(data, dict):
                    raise ValueError("metadata must be a mapping")
            except Exception as err:
                msg = f"Invalid YAML metadata: {err}"
                return _Response.json(
                    400, {"errors": [{"message": msg}], "warnings": [], "error": msg}
                )
        return _Response.json(200, {"errors": [], "warnings": []})

    def _create_repo(self, rtype: str, repo_id: str, payload: dict[str, Any]) -> _Response:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo_id) or (
            "--" in repo_id or ".." in repo_id
        ):
            raise HubError(400, f"Invalid repo name: {repo_id}")
        url = f"{self.url}/{_TYPE_PREFIX[rtype]}{repo_id}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            if (rtype, repo_id) in self._repos:
                return _Response.json(
                    409, {"error": f"You already created this {rtype} repo", "url": url}
                )
            self._new_repo(rtype, repo_id, private)
        return _Response.json(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})

    def _info(self, repo: _Repo, revision: str, blobs: bool) -> _Response:
        with self._lock:
            commit_id = self._resolve(repo, revision)
            tree, commit = repo.tree(commit_id), repo.commits[commit_id]
        siblings = []
        for path, entry in sorted(tree.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sib["lfs"] = {
                        "sha256": entry.sha256,
                        "size": entry.size,
                        "pointerSize": len(entry.pointer),
                    }
            siblings.append(sib)
        data: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": commit_id,
            "lastModified": commit["date"],
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in tree.values()),
        }
        if repo.type == "model":
            data.update(modelId=repo.id, spaces=[])
        return _Response.json(200, data)

    def _refs(self, repo: _Repo, include_prs: bool) -> _Response:
        with self._lock:
            branches = {k: v for k, v in repo.branches.items() if not k.startswith("refs/pr/")}
            prs = {k: v for k, v in repo.branches.items() if k.startswith("refs/pr/")}
            data: dict[str, Any] = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                    for n, c in sorted(branches.items())
                ],
                "converts": [],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c}
                    for n, c in sorted(repo.tags.items())
                ],
            }
            if include_prs:
                data["pullRequests"] = [
                    {"name": n.rsplit("/", 1)[-1], "ref": n, "targetCommit": c}
                    for n, c in sorted(prs.items())
                ]
        return _Response.json(200, data)

    def _history(self, repo: _Repo, commit_id: str) -> Iterator[str]:
        """First-parent history, newest first."""
        current: str | None = commit_id
        while current is not None:
            yield current
            parents = repo.commits[current]["parents"]
            current = parents[0] if parents else None

    def _last_commits(
        self, repo: _Repo, commit_id: str, paths: Iterable[str]
    ) -> dict[str, dict[str, str]]:
        """For each path (file or folder), the last commit that changed something at or under it."""
        todo, out = set(paths), {}
        for cid in self._history(repo, commit_id):
            if not todo:
                break
            tree = repo.commits[cid]["tree"]
            parents = repo.commits[cid]["parents"]
            before = repo.commits[parents[0]]["tree"] if parents else {}
            changed = {p for p in set(tree) | set(before) if tree.get(p) != before.get(p)}
            for path in list(todo):
                if any(c == path or c.startswith(path + "/") for c in changed):
                    commit = repo.commits[cid]
                    out[path] = {"id": cid, "title": commit["summary"], "date": commit["date"]}
                    todo.discard(path)
        return out

    def _tree_items(
        self, repo: _Repo, commit_id: str, tree: dict[str, _Entry], paths: list[str], expand: bool
    ) -> list[dict[str, Any]]:
        items = []
        for path in paths:
            entry = tree.get(path)
            if entry is not None:
                item: dict[str, Any] = {
                    "type": "file",
                    "oid": entry.blob_id,
                    "size": entry.size,
                    "path": path,
                }
                if entry.lfs:
                    item["lfs"] = {
                        "oid": entry.sha256,
                        "size": entry.size,
                        "pointerSize": len(entry.pointer),
                    }
            else:
                under = sorted(
                    f"{p}:{e.blob_id}" for p, e in tree.items() if p.startswith(path + "/")
                )
                oid = hashlib.sha1("\n".join(under).encode()).hexdigest()
                item = {"type": "directory", "oid": oid, "size": 0, "path": path}
            items.append(item)
        if expand:
            last = self._last_commits(repo, commit_id, paths)
            for item in items:
                item["lastCommit"] = last.get(item["path"])
        return items

    def _page(self, items: list[Any], path: str, query: dict[str, str]) -> _Response:
        start = int(query.get("cursor") or 0)
        page = items[start : start + PAGE_SIZE]
        headers = {}
        if start + PAGE_SIZE < len(items):
            nxt = urlencode({**query, "cursor": start + PAGE_SIZE})
            headers["Link"] = f'<{self.url}{path}?{nxt}>; rel="next"'
        return _Response.json(200, page, headers)

    def _tree(self, repo: _Repo, revision: str, folder: str, query: dict[str, str]) -> _Response:
        recursive, expand = _truthy(query.get("recursive")), _truthy(query.get("expand"))
        with self._lock:
            commit_id = self._resolve(repo, revision)
            tree = repo.tree(commit_id)
            folder = folder.strip("/")
            prefix = f"{folder}/" if folder else ""
            if folder and folder in tree:
                paths = [folder]
            else:
                paths_set: set[str] = set()
                for p in tree:
                    if not p.startswith(prefix):
                        continue
                    parts = p[len(prefix) :].split("/")
                    depth = len(parts) if recursive else 1
                    for i in range(1, depth + 1):
                        paths_set.add(prefix + "/".join(parts[:i]))
                if folder and not paths_set:
                    raise HubError(
                        404,
                        f"{folder} does not exist on {revision}",
                        "EntryNotFound",
                        **{"X-Repo-Commit": commit_id},
                    )
                paths = sorted(paths_set)
            items = self._tree_items(repo, commit_id, tree, paths, expand)
        path = f"/api/{repo.type}s/{repo.id}/tree/{quote(revision, safe='')}"
        if folder:
            path += "/" + quote(folder, safe="")
        return self._page(items, path, query)

    def _paths_info(self, repo: _Repo, revision: str, form: dict[str, list[str]]) -> _Response:
        with self._lock:
            commit_id = self._resolve(repo, revision)
            tree = repo.tree(commit_id)
            wanted = [p.strip("/") for p in form.get("paths", [])]
            found = [p for p in wanted if p in tree or any(q.startswith(p + "/") for q in tree)]
            items = self._tree_items(
                repo, commit_id, tree, found, _truthy((form.get("expand") or [""])[-1])
            )
        return _Response.json(200, items)

    def _commits(self, repo: _Repo, revision: str, query: dict[str, str]) -> _Response:
        with self._lock:
            commit_id = self._resolve(repo, revision)
            items = []
            for cid in self._history(repo, commit_id):
                c = repo.commits[cid]
                items.append(
                    {
                        "id": cid,
                        "title": c["summary"],
                        "message": c["description"],
                        "date": c["date"],
                        "authors": [{"user": c["author"]}],
                    }
                )
        return self._page(
            items, f"/api/{repo.type}s/{repo.id}/commits/{quote(revision, safe='')}", query
        )

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> _Response:
        with self._lock:
            tree = repo.tree(self._resolve(repo, revision))
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in tree:
            gitignore = self._object_path(tree[".gitignore"].sha256).read_text(errors="replace")
        files = []
        for f in payload.get("files", []):
            try:
                sample = base64.b64decode(f.get("sample", ""), validate=True)
            except binascii.Error as err:
                raise HubError(400, f"Invalid sample for {f.get('path')}") from err
            mode = self._upload_mode(tree, f["path"], int(f.get("size", 0)), sample)
            out = {
                "path": f["path"],
                "uploadMode": mode,
                "shouldIgnore": bool(gitignore) and _gitignored(gitignore, f["path"]),
            }
            existing = tree.get(f["path"])
            if existing is not None:
                out["oid"] = existing.sha256 if existing.lfs else existing.blob_id
            files.append(out)
        return _Response.json(200, {"files": files, "commitOid": None})

    def _commit(self, repo: _Repo, revision: str, body: bytes, create_pr: bool) -> _Response:
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid ndjson: {err}") from err
        headers = [line["value"] for line in lines if line.get("key") == "header"]
        if len(headers) != 1 or not headers[0].get("summary"):
            raise HubError(400, "The commit needs exactly one header with a summary")
        header = headers[0]
        with self._lock:
            parent_commit = header.get("parentCommit")
            if create_pr:
                base = self._resolve(repo, parent_commit or revision)
            else:
                branch = revision.removeprefix("refs/heads/")
                if branch not in repo.branches:
                    raise HubError(
                        404, f"Invalid rev id: {revision} (not a branch)", "RevisionNotFound"
                    )
                base = repo.branches[branch]
                if parent_commit is not None and not (
                    len(parent_commit) >= 5 and base.startswith(parent_commit.lower())
                ):
                    raise HubError(412, STALE_PARENT)
            tree = repo.tree(base)
            new_objects: list[bytes] = []
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                path = str(value.get("path", ""))
                if key == "header":
                    continue
                if (
                    not path
                    or path.startswith("/")
                    or ".." in path.split("/")
                    or path.startswith(".git/")
                ):
                    raise HubError(400, f"Invalid path in repo: {path!r}")
                if key == "file":
                    raw = value.get("content", "")
                    try:
                        data = (
                            base64.b64decode(raw, validate=True)
                            if value.get("encoding", "base64") == "base64"
                            else raw.encode()
                        )
                    except binascii.Error as err:
                        raise HubError(400, f"Invalid base64 content for {path}") from err
                    if data and self._upload_mode(tree, path, len(data), data[:512]) == "lfs":
                        raise HubError(
                            400,
                            f"Your push was rejected: {path} must be stored with LFS",
                        )
                    new_objects.append(data)
                    sha = hashlib.sha256(data).hexdigest()
                    tree[path] = _Entry(sha, len(data), git_blob_id(data), False)
                elif key == "lfsFile":
                    oid = str(value.get("oid", "")).lower()
                    if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_oids:
                        raise HubError(
                            400, f"LFS object {oid} for {path} was not uploaded to this repo"
                        )
                    size = repo.lfs_oids[oid]
                    if value.get("size") is not None and int(value["size"]) != size:
                        raise HubError(
                            400, f"LFS object {oid}: size {value['size']} != uploaded {size}"
                        )
                    tree[path] = _Entry(oid, size, git_blob_id(_lfs_pointer(oid, size)), True)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(
                            404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                        )
                    del tree[path]
                elif key == "deletedFolder":
                    under = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
                    if not under:
                        raise HubError(
                            404, f"A folder with this name doesn't exist: {path}", "EntryNotFound"
                        )
                    for p in under:
                        del tree[p]
                else:
                    raise HubError(400, f"Unknown commit operation: {key!r}")
            for data in new_objects:
                self._put_object(data)
            commit_id = self._store_commit(
                repo, [base], tree, header["summary"], header.get("description") or ""
            )
            result: dict[str, Any] = {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self.url}/{_TYPE_PREFIX[repo.type]}{repo.id}/commit/{commit_id}",
                "hookOutput": "",
            }
            if create_pr:
                repo.pr_count += 1
                repo.branches[f"refs/pr/{repo.pr_count}"] = commit_id
                result["pullRequestUrl"] = (
                    f"{self.url}/{_TYPE_PREFIX[repo.type]}{repo.id}/discussions/{repo.pr_count}"
                )
            else:
                repo.branches[branch] = commit_id
            self._save(repo)
        return _Response.json(200, result)

    def _ref_op(
        self, repo: _Repo, kind: str, method: str, name: str, payload: dict[str, Any]
    ) -> _Response:
        with self._lock:
            refs = repo.tags if kind == "tag" else repo.branches
            if method == "DELETE":
                if kind == "branch" and name == "main":
                    raise HubError(403, "Cannot delete the default branch")
                if name not in refs:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                del refs[name]
            else:
                # POST /tag/{revision} {"tag": name}; POST /branch/{name} {"startingPoint": rev}
                new, start = (
                    (payload.get("tag", ""), name)
                    if kind == "tag"
                    else (name, payload.get("startingPoint") or "main")
                )
                if not _REF_NAME.fullmatch(new) or new.startswith("refs/"):
                    raise HubError(400, f"Invalid {kind} name: {new!r}")
                commit_id = self._resolve(repo, start)
                if new in refs:
                    raise HubError(409, f"{kind.capitalize()} {new} already exists")
                refs[new] = commit_id
            self._save(repo)
        return _Response.json(200, {})

    def _lfs_href(self, kind: str, repo: _Repo, sha256: str, path: str = "", **params: Any) -> str:
        url_path = f"/{kind}/{repo.type}s/{repo.id}/{sha256}"
        if path:
            url_path += "/" + quote(path)
        params["expires"] = int(time.time()) + URL_TTL_S
        signed = url_path + "?" + urlencode(params)
        sig = hmac.new(self._secret, signed.encode(), hashlib.sha256).hexdigest()
        return f"{self.cdn_url}{signed}&signature={sig}"

    def _lfs_batch(self, rtype: str, repo_id: str, headers: Any, body: bytes) -> _Response:
        payload = json.loads(body or b"{}")
        operation = payload.get("operation")
        access = self._access(headers)
        repo = self._repo(rtype, repo_id, access, write=operation == "upload")
        if operation not in ("upload", "download"):
            raise HubError(400, f"Unsupported LFS operation: {operation!r}")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            out: dict[str, Any] = {"oid": oid, "size": size}
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                out["error"] = {
                    "code": 422,
                    "message": "Invalid object (oid must be a sha256, size an int)",
                }
                out["size"] = size if isinstance(size, int) else 0
            elif operation == "download":
                if oid not in repo.lfs_oids:
                    out["error"] = {"code": 404, "message": "Object does not exist"}
                else:
                    out["actions"] = {"download": {"href": self._lfs_href("cdn", repo, oid)}}
            elif oid not in repo.lfs_oids:  # already present objects get no actions
                auth = {"Authorization": headers.get("Authorization", "")}
                out["authenticated"] = True
                out["actions"] = {
                    "upload": {
                        "href": self._lfs_href("upload", repo, oid, size=size),
                        "expires_in": URL_TTL_S,
                    },
                    "verify": {
                        "href": f"{self.url}/{_TYPE_PREFIX[rtype]}{repo_id}.git/info/lfs/objects"
                        + "/verify",
                        "header": auth,
                    },
                }
            objects.append(out)
        data = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return _Response(
            200, {"Content-Type": "application/vnd.git-lfs+json"}, json.dumps(data).encode()
        )

    def _lfs_verify(self, rtype: str, repo_id: str, headers: Any, body: bytes) -> _Response:
        repo = self._repo(rtype, repo_id, self._access(headers), write=True)
        payload = json.loads(body or b"{}")
        oid, size = payload.get("oid"), payload.get("size")
        if repo.lfs_oids.get(oid) != size:
            raise HubError(404, f"LFS object {oid} (size {size}) was not uploaded")
        return _Response(200, {"Content-Type": "application/vnd.git-lfs+json"}, b"{}")

    def _cdn(
        self, method: str, seg: list[str], query: dict[str, str], headers: Any, body: bytes
    ) -> _Response:
        if len(seg) < 5 or seg[0] not in ("cdn", "upload") or seg[1] not in _PLURAL:
            raise HubError(404, "NoSuchKey")
        # check the signature over the exact path + query the server signed
        params = {k: v for k, v in query.items() if k != "signature"}
        url_path = "/" + "/".join(quote(s) for s in seg)
        signed = url_path + "?" + urlencode(params)
        expected = hmac.new(self._secret, signed.encode(), hashlib.sha256).hexdigest()
        if (
            not hmac.compare_digest(expected, query.get("signature", ""))
            or int(params.get("expires", 0)) < time.time()
        ):
            raise HubError(403, "AccessDenied: Request has expired or the signature does not match")
        rtype, repo_id, sha = _PLURAL[seg[1]], f"{seg[2]}/{seg[3]}", seg[4]
        repo = self._repos.get((rtype, repo_id))
        if repo is None:
            raise HubError(404, "NoSuchKey")
        if seg[0] == "upload":
            if method != "PUT":
                raise HubError(405, "Method not allowed")
            if hashlib.sha256(body).hexdigest() != sha or len(body) != int(params.get("size", -1)):
                raise HubError(
                    400, "BadDigest: the uploaded content does not match its sha256/size"
                )
            self._put_object(body)
            with self._lock:
                repo.lfs_oids[sha] = len(body)
                self._save(repo)
            return _Response(200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if method not in ("GET", "HEAD"):
            raise HubError(405, "Method not allowed")
        if sha not in repo.lfs_oids:
            raise HubError(404, "NoSuchKey")
        path = "/".join(seg[5:])
        data = self._content(repo, path, sha)
        hdrs = {
            "ETag": f'"{sha}"',
            "Content-Type": "application/octet-stream",
            "Content-Disposition": _disposition("attachment", path or sha),
        }
        return _serve_bytes(data, headers.get("Range"), hdrs)

    def _resolve_file(
        self, rtype: str, repo_id: str, revision: str, filename: str, headers: Any
    ) -> _Response:
        access = self._access(headers)
        repo = self._repo(rtype, repo_id, access)
        if repo.gated and access is None:
            raise HubError(
                401,
                f"Access to {rtype} {repo_id} is restricted: you must be authenticated.",
                "GatedRepo",
            )
        with self._lock:
            commit_id = self._resolve(repo, revision)
            entry = repo.tree(commit_id).get(filename)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": commit_id})
        base = {"X-Repo-Commit": commit_id}
        if entry.lfs:
            return _Response(
                302,
                {
                    **base,
                    "Location": self._lfs_href("cdn", repo, entry.sha256, filename),
                    "ETag": f'"{entry.sha256}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                },
            )
        data = self._content(repo, filename, entry.sha256)
        ctype = (
            "application/json; charset=utf-8"
            if filename.endswith(".json")
            else "text/plain; charset=utf-8"
        )
        if _is_binary(data[:512]):
            ctype = "application/octet-stream"
        hdrs = {
            **base,
            "ETag": f'"{entry.blob_id}"',
            "Content-Type": ctype,
            "Content-Disposition": _disposition("inline", filename),
        }
        return _serve_bytes(data, headers.get("Range"), hdrs)


def hub_env(server: HubServer, monkeypatch: Any, home: Path | str | None = None) -> Path:
    """Point huggingface_hub (env and already-imported constants) at ``server``; returns HF_HOME.

    ``home`` (default ``server.root / "client-home"``) becomes ``HF_HOME``; the client's token is
    the first of ``server.tokens`` (sorted). See the module docstring for what is patched and why.
    """
    import huggingface_hub.file_download as file_download
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._cache_manager as cache_manager
    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import constants

    home = Path(home) if home is not None else server.root / "client-home"
    home.mkdir(parents=True, exist_ok=True)
    token = sorted(server.tokens)[0] if server.tokens else None
    for var in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HF_TOKEN",
    ):
        monkeypatch.delenv(var, raising=False)
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if token:
        env["HF_TOKEN"] = token
    for var, value in env.items():
        monkeypatch.setenv(var, value)

    hub_cache = str(home / "hub")
    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(hf_http, "time", _FastTime(time, 0.01))
    monkeypatch.setattr(file_download, "time", _FastTime(time, 0.01))
    return home
