"""A block-diagonal matrix applied to row vectors, for methods that rotate a layer's input block by block.

OFT and BOFT multiply each block of ``b`` input features by its own (b, b) matrix: a batched product of
(tokens, b) by (b, b) matrices, one per block. With small blocks CPU BLAS runs such a batch far below its
speed, its cost set by the number of matrices rather than their arithmetic. :func:`rotate_blocks` then
multiplies ``GROUPED_WIDTH / b`` neighbouring blocks at once, by the block-diagonal matrix holding them
(zeros between them): more multiply-adds, in fewer, larger products. 512 tokens, 2 threads, float32, one
product over 512 features: blocks of 4 took 268 us one by one and 87 us in groups of 4; blocks of 8 187 and
89 us in pairs; blocks of 16 89 us as they are (1376 features: 698 -> 210, 480 -> 211, 209 us). The added
terms are products with zeros, so the result is the blockwise product's up to the order of float sums.
"""

from __future__ import annotations

import torch

#: The width of the block-diagonal groups :func:`rotate_blocks` forms from smaller blocks (measured best).
GROUPED_WIDTH = 16


def group_size(blocks: int, size: int) -> int:
    """How many neighbouring blocks of ``size`` features :func:`rotate_blocks` multiplies at once: the
    largest count up to ``GROUPED_WIDTH / size`` that divides the number of blocks (1 for blocks wider than
    ``GROUPED_WIDTH / 2`` features: a pair would be wider than the groups)."""
    group = max(1, GROUPED_WIDTH // size)
    while blocks % group:
        group -= 1
    return group


def rotate_blocks(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``x`` (..., n b) with its i-th block of b features multiplied on the right by ``matrices[i]`` (n, b, b)
    (row vectors: ``x_i @ R_i``), in the matrices' dtype. Differentiable in both; small blocks run in groups
    (module docstring)."""
    count, size, _ = matrices.shape
    group = group_size(count, size)
    if group > 1:  # [n, g, i, h, j] = R[n g + g', i, j] where g' = h, else 0
        eye = torch.eye(group, dtype=matrices.dtype, device=matrices.device)
        matrices = matrices.view(count // group, group, size, 1, size) * eye.view(1, group, 1, group, 1)
        count, size = count // group, group * size
        matrices = matrices.reshape(count, size, size)
    parts = x.to(matrices.dtype).reshape(x.numel() // x.shape[-1], count, size)  # no -1: a batch may be empty
    # One batched product over the blocks, reading the rows through a transposed view: the result is copied
    # back into the rows' layout once, where einsum also copied the rows into block-major order first.
    return torch.bmm(parts.transpose(0, 1), matrices).transpose(0, 1).reshape(x.shape)
