"""The BEFT module for one Linear layer (PEFT's ``beft_bias``, a (1, out) vector per site).

The layer computes ``W x + b0 + b``: b is trained, the layer's own bias b0 stays frozen. Alone at a plain
Linear layer of the vector's dtype, b joins b0 inside the layer's product (``F.linear`` adds one bias vector
while it writes the output), so the adapter costs no pass over the output of its own; elsewhere it is added
to the layer's output as PEFT adds it, ``(h + b)`` cast back to h's dtype. Merging adds b to b0, and
unmerging takes it off again; a layer without a bias cannot hold b (PEFT refuses to merge it too).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, LayerAdapter, linear_features, MergeError, plain_linear


class BeftLayer(LayerAdapter):
    """One trained bias vector ``beft_bias`` (1, out) for a Linear layer."""

    def __init__(self, base: nn.Module, *, init_weights: bool = True) -> None:
        super().__init__()
        out_features = linear_features(base)[1]
        self.out_features = out_features
        #: Whether merging can add the vector to the layer's own bias (a bias-free layer has none to add it to).
        self.base_has_bias = getattr(base, "bias", None) is not None
        self.beft_bias = nn.Parameter(torch.zeros(1, out_features, dtype=adapter_dtype(base),
                                                  device=base.weight.device))
        if not init_weights:  # PEFT's draw: N(0, 1) (for tests)
            with torch.no_grad():
                nn.init.normal_(self.beft_bias)

    def vector(self) -> torch.Tensor:
        """b as an (out,) vector (a view of the parameter)."""
        return self.beft_bias.view(-1)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return (h + self.vector()).to(h.dtype)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.vector().to(h.dtype).expand_as(h)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """``x W^T + (b0 + b)`` in the layer's own product, for a plain Linear layer whose input, weight and bias
        have the vector's dtype, outside autocast (its products would round the summed bias); None elsewhere
        (the output and b are then added)."""
        vector = self.vector()
        if not plain_linear(base) or torch.is_autocast_enabled(x.device.type) \
                or not x.dtype == base.weight.dtype == vector.dtype:
            return None
        bias = vector if base.bias is None else base.bias + vector
        return F.linear(x, base.weight, bias)

    # -- merging -------------------------------------------------------------------

    def check_mergeable(self) -> None:
        if not self.base_has_bias:
            raise MergeError("a beft adapter adds a bias vector, and this layer has no bias to add it to (PEFT "
                             "refuses it too); keep the adapter unmerged, or adapt only layers with a bias")

    def merge(self, base: nn.Module) -> None:
        self.check_mergeable()
        with torch.no_grad():
            base.bias.add_(self.vector().to(base.bias.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.bias.sub_(self.vector().to(base.bias.dtype))

    # -- files -----------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"beft_bias": self.beft_bias}

    def extra_repr(self) -> str:
        return f"out={self.out_features}" + ("" if self.base_has_bias else ", base without bias (cannot merge)")
