"""The VeRA and PVeRA methods: their sites, the shared projections, and PEFT's adapter_config.json
(torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, Method, read_peft_fields, Site, TargetError, write_peft_fields

from .config import PveraConfig, SharedProjectionConfig, VeraConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: The fields PEFT's VeraConfig and PveraConfig share with ours, all named alike.
_SHARED_FIELDS = ("r", "projection_prng_key", "save_projection", "d_initial", "init_weights", "target_modules",
                  "exclude_modules", "layers_to_transform", "modules_to_save")

#: The ``peft_type`` of a PVeRA folder with exclude_modules, a type PEFT does not have (so PEFT refuses the
#: folder instead of adapting the excluded layers too: its PveraConfig has no exclude_modules).
PVERA_EXCLUDING_TYPE = "PVERA_EXCLUDE_MODULES"


class VeraMethod(Method):
    name = "vera"
    config_class = VeraConfig
    description = "Vector-based random matrix adaptation (VeRA); mergeable; PEFT format"
    can_merge = True
    peft_type = "VERA"
    #: the method's name in messages
    label = "VeRA"
    #: the names of the shared projections A and B (PEFT's attribute names, after the method)
    projection_names = ("vera_A", "vera_B")
    #: the shared random projections (saved with save_projection): saved, not trained
    frozen_tensors = frozenset(projection_names)
    #: A's rows per unit of r (PVeRA's A holds a mean and a log-variance half)
    a_rows_per_rank = 1
    #: PEFT's config fields, all named as ours
    peft_fields = {name: name for name in (*_SHARED_FIELDS, "vera_dropout")}

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_linear_like

        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label=self.label,
                                  kinds="Linear and transformers' Conv1D layers",
                                  defaults_of="lora")  # PEFT's VeRA and PVeRA defaults are LoRA's
        return [Site(name) for name in names]

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """vera_A and vera_B, sized for the largest input and output among the sites."""
        from .projections import draw_projections

        assert isinstance(config, SharedProjectionConfig)
        if not sites:
            raise TargetError(f"{self.label} found no layer to adapt, so its projections have no size; set "
                              f"target_modules")
        sizes = [_features(model, site) for site in sites]
        largest_in, largest_out = max(in_ for in_, _ in sizes), max(out for _, out in sizes)
        a_name, b_name = self.projection_names
        return draw_projections({a_name: (self.a_rows_per_rank * config.r, largest_in),
                                 b_name: (largest_out, config.r)}, config.projection_prng_key)

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        """PEFT's file keys of the shared projections (``base_model.vera_A``), written when save_projection
        is on."""
        assert isinstance(config, SharedProjectionConfig)
        return {name: f"base_model.{name}" for name in self.projection_names} if config.save_projection else {}

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .layer import VeraLayer

        assert isinstance(config, VeraConfig)
        in_features, out_features = linear_features(base_layer)
        return VeraLayer(base_layer, in_features, out_features, config.r, dropout=config.vera_dropout,
                         d_initial=config.d_initial, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, SharedProjectionConfig)
        return sum(_features(model, site)[1] + self.a_rows_per_rank * config.r for site in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: a VeRA adapter's projections are drawn for its r, so it has no zero-padded form."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, self.config_class)
        return write_peft_fields(self.peft_type, config.to_dict(), self.peft_fields, bias="none",
                                 fan_in_fan_out=False, layers_pattern=None)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, self.peft_fields, fixed={"bias": "none", "layers_pattern": None},
                                  ignored={"fan_in_fan_out"})
        return self.config_class.from_dict(values)


class PveraMethod(VeraMethod):
    """PVeRA: VeRA's sites, projections (A with twice the rows) and files, a layer that samples."""

    name = "pvera"
    config_class = PveraConfig
    description = "Probabilistic VeRA (PVeRA): VeRA with a sampled bottleneck; mergeable (the mean); PEFT format"
    peft_type = "PVERA"
    label = "PVeRA"
    projection_names = ("pvera_A", "pvera_B")
    frozen_tensors = frozenset(projection_names)
    a_rows_per_rank = 2
    #: PEFT's PveraConfig fields, all named as ours, and exclude_modules, which PEFT's lacks (see
    #: :meth:`peft_type_of`)
    peft_fields = {name: name for name in (*_SHARED_FIELDS, "pvera_dropout", "sample_at_inference",
                                           "generator_seed")}
    extra_file_types = frozenset({PVERA_EXCLUDING_TYPE})

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """PVERA; None for an adapter with exclude_modules: PEFT's PveraConfig has no such field and would adapt
        the excluded layers too, so the folder says PVERA_EXCLUDE_MODULES, which PEFT refuses."""
        assert isinstance(config, PveraConfig)
        return None if config.exclude_modules else self.peft_type

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        """PEFT's fields; exclude_modules only under PVERA_EXCLUDE_MODULES (PEFT warns of it as unknown)."""
        data = super().config_to_file(config)
        if self.peft_type_of(config) is None:
            data["peft_type"] = PVERA_EXCLUDING_TYPE
        else:
            del data["exclude_modules"]
        return data

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .pvera_layer import PveraLayer

        assert isinstance(config, PveraConfig)
        in_features, out_features = linear_features(base_layer)
        return PveraLayer(base_layer, in_features, out_features, config.r, dropout=config.pvera_dropout,
                          d_initial=config.d_initial, init_weights=config.init_weights,
                          sample_at_inference=config.sample_at_inference, generator_seed=config.generator_seed)


def _features(model: "nn.Module", site: Site) -> tuple[int, int]:
    """(in, out) of the original layer at ``site``."""
    from peftkit.plugin_api import base_of, linear_features

    return linear_features(base_of(model.get_submodule(site.name)))
