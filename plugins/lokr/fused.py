"""LoKr with a rank-r w2 on a plain linear layer as one fused operation (the layer's whole output).

The update ``s kron(w1, w2_a w2_b) x`` is, per token with its input X as an
(in_m, in_n) matrix, ``w1s (X w2_b^T) w2_a^T`` (w1s = s w1): three products
whose intermediates have r columns. They are computed rank-major
(:func:`rank_major_products`): the intermediates are laid out (r, tokens, ...)
and every product is a plain 2-d product of views, so no copy runs between
them, and every product whose output has an r-sized side has r rows, which CPU
BLAS runs several times faster than the same product with r columns. The last
product adds into the base output in place.

In training one autograd node holds the layer: backward runs the same
rank-major products in reverse, the input gradient ``g W + (LoKr's input
gradient)`` is accumulated by the last product instead of summing two
(tokens, in) tensors, and no autograd bookkeeping runs for the views between
the products. In inference (gradients off) the same products run without an
autograd node. Values and gradients equal the unfused forward up to float
rounding (tests/test_fast_paths.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import is_conv1d


def rank_major_products(x2: torch.Tensor, w1s: torch.Tensor, w2_b: torch.Tensor,
                        in_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For x2 (tokens, in_m * in_n): ``z_t`` = the X w2_b^T of every token as (r, tokens * in_m)
    (entry [k, (t, i)]) and ``u_t`` = w1s (X w2_b^T) as (r * tokens, out_l) (entry [(k, t), p]).
    ``u_t.view(r, -1).t()`` is then the (tokens * out_l, r) left factor of the last product."""
    z_t = torch.mm(w2_b, x2.reshape(-1, w2_b.shape[1]).t())
    u_t = torch.mm(z_t.view(-1, in_m), w1s.t())
    return z_t, u_t


def _lokr_sum(x2: torch.Tensor, w1s: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, base: nn.Module,
              in_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``x2 W^T + b + kron(w1s, w2_a w2_b) x2``, ``z_t``, ``u_t``): the update's last product adds into the
    base product in place (``z_t``, ``u_t``: :func:`rank_major_products`' intermediates)."""
    weight, bias = base.weight, getattr(base, "bias", None)
    if is_conv1d(base):  # weight stored (in, out)
        out = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
    else:
        out = F.linear(x2, weight, bias)
    z_t, u_t = rank_major_products(x2, w1s, w2_b, in_m)
    out.view(-1, w2_a.shape[0]).addmm_(u_t.view(w2_b.shape[0], -1).t(), w2_a.t())
    return out, z_t, u_t


class _LokrFn(torch.autograd.Function):
    """y = x W^T + b + kron(w1s, w2_a w2_b) x, w1s = s * w1; x as (tokens, in_m * in_n)."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, w1s: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                base: nn.Module, in_m: int) -> torch.Tensor:
        out, z_t, u_t = _lokr_sum(x2, w1s, w2_a, w2_b, base, in_m)
        ctx.save_for_backward(x2, z_t, u_t, w1s, w2_a, w2_b, base.weight)
        ctx.conv1d, ctx.in_m = is_conv1d(base), in_m
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, z_t, u_t, w1s, w2_a, w2_b, weight = ctx.saved_tensors
        r, out_l, in_n = w2_b.shape[0], w1s.shape[0], w2_b.shape[1]
        g = g.contiguous()
        g_rows = g.view(-1, w2_a.shape[0])  # (tokens * out_l, out_k)
        grad_w2_a = torch.mm(u_t.view(r, -1), g_rows).t() if ctx.needs_input_grad[2] else None
        g_u_t = torch.mm(w2_a.t(), g_rows.t()).view(-1, out_l)  # [(k, t), p], as u_t
        grad_w1s = torch.mm(g_u_t.t(), z_t.view(-1, ctx.in_m)) if ctx.needs_input_grad[1] else None
        g_z_t = torch.mm(g_u_t, w1s).view(r, -1)  # [k, (t, i)], as z_t
        grad_w2_b = torch.mm(g_z_t, x2.view(-1, in_n)) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight.t()) if ctx.conv1d else torch.mm(g, weight)
            grad_x.view(-1, in_n).addmm_(g_z_t.t(), w2_b)
        return grad_x, grad_w1s, grad_w2_a, grad_w2_b, None, None


def fused_lokr(x: torch.Tensor, w1s: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, base: nn.Module,
               in_m: int) -> torch.Tensor:
    """The whole output of linear layer ``base`` with LoKr's update (w1 already scaled) on input ``x``."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled():
        out = _LokrFn.apply(x2, w1s, w2_a, w2_b, base, in_m)
    else:  # inference: the same products, without an autograd node
        out, _, _ = _lokr_sum(x2, w1s, w2_a, w2_b, base, in_m)
    return out.view(*x.shape[:-1], out.shape[-1])
