"""Prompt tuning and P-tuning (soft prompts) as a peftkit plugin (torch-free at import)."""

from __future__ import annotations

from typing import Any, Callable

from peftkit.plugin_api import PLUGIN_API_VERSION, hookimpl

from .config import PromptTuningConfig
from .p_tuning_config import PTuningConfig

PEFTKIT_PLUGIN_API = PLUGIN_API_VERSION

__all__ = ["PromptTuningConfig", "PTuningConfig"]


@hookimpl
def peftkit_register_methods(register: Callable[[Any], None]) -> None:
    from .method import PromptTuningMethod
    from .p_tuning_method import PTuningMethod

    register(PromptTuningMethod())
    register(PTuningMethod())
