"""The DeLoRA module for one Linear layer.

The update is a LoRA-like B A (A: r x in, B: out x r) whose r rank-one terms are each normalized to unit norm
and scaled by lambda / r, applied to the input scaled per feature by the base weight's column norms w:

    h' = h + B diag(s) A (w * x),   s_i = lambda / r / (max(|A_i|, 1e-4) * max(|B^i|, 1e-4)),

A_i row i of A, B^i column i of B (PEFT's clamps). w (``delora_w_norm``, (in,)) is taken from the base weight
when the adapter is created and saved with it, so it stays what it was while the weight is merged into or
trained; lambda (``delora_lambda``, (1,)) trains with A and B.

Cost: PEFT multiplies the whole input by w, scales the (tokens, r) product by s, writes B's product into a
zeroed (tokens, out) tensor and adds that to the base output (four passes over token-sized tensors besides the
two products). Here w and s are folded into A first (an r x in matrix, as small as A), so a forward is the two
low-rank products and the base product, writing one (tokens, out) tensor: alone at a plain Linear layer the
update's product (with the bias) writes the output and the base product accumulates onto it
(:meth:`DeloraLayer.forward_alone`, through the plugin API's fused LoRA node, which also keeps only the
input and a rank-sized intermediate for backward and forms the input gradient in one tensor); elsewhere the
update's product adds into the base output in one ``addmm``. A forward without gradients reuses the folded A
it made last until A, B, lambda or the norms change.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, fusable_linear, fused_lora, kept_while_unchanged, LayerAdapter,
                                linear_features, to_dtype)

#: PEFT's floor under each row norm of A and column norm of B (a zero row or column then adds nothing).
NORM_FLOOR = 1e-4


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of each input column of an (out, in) weight, computed in the weight's dtype (PEFT's)."""
    with torch.no_grad():
        return torch.norm(weight.detach(), dim=0)


def term_scales(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int) -> torch.Tensor:
    """s (r,): lambda / r over the product of each rank-one term's norms, floored as PEFT floors them."""
    a_norms = a.norm(dim=1).clamp(min=NORM_FLOOR)
    b_norms = b.norm(dim=0).clamp(min=NORM_FLOOR)
    return (lam / r) / (a_norms * b_norms)


class DeloraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, *, r: int, delora_lambda: float, module_dropout: float = 0.0,
                 init_weights: bool = True) -> None:
        super().__init__()
        in_features, out_features = linear_features(base)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        # PEFT's draws from torch's global generator, in float32 on the CPU: A, then B when not zero.
        a, b = torch.empty(r, in_features), torch.zeros(out_features, r)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if not init_weights:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.delora_A = nn.Parameter(a.to(**factory))
        self.delora_B = nn.Parameter(b.to(**factory))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(delora_lambda), **factory))
        self.register_buffer("delora_w_norm", column_norms(base.weight).to(**factory))
        self.dropout = nn.Dropout(module_dropout) if module_dropout else nn.Identity()

    def scaled_a(self) -> torch.Tensor:
        """diag(s) A diag(w): A with the term scales and the column norms folded in (r x in)."""
        a = self.delora_A
        scales = term_scales(a, self.delora_B, self.delora_lambda, self.r)
        return a * (scales[:, None] * self.delora_w_norm[None, :])

    def _forward_scaled_a(self) -> torch.Tensor:
        """:meth:`scaled_a` for this forward: new when it records gradients for the adapter (or is compiled), else
        the one made last for the same A, B, lambda and norms (values, storage, device, dtype). Decoding one
        token, making it (two norms and three small products) costs more than the layer's two low-rank products."""
        tensors = (self.delora_A, self.delora_B, self.delora_lambda, self.delora_w_norm)
        return kept_while_unchanged(self, "_kept_scaled_a", tensors, self.scaled_a)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """diag(s) A (w * dropout(x)) per token, (..., r), in the adapter's dtype (autocast's under autocast)."""
        return F.linear(self.dropout(to_dtype(x, self.delora_A.dtype)), self._forward_scaled_a())

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return F.linear(self._down(x), self.delora_B).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """h + (x A'^T) B^T, the second product adding into h in one ``addmm`` where the dtypes agree (no
        separate (tokens, out) update tensor and sum)."""
        down = self._down(x)
        if h.dtype != down.dtype or h.dim() < 2:
            return h + F.linear(down, self.delora_B).to(h.dtype)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), down.reshape(-1, self.r), self.delora_B.t())
        return out.view(h.shape)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's whole output through the fused LoRA node (``fused_lora`` of the plugin API) with A' =
        diag(s) A diag(w) (made each training forward; its gradient flows back to A, B and lambda) and B: one
        autograd node keeps the input and the rank-sized intermediate for backward, the update's product writes
        the output and the base product accumulates onto it, and the input gradient ``g W + (g B) A'`` is one
        tensor; the node drops out the input itself as ``nn.Dropout`` would. None (the base product, then
        :meth:`forward`) under autocast, where the adapter's dtype is not the layer's (float32 beside a
        half-precision weight), or for a layer that is not a plain Linear."""
        if torch.is_autocast_enabled(x.device.type) or not fusable_linear(base, x, self.delora_A) \
                or base.weight.dtype != self.delora_A.dtype:
            return None
        dropout = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0
        return fused_lora(x, None, self._forward_scaled_a(), self.delora_B, base, 1.0, keep_on=self,
                          dropout=dropout)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """B diag(s) A diag(w), the change to ``base.weight`` (out, in)."""
        return self.delora_B @ self.scaled_a()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delora_A": self.delora_A, "delora_B": self.delora_B, "delora_lambda": self.delora_lambda,
                "delora_w_norm": self.delora_w_norm}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"
