"""GLoRA (generalized LoRA) as a peftkit plugin, in Hugging Face PEFT's file format.

This module is the entry point and stays torch-free; the layer module lives in
``layer.py``, imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import GloraConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["GloraConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import GloraMethod

    register(GloraMethod())
