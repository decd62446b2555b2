"""The LoHa module for one Linear (or GPT-2 Conv1D) layer.

The update is a Hadamard (element-wise) product of two rank-r products,

    dW = s * (w1_a @ w1_b) * (w2_a @ w2_b),    s = alpha / r,

with w1_a, w2_a of shape (out, r) and w1_b, w2_b of shape (r, in), so its rank
can reach r**2 for the parameter count of a rank-2r LoRA. Tensor names and
shapes are Hugging Face PEFT's (``hada_w1_a`` ...), so files move between the
two libraries. Like PEFT, the forward builds the dense (out, in) update.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, is_conv1d, LayerAdapter, linear_features


class LohaLinear(LayerAdapter):
    def __init__(self, base: nn.Module, *, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        in_features, out_features = linear_features(base)  # GPT-2's Conv1D stores its weight (in, out)
        self.r, self.scale = r, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.in_features, self.out_features = in_features, out_features
        # float32 beside a half-precision layer, as PEFT keeps adapters (adapter_dtype)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features, **factory))
        for param in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.hada_w2_b)  # dW = 0: the adapted model starts equal to the base

    def delta_out_in(self) -> torch.Tensor:
        """dW in (out, in) layout."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return torch.zeros_like(h)
        weight = self.delta_out_in()
        if self.training and self.rank_dropout:
            keep = (torch.rand(weight.shape[0], device=weight.device) > self.rank_dropout).to(weight.dtype)
            weight = weight * (keep / keep.mean().clamp_min(1e-12)).unsqueeze(1)
        return F.linear(x.to(weight.dtype), weight).to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in the layout the layer stores."""
        delta = self.delta_out_in()
        return delta.t() if is_conv1d(base) else delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
                "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"
