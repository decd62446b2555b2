"""What prompt tuning and prefix tuning share (torch-free).

Both add learned virtual tokens to what the model reads (the input embeddings,
or every attention layer's key/value cache) instead of adapting layers: one
model-level adapter, no layer sites, nothing to merge into the weights, and
the same PEFT geometry fields (``num_virtual_tokens``,
``num_transformer_submodules``). Their configs call the checks below and
their methods subclass :class:`VirtualTokenMethod`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import AdapterConfig
from .errors import ConfigError
from .method import Method, Site

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

#: Config fields that choose layers to adapt; a virtual-token method adapts none.
LAYER_SELECTION_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform")


def check_num_virtual_tokens(config: Any) -> None:
    if config.num_virtual_tokens <= 0:
        raise ConfigError(f"{config.method} config: num_virtual_tokens={config.num_virtual_tokens} must be a "
                          f"positive integer")


def check_num_transformer_submodules(config: Any) -> None:
    if config.num_transformer_submodules not in (None, 1, 2):
        raise ConfigError(f"{config.method} config: num_transformer_submodules={config.num_transformer_submodules} "
                          f"must be 1 (decoder-only or encoder-only models) or 2 (encoder-decoder models)")


def refuse_layer_selection(config: Any, what_it_does: str) -> None:
    """Refuse target_modules and the like, saying what the method does instead (``what_it_does``)."""
    for key in LAYER_SELECTION_FIELDS:
        if getattr(config, key) is not None:
            raise ConfigError(f"{config.method} config: {key} is not used — {what_it_does}; remove {key}")


class VirtualTokenMethod(Method):
    """Base of methods whose one adapter is a model-level module that adds virtual tokens."""

    can_merge = False
    # It changes the model's inputs: only stacking with layer-level adapters makes sense.
    supported_blocks = frozenset({"stack"})
    identity_at_init = False
    aliases = {"num_tokens": "num_virtual_tokens"}

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: Any) -> list[Site]:
        return []


def on_model_device(adapter: "nn.Module", model: "nn.Module") -> "nn.Module":
    """``adapter`` moved to the device of ``model``'s parameters (unchanged when it has none)."""
    device = next((p.device for p in model.parameters()), None)
    return adapter.to(device) if device is not None else adapter
