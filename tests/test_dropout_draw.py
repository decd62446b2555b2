"""core/dropout_draw.py: the CPU keep mask equals the one ``F.dropout`` draws, entry for entry, and leaves the
generator where ``F.dropout`` leaves it; where that equivalence fails the draw falls back to ``bernoulli_``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.core import dropout_draw
from peftkit.core.dropout_draw import cpu_keep_mask, rand_matches_bernoulli


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (512, 512), (3, 1001, 17)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_the_mask_is_the_one_dropout_draws_and_the_generator_moves_alike(dtype, shape, p):
    assert rand_matches_bernoulli()
    x = torch.ones(shape, dtype=dtype)
    torch.manual_seed(11)
    expected = F.dropout(x, p, training=True) != 0
    after_expected = torch.rand(3)
    torch.manual_seed(11)
    keep = cpu_keep_mask(x, 1 - p)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert torch.equal(keep, expected)
    assert torch.equal(torch.rand(3), after_expected)


def test_the_check_leaves_the_global_generator_alone():
    rand_matches_bernoulli.cache_clear()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    rand_matches_bernoulli()
    assert torch.equal(torch.rand(4), expected)


def test_a_torch_whose_draws_differ_falls_back_to_bernoulli(monkeypatch):
    """A torch whose bernoulli_ draws otherwise fails the check: the mask then comes from bernoulli_ itself."""
    rand_matches_bernoulli.cache_clear()
    original_rand = torch.rand
    monkeypatch.setattr(dropout_draw.torch, "rand", lambda *a, **k: 1 - original_rand(*a, **k))
    try:
        assert not rand_matches_bernoulli()
        x = torch.ones(300, 7)
        torch.manual_seed(3)
        expected = F.dropout(x, 0.4, training=True) != 0
        torch.manual_seed(3)
        assert torch.equal(cpu_keep_mask(x, 0.6), expected)
    finally:
        monkeypatch.undo()
        rand_matches_bernoulli.cache_clear()
