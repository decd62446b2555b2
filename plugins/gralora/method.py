"""The GraLoRA method: which layers it adapts (those gralora_k divides), and PEFT's adapter_config.json
(torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import GraloraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's GraloraConfig fields, all named as ours (it has no exclude_modules: the config refuses it).
_PEFT_FIELDS = {name: name for name in (
    "r", "hybrid_r", "alpha", "gralora_dropout", "gralora_k", "init_weights", "target_modules",
    "layers_to_transform", "modules_to_save")}
#: PEFT fields peftkit takes only at one value: bias "all" / "gralora_only" trains base biases, layers_pattern names
#: the layer list (peftkit finds it from the model family).
_PEFT_FIXED = {"bias": "none", "layers_pattern": None}
#: PEFT's fan_in_fan_out: peftkit reads each layer's weight layout from its type (rewritten on save).
_PEFT_IGNORED = frozenset({"fan_in_fan_out"})
#: The layer types GraLoRA adapts (PEFT's GraLoRA takes these only; for error messages).
_ADAPTED = "torch's Linear layers and GPT-2's Conv1D, as PEFT's GraLoRA"


def check_divisible(name: str, in_features: int, out_features: int, config: GraloraConfig) -> None:
    """Refuse a layer whose in or out features gralora_k does not divide (PEFT's rule, with the layer named)."""
    k = config.gralora_k
    for label, size in (("in_features", in_features), ("out_features", out_features)):
        if size % k:
            divisors = [d for d in range(1, min(in_features, out_features) + 1)
                        if in_features % d == 0 and out_features % d == 0 and config.r % d == 0]
            raise ConfigError(f"gralora: gralora_k={k} does not divide {name!r}'s {label}={size} (the weight is "
                              f"cut into gralora_k x gralora_k blocks); choose a gralora_k dividing r and both "
                              f"sizes (here {', '.join(map(str, divisors))}), or leave the layer out of "
                              f"target_modules")


class GraloraMethod(Method):
    name = "gralora"
    config_class = GraloraConfig
    description = "GraLoRA: the weight change cut into k x k blocks, each with its own low-rank pair (optionally " \
                  "plus a plain LoRA); mergeable; PEFT format"
    can_merge = True
    peft_type = "GRALORA"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_linear_like, linear_features

        assert isinstance(config, GraloraConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label="GraLoRA",
                                  kinds=_ADAPTED, defaults_of="lora")  # PEFT's GraLoRA defaults are LoRA's
        for name in names:
            check_divisible(name, *linear_features(model.get_submodule(name)), config)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import GraloraLayer

        assert isinstance(config, GraloraConfig)
        return GraloraLayer(base_layer, r=config.r, gralora_k=config.gralora_k, hybrid_r=config.hybrid_r,
                            alpha=config.alpha, dropout=config.gralora_dropout, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        """(r + hybrid_r) (in + out) per layer: as many as a LoRA of rank r + hybrid_r, whatever gralora_k."""
        from peftkit.plugin_api import linear_features

        assert isinstance(config, GraloraConfig)
        return sum((config.r + config.hybrid_r) * sum(linear_features(model.get_submodule(site.name)))
                   for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: r sets GraLoRA's block layout (each block has rank r / gralora_k) and its scale, so a larger r is
        not the same adapter padded with zeros; its adapters hot-swap at equal ranks only."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, GraloraConfig)
        values = config.to_dict()
        values["alpha"] = _as_written(values["alpha"])
        return write_peft_fields(self.peft_type, values, _PEFT_FIELDS, fan_in_fan_out=False, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED, ignored=_PEFT_IGNORED)
        return GraloraConfig.from_dict(values)


def _as_written(value: float) -> float | int:
    """A whole number as PEFT writes its integer alpha (64, not 64.0); other values unchanged."""
    return int(value) if float(value).is_integer() else value
