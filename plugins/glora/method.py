"""The GLoRA method: its sites (torch Linear layers) and PEFT's adapter_config.json (``peft_type`` GLORA).
Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, read_peft_fields, Site, write_peft_fields

from .config import GloraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's GloraConfig fields, all named as ours (it has no exclude_modules or layers_to_transform: the config
#: refuses them).
_PEFT_FIELDS = {name: name for name in ("r", "config_A_B", "config_C", "config_D_E", "init_weights",
                                        "target_modules", "modules_to_save")}
#: The layer types GLoRA adapts (for error messages).
_ADAPTED = "torch Linear layers (PEFT's GLoRA adapts no other type: not GPT-2's Conv1D)"
#: Parameters per path kind: (rows, cols, r) -> count.
_PATH_SIZES = {"lora": lambda rows, cols, r: r * (rows + cols), "vector": lambda rows, cols, r: rows,
               "constant": lambda rows, cols, r: 1, "none": lambda rows, cols, r: 0}


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of

    return type(base_of(module)) is nn.Linear


class GloraMethod(Method):
    name = "glora"
    config_class = GloraConfig
    description = "GLoRA: W + W*A + B and b + b*D + E + W C per Linear layer (lora, vector or constant paths); " \
                  "mergeable; PEFT format"
    can_merge = True
    # The change scales the weight and moves the bias: weight-space merges of weight changes would lose both.
    merge_dense = False
    peft_type = "GLORA"
    #: the zeros saved for paths set to "none" (PEFT's empty paths' buffers): saved, never trained
    frozen_tensors = frozenset({"zeros"})

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="GLoRA",
                                  kinds=_ADAPTED, defaults_of="lora")  # PEFT's GLoRA defaults are LoRA's
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import GloraLayer

        assert isinstance(config, GloraConfig)
        return GloraLayer(base_layer, config.r, config_A_B=config.config_A_B, config_C=config.config_C,
                          config_D_E=config.config_D_E, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, GloraConfig)
        total = 0
        for site in sites:
            layer = base_of(model.get_submodule(site.name))
            out_features, in_features = layer.weight.shape
            total += 2 * _PATH_SIZES[config.config_A_B](out_features, in_features, config.r)
            if layer.bias is not None:
                total += _PATH_SIZES[config.config_C](in_features, 1, config.r)
                total += 2 * _PATH_SIZES[config.config_D_E](out_features, 1, config.r)
        return total

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: a GLoRA adapter's paths are not one low-rank product to pad."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, GloraConfig)
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS, bias="none")

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        return GloraConfig.from_dict(read_peft_fields(data, self.name, _PEFT_FIELDS, fixed={"bias": "none"}))
