"""Loads plugins and calls their hooks (pluggy; the hooks are in ``adapterctl.hookspecs``).

Plugins come from three places, in this order: installed distributions (entry point group
``adapterctl``), the ``*.py`` files of the folder named by ``ADAPTERCTL_PLUGINS_DIR`` (one
plugin per file, named after it), and adapterctl's own modules (the built-ins, which register
through the same hooks as everyone else). Their hooks are called in that order, so a plugin's
format is tried before the built-in ones (the bare-safetensors reader, which takes any
``.safetensors``, always last). ``ADAPTERCTL_LOAD_PLUGINS`` selects the external ones: unset,
all of them; a comma-separated list of names, those; empty, none (built-ins only, as in CI).

A plugin that fails to load (an import error, a hook whose parameters do not match its spec, a
name already taken) is left out and recorded (``broken``) with a one-line reason: commands that
do not need it still run, the command line warns once, and ``adapterctl plugins`` lists it.
Two plugins registering things of one kind under the same ``name`` is an error naming both.

A built-in plugin module is imported when its hook is first called (``validate`` reads adapter
formats and never pays for the composition methods' option models); external plugins are
imported when the manager loads, so their modules must stay cheap to import (heavy parts
inside functions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from adapterctl import hookspecs
from adapterctl.errors import AdapterctlError, Conflict

# hook -> the built-in modules implementing it, in the order their items come
BUILTIN_PLUGINS: dict[str, tuple[str, ...]] = {
    "register_formats": (
        "adapterctl.formats.peft",
        "adapterctl.formats.mlx",
        "adapterctl.formats.bare",
    ),
    "register_writers": ("adapterctl.formats.peft",),
    "register_methods": ("adapterctl.methods.builtin",),
    "register_remotes": ("adapterctl.hub.plugin",),
}
_BUILTIN_NAMES = frozenset(m for mods in BUILTIN_PLUGINS.values() for m in mods)

# The hooks that take a ``register`` callback, and what ``adapterctl plugins`` calls their items.
REGISTER_HOOKS = {
    "register_formats": "formats",
    "register_writers": "writers",
    "register_methods": "methods",
    "register_merge_kernels": "merge kernels",
    "register_remotes": "remotes",
}


@dataclass
class PluginInfo:
    """One plugin as loaded (or not): where it came from, its version, and why it broke."""

    name: str
    source: str  # "built-in", "entry point <distribution>", or the plugin file's path
    version: str
    error: str | None = None  # one line: why it is not loaded
    registers: dict[str, list[str]] = field(default_factory=dict)  # kind -> names


_manager: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}  # external plugins, loaded or broken, in load order
_warned: set[str] = set()  # broken plugins already warned about


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use (built-ins: see ``collect``)."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("adapterctl")
        pm.add_hookspecs(hookspecs)
        wanted = os.environ.get("ADAPTERCTL_LOAD_PLUGINS")
        selected = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        if selected != set():
            _load_entry_points(pm, selected)
            folder = os.environ.get("ADAPTERCTL_PLUGINS_DIR")
            if folder:
                _load_folder(pm, Path(folder), selected)
        _manager = pm
    return _manager


def _add(pm: pluggy.PluginManager, name: str, source: str, load: Any) -> PluginInfo:
    """Load one external plugin (``load()`` returns its module or object) and register it
    under ``name``; a failure is recorded in its ``PluginInfo``, never raised."""
    if name in _infos and _infos[name].source == source:  # one distribution seen twice
        return _infos[name]
    taken = (
        _infos[name].source if name in _infos else "adapterctl" if name in _BUILTIN_NAMES else ""
    )
    if taken:
        info = PluginInfo(name, source, "?", f"the name is taken by {taken}; rename one of them")
        _infos[f"{name} ({source})"] = info
        return info
    info = _infos[name] = PluginInfo(name, source, "?")
    try:
        plugin = load()
        pm.register(plugin, name=name)
    except (Exception, SystemExit) as exc:  # a broken plugin must not look like our bug
        info.error = _one_line(exc)
        return info
    version = getattr(plugin, "__version__", None)
    info.version = version if isinstance(version, str) else "-"
    return info


def _one_line(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _load_entry_points(pm: pluggy.PluginManager, selected: set[str] | None) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="adapterctl"):
        if selected is not None and ep.name not in selected:
            continue
        dist = getattr(ep, "dist", None)
        info = _add(pm, ep.name, f"entry point {dist.name if dist else ep.value}", ep.load)
        if dist is not None and info.error is None:
            info.version = dist.version


def _load_folder(pm: pluggy.PluginManager, folder: Path, selected: set[str] | None) -> None:
    import importlib.util

    if not folder.is_dir():
        _infos["ADAPTERCTL_PLUGINS_DIR"] = PluginInfo(
            "ADAPTERCTL_PLUGINS_DIR", str(folder), "-", f"{folder}: no such folder"
        )
        return
    for path in sorted(folder.glob("*.py")):
        if selected is not None and path.stem not in selected:
            continue

        def load(path: Path = path) -> Any:
            spec = importlib.util.spec_from_file_location(f"adapterctl_plugin_{path.stem}", path)
            if spec is None or spec.loader is None:  # pragma: no cover - a .py always has one
                raise ImportError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module

        _add(pm, path.stem, str(path), load)


def _register_builtins(pm: pluggy.PluginManager, modules: tuple[str, ...]) -> None:
    import importlib

    for mod in modules:
        if pm.get_plugin(mod) is None:
            pm.register(importlib.import_module(mod), name=mod)


# Built-ins that take whatever the others do not (the bare-safetensors reader detects any
# ``.safetensors``): called last.
FALLBACKS = frozenset({"adapterctl.formats.bare"})


def _ordered(pm: pluggy.PluginManager, hook_name: str) -> list[str]:
    """The plugins implementing ``hook_name``: the external ones in the order they were
    loaded (entry points, then ``ADAPTERCTL_PLUGINS_DIR``), then the built-ins (in
    ``BUILTIN_PLUGINS`` order), the built-in ``FALLBACKS`` last."""
    _register_builtins(pm, BUILTIN_PLUGINS.get(hook_name, ()))
    hook: Any = getattr(pm.hook, hook_name)
    have = {impl.plugin_name for impl in hook.get_hookimpls()}
    builtins = [m for m in BUILTIN_PLUGINS.get(hook_name, ()) if m in have]
    loaded = [name for name, _ in pm.list_name_plugin() if name in have]
    first = [m for m in builtins if m not in FALLBACKS]
    last = [m for m in builtins if m in FALLBACKS]
    return [n for n in loaded if n not in builtins] + first + last


def _call(pm: pluggy.PluginManager, hook_name: str, plugin: str, **kwargs: Any) -> None:
    """Call one plugin's implementation of ``hook_name`` through pluggy."""
    others = [p for name, p in pm.list_name_plugin() if name != plugin]
    pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)


def collect(hook_name: str) -> list[Any]:
    """Call ``register_<things>`` on every plugin and return what they registered: the
    external plugins' in load order, then the built-ins' (``_ordered``).

    Raises:
        Conflict: two plugins registered things with the same ``name`` (both are named).
    """
    return [item for _, item in _collect(hook_name)]


def _collect(hook_name: str) -> list[tuple[str, Any]]:
    pm = manager()
    items: list[tuple[str, Any]] = []
    owners: dict[str, str] = {}
    kind = REGISTER_HOOKS.get(hook_name, hook_name.removeprefix("register_"))
    for plugin in _ordered(pm, hook_name):

        def register(item: Any, plugin: str = plugin) -> None:
            name = getattr(item, "name", None)
            if name is not None:
                if name in owners:
                    raise Conflict(
                        f"two plugins register {kind} {name!r}: {owners[name]} and {plugin}; "
                        "uninstall one of them"
                    )
                owners[name] = plugin
            items.append((plugin, item))

        try:
            _call(pm, hook_name, plugin, register=register)
        except AdapterctlError:
            raise
        except Exception as exc:
            if plugin in _BUILTIN_NAMES:
                raise
            _disable(pm, plugin, f"its {hook_name} raised {_one_line(exc)}")
            items[:] = [(p, item) for p, item in items if p != plugin]
            for name in [n for n, p in owners.items() if p == plugin]:
                del owners[name]
    return items


def _disable(pm: pluggy.PluginManager, plugin: str, why: str) -> None:
    """Unregister a plugin whose hook failed, and record why (warned like a failed load)."""
    pm.unregister(name=plugin)
    info = _infos.get(plugin) or PluginInfo(plugin, "registered in-process", "-")
    info.error = why
    _infos[plugin] = info


def add_commands(cli: Any, reserved: set[str]) -> list[str]:
    """Let every plugin add its commands to the click group ``cli`` (``register_commands``);
    each added command is marked with the plugin's name (``adapterctl_plugin``). Returns the
    names added.

    Args:
        cli: the ``adapterctl`` click group.
        reserved: the names of built-in commands (loaded or not).

    Raises:
        Conflict: a plugin's command takes the name of a built-in or another plugin's command
            (that command is not added).
    """
    pm = manager()
    added: list[str] = []
    for plugin in _ordered(pm, "register_commands"):
        before = dict(cli.commands)
        _call(pm, "register_commands", plugin, cli=cli)
        for name, command in list(cli.commands.items()):
            if before.get(name) is command:
                continue
            if name in reserved or name in before:
                if name in before:
                    cli.commands[name] = before[name]
                else:
                    del cli.commands[name]
                owner = "adapterctl" if name in reserved else _command_plugin(before[name])
                raise Conflict(
                    f"plugin {plugin} adds command {name!r}, which {owner} has; uninstall one "
                    "of them"
                )
            command.adapterctl_plugin = plugin
            added.append(name)
    return added


def broken() -> dict[str, str]:
    """The plugins that failed to load (name -> one-line reason), once the manager is loaded."""
    return {name: i.error for name, i in _infos.items() if i.error is not None}


def take_warnings() -> list[str]:
    """One line per broken plugin not warned about yet (the command line prints them)."""
    if _manager is None:
        return []
    lines = []
    for name, why in broken().items():
        if name not in _warned:
            _warned.add(name)
            lines.append(
                f"plugin {name} not loaded ({why}); fix or uninstall it, or leave it out with "
                "ADAPTERCTL_LOAD_PLUGINS"
            )
    return lines


def describe(cli: Any = None) -> list[PluginInfo]:
    """Every plugin, external ones first (load order), with what it registers of each kind
    (and, given the click group ``cli`` after ``add_commands``, the commands it added);
    broken ones carry their reason.

    Raises:
        Conflict: two plugins register the same name.
    """
    from adapterctl import __version__

    pm = manager()
    infos: dict[str, PluginInfo] = {}

    def info_of(plugin: str) -> PluginInfo:
        if plugin not in infos:
            infos[plugin] = _infos.get(plugin) or PluginInfo(plugin, "built-in", __version__)
            infos[plugin].registers = {}
        return infos[plugin]

    for hook_name, kind in REGISTER_HOOKS.items():
        for plugin, item in _collect(hook_name):
            label = getattr(item, "name", None) or getattr(item, "scheme", "?")
            info_of(plugin).registers.setdefault(kind, []).append(str(label))
    for name, command in sorted((cli.commands if cli is not None else {}).items()):
        owner = _command_plugin(command)
        if owner is not None:
            info_of(owner).registers.setdefault("commands", []).append(name)
    for loaded, _ in pm.list_name_plugin():
        if loaded:
            info_of(loaded)
    for key, info in _infos.items():
        if info.error is not None:
            infos[key] = info
    return sorted(infos.values(), key=lambda i: i.name in _BUILTIN_NAMES)


def _command_plugin(command: Any) -> str | None:
    return getattr(command, "adapterctl_plugin", None)


def plugin_names() -> list[str]:
    """Names of the loaded plugins, external ones first (load order), then the built-ins."""
    pm = manager()
    for modules in BUILTIN_PLUGINS.values():
        _register_builtins(pm, modules)
    names = [name for name, _ in pm.list_name_plugin() if name]
    return sorted(names, key=lambda n: n in _BUILTIN_NAMES)
