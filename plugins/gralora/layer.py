"""The GraLoRA module for one Linear (or GPT-2 Conv1D) layer.

With k = gralora_k, s = r / k, the input cut into k blocks x_n (in / k features each) and the output into k blocks
(out / k each), the update is

    y_j += scale * sum_n  B_j[n*s:(n+1)*s]^T  A_n[:, j*s:(j+1)*s]^T  x_n        (scale = alpha / (r + hybrid_r))

A (``gralora_A``, (k, in/k, r)) holds one (in/k, r) matrix per input block n, B (``gralora_B``, (k, r, out/k))
one (r, out/k) matrix per output block j: PEFT's layout. Block (j, n) of the weight change is the rank-s product
of column chunk j of A_n and row chunk n of B_j. With hybrid_r > 0 a plain LoRA B_h A_h (``gralora_A_general``
(hybrid_r, in), ``gralora_B_general`` (out, hybrid_r)) is added, on an input with its own dropout mask (PEFT
draws two).

Cost: PEFT's two einsums copy the input's blocks, the (tokens, k, r) intermediate and the (tokens, out) update,
then scale it and add it to the base output (five token-sized passes besides the products). Here the first product
is one batched product over a strided view of the input (no copy), the intermediate is permuted once (tokens x k x
r, small), and the second batched product accumulates straight into a strided (k, tokens, out/k) view of the output
with the scale as its alpha: alone at a plain layer the base output is that output (:meth:`forward_alone`),
elsewhere a copy of ``h`` is (one pass, as ``addmm``'s).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, adapter_precision, fusable_linear, is_conv1d, LayerAdapter, \
    linear_features, to_dtype, weight_out_in

from .fused import block_intermediate, GraloraFn


def drawn(shape: tuple[int, ...], random: bool = True) -> torch.Tensor:
    """A float32 CPU tensor drawn as PEFT draws its factors (kaiming uniform, a = sqrt(5)), or zeros."""
    tensor = torch.zeros(shape)
    if random:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


def draw_blocks(k: int, r: int, in_features: int, out_features: int, init_weights: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (k, in/k, r), B (k, r, out/k)) from torch's global generator in PEFT's order: per block, A_n drawn as
    (r, in/k), then B_n as (out/k, r) when ``init_weights`` is false (zeros otherwise)."""
    a_blocks, b_blocks = [], []
    for _ in range(k):
        a_blocks.append(drawn((r, in_features // k)))
        b_blocks.append(drawn((out_features // k, r), random=not init_weights))
    return torch.stack(a_blocks).transpose(1, 2).contiguous(), torch.stack(b_blocks).transpose(1, 2).contiguous()


def draw_hybrid(hybrid_r: int, in_features: int, out_features: int, init_weights: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_h (hybrid_r, in), B_h (out, hybrid_r)) in PEFT's order: PEFT builds two ``nn.Linear`` (whose own init
    draws first, then is overwritten), then draws A_h, then B_h when ``init_weights`` is false."""
    drawn((hybrid_r, in_features))
    drawn((out_features, hybrid_r))
    return drawn((hybrid_r, in_features)), drawn((out_features, hybrid_r), random=not init_weights)


class GraloraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, *, r: int, gralora_k: int, hybrid_r: int = 0, alpha: float = 64,
                 dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        in_features, out_features = linear_features(base)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.gralora_k, self.hybrid_r = r, gralora_k, hybrid_r
        self.scale = alpha / (r + hybrid_r)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        a, b = draw_blocks(gralora_k, r, in_features, out_features, init_weights)
        self.gralora_A = nn.Parameter(a.to(**factory))
        self.gralora_B = nn.Parameter(b.to(**factory))
        self.gralora_A_general: nn.Parameter | None = None
        self.gralora_B_general: nn.Parameter | None = None
        if hybrid_r:
            a_h, b_h = draw_hybrid(hybrid_r, in_features, out_features, init_weights)
            self.gralora_A_general = nn.Parameter(a_h.to(**factory))
            self.gralora_B_general = nn.Parameter(b_h.to(**factory))
        self.dropout = nn.Dropout(dropout) if dropout else None

    # -- forward -------------------------------------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x) in the factors' dtype, as (tokens, in); each call draws its own mask (PEFT's two)."""
        x = to_dtype(x, self.gralora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return x.reshape(-1, self.in_features)

    def _add_update_(self, out2: torch.Tensor, x: torch.Tensor, beta: float = 1.0) -> None:
        """out2 (tokens, out) = beta * out2 + the update, in place (beta 0: out2's values are ignored).

        The hybrid LoRA part is added first: autograd refuses an in-place change of a view taken before an earlier
        in-place change made the tensor require gradients, so each view is taken right before its change. Its
        dropout mask is still drawn second, as PEFT draws it."""
        tokens, k = out2.shape[0], self.gralora_k
        intermediate = block_intermediate(self._input(x), self.gralora_A)
        if self.gralora_A_general is not None:
            down = F.linear(self._input(x), self.gralora_A_general)
            out2.addmm_(down, self.gralora_B_general.t(), beta=beta, alpha=self.scale)
            beta = 1.0
        blocks = out2.view(tokens, k, self.out_features // k).transpose(0, 1)
        blocks.baddbmm_(intermediate, self.gralora_B, beta=beta, alpha=self.scale)

    def _update_out_of_place(self, x: torch.Tensor) -> torch.Tensor:
        """The update (tokens, out) with out-of-place products: autocast casts them (as PEFT's einsums), and
        torch.compile traces them (its functionalization of the in-place product into a transposed view of the
        output gives a tensor that a later view of the output refuses)."""
        tokens = x.numel() // self.in_features
        update = torch.bmm(block_intermediate(self._input(x), self.gralora_A), self.gralora_B)
        update = update.transpose(0, 1).reshape(tokens, self.out_features)
        if self.gralora_A_general is not None:
            update = update + F.linear(F.linear(self._input(x), self.gralora_A_general), self.gralora_B_general)
        return update * self.scale

    @staticmethod
    def _out_of_place(x: torch.Tensor) -> bool:
        """Whether the update is written out of place (:meth:`_update_out_of_place`): under autocast or
        torch.compile."""
        return torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling()

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """The update (tokens, out) in the factors' dtype (autocast's under autocast)."""
        if self._out_of_place(x):
            return self._update_out_of_place(x)
        out2 = torch.empty(x.numel() // self.in_features, self.out_features, dtype=self.gralora_A.dtype,
                           device=x.device)
        self._add_update_(out2, x, beta=0.0)
        return out2

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self._update(x).view(*x.shape[:-1], self.out_features).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """h + the update, the update's second product accumulating into a copy of h (no separate update tensor),
        where h has the factors' dtype and autocast is off."""
        if h.dtype != self.gralora_A.dtype or self._out_of_place(x):
            return h + self.delta(x, h, base)
        out = h.clone(memory_format=torch.contiguous_format)
        self._add_update_(out.view(-1, self.out_features), x)
        return out

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The base output with the update added into it in place: no copy of it, no update tensor. None (the
        base, then :meth:`forward`) under autocast or torch.compile (:meth:`_update_out_of_place`), for a layer
        that is not a plain Linear/Conv1D, or where the factors' dtype is not the layer's (float32 beside
        half-precision weights)."""
        if self._out_of_place(x) or not fusable_linear(base, x, self.gralora_A) \
                or base.weight.dtype != self.gralora_A.dtype:
            return None
        if torch.is_grad_enabled() and self.gralora_A_general is None and (self.dropout is None or not self.training):
            x2 = x.reshape(-1, self.in_features)  # training: one autograd node for the layer (fused.py)
            out = GraloraFn.apply(x2, self.gralora_A, self.gralora_B, weight_out_in(base), base.bias, self.scale)
            return out.view(*x.shape[:-1], self.out_features)
        out = base(x)
        self._add_update_(out.view(-1, self.out_features), x)
        return out

    # -- merging ---------------------------------------------------------------------------------------------------

    def delta_out_in(self) -> torch.Tensor:
        """The whole weight change (out, in), scaled, in the factors' precision (float32 for half ones)."""
        k, s = self.gralora_k, self.r // self.gralora_k
        precision = adapter_precision(self.gralora_A.dtype)
        a = self.gralora_A.to(precision).reshape(k, self.in_features // k, k, s)  # [n, i, j, t]
        b = self.gralora_B.to(precision).reshape(k, k, s, self.out_features // k)  # [j, n, t, o]
        change = torch.einsum("nijt,jnto->joni", a, b).reshape(self.out_features, self.in_features)
        if self.gralora_A_general is not None:
            change = change + self.gralora_B_general.to(precision) @ self.gralora_A_general.to(precision)
        return change * self.scale

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in its layout ((in, out) for GPT-2's Conv1D)."""
        change = self.delta_out_in()
        return change.t() if is_conv1d(base) else change

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"gralora_A": self.gralora_A, "gralora_B": self.gralora_B}
        if self.gralora_A_general is not None:
            out["gralora_A_general.weight"] = self.gralora_A_general
            out["gralora_B_general.weight"] = self.gralora_B_general
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, gralora_k={self.gralora_k}, "
                f"hybrid_r={self.hybrid_r}, scale={self.scale:g}")
