"""The length of HRA's reflection vectors at a layer (torch-free: the method sizes sites with it, the
layer its vectors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn


def reflected_features(base: "nn.Module") -> int:
    """The length of each reflection vector: a linear layer's input width, a Conv2d's filter size."""
    from peftkit.plugin_api import linear_features

    if hasattr(base, "kernel_size"):
        return base.in_channels * base.kernel_size[0] * base.kernel_size[1]
    return linear_features(base)[0]
