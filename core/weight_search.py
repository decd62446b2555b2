"""Gradient-free search for merge weights: CMA-ES over a small weight vector, with a budget of evaluations.

This is the search of LoraHub (Huang et al. 2023): each candidate weight vector is scored by an
``objective`` (a loss on a few examples, plus an L1 penalty the caller adds) and nothing is
differentiated, so a score may come from any forward pass. The evolution strategy is the ``cma``
package's (installed with ``pip install 'peftkit[auto]'``); it is imported only when a search runs.
This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import PeftkitError
from .progress import step_bar

#: Weights are searched in [-BOUND, BOUND] (LoraHub's range): negative weights subtract a member.
BOUND = 1.5


class SearchError(PeftkitError, ValueError):
    """A weight search cannot run (bad budget, the optimizer is not installed, ...)."""


@dataclass
class SearchResult:
    """The best weights seen, their objective value, how many evaluations ran, and each evaluation's value."""

    weights: list[float]
    value: float
    evaluations: int
    history: list[float] = field(default_factory=list)


def _optimizer() -> object:
    import warnings

    try:
        with warnings.catch_warnings():  # cma warns on import when matplotlib (for its plots) is missing
            warnings.simplefilter("ignore")
            import cma
    except ImportError:
        raise SearchError("the weight search needs the 'cma' package (CMA-ES); install it with "
                          "pip install 'peftkit[auto]'") from None
    return cma


def search_weights(objective: Callable[[list[float]], float], start: Sequence[float], *, budget: int,
                   also: Sequence[Sequence[float]] = (), sigma: float = 0.5, bound: float = BOUND, seed: int = 0,
                   progress: bool = True, desc: str = "searching weights") -> SearchResult:
    """Minimise ``objective`` over weight vectors in [-bound, bound]^k within ``budget`` evaluations.

    ``start`` and then the points ``also`` (as many as the budget allows) are evaluated first, so the
    result is never worse than any of them on the objective; CMA-ES then searches from ``start``. With
    one weight (CMA-ES needs at least two dimensions) a grid over [-bound, bound] is tried instead.
    """
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise SearchError(f"the search budget must be a positive number of evaluations, got {budget!r}")
    if not start:
        raise SearchError("the weight search needs at least one weight")
    history: list[float] = []
    best = SearchResult([float(w) for w in start], float("inf"), 0, history)
    bar = step_bar(budget, progress=progress, desc=desc, unit="eval")

    def evaluate(weights: Sequence[float]) -> float:
        point = [min(bound, max(-bound, float(w))) for w in weights]
        value = float(objective(point))
        history.append(value)
        best.evaluations += 1
        if value < best.value:
            best.weights, best.value = point, value
        bar.update(1)  # type: ignore[attr-defined]
        bar.set_postfix(best=f"{best.value:.4g}")  # type: ignore[attr-defined]
        return value

    try:
        evaluate(start)
        for point in list(also)[:budget - 1]:
            evaluate(point)
        if len(start) == 1:
            steps = max(budget - best.evaluations, 1)
            for i in range(budget - best.evaluations):
                evaluate([-bound + 2 * bound * (i + 1) / (steps + 1)])
            return best
        if best.evaluations >= budget:
            return best
        cma = _optimizer()
        strategy = cma.CMAEvolutionStrategy(  # type: ignore[attr-defined]
            list(start), sigma, {"bounds": [-bound, bound], "seed": seed + 1, "verbose": -9})
        while best.evaluations < budget and not strategy.stop():
            points = strategy.ask()
            if best.evaluations + len(points) > budget:
                for point in points[:budget - best.evaluations]:
                    evaluate(point)
                break
            strategy.tell(points, [evaluate(point) for point in points])
    finally:
        bar.close()  # type: ignore[attr-defined]
    return best
