"""The one place that talks to ``huggingface_hub``: the API object and its errors, ours.

The endpoint, the token and offline mode are the client's own: ``HF_ENDPOINT``, ``HF_TOKEN``
or the token file (``hf auth login``), ``HF_HUB_OFFLINE``; nothing here names an endpoint.
The token is never put in a message. Every Hub failure becomes one adapterctl error with one
line naming the repository and the fix: not found (exit 4), a conflicting change on the Hub
(5), auth, network or server trouble (6).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from adapterctl.errors import AdapterctlError, Conflict, NotFound, RemoteError

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def api(token: str | None = None) -> HfApi:
    """The Hub client (``token`` None: the client's own lookup: ``HF_TOKEN``, the token file).

    Raises:
        RemoteError: ``HF_HUB_OFFLINE`` is set (exit 6).
    """
    if offline():
        raise RemoteError(
            "HF_HUB_OFFLINE is set: this needs the Hugging Face Hub; unset HF_HUB_OFFLINE "
            "(or work from local paths and registry references)"
        )
    from huggingface_hub import HfApi

    return HfApi(token=token)


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks the client not to use the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


@contextlib.contextmanager
def hub_errors(repo: str, action: str) -> Iterator[None]:
    """Turn the client's exceptions raised inside the block into adapterctl errors.

    Args:
        repo: ``owner/name``, named in every message.
        action: what was being done (``push``, ``pull``, ``reading the base``…).
    """
    try:
        yield
    except AdapterctlError:
        raise
    except Exception as exc:
        mapped = translate(exc, repo, action)
        if mapped is None:
            raise
        raise mapped from None


def translate(exc: BaseException, repo: str, action: str) -> AdapterctlError | None:
    """The adapterctl error for a client exception, or None when it is not a Hub failure."""
    from huggingface_hub import errors as hf

    where = f"hf://{repo}"
    login = "set HF_TOKEN or run `hf auth login` (push and pull also take --token)"
    writes = action in ("push", "publish")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return RemoteError(f"{where}: {action} needs the Hub but HF_HUB_OFFLINE is set; unset it")
    if isinstance(exc, hf.GatedRepoError):
        return RemoteError(f"{where}: gated; ask for access on its Hub page, then {login}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFound(
            f"{where}: no such repository (or it is private and the token cannot see it); "
            f"check the name, or {login}"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFound(
            f"{where}: no such revision (branch, tag or commit); check the @REV, or omit it"
        )
    if isinstance(exc, hf.EntryNotFoundError):
        return NotFound(f"{where}: a file is missing from the repository ({exc}); check the repo")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            lacks = "cannot write there" if writes else "has no access"
            return RemoteError(
                f"{where}: {action} was refused (HTTP {status}): the token is missing, invalid "
                f"or {lacks}; {login}"
            )
        if status in (409, 412):
            return Conflict(
                f"{where}: the repository changed during the {action} (HTTP {status}); "
                "nothing was written by it: run it again"
            )
        if status == 404:
            return NotFound(f"{where}: not found on the Hub (HTTP 404); check the name")
        return RemoteError(
            f"{where}: {action} failed (HTTP {status}); the Hub may be down: try again later"
        )
    if isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.startswith("httpx"):
        return RemoteError(
            f"{where}: {action} failed: cannot reach the Hub ({type(exc).__name__}); check the "
            "network, HF_ENDPOINT, or try again later"
        )
    return None
