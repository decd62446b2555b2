"""What automatic composition reports and writes: the result, its table, the merged adapter and its card.

The merged adapter is the exact weighted sum of the members' weight changes (``merge_adapters`` with
``linear``), saved as an ordinary LoRA folder. Its model card (README.md) and ``auto_compose.json``
record the members (hub id and commit, or folder), the learned weights, the number of examples and
the held-out metrics of every row of the report.
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

    @property
    def learned(self) -> Row:
        return next(r for r in self.rows if r.kind == "learned")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def format_report(result: AutoComposeResult) -> str:
    """The held-out table (one row per candidate, the uniform average, the learned combination), the
    learned weights, and the members left out with why."""
    from peftkit.cli_output import format_table

    rows = [[r.name, r.kind, f"{r.loss:.4f}", "-" if r.accuracy is None else f"{r.accuracy:.3f}",
             f"{r.seconds:.2f}"] for r in result.rows]
    lines = [f"held-out: {result.heldout_examples} examples; search: {result.search_examples} examples, "
             f"{result.evaluations} evaluations, {result.seconds_per_evaluation * 1000:.0f} ms each", "",
             format_table(rows, ["COMBINATION", "KIND", "LOSS", "ACCURACY", "SECONDS"]), "",
             "weights: " + ", ".join(f"{name} {w:+.3f}" for name, w in result.weights.items())]
    lines += [f"left out {c.source}: {c.left_out}" for c in result.left_out]
    return "\n".join(lines)


def _member_source(candidate: Candidate) -> str:
    return f"{candidate.source}@{candidate.revision}" if candidate.revision else candidate.source


def card_description(result: AutoComposeResult) -> str:
    """The card's body text: how it was made, members with revisions and weights, examples, metrics."""
    lines = [f"A weighted linear merge of {len(result.members)} LoRA adapters, weights learned by peftkit's "
             f"automatic composition (CMA-ES, {result.evaluations} evaluations) on {result.search_examples} "
             f"examples and reported on {result.heldout_examples} held-out examples.", "",
             "| member | weight |", "| --- | --- |"]
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
                merge: bool = False) -> None:
    """Write the learned combination to ``out``: a LoRA adapter folder (the exact weighted merge) with its
    card and record; with ``merge``, the base model with it folded in (a plain transformers model)."""
    from peftkit.core.fileio import apply_normal_modes, atomic_folder
    from peftkit.core.merge_search import average_heads
    from peftkit.core.merging import merge_adapters

    names = [c.name for c in result.members]
    name = MERGED_NAME if MERGED_NAME not in model.adapters else MERGED_NAME + "_learned"
    merge_adapters(model, names, [result.weights[n] for n in names], name=name, strategy="linear",
                   modules_to_save=names[0])
    average_heads(model, names, [result.weights[n] for n in names], name)  # the head the search scored
    with atomic_folder(out) as tmp:
        if merge:
            model.merge_and_unload([name]).save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        else:
            model.save_adapter(str(tmp), name, task=PIPELINE_TAGS.get(result.task), metrics=metrics(result),
                               description=card_description(result))
        (tmp / RECORD_FILE).write_text(record_json(result), encoding="utf-8")
        apply_normal_modes(tmp)


def push_result(result: AutoComposeResult, repo_id: str, *, hub: Any = None, token: str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Publish the saved folder as ``repo_id`` with the same card text and metrics; returns the push result."""
    from peftkit.hub_client.api import push

    if result.out is None:
        raise ValueError("push_result needs a saved result (out)")
    pushed = push(result.out, repo_id, hub=hub, token=token, task=PIPELINE_TAGS.get(result.task),
                  base_model=result.base_model,
                  metrics=metrics(result), description=card_description(result), progress=progress)
    return {"repo_id": repo_id, "commit": getattr(pushed, "commit", None) or str(pushed)}
