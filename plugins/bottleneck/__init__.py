"""Bottleneck adapters (seq_bn, double_seq_bn, par_bn) as a peftkit plugin.

This module is the entry point and stays torch-free; the modules live in
``layer.py`` and are imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import BottleneckConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["BottleneckConfig", "DoubleSeqBnConfig", "ParBnConfig", "SeqBnConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import DoubleSeqBnMethod, ParBnMethod, SeqBnMethod

    register(SeqBnMethod())
    register(DoubleSeqBnMethod())
    register(ParBnMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    from .residual_points import residual_point_specs

    for spec in residual_point_specs():
        register(spec)
