"""Loads plugins: the built-in ones first, then installed distributions (entry point group
``adapterctl``). ``ADAPTERCTL_LOAD_PLUGINS=""`` loads only the built-ins (useful in CI)."""

from __future__ import annotations

import os
from typing import Any

import pluggy

from adapterctl import hookspecs
from adapterctl.errors import Conflict, OperationalError

_manager: pluggy.PluginManager | None = None

BUILTIN_PLUGINS = (
    "adapterctl.formats.peft",
    "adapterctl.formats.bare",
    "adapterctl.methods.builtin",
)


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    if _manager is None:
        import importlib

        pm = pluggy.PluginManager("adapterctl")
        pm.add_hookspecs(hookspecs)
        for mod in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(mod), name=mod)
        if os.environ.get("ADAPTERCTL_LOAD_PLUGINS", None) != "":
            try:
                pm.load_setuptools_entrypoints("adapterctl")
            except Exception as exc:  # a broken third-party plugin must not look like our bug
                raise OperationalError(f"failed to load a plugin: {exc}; uninstall it") from exc
        _manager = pm
    return _manager


def collect(hook_name: str) -> list[Any]:
    """Call ``register_<things>`` on every plugin and return what they registered, in order.

    Raises:
        Conflict: two plugins registered things with the same ``name``.
    """
    items: list[Any] = []
    names: dict[str, Any] = {}

    def register(item: Any) -> None:
        name = getattr(item, "name", None)
        if name is not None:
            if name in names:
                raise Conflict(
                    f"two plugins register {hook_name.removeprefix('register_')} {name!r}; "
                    "uninstall one of them"
                )
            names[name] = item
        items.append(item)

    hook: Any = getattr(manager().hook, hook_name)
    # In registration order (pluggy's call order is the reverse): built-ins first.
    for impl in hook.get_hookimpls():
        impl.function(register=register)
    return items


def plugin_names() -> list[str]:
    """Names of the loaded plugins, built-ins included."""
    return [name for name, _ in manager().list_name_plugin() if name]
