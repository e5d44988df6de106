"""Plugin hook definitions (and nothing else). Built-in features register through these too.

A ``register_<things>`` hook receives a ``register`` callback; call it once per thing you
provide (``plugins/README.md`` is the author's guide, held against these signatures by a
test)::

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


@hookspec
def register_merge_kernels(register: Callable[[Any], None]) -> None:
    """Register compiled merge kernels for the NumPy engine: objects with ``name``,
    ``description``, ``load()`` (the compiled module, or None where it is not available) and
    ``pays(isa, rank, cols)`` (whether it beats NumPy on a tensor of that summed rank and row
    length). The first-party ``adapterctl-fused`` plugin (``plugins/adapterctl-fused``) is one;
    the engine's use of it is described in ``adapterctl.merge.numpy_engine``."""


@hookspec
def register_remotes(register: Callable[[Any], None]) -> None:
    """Register remotes that BASEs (and SOURCEs) may name as ``<scheme>://…``: objects with
    ``scheme`` (``hf``), ``name``, ``description`` and ``open_base(ref, *, token,
    needs_weights)`` returning a ``Checkpoint`` read from headers only (see
    ``adapterctl.checkpoint.open_base``). The built-in Hugging Face Hub remote
    (``adapterctl.hub.plugin``) is one."""


@hookspec
def register_writers(register: Callable[[Any], None]) -> None:
    """Register adapter writers, the formats ``adapterctl convert --to NAME`` writes: objects
    with ``name``, ``description`` and ``write(adapter, out, *, force)`` returning the path
    written (see ``adapterctl.formats.AdapterWriter``). The built-in PEFT-folder writer
    (``adapterctl.formats.peft``) is one."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``adapterctl`` command line: ``cli`` is its click group (use
    ``@cli.command(...)`` or ``cli.add_command``). A command should stay a skin over a
    library call (parse, one call, render) and raise ``adapterctl.errors`` exceptions for
    bad input, which the command line turns into one-line errors and exit codes."""
