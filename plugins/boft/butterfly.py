"""How BOFT cuts a layer's features into rotation blocks and permutes them between factors (torch-free).

A layer's rotation is M = M_(m-1) ... M_1 M_0 over its ``features`` (a linear
layer's input features, a Conv2d's flattened filter), with
``M_i = P_i B_i P_i^T``: B_i block-diagonal (``block_num`` blocks of
``block_size``), P_i the butterfly permutation of factor i. P_i regroups the
features so that each block of factor i holds half a block from each of two
runs of features ``block_size * 2^(i-1)`` apart; P_0 is the identity. The
sizes and checks are Hugging Face PEFT's, so a file holds the same tensors in
both libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peftkit.plugin_api import ConfigError


@dataclass(frozen=True)
class Butterfly:
    """``factors`` block-diagonal factors of ``block_num`` blocks of ``block_size`` over ``features``."""

    features: int
    block_size: int
    block_num: int
    factors: int

    @classmethod
    def plan(cls, features: int, block_size: int, block_num: int, factors: int, where: str) -> "Butterfly":
        """PEFT's blocks for a layer with ``features`` rotated values; ConfigError naming ``where`` (the
        layer and what its features are) when the numbers do not fit, as PEFT refuses them."""
        extra = factors - 1  # the factors beyond the first, PEFT's (and the paper's) count
        if block_num:
            if features % block_num:
                raise ConfigError(f"boft: {where} ({features}) is not divisible by boft_block_num={block_num}; "
                                  f"choose a divisor of it, or set boft_block_size instead")
            if extra and (extra > int(math.log2(block_num)) or block_num % 2 ** extra):
                raise ConfigError(f"boft: boft_block_num={block_num} must be a multiple of 2^"
                                  f"{extra} for boft_n_butterfly_factor={factors} (at {where})")
            block_size = features // block_num
        else:
            span = block_size * 2 ** extra
            if features % block_size or features % span:
                raise ConfigError(f"boft: {where} ({features}) is not divisible by boft_block_size={block_size}"
                                  + (f" times 2^{extra} (boft_n_butterfly_factor={factors})" if extra else "")
                                  + "; choose a block size that divides it (or fewer butterfly factors)")
            block_num = features // block_size
        if extra and (block_num % 2 or block_size % 2):
            raise ConfigError(f"boft: with boft_n_butterfly_factor={factors} the number of blocks ({block_num}) "
                              f"and their size ({block_size}) must both be even (at {where})")
        return cls(features, block_size, block_num, factors)

    def permutation(self, factor: int) -> list[int]:
        """P_i as the list p with P_i[j, p[j]] = 1 (PEFT's convention).

        Factor i cuts the features into groups of ``block_size * 2^i``, each group into halves of
        blocks, and lists a group's even-numbered halves before its odd-numbered ones."""
        if self.factors == 1:
            return list(range(self.features))
        group = self.block_size * 2 ** factor
        half = self.block_size // 2
        halves = group // half
        order = [*range(0, halves, 2), *range(1, halves, 2)]
        within = [h * half + k for h in order for k in range(half)]
        return [start + j for start in range(0, self.features, group) for j in within]

    def rotation_shape(self) -> tuple[int, int, int, int]:
        """PEFT's ``boft_R``: one trained (block_size, block_size) matrix per block and factor."""
        return (self.factors, self.block_num, self.block_size, self.block_size)

    def rotation_parameter_count(self) -> int:
        return math.prod(self.rotation_shape())
