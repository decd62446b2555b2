"""The comparison automatic composition reports: each member alone, the uniform average, each learned combination.

Strategies (``strategy=`` of :func:`peftkit.auto_compose`, ``--strategy`` of ``peftkit compose --auto``):

- ``weights``: CMA-ES over the weights of a linear merge of LoRA weight changes (LoraHub;
  :mod:`peftkit.core.weight_search`), gradient-free.
- ``mixture``: one weight per member over the members' outputs at every site, trained by gradient
  with the members frozen (:mod:`peftkit.learned_mixture`); any method with an output at a layer.
- ``fusion``: AdapterFusion over the members, trained by gradient with the members frozen.

Every row is scored on the held-out batches; its seconds include what it took to learn it. The uniform
average combines the members as the first (saved) strategy does: a weight-space merge whose members'
heads are averaged (weights), or ``average(...)``, which predicts with the first member's head (mixture,
fusion); for LoRA members only the heads can differ. With a
fresh head (a classifier on labels no member predicts), every row trains the same fresh head from
the same start for the same steps (members alone and the uniform average with their mixing fixed),
so the rows differ only in how the members are combined.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from peftkit.auto_compose_report import AutoComposeResult, Candidate, Row

if TYPE_CHECKING:  # pragma: no cover
    from peftkit.core.model import AdaptedModel
    from peftkit.learned_mixture import FreshHead

#: The strategies, in the order the report lists them.
STRATEGIES = ("weights", "mixture", "fusion")
#: What each strategy's row is called in the report.
ROW_NAMES = {"weights": "learned weights", "mixture": "learned mixture", "fusion": "learned fusion"}
#: The adapter name the weight search works on while it runs.
WORK_NAME = "auto_compose"


@dataclass
class Prepared:
    """The model with the kept members on it, the examples as batches, and the fresh head's labels (if any)."""

    model: "AdaptedModel"
    task: str
    candidates: list[Candidate]
    kept: list[Candidate]
    tokenizer: Any
    search_batches: list[dict[str, Any]]
    held_batches: list[dict[str, Any]]
    search_count: int
    held_count: int
    fresh_labels: list[str] | None = None


@dataclass
class Settings:
    """How the learned combinations are learned."""

    strategies: Sequence[str]
    budget: int
    l1: float
    steps: int
    lr: float
    seed: int
    progress: bool
    fusion_lr: float = 1e-3  # a fusion's d x d projections (and its fresh head) diverge at a mixture's lr


@dataclass
class Saved:
    """What the first strategy learned, to save: its composition (mixture, fusion) and its head's weights."""

    node: Any = None
    head_state: Any = None


def compare(prep: Prepared, settings: Settings) -> tuple[AutoComposeResult, Saved]:
    """Score every row of the report (see the module doc) and learn each strategy's combination."""
    from peftkit.core.composition import Average
    from peftkit.learned_mixture import FRESH_HEAD, FreshHead, score_node, train_head_only, with_head
    from peftkit.training_data import CLASSIFICATION_TASKS

    model, classification = prep.model, prep.task in CLASSIFICATION_TASKS
    names = [c.name for c in prep.kept]
    head = FreshHead(model, prep.fresh_labels, settings.seed) if prep.fresh_labels else None
    head_name = FRESH_HEAD if head is not None else None
    rows: list[Row] = []

    def fixed(kind: str, label: str, node: Any, weights: dict[str, float]) -> None:
        seconds = 0.0
        if head is not None:
            seconds = train_head_only(model, node, head, prep.search_batches, steps=settings.steps, lr=settings.lr,
                                      progress=settings.progress, desc=f"head for {label}")
        start = time.perf_counter()
        score = score_node(model, with_head(node, head_name), prep.held_batches, classification=classification)
        rows.append(Row(kind, label, weights, score.loss, score.accuracy, seconds + time.perf_counter() - start))

    for name in names:
        fixed("single", name, name, {name: 1.0})
    uniform = dict(zip(names, [1.0 / len(names)] * len(names)))
    if settings.strategies[0] == "weights":  # the uniform average combined as the saved strategy combines
        rows.append(_merged_uniform(prep, names, classification))
    else:
        fixed("uniform", "uniform average", Average(*names), uniform)

    result = AutoComposeResult(
        task=prep.task, members=prep.kept, left_out=[c for c in prep.candidates if c.left_out is not None],
        weights={}, rows=rows, examples=prep.search_count + prep.held_count, search_examples=prep.search_count,
        heldout_examples=prep.held_count, evaluations=0, seconds_per_evaluation=0.0, search_seconds=0.0,
        strategy=settings.strategies[0], fresh_head_labels=list(prep.fresh_labels) if prep.fresh_labels else None)
    saved = Saved()
    for strategy in settings.strategies:
        if strategy == "weights":
            weights = _search(prep, names, classification, settings, result)
            node = None
        else:
            weights, node = _train(prep, names, classification, settings, head, strategy, result)
        result.combinations[strategy] = weights
        if strategy == result.strategy:
            result.weights = weights
            saved = Saved(node, head.snapshot() if head is not None else None)
    if head is not None and saved.head_state is not None:
        head.restore(saved.head_state)
    model.set_active(None)
    return result, saved


def _merged_uniform(prep: Prepared, names: list[str], classification: bool) -> Row:
    from peftkit.core.merge_search import WeightedMerge

    merge = WeightedMerge(prep.model, names, _work_name(prep.model))
    uniform = [1.0 / len(names)] * len(names)
    start = time.perf_counter()
    try:
        score = merge.score(uniform, prep.held_batches, classification=classification)
    finally:
        merge.remove()
    return Row("uniform", "uniform average", dict(zip(names, uniform)), score.loss, score.accuracy,
               time.perf_counter() - start)


def _work_name(model: "AdaptedModel") -> str:
    return WORK_NAME if WORK_NAME not in model.adapters else WORK_NAME + "_work"


def _search(prep: Prepared, names: list[str], classification: bool, settings: Settings,
            result: AutoComposeResult) -> dict[str, float]:
    """CMA-ES over the weights of a linear merge on the search batches; adds its row to ``result``."""
    from peftkit.core.merge_search import WeightedMerge
    from peftkit.core.weight_search import BOUND, search_weights

    merge = WeightedMerge(prep.model, names, _work_name(prep.model))
    uniform = [1.0 / len(names)] * len(names)

    def objective(weights: list[float]) -> float:
        loss = merge.score(weights, prep.search_batches, classification=classification).loss
        return loss + settings.l1 * sum(abs(w) for w in weights) / len(weights)

    started = time.perf_counter()
    try:
        alone = [[1.0 if j == i else 0.0 for j in range(len(names))] for i in range(len(names))]
        found = search_weights(objective, uniform, also=alone if len(names) > 1 else (), budget=settings.budget,
                               seed=settings.seed, progress=settings.progress, desc=f"weighing {len(names)} adapters")
        search_seconds = time.perf_counter() - started
        start = time.perf_counter()
        score = merge.score(found.weights, prep.held_batches, classification=classification)
        seconds = time.perf_counter() - start
    finally:
        merge.remove()
    weights = dict(zip(names, found.weights))
    result.rows.append(Row("learned", ROW_NAMES["weights"], weights, score.loss, score.accuracy,
                           search_seconds + seconds, strategy="weights"))
    result.evaluations = found.evaluations
    result.search_seconds = search_seconds
    result.seconds_per_evaluation = search_seconds / max(found.evaluations, 1)
    result.settings.update({"bound": BOUND})
    return weights


def _train(prep: Prepared, names: list[str], classification: bool, settings: Settings, head: "FreshHead | None",
           strategy: str, result: AutoComposeResult) -> tuple[dict[str, float], Any]:
    """Train the mixture or the fusion (and the fresh head) on the search batches; adds its row to ``result``."""
    from peftkit.learned_mixture import score_node, train_fusion, train_mixture

    if strategy == "mixture":
        trained = train_mixture(prep.model, names, prep.search_batches, head=head, steps=settings.steps,
                                lr=settings.lr, l1=settings.l1, progress=settings.progress)
    else:
        trained = train_fusion(prep.model, names, prep.search_batches, head=head, steps=settings.steps,
                               lr=settings.fusion_lr, seed=settings.seed, progress=settings.progress)
    start = time.perf_counter()
    score = score_node(prep.model, trained.node, prep.held_batches, classification=classification)
    result.rows.append(Row("learned", ROW_NAMES[strategy], trained.weights, score.loss, score.accuracy,
                           trained.seconds + time.perf_counter() - start, strategy=strategy))
    result.train_losses[strategy] = trained.loss
    return trained.weights, trained.node
