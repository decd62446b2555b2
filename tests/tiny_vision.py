"""A tiny ResNet image classifier built from a transformers config (no downloads), for methods that adapt
Conv2d layers, and the output both peftkit and PEFT models give on one seeded batch of images."""

from __future__ import annotations

from typing import Any

import torch

#: Conv2d layers of the tiny ResNet: the 3x3 convolutions of its blocks and the 1x1 shortcut.
BLOCK_CONVS = ["layer.0.convolution", "layer.1.convolution"]
SHORTCUT = ["shortcut.convolution"]


def tiny_resnet(seed: int = 0) -> Any:
    """A 2-stage basic-block ResNet (8 and 16 channels; a 7x7 stem, 3x3 blocks, a 1x1 shortcut), eval mode."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def image_logits(model: Any) -> torch.Tensor:
    """The logits of ``model`` on two seeded 16x16 RGB images, without gradients."""
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(pixel_values=images).logits


def logits_through_deltas(model: Any) -> torch.Tensor:
    """:func:`image_logits` with a no-op forward hook on every adapted layer's base: the layer then runs
    its base and adds the adapter's ``delta`` (the path compositions take) instead of the adapter's
    fused ``forward_alone``."""
    from peftkit.core.layer import TunerLayer

    handles = [m.base_layer.register_forward_hook(lambda *_: None) for m in model.modules()
               if isinstance(m, TunerLayer)]
    try:
        return image_logits(model)
    finally:
        for handle in handles:
            handle.remove()
