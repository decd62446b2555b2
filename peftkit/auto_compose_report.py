"""What automatic composition reports and writes: the result, its table, the saved combination and its card.

The ``weights`` strategy's combination is the exact weighted sum of the members' weight changes
(``merge_adapters`` with ``linear``), saved as an ordinary LoRA folder; ``mixture`` and ``fusion``
are saved as a composition folder (``save_composition``: the members, the fusion, the fresh head's
adapter). The model card (README.md) and ``auto_compose.json`` record the members (hub id and commit,
or folder), the learned weights, the number of examples and the held-out metrics of every row.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .training_data import PIPELINE_TAGS

if TYPE_CHECKING:  # pragma: no cover
    from peftkit.core.model import AdaptedModel

#: The record written beside the merged adapter.
RECORD_FILE = "auto_compose.json"
#: The name of the merged adapter in the folder's config and card.
MERGED_NAME = "combined"


@dataclass
class Candidate:
    """A member considered: where it came from, the commit when from a hub, and why it was left out."""

    name: str
    source: str
    revision: str | None = None
    path: str | None = None
    left_out: str | None = None


@dataclass
class Row:
    """One line of the report: a candidate alone, the uniform average or the learned combination."""

    kind: str  # "single", "uniform" or "learned"
    name: str
    weights: dict[str, float]
    loss: float
    accuracy: float | None
    seconds: float
    strategy: str | None = None  # for a learned row: weights, mixture or fusion


@dataclass
class AutoComposeResult:
    """What automatic composition found: members used and left out, weights, the held-out report, outputs."""

    task: str
    members: list[Candidate]
    left_out: list[Candidate]
    weights: dict[str, float]
    rows: list[Row]
    examples: int
    search_examples: int
    heldout_examples: int
    evaluations: int
    seconds_per_evaluation: float
    search_seconds: float
    base_model: str | None = None
    out: str | None = None
    pushed: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    #: The strategy whose combination is saved (``weights`` holds its weights); the first one asked for.
    strategy: str = "weights"
    #: Every learned combination's weights by strategy (a fusion's: each member's mean attention share).
    combinations: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The labels of the fresh head trained with every row (None: the members' own heads predict).
    fresh_head_labels: list[str] | None = None
    #: The training loss at the end of each gradient-trained strategy.
    train_losses: dict[str, float] = field(default_factory=dict)

    @property
    def learned(self) -> Row:
        """The held-out row of the saved combination."""
        return next(r for r in self.rows if r.kind == "learned" and r.strategy == self.strategy)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: How the report names each strategy's learned numbers (the weights strategy's are a merge's weights).
_WEIGHTS_LABELS = {"weights": "merge weights", "mixture": "mixture weights", "fusion": "fusion attention"}


def format_report(result: AutoComposeResult) -> str:
    """The held-out table (one row per candidate, the uniform average, the learned combination), the
    learned weights, and the members left out with why."""
    from peftkit.cli_output import format_table

    rows = [[r.name, r.kind, f"{r.loss:.4f}", "-" if r.accuracy is None else f"{r.accuracy:.3f}",
             f"{r.seconds:.2f}"] for r in result.rows]
    trained = f"{result.search_examples} examples"
    if result.evaluations:
        trained += f", {result.evaluations} evaluations, {result.seconds_per_evaluation * 1000:.0f} ms each"
    lines = [f"held-out: {result.heldout_examples} examples; learned on {trained}", "",
             format_table(rows, ["COMBINATION", "KIND", "LOSS", "ACCURACY", "SECONDS"]), ""]
    for strategy, weights in result.combinations.items():
        label = _WEIGHTS_LABELS.get(strategy, f"{strategy} weights")
        lines.append(f"{label}: " + ", ".join(f"{name} {w:+.3f}" for name, w in weights.items()))
    if result.fresh_head_labels:
        lines.append(f"fresh head for labels: {', '.join(result.fresh_head_labels)}")
    lines += [f"left out {c.source}: {c.left_out}" for c in result.left_out]
    return "\n".join(lines)


def _member_source(candidate: Candidate) -> str:
    return f"{candidate.source}@{candidate.revision}" if candidate.revision else candidate.source


def card_description(result: AutoComposeResult) -> str:
    """The card's body text: how it was made, members with revisions and weights, examples, metrics."""
    count = len(result.members)
    steps = result.settings.get("steps")
    how = {"weights": f"A weighted linear merge of {count} LoRA adapters, weights learned by peftkit's automatic "
                      f"composition (CMA-ES, {result.evaluations} evaluations)",
           "mixture": f"A learned mixture of the outputs of {count} adapters (one weight per adapter, "
                      f"trained by gradient for {steps} steps with the adapters frozen) by peftkit's automatic "
                      f"composition",
           "fusion": f"An AdapterFusion over {count} adapters (trained by gradient for {steps} steps with the "
                     f"adapters frozen) by peftkit's automatic composition"}[result.strategy]
    column = "mean attention" if result.strategy == "fusion" else "weight"
    lines = [f"{how}, learned on {result.search_examples} examples and reported on {result.heldout_examples} "
             f"held-out examples.", ""]
    if result.fresh_head_labels:
        lines += [f"A fresh classification head for the labels {', '.join(result.fresh_head_labels)} was trained "
                  f"with it (adapter `fresh_head`).", ""]
    lines += [f"| member | {column} |", "| --- | --- |"]
    lines += [f"| `{_member_source(c)}` | {result.weights[c.name]:+.4f} |" for c in result.members]
    lines += ["", "| held-out | loss | accuracy |", "| --- | --- | --- |"]
    lines += [f"| {r.name} | {r.loss:.4f} | {'-' if r.accuracy is None else f'{r.accuracy:.3f}'} |"
              for r in result.rows]
    if result.left_out:
        lines += ["", "Left out: " + "; ".join(f"`{c.source}` ({c.left_out})" for c in result.left_out)]
    return "\n".join(lines)


def metrics(result: AutoComposeResult) -> dict[str, float]:
    """The learned combination's held-out metrics, for the card's model-index."""
    row = result.learned
    out = {"heldout_loss": row.loss}
    if row.accuracy is not None:
        out["heldout_accuracy"] = row.accuracy
    return out


def record_json(result: AutoComposeResult) -> str:
    """The ``auto_compose.json`` text: members (with revisions), weights, example counts, metrics, settings."""
    data = result.to_json()
    for key in ("out", "pushed"):
        data.pop(key, None)
    for member in data["members"] + data["left_out"]:
        member.pop("path", None)  # a cache folder on this machine means nothing elsewhere
    return json.dumps(data, indent=2) + "\n"


def save_result(model: "AdaptedModel", result: AutoComposeResult, out: Path, *, tokenizer: Any = None,
                merge: bool = False, node: Any = None) -> None:
    """Write the learned combination to ``out``: for the weights strategy a LoRA adapter folder (the exact
    weighted merge), for mixture and fusion the composition ``node`` as a composition folder; each with its
    card and record. With ``merge`` (weights, or a mixture of LoRA members), the base model with the
    weighted merge folded in, and a fresh head as its head: a plain transformers model."""
    from peftkit.core.fileio import apply_normal_modes, atomic_folder

    with atomic_folder(out) as tmp:
        if merge:
            model.merge_and_unload(_merged_stack(model, result, node)).save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        elif result.strategy != "weights":
            _save_composition(model, result, node, tmp, out.name)
        else:
            model.save_adapter(str(tmp), _merged(model, result), task=PIPELINE_TAGS.get(result.task),
                               metrics=metrics(result), description=card_description(result))
        (tmp / RECORD_FILE).write_text(record_json(result), encoding="utf-8")
        apply_normal_modes(tmp)


def _merged(model: "AdaptedModel", result: AutoComposeResult) -> str:
    """Put the weights strategy's merge on ``model`` as one adapter (with the head the search scored)."""
    from peftkit.core.merge_search import average_heads
    from peftkit.core.merging import merge_adapters

    names = [c.name for c in result.members]
    name = MERGED_NAME if MERGED_NAME not in model.adapters else MERGED_NAME + "_learned"
    merge_adapters(model, names, [result.weights[n] for n in names], name=name, strategy="linear",
                   modules_to_save=names[0])
    average_heads(model, names, [result.weights[n] for n in names], name)
    return name


def _merged_stack(model: "AdaptedModel", result: AutoComposeResult, node: Any) -> list[str]:
    """The adapters ``merge_and_unload`` folds in for ``merge``: the weights strategy's merge, or the saved
    composition's adapters as ``peftkit compose --merge`` folds them (``merge_order``: a mixture's average()
    becomes the exact weighted sum of its LoRA members, and a fresh head's head-only adapter, stacked
    last, gives the model its head and labels)."""
    from peftkit.core.merging import merge_order

    return [_merged(model, result)] if result.strategy == "weights" else merge_order(model, node)


def _save_composition(model: "AdaptedModel", result: AutoComposeResult, node: Any, folder: Path, name: str
                      ) -> None:
    """The composition folder's files in ``folder`` (written by save_composition beside, then moved in),
    and a README.md card describing the combination."""
    import shutil

    from peftkit.core.card import card_metadata, render_card

    staging = folder / ".composition"
    model.save_composition(str(staging), node)
    for item in staging.iterdir():
        shutil.move(str(item), str(folder / item.name))
    staging.rmdir()
    task = PIPELINE_TAGS.get(result.task)
    meta = card_metadata(method=result.strategy, base_model=result.base_model, peft_format=False, task=task,
                         metrics=metrics(result), tags=["composition", "auto-compose"], name=name)
    card = render_card(meta, method=result.strategy, adapter_name=name, metrics=metrics(result),
                       description=card_description(result) + f"\n\nComposition: `{node}`")
    (folder / "README.md").write_text(card, encoding="utf-8")


def push_result(result: AutoComposeResult, repo_id: str, *, hub: Any = None, token: str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Publish the saved folder as ``repo_id`` with its card's text (the push keeps the description peftkit wrote
    into the folder's card, with its composition line) and the result's metrics; returns the push result."""
    from peftkit.hub_client.api import push

    if result.out is None:
        raise ValueError("push_result needs a saved result (out)")
    pushed = push(result.out, repo_id, hub=hub, token=token, task=PIPELINE_TAGS.get(result.task),
                  base_model=result.base_model,
                  metrics=metrics(result), progress=progress)
    return {"repo_id": repo_id, "commit": getattr(pushed, "commit", None) or str(pushed)}
