"""The Hugging Face Hub as a remote (hook ``register_remotes``): ``hf://`` BASEs open through
it. Importing this module is cheap; the Hub code loads when a ``hf://`` base is opened."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterctl.hookspecs import hookimpl

if TYPE_CHECKING:
    from adapterctl.checkpoint import Checkpoint


class HubRemote:
    """``hf://OWNER/NAME[@REV]``: a model on the Hugging Face Hub (``HF_ENDPOINT``)."""

    scheme = "hf"
    name = "hub"
    description = "Hugging Face Hub (hf://OWNER/NAME[@REV]; HF_ENDPOINT, HF_TOKEN)"

    def open_base(
        self, ref: str, *, token: str | None = None, needs_weights: str | None = None
    ) -> Checkpoint:
        """The Hub model ``ref`` as a BASE, from its headers only (``hub.base``)."""
        from adapterctl.hub.base import open_hub_base

        return open_hub_base(ref, token=token, needs_weights=needs_weights)


@hookimpl
def register_remotes(register: Any) -> None:
    """Register the Hub remote."""
    register(HubRemote())
