"""BOFT's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, ConfigError, option


@dataclass
class BoftConfig(AdapterConfig):
    """Butterfly orthogonal fine-tuning: y = s * (W (M x)) + b, M a product of butterfly-permuted
    block-diagonal rotations, s a trained per-output scale (arXiv 2311.06243).

    Field names and defaults are Hugging Face PEFT's ``BOFTConfig``'s.

    Each of the ``boft_n_butterfly_factor`` factors is a block-diagonal
    orthogonal matrix (blocks of ``boft_block_size``, or ``boft_block_num``
    blocks: set exactly one, the other to 0), the Cayley transform of a
    trained matrix's skew-symmetric part, conjugated by a butterfly
    permutation that lets factor i mix features 2^i blocks apart; with one
    factor BOFT is block-diagonal OFT. boft_dropout: during training, set this
    share of one randomly chosen factor's blocks to the identity (PEFT's
    multiplicative dropout). init_weights: False starts from random rotations
    and scales (for tests).
    """

    method: ClassVar[str] = "boft"

    boft_block_size: int = option(4, help='size of each rotation block (set this or boft_block_num, the other to 0)')
    boft_block_num: int = option(0, help='number of rotation blocks per layer (set this or boft_block_size, the other to 0)')
    boft_n_butterfly_factor: int = option(
        1, help='number of butterfly factors (1: block-diagonal OFT; each more doubles the reach of a block)')
    boft_dropout: float = option(
        0.0, help="during training, set this share of one random factor's blocks to the identity")
    init_weights: bool = option(
        True, help='true starts at the identity rotation and unit scale; false at random (for tests)')

    def check(self) -> None:
        if self.boft_block_size < 0 or self.boft_block_num < 0 \
                or (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(f"boft config: set exactly one of boft_block_size={self.boft_block_size} and "
                              f"boft_block_num={self.boft_block_num} to a positive integer and the other to 0")
        if self.boft_n_butterfly_factor < 1:
            raise ConfigError(f"boft config: boft_n_butterfly_factor={self.boft_n_butterfly_factor} must be at "
                              f"least 1 (1 is plain block-diagonal OFT)")
        if not 0.0 <= self.boft_dropout < 1.0:
            raise ConfigError(f"boft config: boft_dropout={self.boft_dropout} must be in [0, 1)")
