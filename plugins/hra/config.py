"""HRA's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class HRAConfig(AdapterConfig):
    """Householder reflection adaptation: the layer runs with its weight times a chain of r Householder
    reflections, y = W H x + b with H = H_1 ... H_r and H_i = I - 2 u_i u_i^T / |u_i|^2 (arXiv 2405.17484).

    Field names and defaults are Hugging Face PEFT's ``HRAConfig``'s. The trained vectors u_i are the columns
    of PEFT's ``hra_u`` (in_features x r; in_channels * k * k x r on a Conv2d). apply_GS: orthonormalize the
    u_i first (Gram-Schmidt), H = I - 2 Q Q^T. init_weights: PEFT's symmetric init, the columns in equal
    pairs, so that each pair of reflections cancels and the model starts equal to the base; it needs an
    even r and apply_GS off (see docs/methods/hra.md). False starts from random vectors (for tests).
    """

    method: ClassVar[str] = "hra"

    r: int = option(8, help="number of Householder reflections per layer (even, for the symmetric init)")
    apply_GS: bool = option(False, help="orthonormalize the reflection vectors (Gram-Schmidt) before use")
    init_weights: bool = option(
        True, help="true: vectors in equal pairs, so the model starts as the base (even r); false: random")

    def check(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"hra config: r={self.r} must be a positive integer (an even one, e.g. r=8, for "
                              f"the init that starts at the base model)")
