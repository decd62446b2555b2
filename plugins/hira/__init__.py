"""HiRA (Hadamard high-rank adaptation, PEFT's HIRA, ICLR 2025) as a peftkit plugin, in Hugging Face PEFT's file
format.

This module is the entry point and stays torch-free; the layer modules live in ``layer.py``, imported only when
an adapter is created. HiRA's default targets are LoRA's (as in PEFT), taken through
``adaptable_targets(..., defaults_of="lora")``, so the plugin registers no architecture defaults of its own.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import HiraConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["HiraConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import HiraMethod

    register(HiraMethod())
