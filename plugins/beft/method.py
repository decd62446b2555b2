"""The BEFT method: its sites (torch Linear layers) and PEFT's adapter_config.json (``peft_type`` BEFT).
Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, read_peft_fields, Site, write_peft_fields

from .config import BeftConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's BeftConfig fields, all named as ours (it has no exclude_modules or layers_to_transform: the config
#: refuses them).
_PEFT_FIELDS = {name: name for name in ("init_weights", "target_modules", "modules_to_save")}
#: The layer types BEFT adapts (PEFT's BEFT takes torch Linear layers only; for error messages).
_ADAPTED = "torch Linear layers (PEFT's BEFT adapts no other type: not GPT-2's Conv1D)"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of

    return isinstance(base_of(module), nn.Linear)


class BeftMethod(Method):
    name = "beft"
    config_class = BeftConfig
    description = "BEFT: a trained bias vector added to each adapted Linear layer's output; mergeable into a " \
                  "layer's bias; PEFT format"
    can_merge = True
    # The bias is the whole effect and delta_weight() has none of it: weight-space merges would drop it.
    merge_dense = False
    peft_type = "BEFT"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets

        assert isinstance(config, BeftConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="BEFT", kinds=_ADAPTED,
                                  defaults_of="lora")
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import BeftLayer

        assert isinstance(config, BeftConfig)
        return BeftLayer(base_layer, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import linear_features

        return sum(linear_features(model.get_submodule(site.name))[1] for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: BEFT has no rank (one vector per layer, as wide as its output)."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, BeftConfig)
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        return BeftConfig.from_dict(read_peft_fields(data, self.name, _PEFT_FIELDS))
