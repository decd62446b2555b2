"""The bottleneck adapter module: down projection, activation, up projection.

Sequential (on a projection's output h)::

    out = h + scaling * up(act(down(LN?(h))))

Parallel (beside a feed-forward block, reading its input x)::

    out = h + scaling * up(act(down(LN?(x))))

With ``original_ln_before`` a sequential adapter reads ``LN_model(h + r)`` (r: the
block's residual input, captured as the input of another module; ``h + r`` on a pre-LayerNorm
decoder block, which has no LayerNorm there) and its skip
connection carries h, h + r or that; ``ln_after`` adds a LayerNorm of the adapter's
own on the branch (or on branch + skip).

The up projection starts at zero, so the adapted model starts equal to the base. With a
``phm`` config the projections are PHM layers (``phm.py``: Compacter), reading the adapter-wide
rule matrices (and weight factors) from ``LayerAdapter.shared``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import LayerAdapter

from .gating import gate_for, gated
from .phm import PHMLinear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
    "identity": lambda t: t,
}

#: Std of the up projection when init_weights is False (a non-identity start).
RANDOM_UP_STD = 0.02


class BottleneckAdapter(LayerAdapter):
    """One bottleneck adapter at one site.

    Parameters (file keys relative to the site): ``adapter_down.weight``
    (bottleneck, in), ``adapter_down.bias`` (bottleneck,), ``adapter_up.weight``
    (out, bottleneck), ``adapter_up.bias`` (out,), with ``ln_before``
    ``adapter_norm.weight``/``adapter_norm.bias`` (in,), with learned scaling
    ``adapter_scaling`` (1,).
    """

    def __init__(self, in_features: int, out_features: int, bottleneck: int, *, non_linearity: str,
                 scaling: float | str, dropout: float, ln_before: bool, parallel: bool, residual: bool = True,
                 residual_before_ln: bool = True, init_weights: bool = True, ln_after: bool = False,
                 ln_after_includes_residual: bool = False, original_ln_before: bool = False,
                 model_norm: nn.Module | None = None, original_ln_residual: str = "output",
                 phm: Any = None, use_gating: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        """With ``original_ln_before``, ``forward``'s x must be the block's residual input r, and
        ``model_norm`` is the model's own LayerNorm after the site (None on a pre-LayerNorm block).
        ``phm``: the config whose PHM options make the projections PHM layers (None: Linear layers).
        ``use_gating``: UniPELT's gate (``gate.weight``, ``gate.bias``) scales the branch per example."""
        super().__init__()
        self.original_ln_before = original_ln_before
        # The model's module, not a submodule: it is neither saved nor counted with the adapter.
        self.__dict__["_model_norm"] = model_norm
        self.original_ln_residual = original_ln_residual
        self.ln_after_includes_residual = ln_after_includes_residual
        self.in_features, self.out_features, self.bottleneck = in_features, out_features, bottleneck
        self.parallel, self.residual, self.residual_before_ln = parallel, residual, residual_before_ln
        self.non_linearity = non_linearity
        self._act = ACTIVATIONS[non_linearity]
        factory = {"dtype": dtype, "device": device}
        self.adapter_norm = nn.LayerNorm(in_features, **factory) if ln_before else None
        self.adapter_down: nn.Module
        self.adapter_up: nn.Module
        if phm is not None:
            self.adapter_down = PHMLinear(in_features, bottleneck, "down", phm, zero=False, **factory)
            self.adapter_up = PHMLinear(bottleneck, out_features, "up", phm, zero=init_weights, **factory)
        else:
            self.adapter_down = nn.Linear(in_features, bottleneck, **factory)
            self.adapter_up = nn.Linear(bottleneck, out_features, **factory)
        self.adapter_norm_after = nn.LayerNorm(out_features, **factory) if ln_after else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.adapter_scaling: nn.Parameter | None = None
        self.scaling = 1.0
        if scaling == "learned":
            self.adapter_scaling = nn.Parameter(torch.ones(1, **factory))
        else:
            self.scaling = float(scaling)
        if phm is None:
            self._init_linear(init_weights)
        self.gate = gate_for(in_features, use_gating, factory)
        # out = h + branch exactly when the skip connection carries h itself.
        self.additive = (parallel and not ln_after) or (
            residual and (residual_before_ln or not ln_before) and not ln_after and not original_ln_before)

    def _init_linear(self, init_weights: bool) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_down.bias)
            if init_weights:
                nn.init.zeros_(self.adapter_up.weight)
            else:
                nn.init.normal_(self.adapter_up.weight, std=RANDOM_UP_STD)
            nn.init.zeros_(self.adapter_up.bias)

    # -- forward -----------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the branch computes in: its projections' (they follow ``model.to(...)``)."""
        for param in self.adapter_down.parameters():
            return param.dtype
        shared = self.shared  # a PHM down projection without a bias, its factors all shared
        return next(iter(shared.tensors().values())).dtype if shared is not None else torch.float32

    def _project(self, layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
        return layer(z, self.shared) if isinstance(layer, PHMLinear) else layer(z)

    def _branch(self, z: torch.Tensor) -> torch.Tensor:
        down = self._act(self._project(self.adapter_down, z))
        up = self._project(self.adapter_up, down)
        up = up * self.adapter_scaling if self.adapter_scaling is not None else up * self.scaling
        return self.dropout(up) if self.dropout is not None else up

    @property
    def model_norm(self) -> nn.Module | None:
        """The model's LayerNorm the adapter reads through (original_ln_before on a post-LN block), else None."""
        return self.__dict__["_model_norm"]

    def _through_model_norm(self, summed: torch.Tensor) -> torch.Tensor:
        norm = self.model_norm
        return norm(summed) if norm is not None else summed

    def fusion_query(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """With ``original_ln_before`` (sequential): ``LN_model(h + r)``, what the branch reads and what
        AdapterHub's fusion over such adapters queries with; otherwise h."""
        if self.original_ln_before and not self.parallel:
            return self._through_model_norm(h + x)
        return h

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not self.additive:
            return self.forward(x, h, base) - h
        source = x if self.parallel else h
        z = source.to(self.compute_dtype)
        normed = self.adapter_norm(z) if self.adapter_norm is not None else z
        return gated(self.gate, self._branch(normed), z).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.additive:
            return h + self.delta(x, h, base)
        dtype = self.compute_dtype
        z = skip = (x if self.parallel else h).to(dtype)
        if self.original_ln_before and not self.parallel:
            summed = h + x  # x: the block's residual input
            z = self._through_model_norm(summed).to(dtype)
            skip = {"output": h, "sum": summed, "normed": z}[self.original_ln_residual].to(dtype)
        normed = self.adapter_norm(z) if self.adapter_norm is not None else z
        if not self.residual_before_ln:
            skip = normed
        out = gated(self.gate, self._branch(normed), z)
        if self.parallel:
            return h + self.adapter_norm_after(out).to(h.dtype)
        if self.adapter_norm_after is None:
            return (out + skip if self.residual else out).to(h.dtype)
        if self.ln_after_includes_residual:
            out = self.adapter_norm_after(out + skip if self.residual else out)
        else:
            out = self.adapter_norm_after(out) + (skip if self.residual else 0)
        return out.to(h.dtype)

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        scaling = "learned" if self.adapter_scaling is not None else f"{self.scaling:g}"
        return (f"{kind}, in={self.in_features}, bottleneck={self.bottleneck}, out={self.out_features}, "
                f"act={self.non_linearity}, scaling={scaling}")
