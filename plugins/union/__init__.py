"""Unions: several tuning methods as one adapter (AdapterHub's ``ConfigUnion``, and its ``mam`` preset).

``model.add_adapter("mam", "prefix_tuning[num_virtual_tokens=30]|par_bn")`` adds one adapter made of a
prefix and a parallel bottleneck adapter: activated, trained, saved, pushed and composed by its one
name. ``mam`` spells He et al.'s "mix-and-match" adapter (arXiv 2110.04366) with AdapterHub's defaults, and
``unipelt`` Mao et al.'s gated union (arXiv 2110.07577) with AdapterHub's UniPELTConfig defaults.
This module is the entry point and stays torch-free.
"""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import MamConfig, UnionConfig, UniPeltConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["MamConfig", "UnionConfig", "UniPeltConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import MamMethod, UnionMethod, UniPeltMethod

    register(UnionMethod())
    register(MamMethod())
    register(UniPeltMethod())
