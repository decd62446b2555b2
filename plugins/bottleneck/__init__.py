"""Bottleneck adapters (seq_bn, double_seq_bn, par_bn; Compacter; MAD-X's invertible adapters) as a peftkit plugin.

This module is the entry point and stays torch-free; the modules live in
``layer.py`` and are imported only when an adapter is created.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import (BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig,
                     DoubleSeqBnInvConfig, ParBnConfig, SeqBnConfig, SeqBnInvConfig)

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["BottleneckConfig", "CompacterConfig", "CompacterPlusPlusConfig", "DoubleSeqBnConfig",
           "DoubleSeqBnInvConfig", "ParBnConfig", "SeqBnConfig", "SeqBnInvConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import (CompacterMethod, CompacterPlusPlusMethod, DoubleSeqBnInvMethod, DoubleSeqBnMethod,
                         ParBnMethod, SeqBnInvMethod, SeqBnMethod)

    register(SeqBnMethod())
    register(DoubleSeqBnMethod())
    register(ParBnMethod())
    register(CompacterMethod())
    register(CompacterPlusPlusMethod())
    register(SeqBnInvMethod())
    register(DoubleSeqBnInvMethod())


@hookimpl
def peftkit_register_architectures(register: Callable[[Any], None]) -> None:
    from .embedding_points import embedding_point_specs
    from .residual_points import residual_point_specs

    for spec in residual_point_specs() + embedding_point_specs():
        register(spec)
