"""Score weighted linear merges of LoRA adapters quickly, on one model, for automatic composition.

:class:`WeightedMerge` puts ``sum_i w_i D_i`` (each member's weight change D_i = s_i B_i A_i) on the
model as one adapter built by :func:`~peftkit.core.merging.merge_adapters` with the exact ``cat``
strategy (the members' factors side by side, no SVD), replacing the previous one: trying new weights
costs a concatenation per layer and one forward pass over the examples, never a reload.

Classification heads: members that keep their own copy of the head (same labels, checked by the
caller) are averaged with weights ``|w_i| / sum_j |w_j|``, so that a negative weight, which
subtracts a member's change in the encoder, never flips the head's logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .errors import MergeError
from .layer import ModulesToSave
from .merging import average_copies, merge_adapters

if TYPE_CHECKING:  # pragma: no cover
    from .model import AdaptedModel


@dataclass(frozen=True)
class Score:
    """Mean loss over the examples' targets, and accuracy (classification only)."""

    loss: float
    accuracy: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {"loss": self.loss, "accuracy": self.accuracy}


@contextlib.contextmanager
def in_eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout: the same numbers every run) inside the block, then back in the mode
    it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def score_batches(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], *,
                  classification: bool) -> Score:
    """The model's loss on ``batches`` (each with ``labels``, -100 where none), weighted by targets, and
    for classification the share of targets whose highest logit is the label."""
    total, count, correct = 0.0, 0, 0
    with in_eval_mode(model), torch.no_grad():
        for batch in batches:
            out = model(**batch)
            labels = batch["labels"]
            mask = labels != -100
            n = max(int(mask.sum()), 1)
            total += float(out.loss) * n
            count += n
            if classification:
                predicted = out.logits.argmax(-1)
                correct += int((predicted[mask] == labels[mask]).sum())
    if count == 0:
        raise MergeError("there are no examples to score")
    return Score(total / count, correct / count if classification else None)


class WeightedMerge:
    """The adapter ``name`` on ``model`` = the weighted sum of ``members``' weight changes (see the module doc)."""

    def __init__(self, model: "AdaptedModel", members: Sequence[str], name: str = "auto_compose") -> None:
        if not members:
            raise MergeError("a weighted merge needs at least one member adapter")
        if name in model.adapters:
            raise MergeError(f"the model already has an adapter named {name!r}; choose another name")
        self.model, self.members, self.name = model, list(members), name

    def apply(self, weights: Sequence[float]) -> None:
        """Replace the merged adapter by one with ``weights`` (one per member) and make it the active one."""
        if len(weights) != len(self.members):
            raise MergeError(f"{len(self.members)} members but {len(weights)} weights")
        self.remove()
        weights = [float(w) for w in weights]
        merge_adapters(self.model, self.members, weights, name=self.name, strategy="cat",
                       modules_to_save=self.members[0])
        average_heads(self.model, self.members, weights, self.name)
        self.model.set_active(self.name)

    def score(self, weights: Sequence[float], batches: Sequence[dict[str, torch.Tensor]], *,
              classification: bool) -> Score:
        self.apply(weights)
        return score_batches(self.model, batches, classification=classification)

    def remove(self) -> None:
        if self.name in self.model.adapters:
            self.model.set_active(None)
            self.model.delete_adapter(self.name)


def average_heads(model: "AdaptedModel", members: Sequence[str], weights: Sequence[float], name: str) -> None:
    """Set adapter ``name``'s copy of each saved module (a task head) to the members' copies averaged with
    weights ``|w_i| / sum |w_j|`` (see the module doc); modules fewer than two members keep are left as merged."""
    for module in model.base_model.modules():
        if not isinstance(module, ModulesToSave) or name not in module.copies:
            continue
        holders = [(m, w) for m, w in zip(members, weights) if m in module.copies]
        if len(holders) < 2 or not any(w for _, w in holders):
            continue
        average_copies(module, [m for m, _ in holders], [w for _, w in holders], name)
