"""IA3's module: a learned vector that rescales a Linear/Conv1D layer.

- Other targets: ``out = (W x + b) * l`` with l of shape (out, 1).
- Feed-forward targets: ``out = W (x * l) + b`` with l of shape (1, in):
  computed so when the vector acts alone at its site (one matrix product,
  :meth:`IA3Vector.base_input`), and as ``h + W (x * (l - 1))`` inside a
  composition, so that it composes with what came before at the same site
  (a Stack) and gives a delta for averaging and routing.

In inference (gradients off), alone at a plain linear layer (:meth:`IA3Vector.forward_alone`), output
scaling multiplies the layer's fresh output in place instead of writing a second (tokens, out) tensor:
the same numbers (one layer, 2 threads: 1.18 -> 1.03 x the bare product at 2048 tokens, 1.04 -> 1.03 at
512; a fresh tensor of that size costs its page faults).

Merging multiplies the weight (and, for output scaling, the bias) by l, as
PEFT does; unmerging divides by the same vector (PEFT adds 1e-8 first), and
restores entries whose scale is exactly zero from a copy kept at merge time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_precision, is_conv1d, LayerAdapter, linear_features, MergeError,
                                plain_linear, quantization_of, weight_out_in)


class IA3Vector(LayerAdapter):
    """File key ``ia3_l``: (out, 1), or (1, in) for a feed-forward target (PEFT's layout)."""

    def __init__(self, base: nn.Module, feedforward: bool, init_weights: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        in_f, out_f = linear_features(base)
        self.feedforward, self.conv1d = feedforward, is_conv1d(base)
        # A quantized layer's weight cannot be read as a matrix: its feed-forward delta runs the layer itself.
        self.quantized = quantization_of(base) is not None
        shape = (1, in_f) if feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=base.weight.device))
        if not init_weights:
            with torch.no_grad():
                self.ia3_l.normal_()
        self._zero_backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- forward -----------------------------------------------------------------

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:
            if self.quantized:  # W (x (l - 1)) through the layer itself, without its bias
                bias = getattr(base, "bias", None)
                out = base((_promotable(x, scale) * (scale - 1)).to(x.dtype))
                return (out - bias if bias is not None else out).to(h.dtype)
            weight = weight_out_in(base)
            shifted = (_promotable(x, scale) * (scale - 1)).to(weight.dtype)
            return F.linear(shifted, weight).to(h.dtype)
        return (h * (scale - 1)).to(h.dtype)

    def base_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """Alone, a feed-forward vector runs the layer once on ``x * l`` (exactly PEFT's computation)."""
        if not self.feedforward:
            return None
        scale = self.ia3_l.flatten()
        return (_promotable(x, scale) * scale).to(x.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """Output scaling in inference alone at a plain linear layer: the base product scaled in place
        (module docstring). None (the TunerLayer's own path: ``base_input`` or ``forward``) in training,
        for input scaling and at other layers."""
        if self.feedforward or torch.is_grad_enabled() or not plain_linear(base):
            return None
        return base(x).mul_(self.ia3_l.flatten())  # computed in the promoted dtype, written in the output's

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.feedforward:
            return h + self.delta(x, h, base)
        return (h * self.ia3_l.flatten()).to(h.dtype)

    # -- merging -----------------------------------------------------------------

    def _factor(self, base: nn.Module) -> torch.Tensor:
        """l shaped to multiply ``base.weight`` in its stored layout."""
        factor = self.ia3_l.detach()
        return factor.t() if self.conv1d else factor

    def _bias_factor(self, base: nn.Module) -> torch.Tensor | None:
        bias = getattr(base, "bias", None)
        if self.feedforward or bias is None:
            return None
        return self.ia3_l.detach().reshape(bias.shape)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """W * (l - 1) in ``base.weight``'s layout: the whole change unless l also scales a bias."""
        if self._bias_factor(base) is not None:
            raise MergeError("this ia3 vector also scales the layer's bias, which a weight change cannot hold")
        if self.quantized:
            raise MergeError("the layer's weight is quantized and cannot be read as a matrix")
        return base.weight.detach() * (self._factor(base) - 1)

    def merge(self, base: nn.Module) -> None:
        factor, bias_factor = self._factor(base), self._bias_factor(base)
        weight = base.weight
        if not torch.isfinite(factor).all():
            raise MergeError("an ia3 vector holds NaN or infinite values; it cannot be merged")
        zero_w = (factor == 0).expand_as(weight)
        backup_w = weight.detach()[zero_w].clone() if zero_w.any() else None
        backup_b = None
        if bias_factor is not None and (bias_factor == 0).any():
            backup_b = base.bias.detach()[bias_factor == 0].clone()
        weight.data = torch.mul(weight.data, factor).to(weight.dtype)
        if bias_factor is not None:
            base.bias.data = torch.mul(base.bias.data, bias_factor).to(base.bias.dtype)
        self._zero_backup = (backup_w, backup_b) if backup_w is not None or backup_b is not None else None

    def unmerge(self, base: nn.Module) -> None:
        factor, bias_factor = self._factor(base), self._bias_factor(base)
        weight = base.weight
        weight.data = _divide(weight.data, factor)
        if bias_factor is not None:
            base.bias.data = _divide(base.bias.data, bias_factor)
        if self._zero_backup is not None:
            backup_w, backup_b = self._zero_backup
            if backup_w is not None:
                weight.data[(factor == 0).expand_as(weight)] = backup_w
            if backup_b is not None:
                base.bias.data[bias_factor == 0] = backup_b
            self._zero_backup = None

    # -- files -------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    def extra_repr(self) -> str:
        return f"shape={tuple(self.ia3_l.shape)}, scales={'input' if self.feedforward else 'output'}"


def _divide(values: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """values / factor, leaving entries with a zero factor at 0 (restored from the backup)."""
    safe = torch.where(factor == 0, torch.ones_like(factor), factor)
    return torch.div(values, safe).to(values.dtype)


def _promotable(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` ready to be multiplied by the vector ``scale`` in the vector's precision. A half-precision ``x``
    is used as it is: ``x * l`` with a float32 ``l`` computes in float32 by type promotion, the same values
    as a float32 copy of ``x`` gives, but autograd then keeps ``x`` itself for ``l``'s gradient rather than
    the copy (which PEFT keeps: twice the input's memory per layer). Any other dtype (float64) is converted
    to the vector's, as before."""
    return x if adapter_precision(x.dtype) == scale.dtype else x.to(scale.dtype)
