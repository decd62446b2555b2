"""The HRA module for one Linear or Conv2d layer.

PEFT's HRA runs the layer with the weight ``W H``, H the product
``H_1 H_2 ... H_r`` of Householder reflections ``H_i = I - 2 u_i u_i^T`` (u_i
the columns of ``hra_u``, each divided by its norm), or with apply_GS
``I - 2 Q Q^T`` for Q the Gram-Schmidt orthonormalization of those columns.
PEFT builds H as a dense in x in matrix and multiplies the weight by it at
every forward. Here H is kept in compact form, ``H = I - U T U^T`` with T an
r x r upper-triangular matrix (the "UT transform": ``T^-1 = I/2 +
strictly_upper(U^T U)``; with apply_GS U = Q and T = 2 I), which gives the same
H up to float rounding at a cost of two thin products.

On a Linear layer the reflections act on the input (``x H^T``), and the base
layer then runs once on it (:meth:`HraLayer.base_input`): cheaper than
rotating the weight (see docs/methods/hra.md for the measurement), and it
works on quantized layers too. In training over many tokens on a plain layer the same product runs as LoRA's
form through the fused LoRA node (:meth:`HraLayer.forward_alone`). On a Conv2d they act on each output channel's
flattened filter (in_channels * kh * kw values, PEFT's layout) and the layer
runs with the rotated filters. Inside a composition the change to the output
is ``W (H - I) x``, additive. Merging replaces W with ``W H`` (PEFT's merge);
unmerging multiplies by ``H^T``, its inverse (PEFT's reversed chain).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, adapter_precision, fusable_linear, fused_lora, LayerAdapter, MergeError,
                                quantization_of)

from .shapes import reflected_features


#: From how many tokens a training forward on a plain linear layer runs the fused LoRA node
#: (:meth:`HraLayer.forward_alone`): its B, ``-W U T``, is a product over the weight (out x in x r) each call, which
#: the reflected input's products (tokens x in x r) outweigh from about as many tokens as outputs.
FUSED_FROM_TOKENS = 64


def initial_vectors(features: int, r: int, init_weights: bool) -> torch.Tensor:
    """PEFT's initial ``hra_u`` (features, r), with PEFT's draws from torch's global generator on the CPU:
    Kaiming-uniform columns, in equal adjacent pairs for the symmetric init (an even r), so that
    ``H_2k H_2k+1 = I`` and the layer starts as the base layer."""
    if init_weights and r % 2 == 0:
        half = torch.zeros(features, r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        return torch.repeat_interleave(half, 2, dim=1)
    vectors = torch.empty(features, r)
    nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))
    return vectors


def gram_schmidt(vectors: torch.Tensor) -> torch.Tensor:
    """The columns of ``vectors`` orthonormalized one after the other, in PEFT's order of operations (at the
    symmetric init the second of each equal pair is left with rounding noise, which PEFT normalizes too)."""
    columns = [vectors[:, :1] / vectors[:, 0].norm()]
    for i in range(1, vectors.shape[1]):
        column = vectors[:, i:i + 1]
        for done in columns:
            column = column - (done.t() @ column) * done
        columns.append(column / column.norm())
    return torch.cat(columns, dim=1)


class HraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, *, r: int, apply_GS: bool = False, init_weights: bool = True) -> None:
        super().__init__()
        self.r = r
        self.apply_GS = apply_GS
        self.conv = isinstance(base, nn.Conv2d)
        # A quantized layer's weight cannot be read as a matrix: the change then runs the layer itself.
        self.quantized = quantization_of(base) is not None
        vectors = initial_vectors(reflected_features(base), r, init_weights)
        self.hra_u = nn.Parameter(vectors.to(device=base.weight.device, dtype=adapter_dtype(base)))

    # -- the reflections ---------------------------------------------------------------

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, T) with ``H = I - U T U^T`` (see the module docstring), in the adapter's precision (float32 for
        vectors cast to half precision after adapting: torch has no half-precision triangular solve on the CPU)."""
        vectors = self.hra_u.to(adapter_precision(self.hra_u.dtype))
        eye = torch.eye(self.r, device=vectors.device, dtype=vectors.dtype)
        if self.apply_GS:
            return gram_schmidt(vectors), 2 * eye
        units = vectors / vectors.norm(dim=0)
        inverse = torch.triu(units.t() @ units, diagonal=1) + 0.5 * eye
        return units, torch.linalg.solve_triangular(inverse, eye, upper=True)

    def reflect_rows(self, rows: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``rows @ H^T`` (each row reflected as the layer's input is), or ``rows @ H`` with ``transpose``."""
        units, t = self.compact()
        rows = rows.to(units.dtype)
        return rows - (rows @ units) @ (t if transpose else t.t()) @ units.t()

    def matrix(self) -> torch.Tensor:
        """H as one dense (features, features) matrix (for tests and docs)."""
        units, _ = self.compact()
        return self.reflect_rows(torch.eye(units.shape[0], device=units.device, dtype=units.dtype), True)

    # -- forward -------------------------------------------------------------------

    def base_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """On a linear layer the input reflected, ``H x``: the base layer then runs once on it."""
        return None if self.conv else self.reflect_rows(x).to(x.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """On a Conv2d: the convolution with the reflected filters (bias kept). On a plain linear layer in
        training, from ``FUSED_FROM_TOKENS`` tokens on, the layer's whole output through the plugin API's
        fused LoRA node: ``x H^T W^T = x W^T - (x U) T^T (W U)^T``, LoRA's form with A = U^T and
        B = -W U T (module docstring); else None (the base layer runs on the reflected input)."""
        if not self.conv:
            return self._fused_linear(x, base)
        weight = self._filters(base)
        bias = base.bias.to(weight.dtype) if base.bias is not None else None  # a half layer's bias
        return base._conv_forward(x.to(weight.dtype), weight, bias).to(x.dtype)

    def _fused_linear(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The fused training path of :meth:`forward_alone` on a linear layer, or None where it does not apply:
        without gradients, under autocast, for a weight of another dtype than the vectors, a layer
        ``fusable_linear`` refuses, or fewer tokens than ``FUSED_FROM_TOKENS`` (B costs a product over the
        weight, out x in x r, each call)."""
        vectors = self.hra_u
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) \
                or x.numel() < FUSED_FROM_TOKENS * x.shape[-1] or not fusable_linear(base, x, vectors) \
                or base.weight.dtype != vectors.dtype:
            return None
        units, t = self.compact()
        lora_b = torch.mm(torch.mm(base.weight, units), t).neg_()
        return fused_lora(x, None, units.t(), lora_b, base, 1.0)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.conv:
            change = self._filters(base) - base.weight  # a half weight promotes
            return base._conv_forward(x.to(change.dtype), change, None).to(h.dtype)
        reflected = self.reflect_rows(x)
        shifted = reflected - x.to(reflected.dtype)
        if self.quantized:  # W (H x - x) through the layer itself, without its bias
            bias = getattr(base, "bias", None)
            out = base(shifted.to(x.dtype))
            return (out - bias if bias is not None else out).to(h.dtype)
        weight = base.weight
        return F.linear(shifted.to(weight.dtype), weight).to(h.dtype)

    # -- the weight ------------------------------------------------------------------

    @staticmethod
    def _weight_matrix(base: nn.Module) -> torch.Tensor:
        """The weight as (out, features): a Linear's as it is (HRA adapts no transposed Conv1D), a Conv2d's
        filters flattened."""
        weight = base.weight
        return weight.reshape(weight.shape[0], -1)

    def _reflected_weight(self, base: nn.Module, inverse: bool = False) -> torch.Tensor:
        """``W H`` (``W H^T`` with ``inverse``) in the shape of ``base.weight``, in the adapter's precision."""
        w = self._weight_matrix(base).to(adapter_dtype(base))
        return self.reflect_rows(w, transpose=not inverse).reshape(base.weight.shape)

    def _filters(self, base: nn.Module) -> torch.Tensor:
        """A Conv2d's weight with each output channel's flattened filter reflected, ``W H``."""
        return self._reflected_weight(base)

    # -- merging -------------------------------------------------------------------

    #: Merging multiplies the weight it finds, so an HRA adapter is merged first into its layer.
    merge_reads_weight = True

    def _multiply_weight(self, base: nn.Module, inverse: bool) -> None:
        """W <- W H (merge) or W <- W H^T (unmerge: H is orthogonal), computed in the adapter's precision."""
        weight = base.weight
        weight.data = self._reflected_weight(base, inverse).to(weight.dtype).contiguous()

    def _refuse_quantized(self) -> None:
        if self.quantized:
            raise MergeError("an hra adapter on a quantized layer cannot be merged: the reflected weight would have "
                             "to be quantized again; keep it unmerged, or load the base in float to merge")

    def merge(self, base: nn.Module) -> None:
        self._refuse_quantized()
        with torch.no_grad():
            if not torch.isfinite(self.hra_u).all():
                raise MergeError("an hra reflection vector holds NaN or infinite values; it cannot be merged")
            self._multiply_weight(base, inverse=False)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            self._multiply_weight(base, inverse=True)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change merging makes to ``base.weight`` as it is now, in its shape and dtype."""
        self._refuse_quantized()
        weight = base.weight
        return (self._reflected_weight(base) - weight.to(adapter_dtype(base))).to(weight.dtype)

    # -- files -------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hra_u": self.hra_u}

    def extra_repr(self) -> str:
        return f"r={self.r}, features={self.hra_u.shape[0]}{', apply_GS' if self.apply_GS else ''}"
