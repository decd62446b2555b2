"""The SHiRA method: which layers it adapts, the size check PEFT makes, and PEFT's adapter_config.json
(torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import ShiraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's ShiraConfig fields, all named as ours (it has no exclude_modules or layers_to_transform: the config
#: refuses them).
_PEFT_FIELDS = {name: name for name in ("r", "mask_type", "random_seed", "init_weights", "target_modules",
                                        "modules_to_save")}
#: PEFT's fan_in_fan_out has no meaning here: SHiRA adapts torch Linear layers only, where PEFT sets it false.
_PEFT_IGNORED = ("fan_in_fan_out",)
#: The layer types SHiRA adapts (PEFT's SHiRA takes these only; for error messages).
_ADAPTED = "torch's Linear layers, as PEFT's SHiRA, not GPT-2's Conv1D"


def _adaptable(module: "nn.Module") -> bool:
    from peftkit.plugin_api import base_of, is_conv1d, is_linear_like

    return is_linear_like(module) and not is_conv1d(base_of(module))


class ShiraMethod(Method):
    name = "shira"
    config_class = ShiraConfig
    description = "SHiRA: a sparse high-rank weight change at r * (in + out) random positions; mergeable; PEFT format"
    can_merge = True
    peft_type = "SHIRA"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, linear_features

        assert isinstance(config, ShiraConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="SHiRA", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's SHiRA defaults are LoRA's (GPT-2's are Conv1D)
        check_mask_sizes({name: linear_features(model.get_submodule(name)) for name in names}, config.r)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import ShiraLayer

        assert isinstance(config, ShiraConfig)
        return ShiraLayer(base_layer, r=config.r, mask_type=config.mask_type, random_seed=config.random_seed,
                          init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import linear_features

        assert isinstance(config, ShiraConfig)
        return sum(config.r * sum(linear_features(model.get_submodule(site.name))) for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: r sets how many positions a layer trains, not a rank a smaller adapter could be padded to
        (SHiRA adapters hot-swap at equal r)."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, ShiraConfig)
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS, fan_in_fan_out=False)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        return ShiraConfig.from_dict(read_peft_fields(data, self.name, _PEFT_FIELDS, ignored=_PEFT_IGNORED))


def check_mask_sizes(features: dict[str, tuple[int, int]], r: int) -> None:
    """Refuse an r whose r * (in + out) values outnumber a layer's in * out weights (PEFT refuses it too), naming
    the first such layer and the largest r every adapted layer takes."""
    misfits = [name for name, (in_features, out_features) in features.items()
               if r * (in_features + out_features) > in_features * out_features]
    if not misfits:
        return
    in_features, out_features = features[misfits[0]]
    largest = min(i * o // (i + o) for i, o in features.values())
    more = len(misfits) - 1
    others = f" (so do {more} more layer{'s' if more > 1 else ''})" if more else ""
    raise ConfigError(f"shira: r={r} asks for r * (in + out) = {r * (in_features + out_features)} values at layer "
                      f"{misfits[0]!r} (in {in_features}, out {out_features}), more than its "
                      f"{in_features * out_features} weights{others}; use r={largest} or less, or leave such layers "
                      f"out of target_modules")
