"""LoRA and DoRA on a plain linear layer as one fused operation (the layer's whole output).

When a LoRA adapter is alone at its site, the TunerLayer asks it for the site's
whole output (``LayerAdapter.forward_alone``). The plugin API exports
:func:`fused_lora` (with :func:`dora_norm` and :func:`norm_joins_base_product`) so
every method whose update has LoRA's form runs it: LoRA and DoRA, AdaLoRA (with
``A * E``) and VB-LoRA (with the factors mixed from its bank). Computing the base product here
too, instead of receiving it, lets the update and the base product share one
output tensor: the update's product (with the bias) writes it and the base GEMM
accumulates onto it (beta = 1, written ``addmm(out=)`` so FLOP counters see it),
reading it while it computes, so no separate pass over the (tokens, out) output
runs (0-5% off one layer's step at 512-2048 tokens, paired medians); in training one autograd
node holds the layer:

- forward saves only what backward needs: the input, ``A x^T`` (r x tokens)
  and, for DoRA, the pre-scaling output;
- backward computes the input gradient ``g W + (s g B) A`` the same way (the
  LoRA part written first, ``g W`` accumulated onto it by its GEMM: no separate
  sum of two input gradients), and folds the LoRA scale into the (r x tokens)
  intermediate instead of a (tokens x out) tensor;
- DoRA's ``(m / n) * u + b`` is one multiply-add pass, written over ``u`` at inference, and its
  backward allocates one (tokens x out) tensor (the magnitude gradient's products, then ``g m / n``).

The rank-sized intermediates are kept rank-major, (r, tokens), and every
product that has r as its output's short side is computed as its transpose
(``A x^T`` rather than ``x A^T``, ``xa^T g`` rather than ``g^T xa``): CPU
BLAS runs a product whose output has r rows several times faster than one
whose output has r columns (about 3-4x for r=8 at 512 tokens), and the
transposed operands are read in place (no copies). From rank
``TOKEN_MAJOR_FROM_RANK`` on it is the other way round with 2 threads: the two
products that reduce over a layer's width (``A x^T`` and ``B^T g^T``) then run
faster as written token-major (``x A^T``, ``g B``; 10-30% at r=16..128 on the
(in, out) shapes 512x512, 512x1376, 1376x512 at 512 tokens; equal with 1
thread), and their transposes serve as the rank-major intermediates
(:func:`_rank_major`).

Below that rank, with more than one CPU thread, the four rank-major products of a step (``A x^T`` and
``B^T g^T``, and the sums over the tokens giving A's and B's gradients) run as two halves of the tokens in
one batched product: CPU BLAS barely parallelizes a product with r output rows (r=8, 512x512 operand at
512 tokens: 86 us with 1 thread, 74 us with 2), a batch of two runs one half per thread (2 threads, r=8,
512 to 2048 tokens: such products 5-30% faster, a layer's training step 1-5% faster; no gain at 128
tokens; with 1 thread the split costs 10% and is off). The halves of a sum over the tokens are added
afterwards: the same sum in another order. From ``SPLIT_FROM_TOKENS`` tokens on, for an even count
(:func:`_split_in_halves`).

In bfloat16 or float16 on the CPU the order is the other way round (``accumulating_gemm_is_fast``, the
plugin API): the base product writes the output and the update's product is added into it, and ``g W``
comes first in backward with the LoRA part added into it; CPU BLAS's half-precision product accumulating
onto an existing output runs 5-10% slower than a plain one, and the halves split is off in half precision
(the batched product runs slower there). At the layer (512 tokens, 2 threads, bfloat16, r=8) this order
made the forward 4-5% and backward 6-12% faster than the float32 order.

In training, DoRA's row norms (new every step) need ``A W^T``, a product with r output rows that reads all of
W: the node takes it from the base product instead, multiplying W by x and A stacked (:func:`_base_and_cross`),
for batches of at most as many tokens as outputs (:func:`norm_joins_base_product`).

In inference (gradients off) with many tokens, a float32 or float64 layer adds ``s B A`` to a temporary
copy of W and runs one product instead (:func:`dense_is_cheaper`): the products' passes over the input
and the output grow with the tokens, the copy's pass over the weight does not. One layer's forward over
its bare base product, 2 threads, paired medians (at 1 thread alike): r=8 at 2048 tokens 1.09-1.11 ->
1.03-1.04, r=64 at 1024 tokens 1.24-1.35 -> 1.12-1.14; at 128-512 tokens (r=8) the products stay
cheaper. Training keeps the products: there backward would form the copy again, and the token sums
giving A's and B's gradients pass over the input and the output gradient either way (measured: no
gain below 2048 tokens, 2-5% at 4096 with r=8).

Float32 factors on a bfloat16 or float16 layer (what adapting a half-precision model gives, PEFT's
default too): the factors' products run in float32, as PEFT's float32 branch does, on a float32 copy of
the input made when a product needs it and freed after it; the half-precision input itself is what
backward keeps. The unfused path (and PEFT) keeps that float32 copy for backward instead, twice the
input's memory at every adapted layer (a bfloat16 Llama's training step: 31% less memory kept for
backward with LoRA r8, bench/perf_table.py --dtype bfloat16). The float32 update is added to the
half-precision base product in one rounding.

Under ``torch.autocast`` (a float32 model trained in mixed precision, as a Trainer with ``bf16=True``
runs it) the fused path computes in autocast's dtype, as autocast runs the unfused layer's products: the
input and the factors are cast to it before the node (so the factors' gradients flow back to them as
float32) and the products run with autocast off. The frozen float32 weight is cast inside the node,
and backward casts it again rather than keeping the copy: autocast's own linear keeps the
half-precision copy of every frozen weight alive until backward, a copy of half the adapted layers'
float32 size.

With dropout in training (plain LoRA), the node draws the dropout itself, exactly as
``torch.nn.functional.dropout`` draws it (the same entries, and on the CPU the same values, for one seed),
and keeps for backward the input and a one-byte mask of the kept entries instead of the dropped-out copy and
the dropout's float noise: backward recomputes the copy, and the dropout's gradient joins ``g W`` in the
input gradient's buffer. The layers reading one input (q, k, v; gate, up) then keep that input once: a Llama
step with LoRA r8 and dropout 0.1 keeps 99.9 MiB for backward instead of 139.0 (PEFT 139.0), in the same
time (bench/perf_table.py).

Values and gradients equal the unfused forward (``LoraLinear.forward``) up to
float rounding. The fused path is taken only for a float nn.Linear or GPT-2
Conv1D whose weight and bias are frozen, with the dtypes ``fusable_linear`` (the plugin API) takes:
without autocast input and weight of one dtype and the factors of that dtype or float32 on a
half-precision layer; under autocast tensors autocast casts. Everything else takes the unfused path,
and so does DoRA with dropout in training (PEFT then puts the dropped-out input through W too:
``LoraLinear.forward``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.core.base_layers import accumulating_gemm_is_fast, kept_scaled_transpose, to_dtype, weight_out_in
from peftkit.core.dropout_draw import cpu_keep_mask


#: The rank from which ``_rank_major`` computes its product token-major (module docstring): 2-thread
#: CPU times, min of 200 interleaved calls, float32: rank-major faster at r=8 and 12, token-major at 16 on.
TOKEN_MAJOR_FROM_RANK = 16
#: The token count from which a rank-major product on a CPU with several torch threads runs as two halves
#: of the tokens in one batched product (module docstring).
SPLIT_FROM_TOKENS = 256
#: How many times the weight's copy pass the products' passes must move before inference forms the
#: weight copy (:func:`dense_is_cheaper`), at ranks up to ``DENSE_MARGIN_RANKS[0]`` and from
#: ``DENSE_MARGIN_RANKS[1]`` on (linear in between): the rank-sized products run faster per float moved
#: than the product forming the copy does at low rank (2-thread and 1-thread crossovers measured on the
#: (in, out) shapes 512x512, 512x1376 and 1376x512 at r = 8, 16, 32, 64 and 384 to 2048 tokens).
DENSE_MARGINS = (1.5, 1.0)
DENSE_MARGIN_RANKS = (16, 64)


def dense_is_cheaper(tokens: int, in_features: int, out_features: int, rank: int) -> bool:
    """Whether an inference forward adds ``s B A`` to a temporary copy of W and runs one product rather
    than the products (module docstring). The copy reads and writes the weight once (2 in out floats;
    the base product then reads the copy instead of W); the products read the input once (``A x^T``) and
    write the output once more and read it again (the update's product writes it, the base product
    accumulates onto it): tokens (in + 2 out) floats. The copy wins once the products move more than
    ``DENSE_MARGINS`` times as much, a margin falling with the rank."""
    low_rank, high_rank = DENSE_MARGIN_RANKS
    share = min(max((rank - low_rank) / (high_rank - low_rank), 0.0), 1.0)
    margin = DENSE_MARGINS[0] + share * (DENSE_MARGINS[1] - DENSE_MARGINS[0])
    return tokens * (in_features + 2 * out_features) > margin * 2 * in_features * out_features


def _split_in_halves(rank: int, tokens_operand: torch.Tensor) -> bool:
    """Whether a rank-major product reading ``tokens_operand`` (tokens, k) runs as two halves of the
    tokens in one batched product (module docstring): below ``TOKEN_MAJOR_FROM_RANK``, on the CPU with
    more than one torch thread, from ``SPLIT_FROM_TOKENS`` tokens on, for an even token count, in float32
    or float64 (a bfloat16 batched product runs 10-30% slower than the plain one at r=8); never
    under torch.compile (its kernels are its own, and asking for the thread count would break the graph)."""
    tokens = tokens_operand.shape[0]
    return rank < TOKEN_MAJOR_FROM_RANK and tokens_operand.element_size() >= 4 \
        and tokens >= SPLIT_FROM_TOKENS and tokens % 2 == 0 and tokens_operand.device.type == "cpu" \
        and not torch.compiler.is_compiling() and torch.get_num_threads() > 1


def _rank_major(factor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``factor other^T`` as an (r, tokens) matrix, for a rank-major factor (r, k) and a (tokens, k)
    operand: computed as written below rank ``TOKEN_MAJOR_FROM_RANK`` (each half of the tokens in one
    batched product where :func:`_split_in_halves`), from it on as the transpose of ``other factor^T``
    (a transposed view of a (tokens, r) result; module docstring)."""
    rank, width = factor.shape
    if _split_in_halves(rank, other):
        halves = other.view(2, -1, width).transpose(1, 2)  # (2, k, tokens / 2), read in place
        return torch.bmm(factor.expand(2, rank, width), halves).transpose(0, 1).reshape(rank, -1)
    if rank < TOKEN_MAJOR_FROM_RANK:
        return torch.mm(factor, other.t())
    return torch.mm(other, factor.t()).t()


def _token_sum(rank_major: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``rank_major other``, an (r, k) sum over the tokens of an (r, tokens) and a (tokens, k) matrix; where
    :func:`_split_in_halves`, each half of the tokens is summed in one batched product, then the two added
    (the same sum in another order: equal up to float rounding)."""
    rank = rank_major.shape[0]
    if not _split_in_halves(rank, other):
        return torch.mm(rank_major, other)
    halves = rank_major.view(rank, 2, -1).transpose(0, 1)  # (2, r, tokens / 2), read in place
    return torch.bmm(halves, other.view(2, -1, other.shape[1])).sum(0)


#: Devices where ``torch.nn.functional.dropout`` runs the fused ``native_dropout`` kernel (a one-byte mask);
#: elsewhere (the CPU) it draws a float noise tensor with ``bernoulli_`` and divides it by 1 - p.
_NATIVE_DROPOUT_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")


def _draw_dropout(x2: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x2), the mask of the kept entries), drawn from torch's generator exactly as
    ``torch.nn.functional.dropout(x2, p, training=True)`` draws it on x2's device, so the fused path drops
    the same entries as the unfused layer (and PEFT) for one seed."""
    if x2.device.type in _NATIVE_DROPOUT_DEVICES and x2.numel():
        dropped, keep = torch.native_dropout(x2, p, True)
        return dropped, keep
    if x2.device.type == "cpu":  # the same mask, drawn in fewer steps (core/dropout_draw.py)
        keep = cpu_keep_mask(x2, 1 - p)
        return x2 * _dropout_noise(keep, p, x2.dtype), keep
    noise = torch.empty_like(x2).bernoulli_(1 - p).div_(1 - p)
    return x2 * noise, noise.to(torch.bool)  # a cast, several times faster than comparing (noise != 0)


def _dropout_noise(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """The factor each entry was multiplied by: 1 / (1 - p) where kept, 0 where dropped (as the CPU's dropout
    computes it, so the dropped-out input is recomputed bit for bit there)."""
    return keep.view(torch.uint8).to(dtype).div_(1 - p)  # from bytes: casting bool itself runs 5x slower


def _input_grad(ctx: Any, g: torch.Tensor, weight: torch.Tensor, g_xa_t: torch.Tensor, lora_a: torch.Tensor | None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the base input and of the LoRA input that autograd asks for: ``g W`` (``weight``:
    W as (out, in), cast to g's dtype: under autocast the float32 weight is cast again here rather than
    its copy kept from the forward) and ``g_xa A`` (``g_xa_t``: g_xa rank-major), the second accumulated
    into the first when both inputs are the same tensor. With float32 factors on a half-precision layer,
    ``g_xa A`` is computed in float32 and added to ``g W`` (half precision) in one rounding. ``noise``: the
    dropout drawn inside the node (:func:`_draw_dropout`), whose gradient ``(g_xa A) * noise`` joins
    ``g W`` here instead of in a dropout node of its own."""
    grad_x = grad_x_lora = None
    mixed = g.dtype != ctx.factor_dtype
    if ctx.needs_input_grad[0]:
        weight = to_dtype(weight, g.dtype)
        if noise is not None:
            lora_part = torch.mm(g_xa_t.t(), lora_a).to(g.dtype).mul_(noise)
            if mixed or not accumulating_gemm_is_fast(g):
                grad_x = torch.mm(g, weight).add_(lora_part)
            else:
                grad_x = torch.addmm(lora_part, g, weight, out=lora_part)  # in place, counted as a product
        elif ctx.same_input and mixed:
            grad_x = torch.mm(g, weight).add_(torch.mm(g_xa_t.t(), lora_a))
        elif ctx.same_input and not accumulating_gemm_is_fast(g):  # g W first, the LoRA part added into it
            grad_x = torch.mm(g, weight)
            torch.addmm(grad_x, g_xa_t.t(), lora_a, out=grad_x)
        elif ctx.same_input:  # the LoRA part first; g W adds onto it inside its GEMM (no separate pass)
            grad_x = torch.mm(g_xa_t.t(), lora_a)
            torch.addmm(grad_x, g, weight, out=grad_x)
        else:
            grad_x = torch.mm(g, weight)
    if ctx.needs_input_grad[1]:
        grad_x_lora = torch.mm(g_xa_t.t(), lora_a).to(g.dtype)
    return grad_x, grad_x_lora


def _lora_sum(x2: torch.Tensor, lora_in: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
              keep_on: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x2 W^T (+ b) + s (lora_in A^T) B^T``, ``A lora_in^T``) for W (``weight``, (out, in)) and ``bias`` in
    x2's dtype: the update's product (with the bias) writes the output and the base GEMM accumulates onto
    it, reading it while it computes (no separate pass over the (tokens, out) output); the rank-sized
    intermediate is rank-major (r, tokens). With float32 factors on a half-precision layer, the factors'
    products run in float32 on a float32 copy of the input (freed on return) and their sum is added to the
    base product in one rounding."""
    xa_t = _rank_major(lora_a, to_dtype(lora_in, lora_a.dtype))
    if x2.dtype != lora_a.dtype:
        return F.linear(x2, weight, bias).add_(torch.mm(xa_t.t(), lora_b.t()), alpha=scale), xa_t
    if not accumulating_gemm_is_fast(x2):  # the base product first, the update added into it in place
        out = F.linear(x2, weight, bias)
        return torch.addmm(out, xa_t.t(), lora_b.t(), alpha=scale, out=out), xa_t  # counted as a product
    if bias is None:  # s rides on a scaled copy of the small (out, r) factor (inference keeps it on ``keep_on``)
        scaled_b_t = lora_b.t() * scale if keep_on is None else kept_scaled_transpose(keep_on, lora_b, scale)
        out = torch.mm(xa_t.t(), scaled_b_t)
    else:
        out = torch.addmm(bias, xa_t.t(), lora_b.t(), alpha=scale)
    torch.addmm(out, x2, weight.t(), out=out)  # in place, counted as a product
    return out, xa_t


def _dora_output(unscaled: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None,
                 in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(``(m / n) * unscaled + b``, ``m / n``) in one pass over (tokens, out) (a fused multiply-add with a
    bias), written over ``unscaled`` when ``in_place`` (inference: nothing else reads it), else into a new
    tensor (training saves ``unscaled`` for the magnitude's gradient)."""
    mag_scale = (magnitude / norm).to(unscaled.dtype)
    into = unscaled if in_place else None
    if bias is None:
        return torch.mul(unscaled, mag_scale, out=into), mag_scale
    return torch.addcmul(bias, unscaled, mag_scale, out=into), mag_scale


def _kept_factor_a(ctx: Any, lora_a: torch.Tensor) -> torch.Tensor | None:
    """A, kept for backward only where an input gradient (the only product reading A there) is asked for:
    a method whose A is built in the forward (AdaLoRA's ``A * E``, VB-LoRA's mixed bank vectors) then frees it
    at the layers whose input takes no gradient (the first layer's, after frozen embeddings), as the
    unfused layer (and PEFT's) does."""
    return lora_a if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None


def _lora_grads(ctx: Any, g: torch.Tensor, lora_in: torch.Tensor, xa_t: torch.Tensor, lora_a: torch.Tensor | None,
                lora_b: torch.Tensor, weight: torch.Tensor,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x2, x2_lora, A, B) for the output gradient ``g`` of ``x2 W^T + s (lora_in A^T) B^T``
    (``xa_t`` = A lora_in^T); the scale is applied to (r x tokens) and (r x out) tensors only, and the
    products with an r-sized side are computed in the faster layout for r (module docstring). The factors'
    products run in the factors' dtype (float32 copies of ``g`` and ``lora_in`` in the mixed case)."""
    g_factors = to_dtype(g, lora_b.dtype)
    g_xa_t = _rank_major(lora_b.t(), g_factors).mul_(ctx.scale)  # (s g B)^T
    grad_a = _token_sum(g_xa_t, to_dtype(lora_in, ctx.factor_dtype)) if ctx.needs_input_grad[2] else None
    grad_b = _token_sum(xa_t, g_factors).mul_(ctx.scale).t() if ctx.needs_input_grad[3] else None
    return (*_input_grad(ctx, g, weight, g_xa_t, lora_a, noise), grad_a, grad_b)



class _LoraFn(torch.autograd.Function):
    """y = x W^T + b + s (x_d A^T) B^T, x_d the LoRA input (x, x after a dropout drawn outside, or, with
    ``dropout`` > 0, x after a dropout drawn here); W and b are cast to x's dtype where they differ (autocast),
    and backward casts W again instead of keeping the copy.

    A dropout drawn here keeps x and a one-byte keep mask for backward, which recomputes x_d from them,
    instead of x_d itself (and the dropout node's own float noise): the layers reading one input (q, k and v)
    keep that input once and a mask each rather than a dropped-out copy each."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, x2_lora: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                dropout: float = 0.0) -> torch.Tensor:
        keep = None
        if dropout:
            lora_in, keep = _draw_dropout(x2, dropout)
        else:
            lora_in = x2 if x2_lora is None else x2_lora
        out, xa_t = _lora_sum(x2, lora_in, lora_a, lora_b, to_dtype(weight, x2.dtype), to_dtype(bias, x2.dtype),
                              scale)
        ctx.save_for_backward(lora_in if keep is None else x2, keep, xa_t, _kept_factor_a(ctx, lora_a), lora_b, weight)
        ctx.scale, ctx.same_input, ctx.dropout, ctx.factor_dtype = scale, x2_lora is None, dropout, lora_a.dtype
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lora_in, keep, xa_t, lora_a, lora_b, weight = ctx.saved_tensors
        noise = None
        if keep is not None:
            noise = _dropout_noise(keep, ctx.dropout, lora_in.dtype)
            lora_in = lora_in * noise
        g = g.contiguous()
        grads = _lora_grads(ctx, g, lora_in, xa_t, lora_a, lora_b, weight, noise)
        grad_bias = g.sum(0) if ctx.needs_input_grad[5] else None  # a bias with a LoRA part (lora_bias)
        return (*grads, None, grad_bias, None, None)


def dora_norm(cross: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weight_sq: torch.Tensor,
              scale: float) -> torch.Tensor:
    """DoRA's row norms ``||W + s B A||`` without forming the dense matrix, from ``cross`` = ``A W^T`` (r, out)
    and ``weight_sq`` = the rows' ``||w_i||^2``: ``||w_i||^2 + s b_i . (2 (W A^T)_i + s (B A A^T)_i)``, the second
    factor computed rank-major as the (r, out) matrix ``2 A W^T + s (A A^T) B^T`` in one fused product (CPU BLAS
    runs a product with r output rows several times faster than one with r output columns)."""
    twice_cross_and_lora = torch.addmm(cross, torch.mm(lora_a, lora_a.t()), lora_b.t(), beta=2, alpha=scale)
    return torch.add(weight_sq, (lora_b.t() * twice_cross_and_lora).sum(dim=0), alpha=scale).clamp_min_(0).sqrt_()


def norm_joins_base_product(x: torch.Tensor, lora_a: torch.Tensor, out_features: int) -> bool:
    """Whether a DoRA node computes its row norms itself, from ``A W^T`` taken in the base product (``x`` and A
    stacked: :func:`_base_and_cross`) instead of a product of its own that reads all of W again: in training
    (the norms are recomputed every forward; inference keeps them while the weights do not change), with
    autocast off and the input in the factors' dtype (under autocast, or with float32 factors on a half-precision
    layer, the norms stay float32 products of the float32 weight, as the layer computes them), for at most
    ``out_features`` tokens: the stacked copy of the input then moves no more than the pass over W it saves
    (bench/perf_table.py's Llama, DoRA r8, 2 threads: a step 1.189 -> 1.172 times the frozen base's at 512
    tokens, no gain at 2048, where the copy is the larger)."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.is_grad_enabled() and x.dtype == lora_a.dtype and tokens <= out_features \
        and not torch.is_autocast_enabled(x.device.type)


def _base_and_cross(x2: torch.Tensor, lora_a: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x2 W^T``, ``A W^T``) from one product of W with ``x2`` and A stacked, (tokens + r, in): W is read once
    for both, where a separate ``A W^T`` (r rows: a product CPU BLAS runs far below its speed) reads all of W
    again. The first is a contiguous view of the product's first rows."""
    tokens = x2.shape[0]
    both = torch.mm(torch.cat((x2, lora_a)), weight.t())
    return both[:tokens], both[tokens:]


class _DoraFn(torch.autograd.Function):
    """y = (m / n) * (x W^T + s (x_d A^T) B^T) + b, the norms n detached (DoRA's rule); W and b as in
    :class:`_LoraFn`. Without ``norm`` (:func:`norm_joins_base_product`), the node computes the norms from
    ``weight_sq`` (the rows' ``||w_i||^2``) and ``A W^T`` taken in the base product (:func:`_base_and_cross`)."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, x2_lora: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, scale: float, weight_sq: torch.Tensor | None = None) -> torch.Tensor:
        lora_in = x2 if x2_lora is None else x2_lora
        if norm is None:
            unscaled, cross = _base_and_cross(x2, lora_a, weight)
            norm = dora_norm(cross, lora_a, lora_b, weight_sq, scale)
            xa_t = _rank_major(lora_a, lora_in)
            torch.addmm(unscaled, xa_t.t(), lora_b.t(), alpha=scale, out=unscaled)  # in place, counted as a product
        else:
            unscaled, xa_t = _lora_sum(x2, lora_in, lora_a, lora_b, to_dtype(weight, x2.dtype), None, scale)
        out, mag_scale = _dora_output(unscaled, magnitude, norm, to_dtype(bias, x2.dtype), in_place=False)
        ctx.save_for_backward(lora_in, xa_t, unscaled, mag_scale, norm, _kept_factor_a(ctx, lora_a), lora_b, weight)
        ctx.scale, ctx.same_input, ctx.factor_dtype = scale, x2_lora is None, lora_a.dtype
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        lora_in, xa_t, unscaled, mag_scale, norm, lora_a, lora_b, weight = ctx.saved_tensors
        grad_m = products = None
        if ctx.needs_input_grad[4]:
            products = torch.mul(g, unscaled)
            grad_m = products.sum(0, dtype=norm.dtype).div_(norm)
        # g * (m / n) reuses the (tokens, out) buffer of the products once they are summed: one
        # allocation of that size per backward instead of two.
        grads = _lora_grads(ctx, torch.mul(g, mag_scale, out=products), lora_in, xa_t, lora_a, lora_b, weight)
        return (*grads, grad_m, None, None, None, None, None)


def fused_lora(x: torch.Tensor, lora_x: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
               base: nn.Module, scale: float, magnitude: torch.Tensor | None = None,
               norm: torch.Tensor | None = None, keep_on: nn.Module | None = None,
               dropout: float = 0.0, lora_bias: torch.Tensor | None = None,
               weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The whole output of linear layer ``base`` with a LoRA (DoRA when ``magnitude`` and its detached
    ``norm`` are given, or ``magnitude`` and ``weight_sq``, W's rows' ``||w_i||^2``, where
    :func:`norm_joins_base_product`: the node then computes the norms) on input ``x``; ``lora_x`` is the
    LoRA's own input when it differs from ``x``
    (dropout), else None. The caller checked ``fusable_linear``. Under autocast the inputs and factors are
    cast to autocast's dtype (the factors' gradients flow back to them in their own dtype) and the products
    run in it with autocast off; the frozen weight is cast inside (module docstring). ``keep_on``: the layer
    adapter on which an inference forward (without gradients, outside autocast) keeps ``lora_b.t() * scale``
    between calls where its products use it (``kept_scaled_transpose``: the same numbers). ``dropout`` > 0
    (plain LoRA, ``lora_x`` None): the LoRA reads x after a dropout of that probability, drawn here as
    ``torch.nn.functional.dropout`` draws it; with gradients, backward keeps x and a one-byte mask
    instead of the dropped-out copy (:class:`_LoraFn`). ``lora_bias`` (plain LoRA): B's bias, so the update is
    ``s (B A x + b_B)``; it joins the layer's bias (its gradient flows back through that sum)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _fused_lora(x.to(compute), to_dtype(lora_x, compute), lora_a.to(compute), lora_b.to(compute),
                               base, scale, magnitude, norm, None, dropout, to_dtype(lora_bias, compute))
    return _fused_lora(x, lora_x, lora_a, lora_b, base, scale, magnitude, norm, keep_on, dropout, lora_bias,
                       weight_sq)


def _dense_in_inference(x2: torch.Tensor, lora_x2: torch.Tensor | None, lora_a: torch.Tensor,
                        lora_b: torch.Tensor) -> bool:
    """Whether inference runs through a temporary weight copy: one input for W and the LoRA (no dropout
    input), float32 or float64 throughout (in a 16-bit copy a small update would be rounded away), and
    :func:`dense_is_cheaper`."""
    rank, in_features = lora_a.shape
    return lora_x2 is None and x2.element_size() >= 4 and x2.dtype == lora_a.dtype \
        and dense_is_cheaper(x2.shape[0], in_features, lora_b.shape[0], rank)


def _fused_lora(x: torch.Tensor, lora_x: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                base: nn.Module, scale: float, magnitude: torch.Tensor | None,
                norm: torch.Tensor | None, keep_on: nn.Module | None, dropout: float = 0.0,
                lora_bias: torch.Tensor | None = None, weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    features = x.shape[-1]
    x2 = x.reshape(-1, features)
    lora_x2 = None if lora_x is None else lora_x.reshape(-1, features)
    if dropout and (magnitude is not None or not torch.is_grad_enabled()):
        lora_x2 = _draw_dropout(x2, dropout)[0]  # only plain LoRA with gradients draws inside its node
        dropout = 0.0
    weight, bias = weight_out_in(base), getattr(base, "bias", None)
    if lora_bias is not None:  # b + s b_B, in the LoRA bias's dtype
        scaled = lora_bias * scale
        bias = scaled if bias is None else scaled + bias.to(scaled.dtype)
    if not torch.is_grad_enabled():  # inference: without an autograd node
        lora_in = x2 if lora_x2 is None else lora_x2
        bias = to_dtype(bias, x2.dtype)
        weight = to_dtype(weight, x2.dtype)
        own_bias = bias if magnitude is None else None
        if _dense_in_inference(x2, lora_x2, lora_a, lora_b):
            out = F.linear(x2, torch.addmm(weight, lora_b, lora_a, alpha=scale), own_bias)
        else:
            out, _ = _lora_sum(x2, lora_in, lora_a, lora_b, weight, own_bias, scale, keep_on)
        if magnitude is not None:
            out, _ = _dora_output(out, magnitude, norm, bias, in_place=True)
    elif magnitude is None:
        out = _LoraFn.apply(x2, lora_x2, lora_a, lora_b, weight, bias, scale, dropout)
    else:
        out = _DoraFn.apply(x2, lora_x2, lora_a, lora_b, magnitude, norm, weight, bias, scale, weight_sq)
    return out.view(*x.shape[:-1], out.shape[-1])
