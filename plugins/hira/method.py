"""The HiRA method: which layers it adapts, each layer's rank, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, Method, read_peft_fields, Site,
                                write_peft_fields)

from .config import HiraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's HiraConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "hira_dropout", "fan_in_fan_out", "init_weights", "rank_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "modules_to_save")}
#: PEFT fields peftkit takes only at one value: layers_pattern names the layer list (peftkit finds it from the
#: model family).
_PEFT_FIXED = {"layers_pattern": None}
#: The layer types HiRA adapts (for error messages).
_ADAPTED = ("Linear, transformers' Conv1D, Embedding and torch's Conv1d/2d/3d layers with float weights (not "
            "grouped convolutions, as PEFT; not quantized layers)")


def _adaptable(module: "nn.Module") -> bool:
    from peftkit.plugin_api import base_of, is_conv, is_embedding, is_linear_like, quantization_of

    base = base_of(module)
    if quantization_of(base) is not None:
        return False
    if is_conv(base):
        return base.groups == 1  # PEFT refuses grouped convolutions: B A has no per-group form
    return is_linear_like(base) or is_embedding(base)


class HiraMethod(Method):
    name = "hira"
    config_class = HiraConfig
    description = "HiRA: the base weight multiplied elementwise by a rank-r product (high-rank update); " \
                  "mergeable; PEFT format"
    can_merge = True
    peft_type = "HIRA"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="HiRA", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's HiRA defaults are LoRA's
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import is_conv, is_embedding

        from .layer import HiraConv, HiraEmbedding, HiraLinear

        assert isinstance(config, HiraConfig)
        r = rank_of(site.name, config)
        if is_embedding(base_layer):
            return HiraEmbedding(base_layer, r=r, init_weights=config.init_weights)
        if is_conv(base_layer):
            return HiraConv(base_layer, r=r, dropout=config.hira_dropout, init_weights=config.init_weights)
        return HiraLinear(base_layer, r=r, dropout=config.hira_dropout, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        """r (in + out) per layer (num_embeddings + embedding_dim at an Embedding, in * kernel + out at a
        convolution): A and B."""
        from peftkit.plugin_api import base_of, is_conv, is_embedding, linear_features

        assert isinstance(config, HiraConfig)
        total = 0
        for site in sites:
            base = base_of(model.get_submodule(site.name))
            if is_embedding(base):
                sizes = (base.num_embeddings, base.embedding_dim)
            elif is_conv(base):
                sizes = (base.in_channels * math.prod(base.kernel_size), base.out_channels)
            else:
                sizes = linear_features(base)
            total += rank_of(site.name, config) * sum(sizes)
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: HiRA's modules are not LoRA-form low-rank updates (B A scales the weight), so its adapters
        hot-swap at equal ranks only."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, HiraConfig)
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED)
        values.pop("rank_pattern", None)  # PEFT's HiRA (0.21) makes every layer rank r whatever it says
        return HiraConfig.from_dict(values)


def rank_of(name: str, config: HiraConfig) -> int:
    """The rank at site ``name``: r at every layer (the config refuses rank_pattern, as PEFT ignores it)."""
    return config.r
