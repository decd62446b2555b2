"""RandLoRA's config (torch-free), with PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA: W x + (randlora_alpha / r) * B diag-scaled(A) x, full rank from random bases (arXiv 2502.00987).

    A (r, 1, min_dim) and B (max_dim, n, r) are frozen random bases shared by every layer of the adapter, with
    n = ceil(min_dim / r) bases so that the update can reach full rank; each layer trains ``randlora_lambda``
    (r, n) and ``randlora_gamma`` (n, min(in, out)), which scale the rows and columns of its slice of A. Unlike a
    LoRA rank, a smaller r gives more bases and more trainable parameters.

    projection_prng_key: the seed the bases are drawn from. save_projection: save the bases in the weights file
    (PEFT's keys: once per adapter and once per layer). sparse / very_sparse: ternary bases (-1, 0, 1; 1/6 or
    1/(2 sqrt(min_dim)) of each sign) instead of Kaiming-uniform ones. init_weights: true starts lambda at zero
    (the identity); false keeps PEFT's random lambda (for tests).
    """

    method: ClassVar[str] = "randlora"

    r: int = option(32, help='rank of each random basis; smaller r means more bases and more trainable parameters')
    randlora_alpha: float = option(640, help='scaling numerator: the update is scaled by randlora_alpha / r')
    randlora_dropout: float = option(0.0, help='dropout on the layer input of the update, in [0, 1)')
    projection_prng_key: int = option(0, help='seed the shared random bases are drawn from')
    save_projection: bool = option(
        True, help='save the bases in the weights file (without them a load redraws them from the seed)')
    sparse: bool = option(False, help='ternary sparse bases: -1 and 1 each with probability 1/6, else 0')
    very_sparse: bool = option(
        False, help='very sparse ternary bases: -1 and 1 each with probability 1/(2 sqrt(min_dim)); wins over sparse')
    init_weights: bool = option(
        True, help='true starts randlora_lambda at zero (the identity); false leaves it random (for tests)')

    def check(self) -> None:
        if isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"randlora config: r={self.r} must be a positive integer (the rank of each basis)")
        if not 0.0 <= self.randlora_dropout < 1.0:
            raise ConfigError(f"randlora config: randlora_dropout={self.randlora_dropout} must be in [0, 1)")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ConfigError(f"randlora config: projection_prng_key={self.projection_prng_key!r} must be an "
                              f"integer (the seed of the shared random bases)")
