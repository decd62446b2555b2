"""The FourierFT method: which layers it adapts, each layer's n_frequency, and PEFT's adapter_config.json
(torch-free)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, ConfigError, Method, pattern_value, read_peft_fields, Site,
                                write_peft_fields)

from .config import FourierFTConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's FourierFTConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "modules_to_save")}
#: PEFT fields peftkit takes only at one value: bias "all" / "fourier_only" trains base biases, layers_pattern
#: names the layer list (peftkit finds it from the model family).
_PEFT_FIXED = {"bias": "none", "layers_pattern": None}
#: Where PEFT's default targets for FourierFT differ from LoRA's (the rest take LoRA's, as in PEFT).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"gpt2": ("mlp.c_proj",), "gpt_bigcode": ("mlp.c_proj",)}


class FourierFTMethod(Method):
    name = "fourierft"
    config_class = FourierFTConfig
    description = "FourierFT: a weight change from a few trained spectral coefficients; mergeable; PEFT format"
    can_merge = True
    peft_type = "FOURIERFT"
    identity_at_init = False  # PEFT's default init_weights=False draws the coefficients at random

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_linear_like, linear_features

        assert isinstance(config, FourierFTConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label="FourierFT",
                                  kinds="Linear and transformers' Conv1D layers", defaults_of="lora")
        _check_n_frequency({name: linear_features(model.get_submodule(name)) for name in names}, config)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .layer import FourierFTLayer

        assert isinstance(config, FourierFTConfig)
        in_features, out_features = linear_features(base_layer)
        return FourierFTLayer(base_layer, in_features, out_features, _n_frequency(site.name, config),
                              scaling=config.scaling, random_loc_seed=config.random_loc_seed,
                              init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, FourierFTConfig)
        return sum(_n_frequency(site.name, config) for site in sites)

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, FourierFTConfig)
        # fan_in_fan_out is rewritten from each layer's type when the folder is saved (True for GPT-2's Conv1D).
        return write_peft_fields("FOURIERFT", config.to_dict(), _PEFT_FIELDS, fan_in_fan_out=False, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED, ignored={"fan_in_fan_out"})
        if values.get("random_loc_seed", 0) is None:
            raise ConfigError("PEFT setting random_loc_seed=None is not supported by peftkit's fourierft (PEFT "
                              "cannot draw the spectral positions without a seed either); set an integer seed")
        return FourierFTConfig.from_dict(values)


def _n_frequency(name: str, config: FourierFTConfig) -> int:
    """The number of coefficients at site ``name``: its n_frequency_pattern entry, else n_frequency."""
    return pattern_value(name, config.n_frequency_pattern, config.n_frequency)


def _check_n_frequency(features: dict[str, tuple[int, int]], config: FourierFTConfig) -> None:
    """Refuse more coefficients than a layer's (out, in) spectrum has entries (PEFT refuses them too), naming
    in one message every kind of layer that is too small, with an n_frequency_pattern that fits them all."""
    too_small = {name: (in_features, out_features) for name, (in_features, out_features) in features.items()
                 if _n_frequency(name, config) > in_features * out_features}
    if not too_small:
        return
    fits: dict[str, int] = {}  # leaf name -> the smallest spectrum of the layers so named
    for name, (in_features, out_features) in too_small.items():
        leaf = name.rsplit(".", 1)[-1]
        fits[leaf] = min(fits.get(leaf, in_features * out_features), in_features * out_features)
    name, (in_features, out_features) = next(iter(too_small.items()))
    others = f" (so do {len(too_small) - 1} more layers)" if len(too_small) > 1 else ""
    raise ConfigError(f"fourierft: n_frequency={_n_frequency(name, config)} is more than layer {name!r} has spectral "
                      f"entries ({out_features} x {in_features} = {in_features * out_features}){others}; lower "
                      f"n_frequency to at most {min(fits.values())}, or give such layers fewer with "
                      f"n_frequency_pattern={json.dumps(fits, separators=(',', ':'))}")
