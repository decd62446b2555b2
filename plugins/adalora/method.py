"""The AdaLoRA method: sites, layer creation, training hooks and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, read_peft_fields, Site, write_peft_fields

from .config import AdaloraConfig, UNKNOWN_TOTAL_STEP

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's AdaLoraConfig fields -> ours.
_FROM_PEFT = {"target_r": "target_r", "init_r": "init_r", "tinit": "tinit", "tfinal": "tfinal", "deltaT": "deltaT",
              "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight", "total_step": "total_step",
              "rank_pattern": "rank_pattern", "lora_alpha": "alpha", "lora_dropout": "dropout",
              "init_lora_weights": "init_weights", "target_modules": "target_modules",
              "exclude_modules": "exclude_modules", "layers_to_transform": "layers_to_transform",
              "modules_to_save": "modules_to_save"}
#: PEFT fields (inherited from LoraConfig) that must keep their default.
_PEFT_DEFAULTS: dict[str, Any] = {"bias": "none", "lora_bias": False, "use_rslora": False, "use_dora": False,
                                  "use_qalora": False, "layer_replication": None, "layers_pattern": None,
                                  "loftq_config": {}, "alpha_pattern": {}, "target_parameters": None,
                                  "trainable_token_indices": None}
#: PEFT fields with no meaning for AdaLoRA or peftkit (PEFT ignores ``r`` for AdaLoRA: init_r is the rank).
_PEFT_IGNORED = {"r", "fan_in_fan_out", "megatron_core", "megatron_config", "qalora_group_size",
                 "ensure_weight_tying"}
#: The layer types AdaLoRA adapts (for error messages).
_ADAPTED = "Linear, transformers' Conv1D and torch's Conv2d layers"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of, is_linear_like

    return is_linear_like(module) or isinstance(base_of(module), nn.Conv2d)


class AdaloraMethod(Method):
    name = "adalora"
    config_class = AdaloraConfig
    description = "Adaptive-rank LoRA in SVD form (AdaLoRA), rank budget allocated while training; mergeable; PEFT format"
    can_merge = True
    peft_type = "ADALORA"
    aliases = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"}

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="AdaLoRA",
                                  kinds=_ADAPTED, defaults_of="lora")
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import adalora_layer

        assert isinstance(config, AdaloraConfig)
        kept = (config.rank_pattern or {}).get(f"{site.name}.lora_E")
        return adalora_layer(site.name, base_layer, init_r=config.init_r, alpha=config.alpha, dropout=config.dropout,
                             init_weights=config.init_weights, kept=kept)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        import torch.nn as nn

        from peftkit.plugin_api import base_of, linear_features

        assert isinstance(config, AdaloraConfig)
        total = 0
        for site in sites:
            base = base_of(model.get_submodule(site.name))
            kept = (config.rank_pattern or {}).get(f"{site.name}.lora_E")
            r = sum(kept) if kept is not None else config.init_r
            if isinstance(base, nn.Conv2d):
                in_f, out_f = base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels
            else:
                in_f, out_f = linear_features(base)
            total += r * (in_f + 1 + out_f)
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: an AdaLoRA adapter's scale depends on init_r, so adapters hot-swap at equal shapes only."""
        return None

    # -- training -------------------------------------------------------------------

    def training_loss(self, model: Any, adapter_name: str) -> "torch.Tensor | None":
        """PEFT's orthogonality regularizer: orth_reg_weight times the mean over the adapter's Q and P
        matrices of ||Q Q^T - I||_F and ||P^T P - I||_F."""
        from peftkit.plugin_api import layer_adapters_of

        from .layer import AdaloraLayer

        config = model.adapter_record(adapter_name).config
        layers = [m for m in layer_adapters_of(model, adapter_name).values() if isinstance(m, AdaloraLayer)]
        if not layers or config.orth_reg_weight == 0:
            return None
        total = sum(layer.orthogonality() for layer in layers)
        return config.orth_reg_weight * total / (2 * len(layers))

    def training_callbacks(self, model: Any, adapter_name: str) -> list[Any]:
        from .callback import AdaloraCallback

        return [AdaloraCallback(model, adapter_name)]

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        """PEFT's fields; a schedule not known (total_step null) is written as UNKNOWN_TOTAL_STEP, since PEFT
        refuses null (and reads total_step only while training)."""
        assert isinstance(config, AdaloraConfig)
        data = write_peft_fields("ADALORA", config.to_dict(), _FROM_PEFT, bias="none", fan_in_fan_out=False,
                                 layers_pattern=None)
        if data["total_step"] is None:
            data["total_step"] = UNKNOWN_TOTAL_STEP
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _FROM_PEFT, fixed=_PEFT_DEFAULTS, ignored=_PEFT_IGNORED)
        total_step = values.get("total_step")
        if isinstance(total_step, int) and total_step >= UNKNOWN_TOTAL_STEP:
            values["total_step"] = None  # "not known": training takes the run's steps, as for a config's null
        return AdaloraConfig.from_dict(values)
