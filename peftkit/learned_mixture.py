"""Gradient-trained combinations for automatic composition: output mixing weights, AdapterFusion, fresh heads.

Two strategies of :func:`peftkit.auto_compose` train a combination by gradient descent on the few
examples, with every member frozen:

- **mixture**: one weight per member, ``out = h + sum_i w_i delta_i`` at every site (``delta_i`` member
  i's change to the site's output ``h``), trained from the uniform average with an L1 penalty on the
  mean absolute weight. Any method with an output at a layer can take part (LoRA, IA3, bottleneck
  adapters, ...). The result is an ordinary ``average()`` block: with ``__base__`` (the identity) as an
  extra member carrying ``1 - sum_i w_i``, ``average(a, b, __base__, weights=[w_a, w_b, 1 - w_a - w_b])``
  is exactly ``h + w_a delta_a + w_b delta_b`` for any weights.
- **fusion**: AdapterFusion's attention over the members (:mod:`peftkit.core.fusion`), trained with its
  value regularizer.

A classifier whose examples use labels no member's head predicts gets a **fresh head**: an adapter
(:data:`FRESH_HEAD`) that keeps a new classification head for those labels and is the identity at the
layers (a rank-1 LoRA at one site whose B factor starts at zero and stays frozen), trained together
with the combination. A mixture then reads ``stack(average(...), fresh_head, head=fresh_head)``, a fusion
``fuse(stack(a, fresh_head, head=fresh_head), ...)`` (the same changes, and one head all members agree
on): the members' own heads never run, so they may predict any labels.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from peftkit.core.composition import BASE_MODEL, Average, Fuse, Node, Stack
from peftkit.core.composition_exec import node_delta
from peftkit.core.errors import CompositionError
from peftkit.core.heads import label_heads, label_layer
from peftkit.core.layer import TunerLayer
from peftkit.core.merge_search import Score, score_batches

if TYPE_CHECKING:  # pragma: no cover
    from peftkit.core.model import AdaptedModel

#: The adapter that carries a fresh classification head.
FRESH_HEAD = "fresh_head"
#: The fusion's name on the model and in the saved composition.
FUSION_NAME = "auto_fusion"
#: Mixing weights are kept in [-BOUND, BOUND], as the weight search's are.
BOUND = 1.5


@contextlib.contextmanager
def mixing(model: "AdaptedModel", names: Sequence[str], mix: torch.Tensor) -> Iterator[None]:
    """While open, every site where a member acts outputs ``h + sum_i mix[i] delta_i`` on top of what the
    active composition gives there (keep one that is the identity at the layers: :func:`carrier`).

    Forward hooks on the sites rather than a block: the weights are one live tensor that gradients
    reach, and the trained weights become a plain :func:`mixture_block` to save."""

    def hook(layer: nn.Module, args: tuple, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        out = h
        for i, name in enumerate(names):
            delta = node_delta(name, layer, args[0], h)  # type: ignore[arg-type]
            if delta is not None:
                out = out + mix[i].to(delta.dtype) * delta
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    handles = [module.register_forward_hook(hook) for module in model.base_model.modules()
               if isinstance(module, TunerLayer) and any(n in module.adapters for n in names)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def carrier(names: Sequence[str], head: str | None) -> Node:
    """A composition that is the identity at every site and predicts with the head the mixture will use:
    the fresh head's adapter, else ``average(first member, __base__, weights=[0, 1])`` (an average predicts
    with its first member's head)."""
    return head if head is not None else Average(names[0], BASE_MODEL, weights=[0.0, 1.0])


def mixture_block(names: Sequence[str], weights: Sequence[float]) -> Average:
    """The saved form of mixing weights: ``average()`` of the members, plus ``__base__`` with ``1 - sum w``
    when the weights do not sum to 1 (the module doc), so that the block is exactly ``h + sum_i w_i delta_i``."""
    weights = [float(w) for w in weights]
    rest = 1.0 - sum(weights)
    if abs(rest) < 1e-9:
        return Average(*names, weights=weights)
    return Average(*names, BASE_MODEL, weights=[*weights, rest])


def with_head(node: Node, head: str | None) -> Node:
    """``node`` predicting with adapter ``head``'s classification head (None: as it is)."""
    return node if head is None else Stack(node, head, head=head)


# -- fresh heads -----------------------------------------------------------------------------------


class FreshHead:
    """Adapter :data:`FRESH_HEAD` on ``model``: a new head for ``labels``, reset to the same start before
    each training (so that every row of the report trains its head from the same weights)."""

    def __init__(self, model: "AdaptedModel", labels: Sequence[str], site: str, seed: int) -> None:
        base_labels = model.base_labels or []
        model.add_adapter(FRESH_HEAD, f"lora[r=1,target_modules={json.dumps([site])}]")
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


def last_site(model: "AdaptedModel", names: Sequence[str]) -> str:
    """The last module (in model order) where one of ``names`` acts: where the fresh head's identity LoRA sits."""
    found = None
    for module_name, module in model.base_model.named_modules():
        if isinstance(module, TunerLayer) and any(n in module.adapters for n in names):
            found = module_name
    if found is None:
        raise CompositionError(f"none of the adapters {', '.join(names)} acts at a layer")
    return found


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
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    recent: list[float] = []
    bar = tqdm(total=steps, disable=not progress, desc=desc, unit="step", leave=False)
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
        model.train(was_training)
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
    """Mixing weights (and the fresh head) trained on ``batches`` from the uniform average."""
    started = time.perf_counter()
    mix = torch.full((len(names),), 1.0 / len(names), device=model.device)
    head_name = FRESH_HEAD if head else None
    model.set_active(carrier(names, head_name))
    _freeze(model)
    params = [mix] + (head.parameters() if head else [])
    if head:
        head.reset()

    def clamp() -> None:
        with torch.no_grad():
            mix.clamp_(-BOUND, BOUND)

    with mixing(model, names, mix):
        loss = train_steps(model, params, batches, steps=steps, lr=lr, penalty=lambda: l1 * mix.abs().mean(),
                           after_step=clamp, progress=progress, desc=f"mixing {len(names)} adapters")
    weights = [float(w) for w in mix.detach().cpu()]
    node = with_head(mixture_block(names, weights), head_name)
    model.set_active(node)
    return Trained(node, dict(zip(names, weights)), time.perf_counter() - started, steps, loss)


def train_fusion(model: "AdaptedModel", names: Sequence[str], batches: Sequence[dict[str, Any]], *,
                 head: FreshHead | None, steps: int, lr: float, progress: bool) -> Trained:
    """An AdapterFusion over ``names`` (and the fresh head) trained on ``batches``; its weights are each
    member's mean attention over the examples' tokens and sites."""
    started = time.perf_counter()
    # With a fresh head each member is fused as stack(member, fresh_head, head=fresh_head): the same change
    # (the fresh head's adapter is the identity), and a head every member agrees on, so that members whose
    # own heads predict different labels can be fused (a fusion over them predicts with the fresh head).
    members = [with_head(n, FRESH_HEAD) for n in names] if head else list(names)
    node = Fuse(*members, name=FUSION_NAME)
    if FUSION_NAME in model.fusions:
        model.delete_fusion(FUSION_NAME)
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
    """Each member's mean share of the fusion's attention over the batches' real tokens, all sites alike."""
    totals = dict.fromkeys(names, 0.0)
    count = 0.0
    with torch.no_grad():
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
