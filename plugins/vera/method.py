"""The VeRA method: its sites, the shared projections, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, read_peft_fields, Site, TargetError, write_peft_fields

from .config import VeraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's VeraConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights", "target_modules",
    "exclude_modules", "layers_to_transform", "modules_to_save")}
#: PEFT's file keys of the shared projections (written when save_projection is on).
_PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


class VeraMethod(Method):
    name = "vera"
    config_class = VeraConfig
    description = "Vector-based random matrix adaptation (VeRA); mergeable; PEFT format"
    can_merge = True
    peft_type = "VERA"
    #: the shared random projections (saved with save_projection): saved, not trained
    frozen_tensors = frozenset({"vera_A", "vera_B"})

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_linear_like

        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label="VeRA",
                                  kinds="Linear and transformers' Conv1D layers",
                                  defaults_of="lora")  # PEFT's VeRA defaults are LoRA's
        return [Site(name) for name in names]

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """vera_A and vera_B, sized for the largest input and output among the sites."""
        from .projections import draw_projections

        assert isinstance(config, VeraConfig)
        if not sites:
            raise TargetError("VeRA found no layer to adapt, so its projections have no size; set target_modules")
        sizes = [_features(model, site) for site in sites]
        return draw_projections(config.r, max(out for _, out in sizes), max(in_ for in_, _ in sizes),
                                config.projection_prng_key)

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        assert isinstance(config, VeraConfig)
        return dict(_PROJECTION_KEYS) if config.save_projection else {}

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .layer import VeraLayer

        assert isinstance(config, VeraConfig)
        in_features, out_features = linear_features(base_layer)
        return VeraLayer(base_layer, in_features, out_features, config.r, dropout=config.vera_dropout,
                         d_initial=config.d_initial, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, VeraConfig)
        return sum(_features(model, site)[1] + config.r for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: a VeRA adapter's projections are drawn for its r, so it has no zero-padded form."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, VeraConfig)
        return write_peft_fields("VERA", config.to_dict(), _PEFT_FIELDS, bias="none", fan_in_fan_out=False,
                                 layers_pattern=None)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed={"bias": "none", "layers_pattern": None},
                                  ignored={"fan_in_fan_out"})
        return VeraConfig.from_dict(values)


def _features(model: "nn.Module", site: Site) -> tuple[int, int]:
    """(in, out) of the original layer at ``site``."""
    from peftkit.plugin_api import base_of, linear_features

    return linear_features(base_of(model.get_submodule(site.name)))
