"""BitFit's module: one bias delta per adapter and site.

``out = h + delta`` (broadcast on the bias's dimension): exactly what
training the layer's own bias would give, while the base bias stays frozen
and shared by every adapter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from peftkit.plugin_api import is_conv1d, LayerAdapter, linear_features

#: Std of the deltas when init_weights is False (a non-identity start).
RANDOM_STD = 0.02

_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bias_shape(base: nn.Module) -> tuple[int, ...]:
    """Shape of ``base``'s bias, or of the bias a bias-free Linear/Conv1D would have."""
    bias = getattr(base, "bias", None)
    if isinstance(bias, torch.Tensor):
        return tuple(bias.shape)
    if isinstance(base, nn.Linear) or is_conv1d(base):
        return (linear_features(base)[1],)
    raise TypeError(f"{type(base).__name__} has no bias and cannot be given one")


class BiasDelta(LayerAdapter):
    """Adds a trainable vector to a layer's output. File key: ``bias_delta``,
    shaped like the layer's bias."""

    def __init__(self, base: nn.Module, init_weights: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape = bias_shape(base)
        device = base.weight.device if isinstance(getattr(base, "weight", None), torch.Tensor) else None
        self.bias_delta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if not init_weights:
            with torch.no_grad():
                nn.init.normal_(self.bias_delta, std=RANDOM_STD)
        # Convolutions and batch/group norms put channels on dim 1, the rest on the last dims.
        self.channel_first = isinstance(base, _CHANNEL_FIRST)
        self._merge_record: tuple[torch.Tensor | None, torch.Tensor] | None = None

    def _shaped(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.bias_delta.to(h.dtype)
        if self.channel_first and h.dim() > 2:
            delta = delta.view(-1, *([1] * (h.dim() - 2)))
        return delta

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return h + self._shaped(h)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self._shaped(h).expand_as(h)

    # -- merging -------------------------------------------------------------------

    def merge(self, base: nn.Module) -> None:
        """base.bias += delta; a bias-free layer gets a bias parameter first.

        The bias before the merge and after it are kept (two vectors), so
        unmerge restores the original bits, and removes a bias it created.
        """
        bias = getattr(base, "bias", None)
        before = bias.detach().clone() if bias is not None else None
        if bias is None:
            weight = base.weight
            bias = nn.Parameter(torch.zeros(bias_shape(base), dtype=weight.dtype, device=weight.device),
                                requires_grad=False)
            base.bias = bias
        bias.data += self.bias_delta.detach().to(bias.dtype)
        self._merge_record = (before, bias.detach().clone())

    def unmerge(self, base: nn.Module) -> None:
        record, self._merge_record = self._merge_record, None
        bias = base.bias
        if record is not None and torch.equal(bias.detach(), record[1]):
            before = record[0]
            if before is None:
                base.bias = None  # the layer had no bias: take the created one away again
            else:
                bias.data.copy_(before)
            return
        # The bias changed since our merge (another adapter merged on top and
        # unmerged out of order): subtract instead.
        bias.data -= self.bias_delta.detach().to(bias.dtype)

    # -- files -----------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bias_delta": self.bias_delta}

    def extra_repr(self) -> str:
        return f"shape={tuple(self.bias_delta.shape)}"
