"""The DeLoRA method: which layers it adapts, each layer's rank and lambda, and PEFT's adapter_config.json
(torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, Method, pattern_value, read_peft_fields, Site,
                                write_peft_fields)

from .config import DeloraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's DeloraConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "delora_lambda", "module_dropout", "rank_pattern", "lambda_pattern", "init_weights", "target_modules",
    "exclude_modules", "layers_to_transform", "modules_to_save")}
#: PEFT fields peftkit takes only at one value: bias "all" / "delora_only" trains base biases, layers_pattern names
#: the layer list (peftkit finds it from the model family).
_PEFT_FIXED = {"bias": "none", "layers_pattern": None}
#: The layer types DeLoRA adapts (for error messages).
_ADAPTED = ("torch's Linear layers with float weights, as PEFT's DeLoRA (not GPT-2's Conv1D; not quantized layers, "
            "whose packed weight has no column norms to read)")


def _adaptable(module: "nn.Module") -> bool:
    from peftkit.plugin_api import base_of, is_conv1d, is_linear_like, quantization_of

    base = base_of(module)
    return is_linear_like(module) and not is_conv1d(base) and quantization_of(base) is None


class DeloraMethod(Method):
    name = "delora"
    config_class = DeloraConfig
    description = "DeLoRA: LoRA with normalized rank-one terms under a trained norm bound; mergeable; PEFT format"
    can_merge = True
    peft_type = "DELORA"
    #: the base weight's column norms, a buffer: saved, not trained
    frozen_tensors = frozenset({"delora_w_norm"})

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="DeLoRA", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's DeLoRA defaults are LoRA's (GPT-2's are Conv1D)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import DeloraLayer

        assert isinstance(config, DeloraConfig)
        return DeloraLayer(base_layer, r=rank_of(site.name, config), delora_lambda=lambda_of(site.name, config),
                           module_dropout=config.module_dropout, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        """r (in + out) + 1 per layer: A, B and lambda (the column norms are a saved buffer, not trained)."""
        from peftkit.plugin_api import linear_features

        assert isinstance(config, DeloraConfig)
        total = 0
        for site in sites:
            in_features, out_features = linear_features(model.get_submodule(site.name))
            total += rank_of(site.name, config) * (in_features + out_features) + 1
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: padding DeLoRA's factors with zeros would change lambda / r, so its adapters hot-swap at equal
        ranks only."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, DeloraConfig)
        values = config.to_dict()
        values["delora_lambda"] = _as_written(values["delora_lambda"])
        values["lambda_pattern"] = {key: _as_written(value) for key, value in values["lambda_pattern"].items()}
        return write_peft_fields(self.peft_type, values, _PEFT_FIELDS, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        return DeloraConfig.from_dict(read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED))


def rank_of(name: str, config: DeloraConfig) -> int:
    """The rank at site ``name``: its rank_pattern entry, else r."""
    return pattern_value(name, config.rank_pattern, config.r)


def lambda_of(name: str, config: DeloraConfig) -> float:
    """The initial lambda at site ``name``: its lambda_pattern entry, else delora_lambda."""
    return pattern_value(name, config.lambda_pattern, config.delora_lambda)


def _as_written(value: float) -> float | int:
    """A whole number as PEFT writes its integer default (15, not 15.0); other values unchanged."""
    return int(value) if float(value).is_integer() else value
