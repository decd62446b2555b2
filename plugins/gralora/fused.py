"""GraLoRA's training forward on a plain linear layer as one autograd node (the layer's whole output).

Run through autograd, the in-place accumulation of the blocks' products into a strided view of the base output
records a view-and-copy node whose backward copies the whole (tokens, out) output gradient, and the batched
products over strided views of the input and the output gradient are differentiated with copies of their own.
The node here keeps the input and the permuted (k, tokens, r) intermediate, and backward runs the four batched
products on views of the output gradient and the input with no copy of either, adding the blocks' share of the
input gradient into ``g W`` in place.

Shapes (k blocks, s = r / k): A ``(k, in/k, r)`` one matrix per input block n, B ``(k, r, out/k)`` one per output
block j; the intermediate for output block j holds chunk j of every input block's product ``x_n A_n``, in input
block order (the same permutation maps it back: it swaps the two block axes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def swap_blocks(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """(k, tokens, r) -> (k, tokens, r) with ``out[j, t, n*s:(n+1)*s] = blocks[n, t, j*s:(j+1)*s]`` (a copy):
    per input block -> per output block, and back (the permutation is its own inverse)."""
    _, tokens, rank = blocks.shape
    return blocks.view(k, tokens, k, rank // k).permute(2, 1, 0, 3).reshape(k, tokens, rank)


def _input_blocks(x2: torch.Tensor, k: int) -> torch.Tensor:
    """(tokens, in) as (k, tokens, in/k), a strided view (no copy)."""
    return x2.view(x2.shape[0], k, -1).transpose(0, 1)


def block_intermediate(x2: torch.Tensor, gralora_a: torch.Tensor) -> torch.Tensor:
    """(k, tokens, r): for output block j, the r values B_j reads, chunk j of every input block's product
    ``x_n A_n`` in input block order (one batched product over a view of the input, then one permuted copy)."""
    k = gralora_a.shape[0]
    return swap_blocks(torch.bmm(_input_blocks(x2, k), gralora_a), k)


class GraloraFn(torch.autograd.Function):
    """y = x W^T + b + scale * (the block update): see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, gralora_a: torch.Tensor, gralora_b: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        k, tokens = gralora_a.shape[0], x2.shape[0]
        intermediate = block_intermediate(x2, gralora_a)  # (k[j], tokens, r)
        out = F.linear(x2, weight, bias)
        out.view(tokens, k, -1).transpose(0, 1).baddbmm_(intermediate, gralora_b, alpha=scale)
        ctx.save_for_backward(x2, intermediate, gralora_a, gralora_b, weight)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, intermediate, gralora_a, gralora_b, weight = ctx.saved_tensors
        k, tokens = gralora_a.shape[0], x2.shape[0]
        g = g.contiguous()
        g_blocks = g.view(tokens, k, -1).transpose(0, 1)  # (k[j], tokens, out/k), a view
        grad_b = torch.bmm(intermediate.transpose(1, 2), g_blocks).mul_(ctx.scale) if ctx.needs_input_grad[2] \
            else None
        grad_x = grad_a = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_per_input = swap_blocks(torch.bmm(g_blocks, gralora_b.transpose(1, 2)).mul_(ctx.scale), k)
            if ctx.needs_input_grad[1]:
                grad_a = torch.bmm(_input_blocks(x2, k).transpose(1, 2), g_per_input)
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(g, weight)
                _input_blocks(grad_x, k).baddbmm_(g_per_input, gralora_a.transpose(1, 2))
        grad_bias = g.sum(0) if ctx.needs_input_grad[4] else None
        return grad_x, grad_a, grad_b, None, grad_bias, None
