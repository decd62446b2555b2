"""MiSS balance's arithmetic on an input cut into shards of r features, and its fused training node.

The update of balance is ``S(x) @ D``, S summing x's shards of r features (the last one short when r does not
divide the input width). S is linear and its adjoint spreads an (N, r) gradient over every shard, so the
input's gradient is ``g W + S^T(g D^T)``. Plain autograd computes that second term as a new (N, in) tensor
(the sum's backward expands, the reshape materializes it, the slice of a short shard fills zeros) and then adds
it to ``g W`` in another pass. :class:`BalanceNode` adds ``g D^T`` onto every shard of ``g W`` in place: one pass,
one autograd node per layer, and it keeps only ``S(x)`` (N, r) for backward, as autograd does.
"""

from __future__ import annotations

import torch


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """The sum of ``x``'s shards of r features, (..., r); a short last shard is added onto the first features
    (the sum of x zero-padded to whole shards, without the padded copy of x)."""
    rest = x.shape[-1] % r
    whole = x.shape[-1] - rest
    total = x[..., :whole].reshape(*x.shape[:-1], whole // r, r).sum(dim=-2)
    if rest:
        total[..., :rest] += x[..., whole:]
    return total


def add_to_shards(target: torch.Tensor, values: torch.Tensor, r: int) -> torch.Tensor:
    """``target`` (N, in) with ``values`` (N, r) added onto each of its shards of r features, in place (the
    adjoint of :func:`shard_sum`: a short last shard gets the first features of ``values``)."""
    rest = target.shape[-1] % r
    whole = target.shape[-1] - rest
    target[:, :whole].view(target.shape[0], whole // r, r).add_(values.unsqueeze(1))
    if rest:
        target[:, whole:].add_(values[:, :rest])
    return target


class BalanceNode(torch.autograd.Function):
    """``x2 W^T + b + S(x2) D`` for rows ``x2`` (N, in), the block D (r, out) and a frozen layer (W, b): the
    update's product writes the output and the base product accumulates onto it in place."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, block: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None, r: int) -> torch.Tensor:
        total = shard_sum(x2, r)
        out = torch.mm(total, block)
        torch.addmm(out, x2, weight.t(), out=out)  # in place, counted as a product
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(total if ctx.needs_input_grad[1] else None, block, weight)
        ctx.r = r
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        total, block, weight = ctx.saved_tensors
        g_x = g_block = None
        if ctx.needs_input_grad[0]:
            g_x = add_to_shards(torch.mm(g, weight), torch.mm(g, block.t()), ctx.r)
        if ctx.needs_input_grad[1]:
            g_block = torch.mm(total.t(), g)
        return g_x, g_block, None, None, None
