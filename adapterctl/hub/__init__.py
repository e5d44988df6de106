"""Hugging Face Hub sync: publish registry versions (``push``), bring Hub adapters into the
registry (``pull``), publish ``-o hf://…`` outputs, and read Hub models as BASEs from their
headers only.

- ``sync``: push, pull, publish_folder, output (the commands' work).
- ``base``: ``hf://`` BASEs (``open_hub_base``, ``open_hub_checkpoint``, ``pin_hub_base``)
- ``plugin``: the Hub as a remote (hook ``register_remotes``): what ``checkpoint.open_base``
  calls for ``hf://`` BASEs.
- ``remote``: the ``hf://OWNER/NAME[@REV]`` grammar and ranged reads of a commit's files.
- ``client``: the one place that builds the client and maps its errors to exit codes.
- ``card``: the model cards a push writes.

Importing this package is cheap: its parts load on first use, and ``huggingface_hub`` only
when a request is made (``validate`` of a local base never loads it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapterctl.hub.remote import SCHEME, HubRef, is_hub_ref, parse_ref

if TYPE_CHECKING:
    from adapterctl.hub.sync import (
        Output,
        PullReport,
        PushReport,
        output,
        publish_folder,
        pull,
        push,
    )

_SYNC = ("Output", "PullReport", "PushReport", "output", "publish_folder", "pull", "push")

__all__ = [
    "SCHEME",
    "HubRef",
    "Output",
    "PullReport",
    "PushReport",
    "is_hub_ref",
    "output",
    "parse_ref",
    "publish_folder",
    "pull",
    "push",
]


def __getattr__(name: str) -> Any:
    if name in _SYNC:
        return getattr(importlib.import_module("adapterctl.hub.sync"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
