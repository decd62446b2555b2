"""AdaLoRA (adaptive-rank LoRA in SVD form) as a peftkit plugin, in Hugging Face PEFT's file format.

This module is the entry point and stays torch-free: the module lives in ``layer.py``, the rank
allocation in ``allocator.py`` and the Trainer callback in ``callback.py``, imported when used.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import AdaloraConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["AdaloraConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import AdaloraMethod

    register(AdaloraMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """AdaLoRA's default targets (PEFT's), added to each family's spec."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"adalora": targets}))
