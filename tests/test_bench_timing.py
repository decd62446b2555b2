"""The statistics of bench/timing.py's paired rounds, on a simulated clock (no real timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from timing import median_interval, paired_ratios, Ratio  # noqa: E402


class SimulatedClock:
    """A clock that only the timed functions move: each call of a function adds its cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def costing(self, costs: list[float]):
        """A function whose calls cost ``costs`` in turn (the last one repeated)."""
        calls = iter(costs)
        last = costs[-1]

        def fn() -> None:
            nonlocal last
            last = next(calls, last)
            self.now += last
        return fn


def test_the_ratio_is_taken_within_each_round_so_a_burst_moves_one_round_only():
    clock = SimulatedClock()
    # warm-up: 2 calls each (they agree), then one call per round; round 3 is slowed 5x for both.
    base = clock.costing([1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0])
    adapted = clock.costing([1.1, 1.1, 1.1, 1.1, 5.5, 1.1, 1.1, 1.1, 1.1])
    ratios, base_seconds = paired_ratios({"base": base, "adapted": adapted}, "base", budget_s=0.0,
                                         unit_s=0.5, min_rounds=7, clock=clock)
    assert ratios["adapted"].median == pytest.approx(1.1)
    assert ratios["adapted"].spread == pytest.approx(0.0)
    assert ratios["adapted"].rounds == 7
    assert ratios["base"] == Ratio(1.0, 1.0, 1.0, 7)
    assert base_seconds == pytest.approx(1.0)  # the median, not the mean the burst would pull up


def test_a_timed_unit_is_as_many_calls_as_make_unit_seconds():
    clock = SimulatedClock()
    counts = {"base": 0, "other": 0}

    def counted(name: str, cost: float):
        def fn() -> None:
            counts[name] += 1
            clock.now += cost
        return fn

    paired_ratios({"base": counted("base", 0.1), "other": counted("other", 0.4)}, "base", budget_s=0.0,
                  unit_s=0.4, min_rounds=5, clock=clock)
    # two warm-up calls each, then 4 calls (base) and 1 call (other) per round
    assert counts == {"base": 2 + 5 * 4, "other": 2 + 5 * 1}


def test_median_interval_holds_the_median_and_is_reproducible():
    values = [1.0, 1.02, 0.99, 1.05, 1.01, 1.3, 1.0, 0.98, 1.03]
    low, high = median_interval(values)
    assert low <= sorted(values)[len(values) // 2] <= high
    assert (low, high) == median_interval(values)
    assert median_interval([2.0] * 5) == (2.0, 2.0)
    assert Ratio(1.081, 1.07, 1.094, 9).text(3) == "1.081 ± 0.012"


def test_an_unknown_reference_is_refused_by_name():
    with pytest.raises(ValueError, match="'base' is not one of the timed functions"):
        paired_ratios({"a": lambda: None}, "base", budget_s=0.0)
