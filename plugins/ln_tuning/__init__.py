"""LayerNorm tuning (PEFT's LN_TUNING) as a peftkit plugin: train a copy of each normalization layer.

This module is the entry point and stays torch-free; the module lives in
``layer.py`` and is imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import LNTuningConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["LNTuningConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import LNTuningMethod

    register(LNTuningMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """LN tuning's default targets (the normalization layers) for each family."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"ln_tuning": targets}))
