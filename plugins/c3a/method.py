"""The C3A method: which layers it adapts, each layer's block size, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, ConfigError, Method, pattern_value, read_peft_fields, Site,
                                write_peft_fields)

from .config import C3AConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's C3AConfig fields, all named as ours (it has no exclude_modules: the config refuses one).
_PEFT_FIELDS = {name: name for name in (
    "block_size", "block_size_pattern", "init_weights", "target_modules", "layers_to_transform", "modules_to_save")}
#: PEFT fields peftkit takes only at one value: bias "all" / "c3a_only" trains base biases, layers_pattern names the
#: layer list (peftkit finds it from the model family).
_PEFT_FIXED = {"bias": "none", "layers_pattern": None}
#: The layer types C3A adapts (PEFT's C3A takes these only; for error messages).
_ADAPTED = "torch's Linear layers, as PEFT's C3A, not GPT-2's Conv1D"


def _adaptable(module: "nn.Module") -> bool:
    from peftkit.plugin_api import base_of, is_conv1d, is_linear_like

    return is_linear_like(module) and not is_conv1d(base_of(module))


class C3AMethod(Method):
    name = "c3a"
    config_class = C3AConfig
    description = "C3A: a block-circulant weight change (circular convolution); mergeable; PEFT format"
    can_merge = True
    peft_type = "C3A"
    identity_at_init = False  # PEFT's default init_weights="xavier_uniform" draws the kernels at random

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, linear_features

        assert isinstance(config, C3AConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="C3A", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's C3A defaults are LoRA's (GPT-2's are Conv1D)
        check_block_sizes({name: linear_features(model.get_submodule(name)) for name in names}, config)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import C3ALayer

        assert isinstance(config, C3AConfig)
        return C3ALayer(base_layer, block_size=block_size_of(site.name, config), init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import linear_features

        assert isinstance(config, C3AConfig)
        total = 0
        for site in sites:
            in_features, out_features = linear_features(model.get_submodule(site.name))
            total += in_features * out_features // block_size_of(site.name, config)
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: C3A has no rank (the block size sets the kernels' shapes); C3A adapters hot-swap at equal
        block sizes."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, C3AConfig)
        return write_peft_fields("C3A", config.to_dict(), _PEFT_FIELDS, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        return C3AConfig.from_dict(read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED))


def block_size_of(name: str, config: C3AConfig) -> int:
    """The block size at site ``name``: its block_size_pattern entry, else block_size."""
    return pattern_value(name, config.block_size_pattern, config.block_size)


def check_block_sizes(features: dict[str, tuple[int, int]], config: C3AConfig) -> None:
    """Refuse a block size that does not divide a layer's input and output widths (PEFT refuses it too), naming
    in one message the first such layer, how many more there are, and a block_size_pattern that fits them all:
    per kind of layer, the largest divisor of its widths not above the block size asked for."""
    misfits = {name: (in_features, out_features) for name, (in_features, out_features) in features.items()
               if in_features % block_size_of(name, config) or out_features % block_size_of(name, config)}
    if not misfits:
        return
    fits: dict[str, int] = {}  # leaf name -> a block size dividing the widths of every layer so named
    for leaf in dict.fromkeys(name.rsplit(".", 1)[-1] for name in misfits):
        named = [name for name in features if name.rsplit(".", 1)[-1] == leaf]
        common = math.gcd(*(width for name in named for width in features[name]))
        fits[leaf] = _largest_divisor_up_to(common, min(block_size_of(name, config) for name in named))
    name, (in_features, out_features) = next(iter(misfits.items()))
    others = f" (so do {len(misfits) - 1} more layers)" if len(misfits) > 1 else ""
    every = _largest_divisor_up_to(math.gcd(*(width for pair in features.values() for width in pair)),
                                   block_size_of(name, config))
    raise ConfigError(f"c3a: block_size={block_size_of(name, config)} does not divide both widths of layer {name!r} "
                      f"(in {in_features}, out {out_features}){others}; C3A cuts each layer into square circulant "
                      f"blocks. Use a block_size dividing every adapted layer's widths (block_size={every} does), or "
                      f"give such layers one with block_size_pattern={json.dumps(fits, separators=(',', ':'))}")


def _largest_divisor_up_to(number: int, limit: int) -> int:
    return max(d for d in range(1, min(number, limit) + 1) if number % d == 0)
