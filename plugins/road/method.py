"""The RoAd method: its sites (Linear layers whose output width the group size divides), and PEFT's
adapter_config.json (``peft_type`` ROAD). Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import NUMBERS_PER_OUTPUT, RoadConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's RoadConfig fields, all named as ours (it has no exclude_modules or layers_to_transform: the config
#: refuses them).
_PEFT_FIELDS = {name: name for name in ("variant", "group_size", "init_weights", "target_modules", "modules_to_save")}
#: The layer types RoAd adapts (PEFT's RoAd takes torch Linear layers only; for error messages).
_ADAPTED = "torch Linear layers (PEFT's RoAd adapts no other type: not GPT-2's Conv1D)"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of

    return isinstance(base_of(module), nn.Linear)


def check_group_size(features: dict[str, int], config: RoadConfig) -> None:
    """Refuse a group size that does not divide a layer's output width (PEFT refuses it too), naming the first
    such layer, how many more there are, and the largest group size that fits every adapted layer."""
    misfits = [name for name, out_features in features.items() if out_features % config.group_size]
    if not misfits:
        return
    name = misfits[0]
    others = f" (so do {len(misfits) - 1} more layers)" if len(misfits) > 1 else ""
    fitting = [size for size in range(config.group_size - 2, 1, -2)
               if all(width % size == 0 for width in features.values())]
    advice = f"group_size={fitting[0]} divides every adapted layer's" if fitting else \
        "no even group size divides every adapted layer's"
    raise ConfigError(f"road: group_size={config.group_size} does not divide the output width of layer {name!r} "
                      f"(out {features[name]}){others}; RoAd pairs the outputs within groups of group_size. "
                      f"{advice} output width, or leave such layers out of target_modules")


class RoadMethod(Method):
    name = "road"
    config_class = RoadConfig
    description = "RoAd: the layer's output rotated in 2D pairs and scaled (road_1, road_2, road_4); mergeable; " \
                  "PEFT format"
    can_merge = True
    peft_type = "ROAD"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, linear_features

        assert isinstance(config, RoadConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="RoAd", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's RoAd defaults are LoRA's (GPT-2's are Conv1D)
        check_group_size({name: linear_features(model.get_submodule(name))[1] for name in names}, config)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import RoadLayer

        assert isinstance(config, RoadConfig)
        return RoadLayer(base_layer, variant=config.variant, group_size=config.group_size,
                         init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import linear_features

        assert isinstance(config, RoadConfig)
        per_output = 2 * NUMBERS_PER_OUTPUT[config.variant]  # road_theta and road_alpha
        return sum(int(linear_features(model.get_submodule(site.name))[1] * per_output) for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: RoAd has no rank (the variant and the layer's width set its vectors' sizes)."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, RoadConfig)
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        return RoadConfig.from_dict(read_peft_fields(data, self.name, _PEFT_FIELDS))
