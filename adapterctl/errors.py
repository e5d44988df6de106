"""Every exception adapterctl raises, each carrying the exit code the CLI maps it to.

Each class also inherits the builtin it behaves like, so library users can catch
``LookupError`` or ``ValueError`` without knowing about adapterctl.
"""

from __future__ import annotations


class AdapterctlError(Exception):
    """Base class. ``exit_code`` is the CLI's exit status for this error (see README)."""

    exit_code = 1


class OperationalError(AdapterctlError, OSError):
    """I/O failure, locked registry, plugin failure (exit 1)."""

    exit_code = 1


class UsageError(AdapterctlError, ValueError):
    """Bad flags or arguments (exit 2)."""

    exit_code = 2


class ValidationFailed(AdapterctlError, ValueError):
    """The adapter does not fit or its files are broken (exit 3)."""

    exit_code = 3


class BrokenFile(ValidationFailed):
    """A file is truncated, malformed, empty or a Git LFS pointer (exit 3)."""


class UnsupportedAdapter(ValidationFailed):
    """The adapter is not something we can work on (not LoRA, unknown layout) (exit 3)."""


class UnsupportedBase(ValidationFailed):
    """The base checkpoint is in a form we cannot read or merge into (GPTQ, AWQ, FP8…) (exit 3)."""


class NotFound(AdapterctlError, LookupError):
    """Adapter, version, base, method or remote revision not found (exit 4)."""

    exit_code = 4


class MissingExtra(NotFound, ImportError):
    """An optional part of the install is missing (exit 4); the message names the extra that
    brings it (``pip install 'adapterctl[torch]'``)."""


class VersionRemoved(NotFound):
    """A registry reference names a version that was removed (it left a tombstone) (exit 4)."""


class Conflict(AdapterctlError):
    """Base identity differs from a pin, something already exists, a name clashes (exit 5)."""

    exit_code = 5


class RemoteError(AdapterctlError, ConnectionError):
    """Remote, auth or network failure (exit 6)."""

    exit_code = 6


EXIT_CODES: dict[int, str] = {
    0: "success (validate: no error findings)",
    1: "operational error (I/O, locked registry, plugin failure)",
    2: "usage error (bad flags or arguments)",
    3: "validation failed: the adapter does not fit, or a file is broken",
    4: "not found (adapter, version, base, method, remote revision)",
    5: "conflict (base identity differs from the pin, OUT exists, name clash)",
    6: "remote, auth or network failure",
    70: "internal error (a bug)",
    130: "interrupted",
}
