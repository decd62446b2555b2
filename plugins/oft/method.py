"""The OFT method: which layers it adapts, their rotation blocks, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .blocks import OftBlocks
from .config import OftConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's OFTConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "oft_block_size", "module_dropout", "coft", "eps", "block_share", "use_cayley_neumann",
    "num_cayley_neumann_terms", "init_weights", "target_modules", "exclude_modules", "layers_to_transform",
    "modules_to_save")}
#: The oldest PEFT whose Cayley-Neumann series is the one computed here (PEFT 0.18 changed it, and warns
#: on loading a file without a ``peft_version`` at least this one).
_FORMAT_PEFT_VERSION = "0.18.0"
#: The layer types OFT adapts (for error messages).
_ADAPTED = "Linear, transformers' Conv1D and torch's Conv2d layers"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of, is_linear_like

    return is_linear_like(module) or isinstance(base_of(module), nn.Conv2d)


def _check_conv(name: str, base: "nn.Module") -> None:
    """Refuse the convolutions PEFT's OFT cannot hold (so that every file peftkit writes loads in PEFT)."""
    import torch.nn as nn

    if not isinstance(base, nn.Conv2d):
        return
    kernel, dilation = tuple(base.kernel_size), tuple(base.dilation)
    if base.groups != 1 or kernel[0] != kernel[1] or dilation != (1, 1):
        raise ConfigError(f"oft: {name!r} is a Conv2d with groups={base.groups}, kernel_size={kernel}, "
                          f"dilation={dilation}; OFT (PEFT's format) adapts a Conv2d only with groups=1, a square "
                          f"kernel and dilation 1. Leave it out of target_modules (or add it to exclude_modules)")


class OftMethod(Method):
    name = "oft"
    config_class = OftConfig
    description = "Orthogonal fine-tuning (block-diagonal Cayley rotations, COFT); mergeable; PEFT format"
    can_merge = True
    peft_type = "OFT"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        from peftkit.plugin_api import base_of

        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="OFT", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's OFT defaults are LoRA's
        for name in names:
            _check_conv(name, base_of(model.get_submodule(name)))
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import OftLayer

        assert isinstance(config, OftConfig)
        return OftLayer(base_layer, _blocks(base_layer, config), coft=config.coft, eps=config.eps,
                        use_cayley_neumann=config.use_cayley_neumann,
                        num_cayley_neumann_terms=config.num_cayley_neumann_terms,
                        module_dropout=config.module_dropout, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, OftConfig)
        return sum(_blocks(base_of(model.get_submodule(s.name)), config).parameter_count() for s in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: OFT has no rank to pad; its adapters hot-swap at equal block shapes."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, OftConfig)
        return write_peft_fields("OFT", config.to_dict(), _PEFT_FIELDS, layers_pattern=None, bias="none",
                                 fan_in_fan_out=False, peft_version=_FORMAT_PEFT_VERSION)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        if "oft_block_size" not in data:
            raise ConfigError("this OFT adapter was written by PEFT before 0.14, whose OFT weights have another "
                              "layout (PEFT 0.14 and later cannot load it either); retrain it with a current "
                              "PEFT or with peftkit")
        values = read_peft_fields(data, self.name, _PEFT_FIELDS,
                                  fixed={"layers_pattern": None, "bias": "none"}, ignored={"fan_in_fan_out", "peft_version"})
        return OftConfig.from_dict(values)


def _blocks(base: "nn.Module", config: OftConfig) -> OftBlocks:
    """The rotation blocks over a linear layer's input features, or over a Conv2d's flattened filter
    (in_channels * kh * kw values)."""
    from peftkit.plugin_api import is_linear_like, linear_features

    if is_linear_like(base):
        in_features, _ = linear_features(base)
    else:
        in_features = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
    return OftBlocks.plan(in_features, config.r, config.oft_block_size, config.block_share)
