"""UniPELT's gated LoRA (``lora[use_gating=true]``), as AdapterHub's ``adapters`` computes it.

The gate reads the layer's input x: ``g = mean_t sigmoid(W x_t + b)``, one value per example, and
replaces the scale alpha / r: ``y = W0 x + g * (B A dropout(x))``. The change depends on the input,
so a gated LoRA neither merges into the base weight nor joins a low-rank merge or batched routing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import LayerAdapter, MergeError, SequenceGate

from .layer import LoraLinear

NO_MERGE = ("a gated LoRA (use_gating=true) scales its update by a gate computed from each input, so it has no "
            "fixed weight change to merge; keep it unmerged, or train it without use_gating")


class GatedLoraLinear(LoraLinear):
    """LoRA on a linear layer whose update is scaled by a learned gate on the input (``gate.weight``,
    ``gate.bias``: ``adapters``' names) instead of alpha / r."""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float, init: bool | str) -> None:
        super().__init__(base, r, scale, dropout, init, use_dora=False)
        self.gate = SequenceGate(self.in_features, 1, dtype=self.lora_A.dtype, device=self.lora_A.device)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        return None  # the fused kernel has no gate: the plain path runs

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        update = F.linear(F.linear(self._lora_input(x), self.lora_A), self.lora_B)
        return (update * SequenceGate.broadcast(self.gate(x), update)).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return h + self.delta(x, h, base)

    def low_rank(self, forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return None  # no fixed (A, B, scale): the gate depends on the input

    def check_mergeable(self) -> None:
        raise MergeError(NO_MERGE)

    def lora_delta_out_in(self) -> torch.Tensor:
        raise MergeError(NO_MERGE)  # weight-space merges read the change here

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "gate.weight": self.gate.weight, "gate.bias": self.gate.bias}

    def hotswap_plan(self, new: LayerAdapter) -> Callable[[], None]:
        from peftkit.plugin_api import swap_plan

        return swap_plan(self, new)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, gated"
