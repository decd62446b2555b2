"""The AdaLoRA module for one Linear, GPT-2 Conv1D or Conv2d layer.

The weight change is a LoRA in SVD form,

    dW = s * P diag(E) Q,    s = alpha / (init_r + 1e-5),

with Q = ``lora_A`` (r, in), E = ``lora_E`` (r, 1), P = ``lora_B`` (out, r): PEFT's
names, shapes and scale (its ``ranknum`` is init_r, fixed for the adapter's life and not
saved). Rank allocation zeroes entries of E while training and, at the end, ``keep`` shrinks
the module to the triplets still in use; ``kept`` records which of the init_r initial
triplets those are (PEFT's ``rank_pattern`` entry for this layer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import ConfigError, adapter_dtype, fusable_linear, fused_lora, is_conv1d, LayerAdapter

#: PEFT adds this to ranknum before dividing by it.
RANKNUM_EPS = 1e-5


class AdaloraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, *, init_r: int, alpha: float,
                 dropout: float, init_weights: bool, kept: list[bool] | None = None) -> None:
        super().__init__()
        self.kept = list(kept) if kept is not None else [True] * init_r
        self.r, self.init_r = sum(self.kept), init_r
        self.in_features, self.out_features = in_features, out_features
        # PEFT: scaling = lora_alpha (or the rank the module was built with, when alpha <= 0) / ranknum
        numerator = alpha if alpha > 0 else float(self.r)
        self.scale = numerator / (init_r + RANKNUM_EPS)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.is_conv = isinstance(base, nn.Conv2d)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_E = nn.Parameter(torch.empty(self.r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        if init_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        else:  # everything random (for tests), as PEFT's init_lora_weights=False
            for param in (self.lora_A, self.lora_E, self.lora_B):
                nn.init.normal_(param)

    # -- forward -------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's whole output through the fused LoRA node (``fused_lora``): the update is LoRA's
        ``s (x A'^T) B^T`` with ``A' = Q * E`` (r x in, formed each call; its gradient flows back to Q and E),
        and the node drops out the LoRA input itself as ``nn.Dropout`` would; None on a convolution or a layer
        ``fusable_linear`` refuses (the unfused path runs)."""
        if self.is_conv or not fusable_linear(base, x, self.lora_A):
            return None
        dropout = self.dropout.p if self.dropout is not None and self.training else 0.0
        return fused_lora(x, None, self.lora_A * self.lora_E, self.lora_B, base, self.scale, keep_on=self,
                          dropout=dropout)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.is_conv:
            out = base._conv_forward(self._input(x), self.delta_out_in(base), None)
        else:
            out = F.linear(F.linear(self._input(x), self.lora_A * self.lora_E), self.lora_B) * self.scale
        return out.to(h.dtype)

    # -- merging -------------------------------------------------------------------

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """dW as (out, in) for linear layers, as the (out, in, kh, kw) kernel for a convolution."""
        delta = (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale
        return delta.reshape(base.weight.shape) if self.is_conv else delta

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in the layout the layer stores (GPT-2's Conv1D: (in, out))."""
        delta = self.delta_out_in(base)
        return delta.t() if is_conv1d(base) else delta

    # -- rank allocation -------------------------------------------------------------

    def orthogonality(self) -> torch.Tensor:
        """||Q Q^T - I||_F + ||P^T P - I||_F: how far the singular vectors are from orthonormal."""
        total = self.lora_A.new_zeros(())
        for gram in (self.lora_A @ self.lora_A.t(), self.lora_B.t() @ self.lora_B):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            total = total + torch.linalg.matrix_norm(gram - eye)
        return total

    def keep(self, mask: torch.Tensor) -> None:
        """Shrink to the triplets where ``mask`` (one flag per current triplet) is set; the others
        go, with their share of the update (zero once allocation masked their singular values)."""
        index = mask.reshape(-1).to(device=self.lora_E.device, dtype=torch.bool)
        if index.numel() != self.r:
            raise ValueError(f"keep() got {index.numel()} flags for {self.r} triplets")
        with torch.no_grad():
            for key, tensor in (("lora_A", self.lora_A[index]), ("lora_E", self.lora_E[index]),
                                ("lora_B", self.lora_B[:, index])):
                old = getattr(self, key)
                setattr(self, key, nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad))
        flags = iter(index.tolist())
        self.kept = [bool(was and next(flags)) for was in self.kept]
        self.r = sum(self.kept)

    # -- files -----------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r} of {self.init_r}, scale={self.scale:g}"


def adalora_layer(site: str, base: nn.Module, **options: object) -> AdaloraLayer:
    """The module for ``base`` (Linear, Conv1D or an ungrouped Conv2d), with PEFT's factor shapes."""
    from peftkit.plugin_api import is_linear_like, linear_features

    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ConfigError(f"adalora: {site} is a grouped Conv2d (groups={base.groups}); AdaLoRA adapts "
                              f"ungrouped convolutions only (as PEFT); leave it out of target_modules")
        k = base.kernel_size[0] * base.kernel_size[1]
        return AdaloraLayer(base, base.in_channels * k, base.out_channels, **options)  # type: ignore[arg-type]
    if not is_linear_like(base):
        raise ConfigError(f"adalora: {site} is a {type(base).__name__}; AdaLoRA adapts Linear, transformers' "
                          f"Conv1D and Conv2d layers")
    in_features, out_features = linear_features(base)
    return AdaloraLayer(base, in_features, out_features, **options)  # type: ignore[arg-type]
