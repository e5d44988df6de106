"""The optional parts of the install, and the one way to ask for them.

The core (inspect, validate, diff, the registry, plain 16/32-bit merges on the CPU) needs
NumPy and no torch. Everything that computes with torch asks for it here, so a missing extra is
one clear error (exit 4) naming what to install, not an ImportError:

- ``torch``: compose, resize, ``merge --method``, DoRA and 4-bit merges, CUDA, legacy
  ``.bin`` adapters, ``demo``;
- ``nf4``: torch and bitsandbytes, for 4-bit bases and ``--quantize nf4`` (bitsandbytes'
  quantiser; a pure-torch one, bit for bit the same, stands in where it is missing).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from adapterctl.errors import MissingExtra

# module -> the extra that installs it
EXTRAS = {"torch": "torch", "bitsandbytes": "nf4"}


def require(module: str, purpose: str, *, extra: str | None = None) -> ModuleType:
    """Import an optional dependency, or explain which extra to install.

    Args:
        module: the top-level module, e.g. ``"torch"``.
        purpose: what needs it, for the message (``"compose"``, ``"a 4-bit merge"``).
        extra: the extra to name (default: the one that brings ``module``).

    Returns:
        The module.

    Raises:
        MissingExtra: it is not installed (exit 4).

    Example:
        >>> torch = require("torch", "compose")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name not in (None, module):
            raise  # the module is there but broken: not a missing extra
        raise missing(module, purpose, extra=extra) from None


def missing(module: str, purpose: str, *, extra: str | None = None) -> MissingExtra:
    """The error for an optional ``module`` that is not installed."""
    name = extra or EXTRAS.get(module, module)
    return MissingExtra(
        f"{purpose} needs {module}, which is not installed; "
        f"install it with: pip install 'adapterctl[{name}]'"
    )
