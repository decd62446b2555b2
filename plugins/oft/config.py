"""OFT's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.plugin_api import AdapterConfig, option, ConfigError


@dataclass
class OftConfig(AdapterConfig):
    """Orthogonal fine-tuning: the layer runs on a rotated input, W (R x) + b (arXiv 2306.07280).

    Field names and defaults are Hugging Face PEFT's ``OFTConfig``'s.

    R is block-diagonal: the layer's input features are cut into blocks of
    ``oft_block_size`` (or into ``r`` blocks; set exactly one of the two, the
    other to 0), each rotated by its own orthogonal matrix, the Cayley
    transform of a trained skew-symmetric one (all zero at init: R = I).
    use_cayley_neumann: approximate the Cayley transform's inverse by
    ``num_cayley_neumann_terms`` terms of its Neumann series (faster; R is
    then only nearly orthogonal). coft: the constrained variant, keeping each
    block's skew-symmetric matrix within norm ``eps`` of zero. block_share:
    one rotation shared by all blocks. module_dropout: during training, set
    this share of the blocks to the identity. init_weights: False starts from
    a random rotation (for tests).
    """

    method: ClassVar[str] = "oft"

    r: int = option(0, help='number of rotation blocks per layer (set this or oft_block_size, the other to 0)')
    oft_block_size: int = option(32, help='size of each rotation block (set this or r, the other to 0)')
    module_dropout: float = option(0.0, help='during training, set this share of the blocks to the identity')
    coft: bool = option(False, help="constrained OFT: keep each block's skew-symmetric matrix within norm eps of zero")
    eps: float = option(6e-5, help="with coft, the norm bound of each block's skew-symmetric matrix")
    block_share: bool = option(False, help='one rotation shared by all blocks of a layer')
    use_cayley_neumann: bool = option(
        True, help="approximate the Cayley transform's inverse by a Neumann series (faster, nearly orthogonal)")
    num_cayley_neumann_terms: int = option(5, help='number of Neumann series terms with use_cayley_neumann')
    init_weights: bool = option(
        True, help='true starts at the identity rotation; false from a random rotation (for tests)')

    def check(self) -> None:
        if self.r < 0 or self.oft_block_size < 0 or (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(f"oft config: set exactly one of r={self.r} (the number of blocks) and "
                              f"oft_block_size={self.oft_block_size} to a positive integer and the other to 0")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"oft config: module_dropout={self.module_dropout} must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"oft config: eps={self.eps} must be positive")
        if self.num_cayley_neumann_terms < 1:
            raise ConfigError(f"oft config: num_cayley_neumann_terms={self.num_cayley_neumann_terms} "
                              f"must be at least 1")
