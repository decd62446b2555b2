"""Timing helpers shared by the benchmarks: interleaved repeats and medians, and
paired per-round ratios with their spread, because this machine is shared and noisy."""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median times of several functions, measured round-robin so that load
    changes on the machine hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Ratio:
    """A time ratio measured over paired rounds: the median of the per-round ratios and a 95%
    bootstrap interval of that median (``low``, ``high``)."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        """Half the width of the interval: the ``±`` printed after the median."""
        return (self.high - self.low) / 2

    def text(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ± {self.spread:.{digits}f}"


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median of ``values`` (seeded: the same values
    give the same interval)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


#: The clocks a benchmark can time with: wall time, or the CPU time of this process, which a
#: single-threaded run on a busy machine prefers (time spent waiting for a core is not counted).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn: Callable[[], object], calls: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls."""
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def warm_up(fn: Callable[[], object], tolerance: float = 0.05, most: int = 8,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Call ``fn`` until two consecutive calls take times within ``tolerance`` of each other (caches,
    allocator pools and lazily built kernels settled), at most ``most`` times; the last time."""
    previous = _timed(fn, 1, clock)
    for _ in range(most - 1):
        current = _timed(fn, 1, clock)
        if abs(current - previous) <= tolerance * min(current, previous):
            return current
        previous = current
    return previous


def paired_ratios(fns: dict[str, Callable[[], object]], reference: str, budget_s: float, *,
                  unit_s: float = 0.25, min_rounds: int = 5, max_rounds: int = 200, target_spread: float = 0.005,
                  clock: str | Callable[[], float] = "wall", seed: int = 0) -> tuple[dict[str, Ratio], float]:
    """Each function's time over ``reference``'s, as :class:`Ratio` s, and the reference's median
    seconds per call.

    Every round times each function once, back to back, in a shuffled order, and the ratio is taken
    within the round, so a load burst that hits one round changes that round's ratios only, and the
    median of the per-round ratios discards it. A timed unit is as many calls as make ``unit_s``
    seconds (at least one). The garbage collector is off while a round runs. Rounds continue until
    ``budget_s`` seconds have passed (at least ``min_rounds``, at most ``max_rounds``) or every
    interval is narrower than ``2 * target_spread``. ``clock``: a key of :data:`CLOCKS`, or a
    function returning seconds."""
    names = list(fns)
    if reference not in fns:
        raise ValueError(f"the reference {reference!r} is not one of the timed functions ({', '.join(names)})")
    read = CLOCKS[clock] if isinstance(clock, str) else clock
    calls = {name: max(1, round(unit_s / max(warm_up(fn, clock=read), 1e-9))) for name, fn in fns.items()}
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    reference_times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for done in range(1, max_rounds + 1):
        order = names[:]
        rng.shuffle(order)
        gc.collect()
        gc.disable()
        try:
            times = {name: _timed(fns[name], calls[name], read) for name in order}
        finally:
            gc.enable()
        for name in names:
            samples[name].append(times[name] / times[reference])
        reference_times.append(times[reference])
        if done < min_rounds:
            continue
        if time.perf_counter() > deadline or (done % 5 == 0 and all(
                r.spread < target_spread for r in _ratios(samples, reference).values())):
            break
    return _ratios(samples, reference), statistics.median(reference_times)


def _ratios(samples: dict[str, list[float]], reference: str) -> dict[str, Ratio]:
    out = {}
    for name, values in samples.items():
        low, high = (1.0, 1.0) if name == reference else median_interval(values)
        out[name] = Ratio(statistics.median(values), low, high, len(values))
    return out


def lm_train_step(model: Any, ids: Any) -> Callable[..., None]:
    """A causal-LM training step on ``ids`` (labels = inputs): forward, and backward unless
    ``backward=False``; gradients are dropped after each step."""
    def step(backward: bool = True) -> None:
        out = model(input_ids=ids, labels=ids)
        if backward:
            out.loss.backward()
            for p in model.parameters():
                p.grad = None
    return step


def lm_forward(model: Any, ids: Any, inference_mode: bool = True) -> Callable[[], None]:
    """An inference forward of ``model`` on ``ids``, in inference mode, or with gradients off only
    (``inference_mode=False``: torch's FLOP counter breaks on PEFT's adaption prompts in inference mode)."""
    def run() -> None:
        import torch

        with torch.inference_mode() if inference_mode else torch.no_grad():
            model(input_ids=ids)
    return run


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
