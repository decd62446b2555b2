"""pluggy hook specifications of peftkit.

A plugin is a module (or object) exposed through the ``peftkit`` entry-point
group. It declares the plugin-API version it was written for as the module
attribute ``PEFTKIT_PLUGIN_API`` and implements some of the hooks below with
``@peftkit.hookimpl``. Each hook receives a ``register`` callback; calling it
adds one thing. This keeps hook results out of pluggy's return-value plumbing
and lets one hook register many things (the llm/datasette style).
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT_NAME = "peftkit"

#: The plugin API this core implements. A plugin declaring another major
#: version is refused with a message naming the plugin and the fix.
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    """Register tuning methods: call ``register(method)`` with a :class:`peftkit.Method` instance."""


@hookspec
def peftkit_register_merge_strategies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register weight-space merge strategies: ``register(name, fn)``.

    ``fn(deltas, weights, **options)`` receives a list of dense delta tensors of
    one layer (one per adapter, same shape) and their weights, and returns the
    merged delta tensor.
    """


@hookspec
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """Register model families: ``register(ArchitectureSpec(...))`` with default
    target modules and insertion points for a transformers ``model_type``."""


@hookspec
def peftkit_register_hub_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register hub storage backends by URL scheme: ``register(scheme, factory)``.

    ``factory(url, **options)`` returns an object implementing
    :class:`peftkit.hub_client.backend.HubBackend` (push, resolve, list_files,
    download, search, info, delete); see docs/plugins.md.
    """


@hookspec
def peftkit_register_commands(cli: Any) -> None:
    """Add CLI commands: ``cli`` is the root ``click.Group``; call ``cli.command()`` or ``cli.add_command``."""
