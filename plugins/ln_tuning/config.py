"""LN tuning's config (torch-free), with PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError


@dataclass
class LNTuningConfig(AdapterConfig):
    """LayerNorm tuning (PEFT's ``LNTuningConfig``, arXiv 2312.11420): each targeted module, normally a
    normalization layer, is replaced by a trainable copy of itself; nothing else changes. A few thousand
    parameters on a large model, and no added computation.

    target_modules: None takes the architecture's normalization layers (PEFT's table; the BERT family's
      ``LayerNorm`` modules too); any module with parameters may be named.
    """

    method: ClassVar[str] = "ln_tuning"

    def check(self) -> None:
        if self.layers_to_transform is not None:
            raise ConfigError(f"ln_tuning: layers_to_transform={self.layers_to_transform!r} is not available (PEFT's "
                              f"LN tuning has no such field, so its folder could not say it); name the layers' "
                              f"modules in target_modules instead, e.g. a regex: "
                              f"target_modules=\".*layers\\.0\\..*norm\"")
