"""FourierFT (a weight change from a few trained spectral coefficients, arXiv 2405.03003) as a peftkit plugin,
in Hugging Face PEFT's file format.

This module is the entry point and stays torch-free; the module lives in
``layer.py`` and is imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import FourierFTConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["FourierFTConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import FourierFTMethod

    register(FourierFTMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """FourierFT's own default targets where PEFT's differ from LoRA's (GPT-2: the feed-forward output)."""
    from peftkit.plugin_api import ArchitectureSpec

    from .method import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"fourierft": targets}))
