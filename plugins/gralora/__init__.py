"""GraLoRA (granular low-rank adaptation, PEFT's GRALORA, arXiv 2505.20355) as a peftkit plugin, in Hugging Face
PEFT's file format.

This module is the entry point and stays torch-free; the module lives in
``layer.py`` and is imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import GraloraConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["GraloraConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import GraloraMethod

    register(GraloraMethod())
