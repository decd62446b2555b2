"""LLaMA-Adapter's adaption prompts (PEFT's ADAPTION_PROMPT) as a peftkit plugin, in Hugging Face PEFT's file
format.

This module is the entry point and stays torch-free; the module lives in ``layer.py`` and is imported only
when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import AdaptionPromptConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["AdaptionPromptConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import AdaptionPromptMethod

    register(AdaptionPromptMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """The attention module adaption prompts go into, for each model type PEFT supports."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import MODEL_TYPES

    for model_type, attention in MODEL_TYPES.items():
        register(ArchitectureSpec(model_type, defaults={"adaption_prompt": (attention.module,)}))
