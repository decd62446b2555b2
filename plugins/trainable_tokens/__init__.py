"""Trainable tokens (PEFT's TRAINABLE_TOKENS) as a peftkit plugin: train chosen rows of an embedding.

This module is the entry point and stays torch-free; the modules live in
``layer.py`` and are imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import TrainableTokensConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["TrainableTokensConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import TrainableTokensMethod

    register(TrainableTokensMethod())
