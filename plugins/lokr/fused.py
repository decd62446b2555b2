"""LoKr with a rank-r w2 on a plain linear layer as one fused operation (the layer's whole output).

The update ``s kron(w1, w2_a w2_b) x`` is computed as three products whose
intermediates have r columns (layer.py), added into the base output in place;
in training, one autograd node holds the layer, so the input gradient
``g W + (LoKr's input gradient)`` is accumulated by the last product instead
of summing two (tokens, in) tensors, and no autograd bookkeeping runs for the
reshapes between the products. Values and gradients equal the unfused forward
up to float rounding (tests/test_fast_paths.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import is_conv1d


def _rows(t: torch.Tensor, tokens: int, a: int, b: int) -> torch.Tensor:
    """(tokens * a, b) rows -> (tokens * b, a) rows: the per-token transpose, copied contiguous."""
    return t.view(tokens, a, b).transpose(1, 2).reshape(tokens * b, a)


class _LokrFn(torch.autograd.Function):
    """y = x W^T + b + kron(w1s, w2_a w2_b) x, w1s = s * w1; x as (tokens, in_m * in_n)."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, w1s: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                base: nn.Module, in_m: int) -> torch.Tensor:
        tokens, in_n, r, out_l = x2.shape[0], w2_b.shape[1], w2_b.shape[0], w1s.shape[0]
        weight, bias = base.weight, getattr(base, "bias", None)
        conv1d = is_conv1d(base)
        if conv1d:
            out = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
        else:
            out = F.linear(x2, weight, bias)
        z = _rows(torch.mm(x2.view(-1, in_n), w2_b.t()), tokens, in_m, r)  # rows (token, k)
        u = _rows(torch.mm(z, w1s.t()), tokens, r, out_l)  # rows (token, p)
        out.view(-1, w2_a.shape[0]).addmm_(u, w2_a.t())
        ctx.save_for_backward(x2, z, u, w1s, w2_a, w2_b, weight)
        ctx.conv1d, ctx.in_m = conv1d, in_m
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, z, u, w1s, w2_a, w2_b, weight = ctx.saved_tensors
        tokens, in_m, r, out_l = x2.shape[0], ctx.in_m, w2_b.shape[0], w1s.shape[0]
        in_n = w2_b.shape[1]
        g = g.contiguous()
        g_rows = g.view(-1, w2_a.shape[0])  # rows (token, p)
        grad_w2_a = torch.mm(g_rows.t(), u) if ctx.needs_input_grad[2] else None
        g_u = _rows(torch.mm(g_rows, w2_a), tokens, out_l, r)  # rows (token, k)
        grad_w1s = torch.mm(g_u.t(), z) if ctx.needs_input_grad[1] else None
        g_z = _rows(torch.mm(g_u, w1s), tokens, r, in_m)  # rows (token, i)
        grad_w2_b = torch.mm(g_z.t(), x2.view(-1, in_n)) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight.t()) if ctx.conv1d else torch.mm(g, weight)
            grad_x.view(-1, in_n).addmm_(g_z, w2_b)
        return grad_x, grad_w1s, grad_w2_a, grad_w2_b, None, None


def fused_lokr(x: torch.Tensor, w1s: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, base: nn.Module,
               in_m: int) -> torch.Tensor:
    """The whole output of linear layer ``base`` with LoKr's update (w1 already scaled) on input ``x``."""
    x2 = x.reshape(-1, x.shape[-1])
    out = _LokrFn.apply(x2, w1s, w2_a, w2_b, base, in_m)
    return out.view(*x.shape[:-1], out.shape[-1])
