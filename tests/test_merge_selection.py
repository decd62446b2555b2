"""The exact k-th-largest selection behind magnitude trimming (TIES, magnitude_prune)."""

from __future__ import annotations

import pytest
import torch

from peftkit.core.merge_strategies import kth_largest, trim_by_magnitude


def _reference(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values, values.numel() - k + 1).values


@pytest.mark.parametrize("shape", [(512, 512), (1376, 512), (64, 64)])
@pytest.mark.parametrize("density", [1e-5, 0.2, 0.5, 0.9, 1.0])
def test_kth_largest_equals_kthvalue_on_lora_like_changes(shape: tuple[int, int], density: float) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    delta = torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen)
    magnitude = delta.abs().reshape(-1)
    k = max(1, int(density * magnitude.numel()))
    assert kth_largest(magnitude, k) == _reference(magnitude, k)


def test_kth_largest_with_repeated_values_zeros_and_extremes() -> None:
    values = torch.randint(0, 5, (300_000,), generator=torch.Generator().manual_seed(1)).float()
    for k in (1, 1000, 60_000, 150_000, 299_999, 300_000):
        assert kth_largest(values, k) == _reference(values, k)
    spiky = torch.zeros(200_000)
    spiky[7] = 1e30  # one huge value puts every other value in the lowest bucket
    spiky[100:5000] = torch.linspace(1e-8, 1.0, 4900)
    for k in (1, 2, 4901, 4902, 200_000):
        assert kth_largest(spiky, k) == _reference(spiky, k)
    assert kth_largest(torch.zeros(100_000), 10) == 0
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        kth_largest(torch.ones(4), 5)


def test_trim_keeps_the_largest_entries() -> None:
    delta = torch.randn(300, 400, generator=torch.Generator().manual_seed(2))
    trimmed = trim_by_magnitude(delta, 0.1)
    kept = trimmed != 0
    assert int(kept.sum()) == int(0.1 * delta.numel())
    assert delta.abs()[kept].min() >= delta.abs()[~kept].max()
    torch.testing.assert_close(trimmed[kept], delta[kept])
