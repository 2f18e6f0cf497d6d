"""The plugin manager: built-ins and third-party packages load through the `exlcore` entry-point group.

EXLCORE_PLUGINS, when set, is a comma-separated allow-list of entry-point names to load.
"""

import os
from functools import cache

import pluggy

from exlcore import hookspecs
from exlcore.errors import ExlError

GROUP = "exlcore"


@cache
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    allowed = os.environ.get("EXLCORE_PLUGINS")
    allowed = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    if allowed is None:
        pm.load_setuptools_entrypoints(GROUP)
    else:
        for name in allowed:
            pm.load_setuptools_entrypoints(GROUP, name=name)
    return pm


def _collect(hook) -> list[tuple[str, tuple]]:
    """Run a register-style hook once per plugin, remembering which plugin registered what."""
    found = []
    for impl in hook.get_hookimpls():  # in registration order (pluggy calls hooks in the reverse)
        impl.function(register=lambda *item, _name=impl.plugin_name: found.append((_name, item)))
    return found


def architectures() -> dict:
    """HF architecture string -> (ArchitectureSpec, plugin name). Later plugins override earlier ones."""
    table = {}
    for plugin, (spec,) in _collect(manager().hook.register_architectures):
        for name in spec.names:
            table[name] = (spec, plugin)
    return table


def chat_templates() -> dict[str, str]:
    return {name: source for _, (name, source) in _collect(manager().hook.register_chat_templates)}


def plugin_source(plugin_name: str) -> str:
    """The distribution (name and version) that provides a plugin, or 'registered at runtime'."""
    pm = manager()
    plugin = pm.get_plugin(plugin_name)
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return f"{dist.metadata['Name']} {dist.version}"
    return "registered at runtime"


def spec_for(architecture: str):
    table = architectures()
    if architecture not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ExlError(
            f"unknown architecture {architecture!r} (known: {known}); install a plugin package that "
            f"registers it under the '{GROUP}' entry-point group (see README, 'Adding an architecture')"
        )
    return table[architecture][0]
