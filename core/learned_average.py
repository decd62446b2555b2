"""Trainable weights for an ``average()`` block: the block itself runs with them, so training and inference
run the same code (:func:`peftkit.core.composition_exec.run_average`).

An ``average()`` block is plain data (its weights are numbers). While ``model.learn_average(block)`` is
open, a :class:`LearnedAverage` registered on the model's :class:`~peftkit.core.state.AdapterState` gives
the block its weights as a tensor that gradients reach; the block normalizes them exactly as it
normalizes its own numbers. When no gradient is recorded (scoring, generating) the block takes them as
plain numbers, which is :meth:`LearnedAverage.block` run as saved. As AdapterFusion's weights live on
the model under the fusion's name, these live on the model under the block.

``rest=`` names a child (usually ``__base__``, the identity) whose weight is ``1 - sum`` of the others:
the weights then always sum to 1, so normalizing leaves them as they are and the block computes exactly
``h + sum_i w_i delta_i`` over the other children, with any weights (a mixture of adapters' changes,
not only a convex combination).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .composition import Average
from .errors import CompositionError


class LearnedAverage(nn.Module):
    """The weights of one ``average()`` block as parameters (``free``: one per child, less ``rest``)."""

    def __init__(self, block: Average, rest: str | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(block, Average):
            raise CompositionError(f"learn_average() takes an average() block, e.g. Average('a', 'b'); got {block}")
        children = [str(c) for c in block.children]
        if rest is not None and rest not in children:
            raise CompositionError(f"learn_average(rest={rest!r}): {rest!r} is not a child of {block}; name one of "
                                   f"{', '.join(children)}")
        self.average = block
        self.rest_index = children.index(rest) if rest is not None else None
        start = list(block.normalized_weights())
        if self.rest_index is not None:
            del start[self.rest_index]
        self.free = nn.Parameter(torch.tensor(start, dtype=torch.float32, device=device))

    def forward(self) -> torch.Tensor:
        """The block's weights, one per child (with ``rest``: that child's is ``1 - sum`` of the others)."""
        if self.rest_index is None:
            return self.free
        rest = (1.0 - self.free.sum()).unsqueeze(0)
        return torch.cat([self.free[:self.rest_index], rest, self.free[self.rest_index:]])

    def clamp_(self, bound: float) -> None:
        """Keep every free weight in [-bound, bound]."""
        with torch.no_grad():
            self.free.clamp_(-bound, bound)

    def weights(self) -> list[float]:
        """The current weights as numbers, one per child."""
        return [float(w) for w in self.forward().detach().cpu()]

    def block(self, drop_rest_below: float = 0.0) -> Average:
        """The ``average()`` block with the current weights as numbers: what runs when it is saved and loaded.
        With ``rest``, a rest weight whose size is at most ``drop_rest_below`` leaves that child out."""
        weights = self.weights()
        children = list(self.average.children)
        if self.rest_index is not None and abs(weights[self.rest_index]) <= drop_rest_below:
            del children[self.rest_index], weights[self.rest_index]
        return Average(*children, weights=weights)


def run_weights(learned: LearnedAverage) -> "torch.Tensor | Sequence[float]":
    """The weights a block runs with now: a tensor gradients reach while they are recorded, else numbers
    (the path, and the cached products, of a block with these weights saved)."""
    if torch.is_grad_enabled():
        weights = learned()
        return weights / weights.sum()
    return Average(*learned.average.children, weights=learned.weights()).normalized_weights()
