"""Gradient-trained combinations for automatic composition: output mixing weights, AdapterFusion, fresh heads.

Two strategies of :func:`peftkit.auto_compose` train a combination by gradient descent on the few
examples, with every member frozen:

- **mixture**: one weight per member, ``out = h + sum_i w_i delta_i`` at every site (``delta_i`` member
  i's change to the site's output ``h``), trained from the uniform average with an L1 penalty on the
  mean absolute weight. Any method with an output at a layer can take part (LoRA, IA3, bottleneck
  adapters, ...). It trains through the block it is saved as: ``average(a, b, __base__)`` whose weights
  are learned in place (``model.learn_average(block, rest="__base__")``: ``__base__``, the identity,
  carries ``1 - w_a - w_b``, so the block is exactly ``h + w_a delta_a + w_b delta_b`` for any weights),
  and the saved ``average(a, b, __base__, weights=[w_a, w_b, 1 - w_a - w_b])`` runs the same code.
- **fusion**: AdapterFusion's attention over the members (:mod:`peftkit.core.fusion`), trained with its
  value regularizer.

A classifier whose examples use labels no member's head predicts gets a **fresh head**: a head-only
adapter (:data:`FRESH_HEAD`: ``target_modules="dummy-target-modules"``, PEFT's name for an adapter that
adapts no layer, and the task head in ``modules_to_save``, with a new last linear layer for those labels),
trained together with the combination. A mixture then reads ``stack(average(...), fresh_head,
head=fresh_head)``, a fusion ``fuse(stack(a, fresh_head, head=fresh_head), ...)`` (the same changes, and
one head all members agree on): the members' own heads never run, so they may predict any labels. The
fresh head's folder is an ordinary adapter folder (PEFT loads it), and merging the composition folds it
in as the model's head, with its labels in the merged config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn as nn

from peftkit.core.composition import BASE_MODEL, Average, Fuse, Node, Stack
from peftkit.core.errors import CompositionError
from peftkit.core.heads import label_heads, label_layer
from peftkit.core.merge_search import in_eval_mode, Score, score_batches
from peftkit.core.progress import step_bar
from peftkit.core.targets import NO_LAYERS

if TYPE_CHECKING:  # pragma: no cover
    from peftkit.core.model import AdaptedModel

#: The head-only adapter that carries a fresh classification head.
FRESH_HEAD = "fresh_head"
#: The fusion's name on the model and in the saved composition.
FUSION_NAME = "auto_fusion"
#: Mixing weights are kept in [-BOUND, BOUND], as the weight search's are.
BOUND = 1.5


def with_head(node: Node, head: str | None) -> Node:
    """``node`` predicting with adapter ``head``'s classification head (None: as it is)."""
    return node if head is None else Stack(node, head, head=head)


# -- fresh heads -----------------------------------------------------------------------------------


class FreshHead:
    """Head-only adapter :data:`FRESH_HEAD` on ``model``: a new head for ``labels``, reset to the same start
    before each training (so that every row of the report trains its head from the same weights)."""

    def __init__(self, model: "AdaptedModel", labels: Sequence[str], seed: int) -> None:
        base_labels = model.base_labels or []
        model.add_adapter(FRESH_HEAD, f"lora[target_modules={NO_LAYERS}]")  # the task head: modules_to_save
        self.model, self.labels = model, list(labels)
        wrappers = list(label_heads(model.base_model, FRESH_HEAD, len(base_labels)))
        if not wrappers:
            raise CompositionError("the base model keeps no classification head to give a fresh copy of")
        generator = torch.Generator().manual_seed(seed)
        std = float(getattr(model.base_model.config, "initializer_range", 0.02) or 0.02)
        for wrapper in wrappers:
            head = wrapper.copies[FRESH_HEAD]
            sub_name, layer = label_layer(head)  # type: ignore[misc]
            fresh = nn.Linear(layer.in_features, len(self.labels), bias=layer.bias is not None,
                              device=layer.weight.device, dtype=layer.weight.dtype)
            with torch.no_grad():
                fresh.weight.copy_(torch.randn(fresh.weight.shape, generator=generator) * std)
                if fresh.bias is not None:
                    fresh.bias.zero_()
            if sub_name:
                parent, _, child = sub_name.rpartition(".")
                setattr(head.get_submodule(parent) if parent else head, child, fresh)
            else:
                wrapper.copies[FRESH_HEAD] = fresh
        self.heads = [wrapper.copies[FRESH_HEAD] for wrapper in wrappers]
        model.adapter_record(FRESH_HEAD).labels = list(self.labels)
        self.start = self.snapshot()

    def reset(self) -> None:
        self.restore(self.start)

    def snapshot(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in head.state_dict().items()} for head in self.heads]

    def restore(self, states: list[dict[str, torch.Tensor]]) -> None:
        for head, state in zip(self.heads, states):
            head.load_state_dict(state)

    def parameters(self) -> list[nn.Parameter]:
        return [p for head in self.heads for p in head.parameters()]


# -- training --------------------------------------------------------------------------------------


@dataclass
class Trained:
    """A trained combination: the block to activate (saved form), its weights, its training time and loss."""

    node: Node
    weights: dict[str, float]
    seconds: float
    steps: int
    loss: float


def _freeze(model: "AdaptedModel") -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def train_steps(model: "AdaptedModel", params: list[torch.Tensor], batches: Sequence[dict[str, Any]], *,
                steps: int, lr: float, penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None, progress: bool, desc: str) -> float:
    """``steps`` Adam steps on ``params`` over ``batches`` in turn (the model in eval mode: no dropout, so
    a few examples give the same result every run); returns the mean loss of the last pass over the batches."""
    with in_eval_mode(model):
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        recent: list[float] = []
        bar = step_bar(steps, progress=progress, desc=desc, unit="step")
        try:
            for step in range(steps):
                loss = model(**batches[step % len(batches)]).loss
                if penalty is not None:
                    loss = loss + penalty()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                recent = (recent + [float(loss.detach())])[-len(batches):]
                bar.update(1)
                bar.set_postfix(loss=f"{recent[-1]:.4g}")
        finally:
            bar.close()
            for param in params:
                param.requires_grad_(False)
    return sum(recent) / max(len(recent), 1)


def train_head_only(model: "AdaptedModel", node: Node, head: FreshHead, batches: Sequence[dict[str, Any]], *,
                    steps: int, lr: float, progress: bool, desc: str) -> float:
    """Train the fresh head alone (from its start) under the fixed composition ``node``; returns seconds."""
    started = time.perf_counter()
    head.reset()
    model.set_active(with_head(node, FRESH_HEAD))
    _freeze(model)
    train_steps(model, head.parameters(), batches, steps=steps, lr=lr, progress=progress, desc=desc)
    return time.perf_counter() - started


def train_mixture(model: "AdaptedModel", names: Sequence[str], batches: Sequence[dict[str, Any]], *,
                  head: FreshHead | None, steps: int, lr: float, l1: float, progress: bool) -> Trained:
    """Mixing weights (and the fresh head) trained on ``batches`` from the uniform average, through the
    block they are saved as (``average(*names, __base__)`` with learned weights; the module doc)."""
    started = time.perf_counter()
    head_name = FRESH_HEAD if head else None
    block = Average(*names, BASE_MODEL, weights=[1.0 / len(names)] * len(names) + [0.0])
    model.set_active(with_head(block, head_name))
    _freeze(model)
    if head:
        head.reset()
    with model.learn_average(block, rest=BASE_MODEL) as learned:
        params = list(learned.parameters()) + (head.parameters() if head else [])
        loss = train_steps(model, params, batches, steps=steps, lr=lr, penalty=lambda: l1 * learned.free.abs().mean(),
                           after_step=lambda: learned.clamp_(BOUND), progress=progress,
                           desc=f"mixing {len(names)} adapters")
        # __base__ is left out when the members' weights already sum to 1 (it then adds nothing).
        saved = learned.block(drop_rest_below=1e-9)
        weights = [float(w) for w in learned.free.detach().cpu()]
    node = with_head(saved, head_name)
    model.set_active(node)
    return Trained(node, dict(zip(names, weights)), time.perf_counter() - started, steps, loss)


def train_fusion(model: "AdaptedModel", names: Sequence[str], batches: Sequence[dict[str, Any]], *,
                 head: FreshHead | None, steps: int, lr: float, seed: int, progress: bool) -> Trained:
    """An AdapterFusion over ``names`` (and the fresh head) trained on ``batches``, its query weights drawn
    from ``seed``; its weights are each member's mean attention over the examples' tokens and sites."""
    started = time.perf_counter()
    # With a fresh head each member is fused as stack(member, fresh_head, head=fresh_head): the same change
    # (the fresh head's adapter adapts no layer), and a head every member agrees on, so that members whose
    # own heads predict different labels can be fused (a fusion over them predicts with the fresh head).
    members = [with_head(n, FRESH_HEAD) for n in names] if head else list(names)
    node = Fuse(*members, name=FUSION_NAME)
    if FUSION_NAME in model.fusions:
        model.delete_fusion(FUSION_NAME)
    with torch.random.fork_rng(devices=[]):  # the same start every run, whatever ran before
        torch.manual_seed(seed)
        model.add_fusion(node)
    model.set_active(node)
    _freeze(model)
    params = [p for p in model.fusion_parameters(FUSION_NAME)]
    if head:
        head.reset()
        params += head.parameters()
    loss = train_steps(model, params, batches, steps=steps, lr=lr, penalty=model.fusion_regularization_loss,
                       progress=progress, desc=f"fusing {len(names)} adapters")
    seconds = time.perf_counter() - started
    shares = attention_shares(model, [str(m) for m in members], batches)
    return Trained(node, {name: shares[str(m)] for name, m in zip(names, members)}, seconds, steps, loss)


def attention_shares(model: "AdaptedModel", names: Sequence[str], batches: Sequence[dict[str, Any]]
                     ) -> dict[str, float]:
    """Each member's mean share of the fusion's attention over the batches' real tokens, all sites alike, read
    in eval mode as the fusion is trained and scored (dropout would change them from run to run)."""
    totals = dict.fromkeys(names, 0.0)
    count = 0.0
    with in_eval_mode(model), torch.no_grad():
        for batch in batches:
            with model.capture_fusion_weights() as cap:
                model(**batch)
            mask = batch.get("attention_mask")
            for call in cap.calls:
                for weights in call.get(FUSION_NAME, {}).values():
                    probs = weights.weights.float()
                    keep = mask.to(probs.device).float().unsqueeze(-1) if mask is not None and \
                        mask.shape == probs.shape[:-1] else torch.ones_like(probs[..., :1])
                    share = (probs * keep).reshape(-1, probs.shape[-1]).sum(0)
                    for j, member in enumerate(weights.members):
                        totals[member] += float(share[j])
                    count += float(keep.sum())
    return {name: totals[name] / count if count else 0.0 for name in names}


def score_node(model: "AdaptedModel", node: Node, batches: Sequence[dict[str, Any]], *,
               classification: bool) -> Score:
    model.set_active(node)
    return score_batches(model, batches, classification=classification)
