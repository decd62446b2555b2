"""LoRA (and DoRA) on torch's convolution layers, nn.Conv1d / nn.Conv2d / nn.Conv3d, in PEFT's layout.

The adapter is two convolutions: ``lora_A`` has the base layer's kernel, stride and padding and maps
in_channels -> r; ``lora_B`` is a 1x1 convolution r -> out_channels, grouped like the base layer. The
site's output is ``h + s * B(A(dropout(x)))``. Because B's kernel is 1x1, the composed convolution is
a convolution with the base layer's kernel whose weight is ``s * B_flat @ A_flat`` (B as (out, r), A as
(r, in * kernel)) reshaped to the base weight's shape: that is the change merging adds to the base.

The file keys and shapes are PEFT's: ``lora_A.weight`` (r, in, *kernel), ``lora_B.weight``
(out, r / groups, 1, ...), and with DoRA ``lora_magnitude_vector`` (1, out, 1, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import ConfigError, MergeError

from .layer import LoraFactors

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def check_conv_site(name: str, base: nn.Module, r: int, use_dora: bool) -> None:
    """Refuse what LoRA on ``base`` cannot do in PEFT's format (PEFT refuses the rank, and builds
    lora_A without dilation, so a dilated layer's adapter output has the wrong size there)."""
    kind = type(base).__name__
    if any(d != 1 for d in base.dilation):
        raise ConfigError(f"lora: {name} is a {kind} with dilation={tuple(base.dilation)}; LoRA on convolutions "
                          f"(PEFT's format) builds lora_A without dilation, so its output would not line up with "
                          f"the layer's. Leave this layer out of target_modules (or add it to exclude_modules)")
    if base.groups > 1 and r % base.groups:
        raise ConfigError(f"lora: {name} is a {kind} with groups={base.groups}, and LoRA's rank must be a multiple "
                          f"of groups there (lora_B is grouped like the layer); r={r} is not. Choose r (or "
                          f"rank_pattern for this layer) divisible by {base.groups}, or leave the layer out")
    if use_dora and base.groups > 1:
        raise ConfigError(f"lora: DoRA is not available on {name}, a {kind} with groups={base.groups}: its grouped "
                          f"lora_B has no dense weight change to normalize; set use_dora=false or leave the "
                          f"layer out")


class LoraConv(LoraFactors):
    """LoRA on an N-d convolution; DoRA rescales each output channel of W + s * delta to a trained norm."""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float, init: bool | str,
                 use_dora: bool, lora_bias: bool = False) -> None:
        super().__init__()
        self.dims = base.weight.dim() - 2
        self.r, self.scale, self.use_dora = r, float(scale), use_dora
        self.in_channels, self.out_channels, self.groups = base.in_channels, base.out_channels, base.groups
        self.stride, self.padding = tuple(base.stride), base.padding
        self.padding_mode = base.padding_mode
        ones = (1,) * self.dims
        self._set_factors(base, (r, self.in_channels, *base.kernel_size),
                          (self.out_channels, r // self.groups, *ones), dropout, init,
                          magnitude_shape=(1, self.out_channels, *ones), lora_bias=lora_bias)

    # -- forward -------------------------------------------------------------------

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        """s * (B(A(x)) + b) for the LoRA input x (``_lora_input``: after dropout), in the adapter's dtype; b is
        B's bias (lora_bias) or nothing."""
        conv = _CONV[self.dims]
        after_a = conv(x, self.lora_A, None, self.stride, self.padding)
        scaled_b, bias = self.lora_B, self.lora_bias
        if self.scale != 1.0:  # B and its bias are tiny; the output is not
            scaled_b, bias = scaled_b * self.scale, None if bias is None else bias * self.scale
        return conv(after_a, scaled_b, bias, 1, 0, 1, self.groups)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.use_dora:
            return self.forward(x, h, base) - h
        return self._lora(self._lora_input(x)).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.use_dora and self._dropout_active():
            return self._dora_dropped(x, h, base)
        lora = self._lora(self._lora_input(x)).to(h.dtype)
        if not self.use_dora:
            return h + lora
        # W' = m * (W + s*delta) / ||W + s*delta||  =>  y = (m/n) * (h - b + lora) + b, per output channel;
        # the norm is a constant (detached), as the DoRA paper and PEFT do.
        mag_scale = self._magnitude_scale(base).to(h.dtype)
        bias = getattr(base, "bias", None)
        if bias is None:
            return mag_scale * (h + lora)
        bias = self._per_channel(bias).to(h.dtype)
        return mag_scale * (h - bias + lora) + bias

    def _magnitude_scale(self, base: nn.Module) -> torch.Tensor:
        """m / ||W + s*delta|| per output channel (norms detached), shaped to broadcast over the output."""
        return self._per_channel(self.lora_magnitude_vector.flatten() / self._weight_norm(base))

    def _dora_dropped(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """DoRA in training with dropout, as PEFT computes it: y = h + (m/n - 1) * conv(x_d, W) + (m/n) * lora(x_d),
        x_d the dropped-out input, h the base output on x."""
        dropped = self._lora_input(x)
        mag_scale = self._magnitude_scale(base).to(dropped.dtype)
        dropped_base = _CONV[self.dims](dropped, base.weight.to(dropped.dtype), None, base.stride, base.padding,
                                        base.dilation, base.groups)
        return h + ((mag_scale - 1) * dropped_base + mag_scale * self._lora(dropped)).to(h.dtype)

    def _per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (one per output channel) shaped to broadcast over (N, out, *spatial) and (out, *spatial)."""
        return values.reshape(-1, *(1,) * self.dims)

    def _weight_norm(self, base: nn.Module) -> torch.Tensor:
        """||W + s*delta|| per output channel, over its input channels and kernel (detached)."""
        with torch.no_grad():
            weight = base.weight.flatten(1).to(self.lora_A.dtype)
            return (weight + self._flat_delta()).norm(dim=1)

    # -- merging -------------------------------------------------------------------

    def _flat_delta(self) -> torch.Tensor:
        """s * B @ A as (out, in * kernel): the weight of B(A(.)) when groups == 1."""
        return (self.lora_B.flatten(1) @ self.lora_A.flatten(1)) * self.scale

    def _refuse_grouped(self) -> None:
        if self.groups > 1:
            raise MergeError(f"LoRA on a convolution with groups={self.groups} cannot be merged: lora_A spans every "
                             f"input channel, so the adapter's change is not a grouped kernel (PEFT refuses too); "
                             f"keep the adapter unmerged")

    def check_mergeable(self) -> None:
        """Raise MergeError when this adapter cannot be folded into the layer's weight (the TunerLayer
        asks before any layer of the model is merged)."""
        super().check_mergeable()
        self._refuse_grouped()
        if self.padding_mode != "zeros":
            raise MergeError(f"LoRA on a convolution with padding_mode={self.padding_mode!r} cannot be merged: "
                             f"lora_A pads with zeros (as in PEFT), the merged layer would pad its change "
                             f"with {self.padding_mode!r}; keep the adapter unmerged")

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """Change to ``base.weight`` (same shape)."""
        self.check_mergeable()
        delta = self._flat_delta()
        if self.use_dora:
            weight = base.weight.flatten(1).to(delta.dtype)
            factor = (self.lora_magnitude_vector.flatten() / self._weight_norm(base)).unsqueeze(1)
            delta = factor * (weight + delta) - weight
        return delta.reshape(base.weight.shape)

    def merge(self, base: nn.Module) -> None:
        self.check_mergeable()
        super().merge(base)

    def unmerge(self, base: nn.Module) -> None:
        if not self.use_dora:
            super().unmerge(base)
            return
        # W = W' * n / m - s*delta, with n the norm from merge time.
        weight = base.weight
        factor = (self._merged_norm / self.lora_magnitude_vector.flatten()).unsqueeze(1).to(weight.dtype)
        restored = weight.data.flatten(1) * factor - self._flat_delta().to(weight.dtype)
        weight.data = restored.reshape(weight.shape)
        self._merged_norm = None

    def low_rank(self, forward: bool = False) -> None:
        """None: the factors are convolution kernels, not the (r, in) / (out, r) matrices that composition's
        batched products and low_rank()'s callers expect (see :meth:`weight_factors`)."""
        return None

    def weight_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scale), the live parameters, for weight-space merging: flattened to (r, in * kernel) and
        (out, r), ``scale * B @ A`` is the change to the flattened base weight. None with DoRA, and with
        lora_bias (the bias changes too)."""
        if self.use_dora or self.lora_bias is not None:
            return None
        self._refuse_grouped()
        return self.lora_A, self.lora_B, self.scale

    def extra_repr(self) -> str:
        kernel = "x".join(str(k) for k in self.lora_A.shape[2:])
        return (f"in={self.in_channels}, out={self.out_channels}, kernel={kernel}, r={self.r}, "
                f"scale={self.scale:g}" + (f", groups={self.groups}" if self.groups > 1 else "")
                + (", dora" if self.use_dora else "") + (", lora_bias" if self.lora_bias is not None else ""))
