"""The BOFT method: which layers it adapts, their butterfly blocks, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .butterfly import Butterfly
from .config import BoftConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's BOFTConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "init_weights",
    "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save")}
#: The layer types BOFT adapts (for error messages).
_ADAPTED = "Linear, transformers' Conv1D and torch's Conv2d layers"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of, is_linear_like

    return is_linear_like(module) or isinstance(base_of(module), nn.Conv2d)


def _rotated_features(name: str, base: "nn.Module") -> tuple[int, int, str]:
    """(features the rotation acts on, output features, how to name them in a message) for the layer
    ``base`` at site ``name``; ConfigError for a Conv2d PEFT's BOFT cannot hold."""
    from peftkit.plugin_api import is_linear_like, linear_features

    if is_linear_like(base):
        in_features, out_features = linear_features(base)
        return in_features, out_features, f"the input width of {name}"
    kernel = tuple(base.kernel_size)
    if base.groups != 1 or kernel[0] != kernel[1]:
        raise ConfigError(f"boft: {name!r} is a Conv2d with groups={base.groups} and kernel_size={kernel}; BOFT "
                          f"(PEFT's format) adapts a Conv2d only with groups=1 and a square kernel. Leave it out "
                          f"of target_modules (or add it to exclude_modules)")
    return (base.in_channels * kernel[0] * kernel[1], base.out_channels,
            f"the filter size of {name} (in_channels * kh * kw)")


def _butterfly(name: str, base: "nn.Module", config: BoftConfig) -> tuple[Butterfly, int]:
    features, out_features, where = _rotated_features(name, base)
    return Butterfly.plan(features, config.boft_block_size, config.boft_block_num,
                          config.boft_n_butterfly_factor, where), out_features


class BoftMethod(Method):
    name = "boft"
    config_class = BoftConfig
    description = "Butterfly orthogonal fine-tuning (BOFT: butterfly-factorised Cayley rotations and a scale); mergeable; PEFT format"
    can_merge = True
    peft_type = "BOFT"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, base_of

        assert isinstance(config, BoftConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="BOFT", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's BOFT defaults are LoRA's
        for name in names:  # every layer's blocks are checked before any adapter is made
            _butterfly(name, base_of(model.get_submodule(name)), config)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import BoftLayer

        assert isinstance(config, BoftConfig)
        butterfly, out_features = _butterfly(site.name, base_layer, config)
        return BoftLayer(base_layer, butterfly, out_features, dropout=config.boft_dropout,
                         init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, BoftConfig)
        total = 0
        for site in sites:
            butterfly, out_features = _butterfly(site.name, base_of(model.get_submodule(site.name)), config)
            total += butterfly.rotation_parameter_count() + out_features
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: BOFT has no rank to pad; its adapters hot-swap at equal block shapes."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, BoftConfig)
        return write_peft_fields("BOFT", config.to_dict(), _PEFT_FIELDS, layers_pattern=None, bias="none",
                                 fan_in_fan_out=False)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed={"layers_pattern": None, "bias": "none"},
                                  ignored={"fan_in_fan_out"})
        return BoftConfig.from_dict(values)
