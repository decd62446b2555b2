"""VB-LoRA (LoRA factors mixed from a shared vector bank, arXiv 2405.15179) as a peftkit plugin, in
Hugging Face PEFT's file format.

This module is the entry point and stays torch-free; the module lives in
``layer.py`` and is imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import VBLoRAConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["VBLoRAConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import VBLoRAMethod

    register(VBLoRAMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """VB-LoRA's own default targets where PEFT's differ from LoRA's (T5, BART, OPT: every projection)."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"vblora": targets}))
