"""The LoKr method: which layers it adapts, their factor shapes, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, pattern_value, read_peft_fields, Site, write_peft_fields

from .config import LokrConfig
from .shapes import LokrShapes

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's LoKrConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "decompose_both", "decompose_factor",
    "rank_dropout_scale", "init_weights", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "modules_to_save")}
#: The layer types LoKr adapts (for error messages).
_ADAPTED = "Linear, transformers' Conv1D, and torch's Conv1d and Conv2d layers"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of, is_linear_like

    return is_linear_like(module) or isinstance(base_of(module), (nn.Conv1d, nn.Conv2d))


class LokrMethod(Method):
    name = "lokr"
    config_class = LokrConfig
    description = "Low-rank Kronecker product (LoKr, LyCORIS); mergeable; PEFT format"
    can_merge = True
    peft_type = "LOKR"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="LoKr", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's LoKr defaults are LoRA's
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import LokrLayer

        assert isinstance(config, LokrConfig)
        alpha = pattern_value(site.name, config.alpha_pattern, config.alpha)
        shapes = _shapes(site.name, base_layer, config)
        return LokrLayer(base_layer, shapes, scale=alpha / shapes.r, rank_dropout=config.rank_dropout,
                         module_dropout=config.module_dropout, rank_dropout_scale=config.rank_dropout_scale,
                         init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, LokrConfig)
        return sum(_shapes(s.name, base_of(model.get_submodule(s.name)), config).parameter_count() for s in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: a LoKr factor's form (full matrix or rank-r product) depends on r, so a lower-rank
        adapter cannot be zero-padded into a higher-rank one; LoKr adapters hot-swap at equal shapes."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, LokrConfig)
        return write_peft_fields("LOKR", config.to_dict(), _PEFT_FIELDS, layers_pattern=None)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed={"layers_pattern": None})
        return LokrConfig.from_dict(values)


def _shapes(name: str, base: "nn.Module", config: LokrConfig) -> LokrShapes:
    """PEFT's factor plan for the layer ``base`` at site ``name``."""
    from peftkit.plugin_api import is_linear_like, linear_features

    if is_linear_like(base):
        in_features, out_features = linear_features(base)
        kernel: tuple[int, ...] = ()
    else:  # Conv1d / Conv2d: the weight is (out, in / groups, *kernel)
        in_features, out_features = base.in_channels // base.groups, base.out_channels
        kernel = tuple(base.kernel_size)
    return LokrShapes.plan(out_features, in_features, kernel, pattern_value(name, config.rank_pattern, config.r),
                           decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                           use_effective_conv2d=config.use_effective_conv2d)
