"""BEFT (a trained bias vector added to each adapted Linear layer's output, PEFT's BEFT) as a peftkit plugin, in
Hugging Face PEFT's file format.

This module is the entry point and stays torch-free; the layer module lives in ``layer.py``, imported only
when an adapter is created. Its default targets are PEFT's (``defaults.py``: the value projections); a family
PEFT's BEFT names none for takes LoRA's (``adaptable_targets(..., defaults_of="lora")``).
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import BeftConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["BeftConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import BeftMethod

    register(BeftMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    """BEFT's default targets, added to each family's spec."""
    from peftkit.plugin_api import ArchitectureSpec

    from .defaults import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS.items():
        register(ArchitectureSpec(model_type, defaults={"beft": targets}))
