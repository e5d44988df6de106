"""Loads plugins: the built-in ones first, then installed distributions (entry point group
``adapterctl``). ``ADAPTERCTL_LOAD_PLUGINS=""`` loads only the built-ins (useful in CI).

A built-in plugin module is imported when its hook is first collected (``validate`` reads
adapter formats and never pays for the composition methods' option models); third-party
plugins are imported when the manager loads (their entry points must stay cheap to import:
heavy parts inside functions)."""

from __future__ import annotations

import os
from typing import Any

import pluggy

from adapterctl import hookspecs
from adapterctl.errors import Conflict, OperationalError

_manager: pluggy.PluginManager | None = None

# hook -> the built-in modules implementing it, in the order their items come first
BUILTIN_PLUGINS: dict[str, tuple[str, ...]] = {
    "register_formats": ("adapterctl.formats.peft", "adapterctl.formats.bare"),
    "register_methods": ("adapterctl.methods.builtin",),
    "register_remotes": ("adapterctl.hub.plugin",),
}
_BUILTIN_NAMES = frozenset(m for mods in BUILTIN_PLUGINS.values() for m in mods)


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use (built-ins: see ``collect``)."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("adapterctl")
        pm.add_hookspecs(hookspecs)
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

    pm = manager()
    _register_builtins(pm, BUILTIN_PLUGINS.get(hook_name, ()))
    hook: Any = getattr(pm.hook, hook_name)
    # Built-ins first, then in registration order (pluggy's call order is the reverse).
    impls = sorted(hook.get_hookimpls(), key=lambda i: i.plugin_name not in _BUILTIN_NAMES)
    for impl in impls:
        impl.function(register=register)
    return items


def _register_builtins(pm: pluggy.PluginManager, modules: tuple[str, ...]) -> None:
    import importlib

    for mod in modules:
        if pm.get_plugin(mod) is None:
            pm.register(importlib.import_module(mod), name=mod)


def plugin_names() -> list[str]:
    """Names of the loaded plugins, built-ins first."""
    pm = manager()
    for modules in BUILTIN_PLUGINS.values():
        _register_builtins(pm, modules)
    names = [name for name, _ in pm.list_name_plugin() if name]
    return sorted(names, key=lambda n: n not in _BUILTIN_NAMES)
