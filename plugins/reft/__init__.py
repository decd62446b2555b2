"""ReFT (representation fine-tuning: LoReFT, NoReFT, DiReFT) as a peftkit plugin.

This module is the entry point and stays torch-free; the modules live in ``layer.py``,
``units.py`` and ``batch.py`` and are imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["DiReftConfig", "LoReftConfig", "NoReftConfig", "ReftConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import DiReftMethod, LoReftMethod, NoReftMethod, ReftMethod

    register(ReftMethod())
    register(LoReftMethod())
    register(NoReftMethod())
    register(DiReftMethod())
