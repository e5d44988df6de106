"""Plugin hook definitions (and nothing else). Built-in features register through these too.

A hook receives a ``register`` callback; call it once per thing you provide::

    @hookimpl
    def register_formats(register):
        register(MyFormat())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("adapterctl")
hookimpl = pluggy.HookimplMarker("adapterctl")


@hookspec
def register_formats(register: Callable[[Any], None]) -> None:
    """Register adapter formats: objects with ``name``, ``description``, ``detect(path)`` and
    ``read(path, options)`` (see ``adapterctl.formats.AdapterFormat``)."""


@hookspec
def register_methods(register: Callable[[Any], None]) -> None:
    """Register composition methods: objects with ``name``, ``description``, ``reference``,
    ``options_model``, ``factored``, ``truncates`` and ``combine_dense(deltas, weights,
    options, generator)`` (see ``adapterctl.methods.Method``)."""
