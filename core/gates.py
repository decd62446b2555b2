"""Input-dependent gates (AdapterHub's UniPELT, Mao et al. 2022, arXiv 2110.07577).

A gate is a linear layer on the input a module adapts, put through a sigmoid and averaged
over the sequence: one value in (0, 1) per example (and per gate output), which scales that
module's change. ``adapters`` averages over every position, padding included; so does this.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: Std of the normal draw of a new gate's weight (``adapters``' and BERT's init); the bias starts at 0.
GATE_INIT_STD = 0.02


class SequenceGate(nn.Linear):
    """``g = mean_t sigmoid(W x_t + b)``: (batch, outputs) for ``x`` of shape (batch, seq, in).

    A 2-D input (rows without a sequence) gets one gate per row, unaveraged. Its parameters are
    those of an ``nn.Linear(in_features, outputs)`` (file keys ``weight`` and ``bias``, ``adapters``'
    names), starting at weight ~ N(0, 0.02), bias 0: every gate opens at 0.5 on average.
    """

    def __init__(self, in_features: int, outputs: int = 1, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(in_features, outputs, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(self.weight, std=GATE_INIT_STD)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(super().forward(x.to(self.weight.dtype)))
        return gate.mean(dim=1) if gate.dim() == 3 else gate

    @staticmethod
    def broadcast(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A (batch, 1) gate shaped to multiply ``like`` (batch, ..., features) row by row."""
        return gate.reshape(gate.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)
