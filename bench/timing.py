"""Timing helpers shared by the benchmarks: interleaved repeats and medians,
because this machine is shared and noisy."""

from __future__ import annotations

import statistics
import time
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


def lm_forward(model: Any, ids: Any) -> Callable[[], None]:
    """An inference forward of ``model`` on ``ids``."""
    def run() -> None:
        import torch

        with torch.inference_mode():
            model(input_ids=ids)
    return run


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
