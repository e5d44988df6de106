"""``validate``: rules that turn an adapter (and optionally a base) into findings with stable codes.

Every rule is a small function registered with a code, a severity and a one-line description
in ``RULES``; the codes never change meaning, so CI configurations and README links stay valid.
One module per family:

- ``structure``: ``AC1xx``, the adapter's own files and config.
- ``base``: ``AC2xx``, compatibility with a base checkpoint (only with one).
- ``vllm`` (AC30x) and ``llama_cpp`` (AC31x): a serving target's restrictions. Each of these
  rules cites the source file (and the upstream commit it was read at) of the rule it encodes.

``core`` holds the framework (``Rule``, ``Finding``, ``ValidationReport``, the registry and the
``validate`` runner); ``context`` what the rules look at. Importing this package registers
every family, in code order.
"""

from __future__ import annotations

# Imported for their effect: each family registers its rules in RULES.
from adapterctl.validate import base, llama_cpp, structure, vllm  # noqa: F401
from adapterctl.validate.core import (
    RULES,
    SERVING_TARGETS,
    VLLM_MAX_LORA_RANKS,
    Finding,
    Rule,
    ValidationReport,
    require_fit,
    rules_markdown,
    skip_reason,
    validate,
)

__all__ = [
    "RULES",
    "SERVING_TARGETS",
    "VLLM_MAX_LORA_RANKS",
    "Finding",
    "Rule",
    "ValidationReport",
    "require_fit",
    "rules_markdown",
    "skip_reason",
    "validate",
]
