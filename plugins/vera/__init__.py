"""VeRA (vector-based random matrix adaptation) and PVeRA (its probabilistic variant) as a peftkit plugin,
in Hugging Face PEFT's file format.

This module is the entry point and stays torch-free; the layer modules live in
``layer.py`` and ``pvera_layer.py`` and the projections in ``projections.py``,
imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import PveraConfig, VeraConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["PveraConfig", "VeraConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import PveraMethod, VeraMethod

    register(VeraMethod())
    register(PveraMethod())
