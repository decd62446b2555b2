"""rotate_blocks (peftkit/core/block_rotation.py, the plugin API): the blockwise product of OFT's and BOFT's
rotations, with small blocks multiplied in block-diagonal groups; values and gradients against the blockwise
product in float64."""

from __future__ import annotations

import pytest
import torch

from peftkit.plugin_api import rotate_blocks
from peftkit.core.block_rotation import group_size


def _blockwise(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    count, size, _ = matrices.shape
    return torch.cat([x[..., i * size:(i + 1) * size] @ matrices[i] for i in range(count)], dim=-1)


@pytest.mark.parametrize("count,size", [(12, 4), (6, 8), (5, 4), (7, 3), (4, 16), (2, 32), (9, 1), (3, 6)])
def test_values_and_gradients_equal_the_blockwise_product(count, size):
    generator = torch.Generator().manual_seed(count * size)
    x = torch.randn(2, 5, count * size, dtype=torch.float64, generator=generator, requires_grad=True)
    matrices = torch.randn(count, size, size, dtype=torch.float64, generator=generator, requires_grad=True)
    got, want = rotate_blocks(x, matrices), _blockwise(x, matrices)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    seed = torch.randn(got.shape, dtype=torch.float64, generator=generator)
    for have, expected in zip(torch.autograd.grad(got, (x, matrices), seed),
                              torch.autograd.grad(want, (x, matrices), seed)):
        torch.testing.assert_close(have, expected, rtol=1e-12, atol=1e-12)


def test_small_blocks_run_in_groups_up_to_sixteen_features_that_divide_the_count():
    sizes = [group_size(12, 4), group_size(5, 4), group_size(6, 8), group_size(7, 3), group_size(4, 16)]
    assert sizes == [4, 1, 2, 1, 1]
    assert group_size(10, 3) == 5 and group_size(64, 1) == 16


def test_one_shared_matrix_expanded_over_the_blocks_and_a_bfloat16_input():
    """OFT's block_share expands one rotation over all blocks (stride 0); a bfloat16 input is computed in the
    matrices' float32."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, 4, 4, generator=generator).expand(8, 4, 4)
    x = torch.randn(3, 32, generator=generator).to(torch.bfloat16)
    got = rotate_blocks(x, shared)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _blockwise(x.float(), shared))


def test_an_empty_batch_and_a_single_vector_keep_their_shapes():
    matrices = torch.randn(2, 32, 32)
    assert rotate_blocks(torch.randn(0, 5, 64), matrices).shape == (0, 5, 64)
    vector = torch.randn(64)
    torch.testing.assert_close(rotate_blocks(vector, matrices), _blockwise(vector, matrices))
