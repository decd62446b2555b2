"""UniPELT's gate on a bottleneck adapter (``use_gating``), as AdapterHub's ``adapters`` computes it.

The gate reads the adapter's input (before its own ``ln_before`` LayerNorm): ``g = mean_t
sigmoid(W x_t + b)``, one value per example, and multiplies the branch's output (after scaling
and dropout), before the skip connection: ``out = skip + g * branch``.
"""

from __future__ import annotations

from typing import Any

import torch

from peftkit.plugin_api import SequenceGate


def gate_for(in_features: int, use_gating: bool, factory: dict[str, Any]) -> SequenceGate | None:
    """A new gate on an input of ``in_features`` when ``use_gating``, else None."""
    return SequenceGate(in_features, 1, **factory) if use_gating else None


def gated(gate: SequenceGate | None, branch: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``branch`` scaled by ``gate(z)`` per example (unchanged without a gate)."""
    if gate is None:
        return branch
    return branch * SequenceGate.broadcast(gate(z), branch)
