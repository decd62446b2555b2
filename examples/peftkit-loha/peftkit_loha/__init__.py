"""LoHa (low-rank Hadamard product, arXiv 2108.06098) as a peftkit plugin.

This module is the plugin's entry point. peftkit imports it every time it
starts (``peftkit --help`` included), so it stays torch-free: the method
object is built inside the hook, and the torch code lives in ``layer.py``,
imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import hookimpl

from .config import LohaConfig

#: The peftkit plugin API this plugin is written for (see docs/plugins.md).
PEFTKIT_PLUGIN_API = 1

__all__ = ["LohaConfig", "PEFTKIT_PLUGIN_API"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import LohaMethod

    register(LohaMethod())
