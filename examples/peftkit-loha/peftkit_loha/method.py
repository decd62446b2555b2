"""The LoHa method: which layers it adapts, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (adaptable_targets, AdapterConfig, ConfigError, is_linear_like, Method,
                                pattern_value, Site)

from .config import LohaConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's LoHaConfig fields that are ours too, under the same names.
_PEFT_FIELDS = ("r", "alpha", "rank_dropout", "module_dropout", "init_weights", "rank_pattern", "alpha_pattern",
                "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save")
#: Layer-list names PEFT's ``layers_pattern`` may hold that peftkit's layer index already understands.
_LAYER_LISTS = ("layers", "layer", "h", "block", "blocks")


class LohaMethod(Method):
    name = "loha"
    config_class = LohaConfig
    description = "Low-rank Hadamard product (LoHa, arXiv 2108.06098); mergeable; PEFT format"
    can_merge = True
    peft_type = "LOHA"

    def sites(self, model: "nn.Module", config: AdapterConfig,
              arch: "ArchitectureSpec | None") -> list[Site]:
        # Like PEFT, LoHa adapts the layers LoRA adapts by default, unless a plugin registered LoHa defaults
        # for the family; a target_modules list naming another kind of layer is refused with the reason.
        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label="LoHa",
                                  kinds="Linear and Conv1D layers", defaults_of="lora")
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import LohaLinear

        assert isinstance(config, LohaConfig)
        r = pattern_value(site.name, config.rank_pattern, config.r)
        alpha = pattern_value(site.name, config.alpha_pattern, config.alpha)
        return LohaLinear(base_layer, r=r, alpha=alpha, rank_dropout=config.rank_dropout,
                          module_dropout=config.module_dropout, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import linear_features  # imports torch: not at this module's import

        assert isinstance(config, LohaConfig)
        total = 0
        for site in sites:
            in_features, out_features = linear_features(model.get_submodule(site.name))
            r = pattern_value(site.name, config.rank_pattern, config.r)
            total += 2 * r * (out_features + in_features)  # two (out, r) + (r, in) pairs
        return total

    # -- PEFT's adapter_config.json -------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, LohaConfig)
        ours = config.to_dict()
        data: dict[str, Any] = {"peft_type": "LOHA", "use_effective_conv2d": False, "layers_pattern": None}
        data.update({key: ours[key] for key in _PEFT_FIELDS})
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in _PEFT_FIELDS:
                values[key] = value
            elif key == "layers_pattern":
                if value not in (None, "", []) and not set([value] if isinstance(value, str) else value) \
                        <= set(_LAYER_LISTS):
                    raise ConfigError(f"PEFT setting layers_pattern={value!r} is not supported by peftkit-loha "
                                      f"(it finds layer indices in {', '.join(_LAYER_LISTS)} lists)")
            elif key in ("peft_type", "use_effective_conv2d"):
                continue  # use_effective_conv2d only concerns Conv2d layers, which LoHa here never adapts
            elif value in (None, False, {}, [], ""):
                continue  # a PEFT option this plugin does not have, left at its off value
            else:
                raise ConfigError(f"PEFT setting {key}={value!r} is not supported by peftkit-loha")
        return LohaConfig.from_dict(values)
