"""LoRA (with rsLoRA, DoRA, PiSSA and OLoRA) as a peftkit plugin."""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import LoraConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["LoraConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import LoraMethod

    register(LoraMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """LoRA's default targets, added to each family's spec (the core's table has the insertion points)."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"lora": targets}))
