"""The RandLoRA module for one Linear or GPT-2 Conv1D layer.

The layer's slice of the shared bases: A (r, 1, m) and B (M, n, r), m = min(in, out), M = max(in, out),
n = ceil(m / r). The trainable ``randlora_lambda`` (r, n) and ``randlora_gamma`` (n, m) scale A into
S[k, b, :] = lambda[k, b] * A[k, 0, :] * gamma[b, :], and the update is the product of the flattened S
(r * n, m) and the flattened B (M, n * r), applied on the smaller side: for in <= out,
``scaling * B_flat (S_flat x)``, else ``scaling * S_flat^T (B_flat^T x)`` (PEFT's pairing of the two flattenings,
kept as is). Per forward only S is built (as in PEFT), never the (out, in) update; merging builds that.
The bases are read through ``self.shared`` at each use. File keys are PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, is_conv1d, LayerAdapter, MergeError, quantization_of

from .bases import BASIS_A, BASIS_B, num_bases


class _ScaledBasis(torch.autograd.Function):
    """lambda[:, :, None] * A * gamma[None]: (r, n, m), keeping only the three inputs for the backward (not the
    (r, n, m) product autograd would keep for gamma's gradient). A is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx: Any, basis: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(basis, lam, gamma)
        return lam[:, :, None] * basis * gamma[None]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        basis, lam, gamma = (t.to(grad.dtype) for t in ctx.saved_tensors)
        row = basis[:, 0, :]  # (r, m)
        grad_lambda = torch.einsum("kbj,kj,bj->kb", grad, row, gamma)
        grad_gamma = torch.einsum("kbj,kj,kb->bj", grad, row, lam)
        return None, grad_lambda, grad_gamma


class RandLoraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, *, scaling: float,
                 dropout: float = 0.0, init_weights: bool = True, save_projection: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling, self.save_projection = scaling, save_projection
        self.min_dim, self.max_dim = min(in_features, out_features), max(in_features, out_features)
        self.num_bases = num_bases(self.min_dim, r)
        self.quantized = quantization_of(base)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        # PEFT draws lambda from torch's generator even when init_weights then zeroes it: the same draws here.
        lam = torch.randn(r, self.num_bases).to(**factory)
        gamma = torch.full((self.num_bases, self.min_dim), 1.0 / self.max_dim, **factory)
        if init_weights:
            lam.zero_()
            gamma.fill_(1.0 / max(gamma.shape))
        self.randlora_lambda = nn.Parameter(lam)
        self.randlora_gamma = nn.Parameter(gamma)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A (r, 1, m) and B (M, n, r), in lambda's dtype and device."""
        shared = self.shared
        if shared is None:
            raise RuntimeError("this RandLoRA layer is not bound to its adapter's bases; create RandLoRA adapters "
                               "through AdaptedModel.add_adapter or load_adapter")
        like = self.randlora_lambda
        a = getattr(shared, BASIS_A)[:, : self.num_bases, : self.min_dim]
        b = getattr(shared, BASIS_B)[: self.max_dim, : self.num_bases, :]
        return a.to(device=like.device, dtype=like.dtype), b.to(device=like.device, dtype=like.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second): the update is ``second @ first`` (out, in), first (r * n, in), second (out, r * n)."""
        a, b = self._bases()
        scaled = _ScaledBasis.apply(a, self.randlora_lambda, self.randlora_gamma).flatten(end_dim=1)  # (r*n, m)
        b_flat = b.flatten(start_dim=1)  # (M, n*r)
        if self.min_dim == self.in_features:
            return scaled, b_flat
        return b_flat.t(), scaled.t()

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        first, second = self.factors()
        x = x if x.dtype == first.dtype else x.to(first.dtype)
        return (F.linear(F.linear(self.dropout(x), first), second) * self.scaling).to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in the layout the layer stores (GPT-2's Conv1D: (in, out))."""
        if self.quantized:
            raise MergeError(f"a randlora adapter on a quantized layer ({self.quantized}) cannot be merged: the "
                             f"weight would have to be quantized again; keep it unmerged, or load the base in "
                             f"float to merge")
        first, second = self.factors()
        delta = (second @ first) * self.scaling
        return delta.t() if is_conv1d(base) else delta

    # -- files -------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's file holds, with save_projection, a copy of the whole shared bases under every layer too
        (``<module>.randlora_A`` / ``.randlora_B``), beside the adapter-wide ``base_model.randlora_A`` / ``_B``."""
        out = dict(self.tensors())
        if self.save_projection and self.shared is not None:
            for name in (BASIS_A, BASIS_B):
                out[name] = getattr(self.shared, name).detach().clone()
        return out

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drops the per-layer copies of the bases: the adapter-wide ones are loaded (PEFT loads every copy into
        the one shared buffer, all equal in its files)."""
        return {key: value for key, value in saved.items() if key not in (BASIS_A, BASIS_B)}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, bases={self.num_bases}, "
                f"scaling={self.scaling:g}")
