"""The MiSS method: its sites (Linear layers whose shapes the variant divides), and PEFT's adapter_config.json
(``peft_type`` MISS). Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import MissConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's MissConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "miss_dropout", "mini_r", "init_weights", "target_modules", "exclude_modules", "layers_to_transform",
    "modules_to_save")}
#: The layer types MiSS adapts (PEFT's MiSS takes torch Linear layers only; not transformers' Conv1D).
_ADAPTED = "torch Linear layers (PEFT's MiSS adapts no other type: not GPT-2's Conv1D)"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of

    return isinstance(base_of(module), nn.Linear)


def _check_shapes(name: str, base: "nn.Module", config: MissConfig) -> None:
    """Refuse a layer whose sizes the variant cannot cut (PEFT's rules, with the layer named)."""
    from peftkit.plugin_api import linear_features, quantization_of

    in_features, out_features = linear_features(base)
    if config.r > in_features:
        raise ConfigError(f"miss: r={config.r} is larger than {name!r}'s in_features={in_features}; set r to at "
                          f"most {in_features} (r is the shard size of the input features)")
    if config.variant == "bat":
        if in_features % config.r or out_features % config.r:
            raise ConfigError(f"miss: init_weights=\"bat\" cuts the weight into (r, r) blocks, but {name!r} is "
                              f"{out_features} x {in_features} and r={config.r} does not divide both; choose an r "
                              f"dividing both, or leave the layer out of target_modules")
        if quantization_of(base) is not None:
            raise ConfigError(f"miss: init_weights=\"bat\" reads the weight of {name!r}, which is quantized "
                              f"({quantization_of(base)}); use init_weights=true or \"mini\", or load the base in "
                              f"float")
    if config.variant == "mini" and out_features % config.mini_r:
        raise ConfigError(f"miss: init_weights=\"mini\" repeats a block of width mini_r={config.mini_r} over "
                          f"{name!r}'s out_features={out_features}, which it does not divide; choose a mini_r "
                          f"dividing {out_features}")


def _block_size(base: "nn.Module", config: MissConfig) -> int:
    from peftkit.plugin_api import linear_features

    in_features, out_features = linear_features(base)
    width = {"balance": out_features, "mini": config.mini_r, "bat": out_features}[config.variant]
    return config.r * width


class MissMethod(Method):
    name = "miss"
    config_class = MissConfig
    description = "MiSS, matrix shard sharing (PEFT's former Bone; balance, bat and mini variants); mergeable; " \
                  "PEFT format"
    can_merge = True
    peft_type = "MISS"
    known_as = {"bone": "PEFT's Bone became MiSS (peft_type MISS): peftkit's method is miss, e.g. miss[r=64]"}

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, base_of

        assert isinstance(config, MissConfig)
        chosen = config.target_modules is not None
        try:
            names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="MiSS",
                                      kinds=_ADAPTED, defaults_of="lora")  # PEFT's MiSS defaults are LoRA's
        except ConfigError as exc:
            if chosen:
                raise
            raise ConfigError(f"miss: this model's default targets {config.target_modules!r} are not torch Linear "
                              f"layers (GPT-2's are transformers Conv1D), and PEFT's MiSS adapts only those; name "
                              f"the model's Linear layers in target_modules instead") from exc
        for name in names:
            _check_shapes(name, base_of(model.get_submodule(name)), config)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .layer import MissLayer

        assert isinstance(config, MissConfig)
        in_features, out_features = linear_features(base_layer)
        return MissLayer(base_layer, in_features, out_features, config.r, variant=config.variant,
                         mini_r=config.mini_r, dropout=config.miss_dropout, random_init=config.init_weights is False)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, MissConfig)
        return sum(_block_size(base_of(model.get_submodule(site.name)), config) for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: r is MiSS's shard size, so a MiSS adapter has no zero-padded form of a larger r."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, MissConfig)
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS, bias="none", layers_pattern=None)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed={"bias": "none", "layers_pattern": None})
        return MissConfig.from_dict(values)
