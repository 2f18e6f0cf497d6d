"""Plugin hooks. Every hook gets a `register` callback, so plugins never import registries."""

import pluggy

hookspec = pluggy.HookspecMarker("exlcore")
hookimpl = pluggy.HookimplMarker("exlcore")


@hookspec
def register_architectures(register):
    """Call register(spec) for each exlcore.spec.ArchitectureSpec the plugin provides."""


@hookspec
def register_chat_templates(register):
    """Call register(name, jinja_source) for fallback prompt formats (used by `exl chat --mode`)."""


@hookspec
def register_commands(subparsers):
    """Add subcommands to the `exl` CLI: subparsers is argparse's; set `func` with set_defaults."""
