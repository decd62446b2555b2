"""The RandLoRA method: its sites, the shared bases, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, read_peft_fields, Site, TargetError, write_peft_fields

from .config import RandLoraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's RandLoraConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "save_projection", "sparse", "very_sparse",
    "init_weights", "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save")}
#: PEFT fields peftkit takes only at one value: bias "all" / "randlora_only" trains the base biases, layers_pattern
#: names the layer list (peftkit finds it from the model family).
_PEFT_FIXED = {"bias": "none", "layers_pattern": None}
#: PEFT's file keys of the adapter-wide bases (written when save_projection is on).
_BASES_KEYS = {"randlora_A": "base_model.randlora_A", "randlora_B": "base_model.randlora_B"}


class RandLoraMethod(Method):
    name = "randlora"
    config_class = RandLoraConfig
    description = "RandLoRA: full-rank updates from shared random bases; mergeable; PEFT format"
    can_merge = True
    peft_type = "RANDLORA"
    #: the shared random bases (saved with save_projection): saved, not trained
    frozen_tensors = frozenset({"randlora_A", "randlora_B"})

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_linear_like

        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label="RandLoRA",
                                  kinds="Linear and transformers' Conv1D layers",
                                  defaults_of="lora")  # PEFT's RandLoRA defaults are LoRA's
        return [Site(name) for name in names]

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """randlora_A and randlora_B, sized as PEFT sizes them: from the largest output and the largest input
        among the sites (each taken separately)."""
        from peftkit.plugin_api import linear_features

        from .bases import draw_bases

        assert isinstance(config, RandLoraConfig)
        if not sites:
            raise TargetError("RandLoRA found no layer to adapt, so its bases have no size; set target_modules")
        sizes = [linear_features(model.get_submodule(site.name)) for site in sites]
        largest = (max(out for _, out in sizes), max(in_ for in_, _ in sizes))
        return draw_bases(config.r, largest, config.projection_prng_key, sparse=config.sparse,
                          very_sparse=config.very_sparse)

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        assert isinstance(config, RandLoraConfig)
        return dict(_BASES_KEYS) if config.save_projection else {}

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .layer import RandLoraLayer

        assert isinstance(config, RandLoraConfig)
        in_features, out_features = linear_features(base_layer)
        return RandLoraLayer(base_layer, in_features, out_features, config.r,
                             scaling=config.randlora_alpha / config.r, dropout=config.randlora_dropout,
                             init_weights=config.init_weights, save_projection=config.save_projection)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        """Per layer lambda (r, n) and gamma (n, min(in, out)), n = ceil(min(in, out) / r)."""
        from peftkit.plugin_api import linear_features

        assert isinstance(config, RandLoraConfig)
        total = 0
        for in_, out in (linear_features(model.get_submodule(site.name)) for site in sites):
            bases = -(-min(in_, out) // config.r)
            total += bases * (config.r + min(in_, out))
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: a RandLoRA adapter's bases are drawn for its r, so it has no zero-padded form."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, RandLoraConfig)
        return write_peft_fields("RANDLORA", config.to_dict(), _PEFT_FIELDS, fan_in_fan_out=False, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED, ignored={"fan_in_fan_out"})
        return RandLoraConfig.from_dict(values)
