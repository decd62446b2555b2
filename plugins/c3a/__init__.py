"""C3A (circular convolution adaptation, PEFT's C3A, arXiv 2407.19342) as a peftkit plugin, in Hugging Face
PEFT's file format.

This module is the entry point and stays torch-free; the module lives in
``layer.py`` and is imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import C3AConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["C3AConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import C3AMethod

    register(C3AMethod())
