"""LoRA's config (torch-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

from peftkit.plugin_api import AdapterConfig, ConfigError


@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adaptation: W x + (alpha / r) * B A x (arXiv 2106.09685).

    r: rank. alpha: scaling numerator (PEFT: lora_alpha). dropout: on the
    LoRA input. use_rslora: scale by alpha / sqrt(r) (arXiv 2312.03732).
    use_dora: weight-decomposed LoRA (arXiv 2402.09353). init_weights: True
    (B = 0, so the model starts equal to the base), "gaussian", or False
    (B random too; for tests). rank_pattern / alpha_pattern: per-module
    overrides, keys are regexes matched against the end of module names.
    """

    method: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_weights: Union[bool, Literal["gaussian"]] = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora config: r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora config: dropout={self.dropout} must be in [0, 1)")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"lora config: rank_pattern[{key!r}]={rank} must be positive")
        for field_name, patterns in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key in patterns:
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(f"lora config: {field_name} key {key!r} is not a valid regular expression "
                                      f"({exc}); keys are module names or regexes matched at the end of module "
                                      f"names, e.g. {{\"q_proj\": 16}}") from None
