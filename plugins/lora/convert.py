"""Saving a PiSSA / OLoRA adapter as a plain LoRA for the original base model (PEFT's
``path_initial_model_for_weight_conversion``).

A residual init leaves W - s * B0 A0 in the base weight. After training to (A, B), the model computes
W + s * (B A - B0 A0) = W + s * [B | -B0] [A ; A0]: a LoRA of rank 2r on the original W, with the same
scale (alpha doubled, or times sqrt(2) with rsLoRA). Such an adapter loads on the unchanged base model, in
peftkit and in peft, and composes or merges like any LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from peftkit.plugin_api import adapters_at, ConfigError, MergeError, TunerLayer

from .config import is_residual_init, LoraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn


def save_as_lora(model: "nn.Module", path: str, adapter_name: str = "default", **card: Any) -> None:
    """Save LoRA adapter ``adapter_name`` of ``model`` (an AdaptedModel), initialised with PiSSA or OLoRA,
    as a plain LoRA of twice the rank that gives the same outputs on the ORIGINAL base model. The model
    itself is left as it was (its adapter keeps training, and ``save_adapter`` still saves the residual
    form)."""
    record = model.adapter_record(adapter_name)
    config = record.config
    if not isinstance(config, LoraConfig) or not is_residual_init(config.init_weights):
        raise ConfigError(f"save_as_lora: adapter {adapter_name!r} is not a LoRA initialised with pissa, "
                          f"pissa_niter_N or olora (init_weights={getattr(config, 'init_weights', None)!r}); "
                          f"save it with save_adapter()")
    layers = []
    for name, module in model.named_modules():
        layer = adapters_at(module).get(adapter_name)
        if layer is None:
            continue
        if isinstance(module, TunerLayer) and adapter_name in module.merged:
            raise MergeError(f"save_as_lora: adapter {adapter_name!r} is merged into {name}; unmerge it first")
        if getattr(layer, "initial_lora_A", None) is None:
            raise ConfigError(f"save_as_lora: {name} holds no initial factors of adapter {adapter_name!r} "
                               f"(it was loaded from a file, not initialised in this process); the conversion "
                               f"needs the adapter as initialised, before training")
        layers.append(layer)
    saved = [(layer, layer.lora_A.data, layer.lora_B.data, layer.r) for layer in layers]
    try:
        for layer in layers:
            layer.lora_A.data = torch.cat([layer.lora_A.data, layer.initial_lora_A.to(layer.lora_A.dtype)], dim=0)
            layer.lora_B.data = torch.cat([layer.lora_B.data, -layer.initial_lora_B.to(layer.lora_B.dtype)], dim=1)
            layer.r *= 2
        record.config = doubled_rank(config)
        model.save_adapter(path, adapter_name, **card)
    finally:
        record.config = config
        for layer, a, b, r in saved:
            layer.lora_A.data, layer.lora_B.data, layer.r = a, b, r


def doubled_rank(config: LoraConfig) -> LoraConfig:
    """``config`` at twice the rank with the same scale, and the default init."""
    factor = 2 ** 0.5 if config.use_rslora else 2
    return dataclasses.replace(
        config, r=2 * config.r, alpha=config.alpha * factor, init_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})
