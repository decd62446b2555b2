"""(IA)^3 as a peftkit plugin, in Hugging Face PEFT's file format.

This module is the entry point and stays torch-free; the modules live in
``layer.py`` and are imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import IA3Config

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["IA3Config"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import IA3Method

    register(IA3Method())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """IA3's default targets and feed-forward modules, added to each family's spec."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import DEFAULT_TARGETS, FEEDFORWARD_KEY

    for model_type, (targets, feedforward) in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"ia3": targets, FEEDFORWARD_KEY: feedforward}))
