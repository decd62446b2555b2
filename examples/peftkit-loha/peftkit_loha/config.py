"""LoHa's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, option, ConfigError


@dataclass
class LohaConfig(AdapterConfig):
    """Low-rank Hadamard product: W x + s * ((A1 B1) * (A2 B2)) x, s = alpha / r.

    r: rank of each of the two factors (the update's rank can reach r**2).
    alpha: scaling numerator. rank_dropout: during training, drop rows of the
    update with this probability (survivors rescaled). module_dropout: during
    training, skip the whole update of a layer with this probability.
    init_weights: True starts B2 at zero, so the model starts equal to the
    base; False initializes every factor at random (for tests).
    rank_pattern / alpha_pattern: per-module overrides; keys are regexes
    matched against the end of module names (PEFT's rule).
    """

    method: ClassVar[str] = "loha"

    r: int = option(8, help="rank of each of the two factors (the update's rank can reach r**2)")
    alpha: float = option(8, help='scaling numerator: the update is scaled by alpha / r')
    rank_dropout: float = option(
        0.0, help='during training, drop rows of the update with this probability (survivors rescaled)')
    module_dropout: float = option(0.0, help="during training, skip a layer's whole update with this probability")
    init_weights: bool = option(
        True, help='true starts B2 at zero (the model equals the base); false draws every factor at random (for tests)')
    rank_pattern: dict[str, int] = option(
        default_factory=dict, help='per-module rank overrides: regex keys matched at the end of module names')
    alpha_pattern: dict[str, float] = option(
        default_factory=dict, help='per-module alpha overrides: regex keys matched at the end of module names')

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"loha config: r={self.r} must be a positive integer")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"loha config: {key}={value} must be in [0, 1)")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"loha config: rank_pattern[{key!r}]={rank} must be a positive integer")
