"""The LN-tuning method: its sites (modules with parameters), and PEFT's file format (``peft_type`` LN_TUNING)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, read_peft_fields, Site

from .config import LNTuningConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's LNTuningConfig fields, named as ours.
_PEFT_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")
#: PEFT fields that carry nothing peftkit needs.
_PEFT_IGNORED = {"peft_type", "revision", "task_type", "inference_mode", "base_model_name_or_path",
                 "auto_mapping", "peft_version"}


class LNTuningMethod(Method):
    name = "ln_tuning"
    config_class = LNTuningConfig
    description = "LayerNorm tuning: train a copy of each normalization layer; mergeable; PEFT format"
    can_merge = True
    merge_elementwise = True  # per-channel scales and shifts around the base layer's own values
    peft_type = "LN_TUNING"
    supported_blocks = ALL_BLOCKS

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import find_targets

        assert isinstance(config, LNTuningConfig)
        names = find_targets(model, config, arch, method=self.name)
        for name in names:
            module = model.get_submodule(name)
            if not any(True for _ in module.parameters()):
                raise ConfigError(f"ln_tuning: {name} ({type(module).__name__}) has no parameters to train; target "
                                  f"normalization layers, e.g. target_modules=[input_layernorm,norm]")
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import TunedCopy

        return TunedCopy(base_layer)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        return sum(p.numel() for s in sites for p in base_of(model.get_submodule(s.name)).parameters())

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, LNTuningConfig)
        ours = config.to_dict()
        return {"peft_type": self.peft_type, **{key: ours[key] for key in _PEFT_FIELDS}}

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        fields = {key: key for key in _PEFT_FIELDS}
        return LNTuningConfig.from_dict(read_peft_fields(data, self.name, fields, ignored=_PEFT_IGNORED))
