"""LN tuning's module: a trainable copy of the layer it adapts, run instead of it.

The copy lives under ``ln_tuning_layers`` so that its tensors' file keys are PEFT's
(``<module>.ln_tuning_layers.weight``). Alone at its site it runs in place of the base layer (the base
layer does not run at all); in a composition its output replaces the site's output. Merging copies its
tensors into the base layer (the base layer's own are kept to put back when unmerging), as PEFT swaps
the two layers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from peftkit.plugin_api import LayerAdapter, PeftkitError

#: The attribute a TunedCopy sets on its output, so that a second one in the same stack is refused (each
#: replaces the layer: the second would silently drop the first).
_REPLACED = "_peftkit_ln_tuning_replaced"


class TunedCopy(LayerAdapter):
    """A copy of the base layer, trained in its place."""

    additive = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base)
        self.__dict__["_kept"] = None  # the base layer's own tensors while merged
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # a norm's per-channel weight: the output width
            self.out_features = weight.shape[0]  # (what a fusion at this site is sized by: RMSNorm says it nowhere)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.ln_tuning_layers(x)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if getattr(h, _REPLACED, False):
            raise PeftkitError("two ln_tuning adapters are stacked at one layer, and each replaces it (the second "
                               "would drop the first); activate one of them, or average(...) them")
        out = self.ln_tuning_layers(x)
        setattr(out, _REPLACED, True)
        return out

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.ln_tuning_layers(x) - h

    def merge(self, base: nn.Module) -> None:
        own = base.state_dict()
        self.__dict__["_kept"] = {key: value.detach().clone() for key, value in own.items()}
        with torch.no_grad():
            for key, value in self.ln_tuning_layers.state_dict().items():
                own[key].copy_(value)

    def unmerge(self, base: nn.Module) -> None:
        kept = self.__dict__["_kept"]
        if kept is None:
            return
        own = base.state_dict()
        with torch.no_grad():
            for key, value in kept.items():
                own[key].copy_(value)
        self.__dict__["_kept"] = None
