"""bitsandbytes, imported quietly: the one place ``adapterctl.nf4`` imports it."""

from __future__ import annotations

import logging
from types import ModuleType


def functional() -> ModuleType:
    """``bitsandbytes.functional``, imported without its start-up warnings.

    On CPUs with AVX512-BF16, bitsandbytes 0.49+ tries at import to load an optional inference
    kernel from the Hub and logs a warning when it cannot (offline, or not trusted). We only
    quantise, which does not use that kernel, so the warning would be noise on the user's
    terminal.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    finally:
        log.setLevel(level)
    return functional
