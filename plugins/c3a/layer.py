"""The C3A module for one Linear layer.

The weight change (out, in) is block-circulant, divided by the input width:

    dW = C / in,   C[i*b + t, j*b + s] = c3a_kernel[i, j, (s - t) mod b],

b the block size: block (i, j) of C is the circulant matrix whose row t is the kernel vector
``c3a_kernel[i, j]`` rotated right by t. PEFT computes C x as a circular correlation of each
input block with each kernel through FFTs (in float32) in every forward; ``C`` is the same
matrix, so both give the same numbers up to float rounding.

Cost: C is a copy of the kernel's numbers into an (out, in) matrix (no arithmetic, so no
rounding). On a 512 x 512 layer with 512 tokens (2 CPU threads, float32, block sizes 4 to
256) building it and running one product with W + dW took 1.5-1.8 ms a forward and 3.9-4.8 ms
with the backward, against 4.2-5.0 ms and 10.5-13.7 ms for PEFT's FFT form (the base product
alone: 1.3 ms). So peftkit builds dW once per forward that records gradients for the kernel,
and a forward without them (inference, or the adapter frozen) reuses the dW it built last until
the kernel, its storage or dtype change, at the memory of one (out, in) matrix per layer
(``merge_adapter()`` folds it into the weight instead). Alone at a plain layer, from
``FUSED_FROM_TOKENS`` tokens on, the layer runs one product with W + dW (in training through
:class:`_SummedWeightProduct`, which keeps x and the kernel for backward, not W + dW); for fewer
tokens (decoding) it adds x dW^T to the base product. The kernel's gradient is computed per frequency
(:func:`kernel_gradient`), without the (out, in) product g^T x.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, fusable_linear, kept_while_unchanged, LayerAdapter, linear_features,
                                to_dtype)

#: From how many tokens an adapter alone at a plain layer runs one product with W + dW instead of the base
#: product and x dW^T (2 threads, float32, 512 x 512: equal near 32 tokens, W + dW 1.5 ms against 2.7 ms at 512).
FUSED_FROM_TOKENS = 32


def draw_kernel(kernel: torch.Tensor, init_weights: Union[bool, str], in_features: int, out_features: int) -> None:
    """Fill ``kernel`` in place as PEFT does, from torch's global generator: true leaves it (zeros, no draw);
    false or "xavier_uniform" draws U(-a, a) with a = sqrt(6 / (in + out)); "kaiming_uniform" U(-a, a) with
    a = sqrt(1 / in); "gaussian" a standard normal."""
    with torch.no_grad():
        if init_weights is True:
            return
        if init_weights in (False, "xavier_uniform"):
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(in_features + out_features))
            nn.init.uniform_(kernel, -bound, bound)
        elif init_weights == "kaiming_uniform":
            bound = math.sqrt(1.0 / float(in_features))
            nn.init.uniform_(kernel, -bound, bound)
        elif init_weights == "gaussian":
            nn.init.normal_(kernel)
        else:
            raise ValueError(f"c3a: init_weights={init_weights!r} is not one of true, false, 'xavier_uniform', "
                             f"'kaiming_uniform', 'gaussian'")


def _circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """(m, n, b, b): block (i, j) is the circulant matrix of ``kernel[i, j]`` (m, n, b), row t the vector
    rotated right by t. Differentiable (a copy of the kernel's numbers)."""
    b = kernel.shape[-1]
    doubled = torch.cat([kernel, kernel], dim=-1)
    # Window s of the doubled vector is the vector rotated left by s; row t is window b - t.
    return doubled.unfold(-1, b, 1)[:, :, 1:].flip(-2)


def block_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The (m * b, n * b) matrix whose block (i, j) is the circulant matrix of ``kernel[i, j]`` (row t: the
    vector rotated right by t), for a kernel of shape (m, n, b). Differentiable (copies)."""
    m, n, b = kernel.shape
    return _circulant_blocks(kernel).permute(0, 2, 1, 3).reshape(m * b, n * b)


def weight_plus_change(weight: torch.Tensor, kernel: torch.Tensor, in_features: int) -> torch.Tensor:
    """``W + C(kernel) / in`` (out, in) for a weight and kernel of one dtype, without autograd: the blocks of the
    kernel divided by in (a pass over (out, in) that reads only the small kernel), then one pass adding them to
    W's blocks and writing W's layout. ``weight + block_circulant(kernel) / in`` took two passes more (the
    blocks' copy into C's layout, the division): 0.45 against 0.85-1.0 ms for 1376 x 512 with blocks of 32
    (2 threads). The same numbers: each entry is W's plus the kernel's entry divided by in."""
    m, n, b = kernel.shape
    blocks = _circulant_blocks(kernel / in_features).permute(0, 2, 1, 3)  # (m, b, n, b), a view
    out = torch.empty((m, b, n, b), dtype=weight.dtype, device=weight.device)
    return torch.add(weight.reshape(m, b, n, b), blocks, out=out).view(m * b, n * b)


def kernel_gradient(grad: torch.Tensor, x2: torch.Tensor, kernel_shape: torch.Size) -> torch.Tensor:
    """The gradient of a kernel (m, n, b) whose block-circulant matrix C gives ``x2 C^T`` (tokens, m b), for the
    output gradient ``grad``: entry (i, j, k) is the sum over the tokens and t of ``grad[:, i b + t]`` times
    ``x2[:, j b + (t + k) mod b]``, a circular cross-correlation of the blocks, computed per frequency: the real
    FFTs of the blocks of both, for each frequency the (m, n) product of the one's conjugate with the other
    over the tokens (a batched complex product), and the inverse FFT. That is about 2 tokens out in / b
    multiply-adds where forming ``grad^T x2`` (out, in) and summing its circulant diagonals took tokens out in
    (512 tokens, blocks of 32, 2 threads: 0.59 against 1.9 ms on a 512 x 512 layer, 1.2 against 4.8 ms on
    512 x 1376 and 1376 x 512)."""
    m, n, b = kernel_shape
    tokens = grad.shape[0]
    grad_blocks = torch.fft.rfft(grad.reshape(tokens, m, b), dim=-1).permute(2, 0, 1).contiguous()  # (F, T, m)
    x_blocks = torch.fft.rfft(x2.reshape(tokens, n, b), dim=-1).permute(2, 0, 1).contiguous()  # (F, T, n)
    per_frequency = torch.bmm(grad_blocks.transpose(1, 2).conj(), x_blocks)  # (F, m, n)
    return torch.fft.irfft(per_frequency, n=b, dim=0).permute(1, 2, 0)


class _SummedWeightProduct(torch.autograd.Function):
    """y = x (W + dW)^T + b with dW = C(kernel) / in, keeping for backward only x and the kernel (as PEFT's FFT
    form does), not an (out, in) matrix per layer: backward builds dW again (a copy of the kernel's numbers),
    and the kernel's gradient is a circular cross-correlation of g's and x's blocks (:func:`kernel_gradient`)."""

    @staticmethod
    def forward(ctx: object, x2: torch.Tensor, kernel: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
        ctx.save_for_backward(x2, kernel, weight)
        ctx.in_features = in_features
        return F.linear(x2, weight_plus_change(weight, kernel, in_features), bias)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, kernel, weight = ctx.saved_tensors
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, weight_plus_change(weight, kernel, ctx.in_features))
        if ctx.needs_input_grad[1]:
            grad_kernel = kernel_gradient(g, x2, kernel.shape).div_(ctx.in_features).to(kernel.dtype)
        return grad_x, grad_kernel, None, None, None


class C3ALayer(LayerAdapter):
    def __init__(self, base: nn.Module, *, block_size: int, init_weights: Union[bool, str] = "xavier_uniform"
                 ) -> None:
        super().__init__()
        in_features, out_features = linear_features(base)
        if in_features % block_size or out_features % block_size:  # the method checks every layer before this
            raise ValueError(f"c3a: block_size={block_size} must divide in_features={in_features} and "
                             f"out_features={out_features}")
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        # Drawn in float32 on the weight's device (PEFT's draw), then kept in the adapter's dtype.
        kernel = torch.zeros(out_features // block_size, in_features // block_size, block_size,
                             dtype=torch.float32, device=base.weight.device)
        draw_kernel(kernel, init_weights, in_features, out_features)
        self.c3a_kernel = nn.Parameter(kernel.to(adapter_dtype(base)))

    def delta_out_in(self) -> torch.Tensor:
        """dW as (out, in), built from the kernel now, in the kernel's dtype."""
        return block_circulant(self.c3a_kernel) / self.in_features

    def _weight_change(self) -> torch.Tensor:
        """dW for this forward: new when the forward records gradients for the kernel (or is compiled), else the
        one built last for the kernel's same values, storage, device and dtype."""
        return kept_while_unchanged(self, "_kept_change", (self.c3a_kernel,), self.delta_out_in)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's whole output as one product with W + dW, from ``FUSED_FROM_TOKENS`` tokens on (the same
        numbers up to float rounding); None (the two products) under autocast, for a weight of another dtype
        than dW (a half-precision layer: PEFT adds the float32 change to the layer's output), or few tokens."""
        kernel = self.c3a_kernel
        if x.numel() < FUSED_FROM_TOKENS * x.shape[-1] or torch.is_autocast_enabled(x.device.type) \
                or not fusable_linear(base, x, kernel) or base.weight.dtype != kernel.dtype:
            return None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # training: keep x and the kernel only
            self.__dict__.pop("_kept_change", None)
            x2 = x.reshape(-1, x.shape[-1])
            out = _SummedWeightProduct.apply(x2, kernel, base.weight, base.bias, self.in_features)
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, base.weight + self._weight_change(), base.bias)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """dW x in the kernel's dtype (float32 beside a half-precision layer, as PEFT's FFT), added in h's dtype.
        Autocast is off for it: PEFT's FFTs are not autocast either."""
        change = self._weight_change()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(to_dtype(x, change.dtype), change).to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight`` (out, in)."""
        return self.delta_out_in()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"c3a_kernel": self.c3a_kernel}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block_size={self.block_size}"
