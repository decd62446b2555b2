"""The LoKr module for one Linear, GPT-2 Conv1D, Conv1d or Conv2d layer.

The weight change is a Kronecker product,

    dW = s * kron(w1, w2),    s = alpha / r,

with w1 (out_l, in_m) and w2 (out_k, in_n, *kernel) each either a trained
matrix or a product of two rank-r ones (see shapes.py for which, and for the
Tucker form of w2 on convolutions). File keys and shapes are Hugging Face
PEFT's (``lokr_w1``, ``lokr_w2_a``, ...).

On linear layers the unmerged forward never builds the dense (out, in)
update, as PEFT does: since kron(w1, w2) x = vec(w1 X w2^T) for x reshaped
to X (in_m, in_n), it runs two small matrix products per token, many times
fewer operations (and no out * in temporary in the backward pass). When w2
is itself a rank-r product (the usual case) w2's two factors are applied
separately, as products of views with rank-major intermediates (fused.py: no
copies between them), and the last product adds the base output in the same
kernel. The
result equals PEFT's up to float rounding. Convolutions use the dense kernel,
run by the base layer's own convolution (same stride, padding, padding mode,
dilation and groups), so unmerged and merged outputs agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, fusable_linear, is_conv1d, LayerAdapter

from .fused import fused_lokr, rank_major_products
from .shapes import LokrShapes

#: Which parameters start at zero (the update is then zero) for each init_weights value.
_ZERO_AT_INIT = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}


class LokrLayer(LayerAdapter):
    def __init__(self, base: nn.Module, shapes: LokrShapes, *, scale: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 init_weights: bool | str = True) -> None:
        super().__init__()
        self.shapes, self.scale = shapes, float(scale)
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.is_conv = bool(shapes.kernel)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        zero = _ZERO_AT_INIT[init_weights]
        for key, shape in shapes.tensor_shapes().items():
            param = nn.Parameter(torch.empty(shape, **factory))
            if key in zero:
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            setattr(self, key, param)

    # -- the factors -----------------------------------------------------------------

    def _w1(self) -> torch.Tensor:
        if self.shapes.full_w1:
            return self.lokr_w1
        return self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        """(out_k, in_n * kernel) for the low-rank form, (out_k, in_n, *kernel) otherwise."""
        if self.shapes.full_w2:
            return self.lokr_w2
        if self.shapes.tucker:  # core (r, r, *k) mapped by w2_a to out_k and by w2_b to in_n
            return torch.einsum("abhw,ao,bi->oihw", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return self.lokr_w2_a @ self.lokr_w2_b

    def delta_out_in(self) -> torch.Tensor:
        """dW as (out, in) for linear layers, (out, in / groups, *kernel) for convolutions."""
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4:  # a 4-d w2 takes w1 as (out_l, in_m, 1, 1)
            w1 = w1[:, :, None, None]
        # A Conv1d's full w2 is 3-d: w1 then gains a leading dimension (torch.kron's rule, PEFT's
        # layout), and the reshape below gives PEFT's (out, in, k) kernel.
        delta = kron(w1, w2) * self.scale
        if not self.is_conv:
            return delta
        out_features, in_features = self.shapes.out_l * self.shapes.out_k, self.shapes.in_m * self.shapes.in_n
        return delta.reshape(out_features, in_features, *self.shapes.kernel)

    # -- forward -------------------------------------------------------------------

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(()) <= self.module_dropout:
            return torch.zeros_like(h)
        dtype = next(self.parameters()).dtype
        x = x if x.dtype == dtype else x.to(dtype)
        if self.is_conv:
            out = base._conv_forward(x, self.delta_out_in(), None)
        else:
            out = self._linear_delta(x)
        if self.training and self.rank_dropout:
            # output channels: the last dimension of a linear output, (N, C, *spatial) for a convolution
            out = out * self._row_mask(out, channel_dim=-1 - len(self.shapes.kernel))
        return out.to(h.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """Alone on a plain linear layer with a rank-r w2 (no dropout drawing; input, weight and factors of
        dtypes ``fusable_linear`` takes, autocast included): the layer's output as one fused operation
        (fused.py); None otherwise."""
        s = self.shapes
        if self.is_conv or s.full_w2 or self.lokr_w2_b.shape[0] >= s.in_n:
            return None
        if self.training and (self.module_dropout or self.rank_dropout):
            return None
        if not fusable_linear(base, x, self.lokr_w2_b):
            return None
        return fused_lokr(x, self._w1(), self.lokr_w2_a, self.lokr_w2_b, base, s.in_m, self.scale, keep_on=self)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """h + delta; on a linear layer (no dropout drawing, one dtype) the update's last product
        adds h in the same kernel, or h is added to the update read in its transposed layout, so
        no separate (tokens, out) update tensor is written."""
        dtype = next(self.parameters()).dtype
        if self.is_conv or (self.training and (self.module_dropout or self.rank_dropout)) \
                or not (x.dtype == h.dtype == dtype) or not h.is_contiguous() or x.shape[:-1] != h.shape[:-1]:
            return h + self.delta(x, h, base)
        return self._linear_delta(x, add_to=h)

    def _linear_delta(self, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """s * kron(w1, w2) x, computed as s * w1 X w2^T with X = x as (in_m, in_n), in the cheaper order
        (matrix products plus copies for the reshapes); ``add_to + `` that when given (contiguous).

        Only 2-d matrix products run (the reshapes copy where needed): ``torch.matmul`` on batched
        operands picks another kernel depending on whether a factor requires grad, which would
        make a frozen copy of an adapter round differently from the trained one."""
        s = self.shapes
        w1 = self._w1() * self.scale
        if not s.full_w2 and self.lokr_w2_b.shape[0] < s.in_n:
            return self._low_rank_w2_delta(x, w1, add_to)
        w2 = self._w2()
        if s.out_l * s.in_n * (s.in_m + s.out_k) <= s.in_m * s.out_k * (s.in_n + s.out_l):
            # w1 first: rows (token, q) -> (token, q, i), then rows (token, i) -> (token, i, p)
            t = x.reshape(-1, s.in_m, s.in_n).transpose(1, 2).reshape(-1, s.in_m)
            t = F.linear(t, w1).view(-1, s.in_n, s.out_l).transpose(1, 2).reshape(-1, s.in_n)
            if add_to is not None:
                return torch.addmm(add_to.view(-1, s.out_k), t, w2.t()).view(add_to.shape)
            out = F.linear(t, w2)
        else:
            # w2 first: rows (token, j) -> (token, j, p), then rows (token, p) -> (token, p, i)
            t = F.linear(x.reshape(-1, s.in_n), w2)
            t = t.view(-1, s.in_m, s.out_k).transpose(1, 2).reshape(-1, s.in_m)
            out = F.linear(t, w1).view(-1, s.out_k, s.out_l).transpose(1, 2)
            if add_to is not None:
                return (add_to.view(-1, s.out_l, s.out_k) + out).view(add_to.shape)
        return out.reshape(*x.shape[:-1], s.out_l * s.out_k)

    def _low_rank_w2_delta(self, x: torch.Tensor, w1: torch.Tensor, add_to: torch.Tensor | None) -> torch.Tensor:
        """The update when w2 = w2_a w2_b (rank r): w1 (X w2_b^T) w2_a^T, three products of views
        with rank-major intermediates (fused.py's :func:`rank_major_products`, no copies between
        them); the last product writes (or adds into ``add_to``) the output in its final layout."""
        s = self.shapes
        _, u_t = rank_major_products(x.reshape(-1, x.shape[-1]), w1, self.lokr_w2_b, s.in_m)
        u = u_t.view(self.lokr_w2_b.shape[0], -1).t()  # (tokens * out_l, r)
        if add_to is not None:
            return torch.addmm(add_to.view(-1, s.out_k), u, self.lokr_w2_a.t()).view(add_to.shape)
        return torch.mm(u, self.lokr_w2_a.t()).view(*x.shape[:-1], s.out_l * s.out_k)

    def _row_mask(self, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """PEFT's rank dropout: each output row of the update kept with probability 1 - rank_dropout
        (one draw per forward, shared by the batch), rescaled by 1 / (kept share) with rank_dropout_scale."""
        rows = out.shape[channel_dim]
        keep = (torch.rand(rows, device=out.device) > self.rank_dropout).to(out.dtype)
        if self.rank_dropout_scale:
            keep = keep / keep.mean().clamp_min(1.0 / rows)
        shape = [1] * out.dim()
        shape[channel_dim] = rows
        return keep.reshape(shape)

    # -- merging -------------------------------------------------------------------

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in the layout the layer stores (GPT-2's Conv1D: (in, out))."""
        delta = self.delta_out_in()
        return delta.t() if is_conv1d(base) else delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self.shapes.tensor_shapes()}

    def extra_repr(self) -> str:
        s = self.shapes
        w1 = f"w1=({s.out_l}, {s.in_m})" + ("" if s.full_w1 else f" rank {s.r}")
        w2 = f"w2=({s.out_k}, {s.in_n}{''.join(f', {k}' for k in s.kernel)})"
        w2 += "" if s.full_w2 else (f" tucker rank {s.r}" if s.tucker else f" rank {s.r}")
        return f"{w1}, {w2}, scale={self.scale:g}"


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Kronecker product, as ``torch.kron`` defines it for ``a.dim() <= b.dim()`` (``a`` gains leading
    dimensions of size 1), computed by broadcasting: ``torch.kron`` fails on some factors with size-1
    dimensions (a rank-1 w1, a Conv1d's Tucker core), which PEFT then cannot run."""
    a = a.reshape((1,) * (b.dim() - a.dim()) + tuple(a.shape))
    interleaved_a = [size for dim in a.shape for size in (dim, 1)]
    interleaved_b = [size for dim in b.shape for size in (1, dim)]
    product = a.reshape(interleaved_a) * b.reshape(interleaved_b)
    return product.reshape([x * y for x, y in zip(a.shape, b.shape)])
