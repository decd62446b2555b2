"""LoKr with a rank-r w2 on a plain linear layer as one fused operation (the layer's whole output).

The update ``s kron(w1, w2_a w2_b) x`` is, per token with its input X as an
(in_m, in_n) matrix, ``s w1 (X w2_b^T) w2_a^T``: three products whose
intermediates have r columns. They are computed rank-major
(:func:`rank_major_products`): the intermediates are laid out (r, tokens, ...)
and every product is a plain 2-d product of views, so no copy runs between
them, and every product whose output has an r-sized side has r rows, which CPU
BLAS runs several times faster than the same product with r columns. The
update and the base product share one output tensor: the update's last product
writes it and the base GEMM accumulates onto it (beta = 1, written as
``addmm(out=)``, which FLOP counters see, not ``addmm_``), which reads it while
computing, so no separate pass over the (tokens, out) output runs (with
a bias, the base product comes first and the last product adds into it in
place). The scale s rides on a small factor or the product's multiplier (no
scaled copy of w1 with its own autograd node).

In training one autograd node holds the layer: backward runs the same
rank-major products in reverse, the input gradient ``g W + (LoKr's input
gradient)`` is one tensor the same way (LoKr's part written first, g W
accumulated onto it by its GEMM), no autograd bookkeeping runs for the views
between the products, and an intermediate gradient is computed only when a
gradient asked for needs it. In inference (gradients off) no autograd node
is made, and when the input has so many tokens that the products' passes over
the (tokens, in) and (tokens, out) tensors move more memory than one pass over
the weight (:func:`dense_is_cheaper`), the update is added to a temporary copy
of the weight instead, and the layer is one product. Values and gradients equal the
unfused forward up to float rounding (tests/test_values_lokr.py,
tests/test_fast_paths.py).

Float32 factors on a bfloat16 or float16 layer (what adapting a half-precision model gives, PEFT's default
too): the factors' products run in float32 on a float32 copy of the input made when a product needs it and
freed after it, so backward keeps the half-precision input itself, not a float32 copy (the unfused path's
and PEFT's); the float32 update is added to the half-precision base product in one rounding.

Under ``torch.autocast`` the fused path computes in autocast's dtype (the input and factors cast to it
before the node, the products run with autocast off), and the frozen float32 weight is cast inside the
node and again in backward instead of keeping the copy alive, as autocast's own linear does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import accumulating_gemm_is_fast, kept_scaled_transpose, to_dtype, weight_out_in


def rank_major_products(x2: torch.Tensor, w1: torch.Tensor, w2_b: torch.Tensor,
                        in_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For x2 (tokens, in_m * in_n): ``z_t`` = the X w2_b^T of every token as (r, tokens * in_m)
    (entry [k, (t, i)]) and ``u_t`` = w1 (X w2_b^T) as (r * tokens, out_l) (entry [(k, t), p]).
    ``u_t.view(r, -1).t()`` is then the (tokens * out_l, r) left factor of the last product."""
    z_t = torch.mm(w2_b, x2.reshape(-1, w2_b.shape[1]).to(w2_b.dtype).t())
    u_t = torch.mm(z_t.view(-1, in_m), w1.t())
    return z_t, u_t


#: How many times the weight pass the products' passes must move before inference forms the weight copy
#: (:func:`dense_is_cheaper`). In a model the weight pass is dearer per float than the products' passes:
#: it reads a weight no other layer has touched since the last forward (from main memory) and writes a
#: fresh copy, while the products read an input the previous operation has just written and write an
#: output the next one reads at once. Measured in perf_table's Llama forward (2 threads, paired rounds,
#: the products against the copy on every layer): the products 1.3-3% faster at 512 tokens and the copy
#: 1.4% faster at 768 on the 512x512 layers (where the products on the 1376-wide ones gained 0.6%), the copy
#: 3-6% faster at 1024 and 2048 tokens on all layers; a margin of 1 (the count alone) took the copy from 300
#: tokens on.
DENSE_MARGIN = 2.25


def dense_is_cheaper(tokens: int, out_l: int, out_k: int, in_m: int, in_n: int, r: int) -> bool:
    """Whether adding ``s kron(w1, w2)`` to a temporary copy of the weight is cheaper than the three
    products: the copy reads and writes the weight once (2 out in floats; the base product then reads the
    copy instead of the weight), the products read the input once, read and write the output once and
    write and read both rank-sized intermediates (tokens (in + 2 out + 2 r (in_m + out_l)) floats). The
    copy wins once the products move more than ``DENSE_MARGIN`` times as much."""
    weight_pass = 2 * out_l * out_k * in_m * in_n
    product_passes = tokens * (in_m * in_n + 2 * out_l * out_k + 2 * r * (in_m + out_l))
    return DENSE_MARGIN * weight_pass < product_passes


def _lokr_sum(x2: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, in_m: int, scale: float,
              keep_on: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``x2 W^T + b + s kron(w1, w2_a w2_b) x2``, ``z_t``, ``u_t``: :func:`rank_major_products`'
    intermediates), for W (``weight``, (out, in)) and ``bias`` in x2's dtype. Without a bias the update's
    last product writes the output and the base product adds onto it (the base GEMM reads the output while
    it computes: no separate pass over it); with a bias the
    update's last product adds into the base product in place. With float32 factors on a half-precision
    layer the factors' products run in float32 and their sum is added to the base product in one rounding."""
    z_t, u_t = rank_major_products(x2, w1, w2_b, in_m)
    update_rows = u_t.view(w2_b.shape[0], -1).t()  # (tokens * out_l, r)
    if x2.dtype != w2_b.dtype:
        out = F.linear(x2, weight, bias)
        out.view(-1, w2_a.shape[0]).add_(torch.mm(update_rows, w2_a.t()), alpha=scale)
    elif bias is None and accumulating_gemm_is_fast(x2):
        scaled_w2_a_t = w2_a.t() * scale if keep_on is None else kept_scaled_transpose(keep_on, w2_a, scale)
        out = torch.mm(update_rows, scaled_w2_a_t).view(x2.shape[0], -1)
        torch.addmm(out, x2, weight.t(), out=out)  # in place, counted as a product
    else:  # with a bias, or where the base product is the faster first (accumulating_gemm_is_fast)
        out = F.linear(x2, weight, bias)
        rows = out.view(-1, w2_a.shape[0])
        torch.addmm(rows, update_rows, w2_a.t(), alpha=scale, out=rows)  # in place, counted as a product
    return out, z_t, u_t


def _dense_sum(x2: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, in_m: int, scale: float) -> torch.Tensor:
    """``x2 (W + s kron(w1, w2_a w2_b))^T + b``: the update added to a temporary copy of W in one pass
    (a broadcast product of w1 and w2, written in the layout of ``weight``, W as (out, in)), then one
    product."""
    out_l, out_k, in_n = w1.shape[0], w2_a.shape[0], w2_b.shape[1]
    blocks = weight.reshape(out_l, out_k, in_m, in_n)  # [p, q, i, j] = W[(p, q), (i, j)], a view
    w2 = torch.mm(w2_a, w2_b)
    merged = torch.addcmul(blocks, w1[:, None, :, None], w2[None, :, None, :], value=scale)
    return F.linear(x2, merged.reshape(weight.shape), bias)


class _LokrFn(torch.autograd.Function):
    """y = x W^T + b + s kron(w1, w2_a w2_b) x; x as (tokens, in_m * in_n), W as (out, in). W and b are cast to
    x's dtype where they differ (autocast), and backward casts W again instead of keeping the copy."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None, in_m: int, scale: float) -> torch.Tensor:
        out, z_t, u_t = _lokr_sum(x2, w1, w2_a, w2_b, weight.to(x2.dtype), to_dtype(bias, x2.dtype), in_m, scale)
        ctx.save_for_backward(x2, z_t, u_t, w1, w2_a, w2_b, weight)
        ctx.in_m, ctx.scale = in_m, scale
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, z_t, u_t, w1, w2_a, w2_b, weight = ctx.saved_tensors
        need_x, need_w1, need_w2_a, need_w2_b = ctx.needs_input_grad[:4]
        r, out_l, in_n = w2_b.shape[0], w1.shape[0], w2_b.shape[1]
        g = g.contiguous()
        g_rows = g.view(-1, w2_a.shape[0]).to(w2_a.dtype)  # (tokens * out_l, out_k), in the factors' dtype
        grad_w1 = grad_w2_a = grad_w2_b = grad_x = None
        if need_w2_a:
            grad_w2_a = torch.mm(u_t.view(r, -1), g_rows).mul_(ctx.scale).t()
        if need_x or need_w1 or need_w2_b:
            # the gradient of u (s w2_a^T g), [(k, t), p] as u_t; s is applied to the small w2_a
            g_u_t = torch.mm(w2_a.t() * ctx.scale, g_rows.t()).view(-1, out_l)
            if need_w1:
                grad_w1 = torch.mm(g_u_t.t(), z_t.view(-1, ctx.in_m))
            if need_x or need_w2_b:
                g_z_t = torch.mm(g_u_t, w1).view(r, -1)  # [k, (t, i)], as z_t
                if need_w2_b:
                    grad_w2_b = torch.mm(g_z_t, x2.view(-1, in_n).to(w2_b.dtype))
                if need_x and g.dtype != w2_b.dtype:  # float32 factors: their part added in one rounding
                    grad_x = torch.mm(g, weight.to(g.dtype))
                    grad_x.add_(torch.mm(g_z_t.t(), w2_b).view(g.shape[0], -1))
                elif need_x and not accumulating_gemm_is_fast(g):  # g W first, LoKr's part added into it
                    grad_x = torch.mm(g, weight.to(g.dtype))
                    rows = grad_x.view(-1, in_n)
                    torch.addmm(rows, g_z_t.t(), w2_b, out=rows)
                elif need_x:  # LoKr's part first; g W adds onto it inside its GEMM (no separate pass)
                    grad_x = torch.mm(g_z_t.t(), w2_b).view(g.shape[0], -1)
                    torch.addmm(grad_x, g, weight.to(g.dtype), out=grad_x)
        return grad_x, grad_w1, grad_w2_a, grad_w2_b, None, None, None, None


def fused_lokr(x: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, base: nn.Module,
               in_m: int, scale: float = 1.0, keep_on: nn.Module | None = None) -> torch.Tensor:
    """The whole output of linear layer ``base`` with LoKr's update ``scale * kron(w1, w2_a w2_b)`` on ``x``.
    Under autocast the input and factors are cast to autocast's dtype (the factors' gradients flow back to
    them in their own dtype) and the products run in it with autocast off; the frozen weight is cast
    inside (module docstring). ``keep_on``: the layer adapter on which an inference forward (without
    gradients, outside autocast) keeps ``w2_a.t() * scale`` between calls where its products use it
    (``kept_scaled_transpose``: the same numbers)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _fused_lokr(x.to(compute), w1.to(compute), w2_a.to(compute), w2_b.to(compute), base, in_m, scale,
                               None)
    return _fused_lokr(x, w1, w2_a, w2_b, base, in_m, scale, keep_on)


def _fused_lokr(x: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, base: nn.Module,
                in_m: int, scale: float, keep_on: nn.Module | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    weight, bias = weight_out_in(base), getattr(base, "bias", None)
    if torch.is_grad_enabled():
        out = _LokrFn.apply(x2, w1, w2_a, w2_b, weight, bias, in_m, scale)
    elif x2.element_size() >= 4 and dense_is_cheaper(x2.shape[0], w1.shape[0], w2_a.shape[0], in_m,
                                                     w2_b.shape[1], w2_b.shape[0]):
        # float32/64 only: in a 16-bit weight copy a small update would be rounded away
        out = _dense_sum(x2, w1, w2_a, w2_b, to_dtype(weight, x2.dtype), to_dtype(bias, x2.dtype), in_m, scale)
    else:  # inference: the same products, without an autograd node (s w2_a^T kept by the caller)
        out, _, _ = _lokr_sum(x2, w1, w2_a, w2_b, to_dtype(weight, x2.dtype), to_dtype(bias, x2.dtype), in_m,
                              scale, keep_on)
    return out.view(*x.shape[:-1], out.shape[-1])
