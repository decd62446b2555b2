"""The built-in merge strategies on small hand-made task vectors, against values worked out by hand
(the papers' formulas): task arithmetic, magnitude trimming with ties at the threshold, the exact
k-th largest on both of its paths, DARE's drop-and-rescale in PEFT's draw order, and TIES' sign
election (total and frequency, a zero sum electing +) with its disjoint mean."""

from __future__ import annotations

import pytest
import torch

from peftkit.core import merge_strategies as ms

D1 = torch.tensor([1.0, -2.0, 3.0, 0.0, 2.0])
D2 = torch.tensor([-3.0, 1.0, 1.0, 0.0, -2.0])


def test_linear_is_the_weighted_sum():
    torch.testing.assert_close(ms.linear([D1, D2], [0.5, -2.0]), 0.5 * D1 - 2.0 * D2)
    torch.testing.assert_close(ms.linear([D1], [3.0]), 3.0 * D1)
    with pytest.raises(AssertionError):
        ms.linear([], [])


def test_trim_keeps_the_largest_magnitudes_and_every_tie_at_the_threshold():
    t = torch.tensor([[3.0, -1.0], [0.5, -4.0]])
    torch.testing.assert_close(ms.trim_by_magnitude(t, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    torch.testing.assert_close(ms.trim_by_magnitude(t, 0.75), torch.tensor([[3.0, -1.0], [0.0, -4.0]]))
    assert ms.trim_by_magnitude(t, 1.0) is t and ms.trim_by_magnitude(t, 1.5) is t
    torch.testing.assert_close(ms.trim_by_magnitude(t, 0.2), torch.zeros(2, 2))  # int(0.8) = 0 kept
    tied = torch.tensor([2.0, -2.0, 1.0, 0.0])
    torch.testing.assert_close(ms.trim_by_magnitude(tied, 0.25), torch.tensor([2.0, -2.0, 0.0, 0.0]))


@pytest.mark.parametrize("bins", [2048, 4], ids=["kthvalue", "buckets"])
def test_kth_largest_is_exact_with_duplicates(bins):
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 20, (80,), generator=generator).float() / 4  # many ties, n >= 16 * 4
    descending = values.sort(descending=True).values
    for k in range(1, values.numel() + 1):
        assert ms.kth_largest(values, k, bins=bins) == descending[k - 1], k
    for bad in (0, values.numel() + 1):
        with pytest.raises(ValueError, match=f"k must be between 1 and 80, not {bad}"):
            ms.kth_largest(values, bad, bins=bins)


def test_kth_largest_of_all_zeros_on_the_bucket_path():
    assert ms.kth_largest(torch.zeros(64), 5, bins=4) == 0


def test_drop_at_random_keeps_entries_with_the_generators_draws_and_rescales():
    t = torch.arange(1.0, 41.0)
    assert ms.drop_at_random(t, 1.0) is t
    torch.testing.assert_close(ms.drop_at_random(t, 0.0), torch.zeros(40))
    torch.testing.assert_close(ms.drop_at_random(t, -0.5), torch.zeros(40))
    mask = torch.bernoulli(torch.full((40,), 0.25), generator=torch.Generator().manual_seed(7))
    assert 0 < mask.sum() < 40
    dropped = ms.drop_at_random(t, 0.25, torch.Generator().manual_seed(7))
    torch.testing.assert_close(dropped, t * mask * 4.0)


def test_ties_total_sign_election_and_disjoint_mean_by_hand():
    # column:       0     1      2      3    4
    # D1:           1    -2      3      0    2
    # D2:          -3     1      1      0   -2
    # sum:         -2    -1      4      0    0   -> elected: -, -, +, +, + (a zero sum elects +)
    # agreeing:    D2    D1    both   none  D1
    # weights 2, 0.5: -1.5, -4, (6 + 0.5) / 2, 0, 4
    merged = ms.ties([D1, D2], [2.0, 0.5], density=1.0)
    torch.testing.assert_close(merged, torch.tensor([-1.5, -4.0, 3.25, 0.0, 4.0]))


def test_ties_frequency_sign_election_by_hand():
    # signs sum: 0, 0, 2, 0, 0 -> every elected sign is +; agreeing: D1, D2, both, none, D1
    merged = ms.ties([D1, D2], [2.0, 0.5], density=1.0, majority_sign_method="frequency")
    torch.testing.assert_close(merged, torch.tensor([2.0, 0.5, 3.25, 0.0, 4.0]))
    with pytest.raises(ValueError, match="majority_sign_method must be 'total' or 'frequency', not 'most'"):
        ms.ties([D1, D2], [1.0, 1.0], density=1.0, majority_sign_method="most")


def test_ties_trims_before_electing():
    # density 0.4 keeps int(2.0) = 2 entries, and every entry tied with the 2nd largest magnitude
    trimmed1 = torch.tensor([0.0, -2.0, 3.0, 0.0, 2.0])
    trimmed2 = torch.tensor([-3.0, 0.0, 0.0, 0.0, -2.0])
    assert torch.equal(ms.trim_by_magnitude(D1, 0.4), trimmed1)
    assert torch.equal(ms.trim_by_magnitude(D2, 0.4), trimmed2)
    # sum: -3, -2, 3, 0, 0 -> elected -, -, +, +, +; agreeing: D2, D1, D1, none, D1
    torch.testing.assert_close(ms.ties([D1, D2], [1.0, 1.0], density=0.4), torch.tensor([-3.0, -2.0, 3.0, 0.0, 2.0]))
    torch.testing.assert_close(ms.magnitude_prune([D1, D2], [1.0, 0.5], density=0.4), trimmed1 + 0.5 * trimmed2)


def test_dare_strategies_draw_per_adapter_in_order_then_combine():
    t1, t2 = torch.arange(1.0, 21.0), -torch.arange(1.0, 21.0) * 0.5
    generator = torch.Generator().manual_seed(3)
    m1 = torch.bernoulli(torch.full((20,), 0.5), generator=generator)
    m2 = torch.bernoulli(torch.full((20,), 0.5), generator=generator)
    d1, d2 = t1 * m1 * 2, t2 * m2 * 2
    linear = ms.dare_linear([t1, t2], [1.0, 3.0], density=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(linear, d1 + 3.0 * d2)
    expected = ms.ties([d1, d2], [1.0, 3.0], density=1.0)
    dare_ties = ms.dare_ties([t1, t2], [1.0, 3.0], density=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(dare_ties, expected)
    frequency = ms.dare_ties([t1, t2], [1.0, 3.0], density=0.5, majority_sign_method="frequency",
                             generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(frequency, ms.ties([d1, d2], [1.0, 3.0], density=1.0, majority_sign_method="frequency"))


def test_the_plugin_registers_each_strategy_under_its_name():
    registered: dict[str, object] = {}
    ms.peftkit_register_merge_strategies(registered.__setitem__)
    assert registered == {"linear": ms.linear, "magnitude_prune": ms.magnitude_prune, "ties": ms.ties,
                          "dare_linear": ms.dare_linear, "dare_ties": ms.dare_ties}


def test_frequency_election_can_elect_minus():
    d1, d2, d3 = torch.tensor([1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([2.0, -1.0])
    # signs per column: (+, -, +) -> +; (-, -, -) -> -. Agreeing: d1, d3 | all three.
    merged = ms.ties([d1, d2, d3], [1.0, 1.0, 1.0], density=1.0, majority_sign_method="frequency")
    torch.testing.assert_close(merged, torch.tensor([1.5, -4.0 / 3]))


def test_float64_task_vectors_are_weighted_in_float64():
    d1, d2 = torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    merged = ms.ties([d1, d2], [0.1, 0.7], density=1.0)
    assert merged.dtype == torch.float64
    assert merged[0].item() == (0.1 * 1.0 + 0.7 * 2.0) / 2 and merged[1].item() == 0.1 * 3.0


def test_kth_largest_of_values_below_one_on_the_bucket_path():
    values = torch.linspace(0.01, 0.99, 99)
    assert ms.kth_largest(values, 10, bins=4) == values.sort(descending=True).values[9]
