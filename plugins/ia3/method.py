"""The IA3 method: sites, feed-forward classification, PEFT's file format."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, read_peft_fields, Site

from .adapterhub import IA3AdapterHub
from .config import IA3Config
from .defaults import FEEDFORWARD_KEY

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: Role of a site whose input (not output) is scaled.
FEEDFORWARD = "feedforward"

#: PEFT IA3Config fields, all named as ours.
_PEFT_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
                "init_ia3_weights", "layers_to_transform")
#: PEFT fields that carry nothing peftkit needs.
_PEFT_IGNORED = {"peft_type", "revision", "task_type", "inference_mode", "base_model_name_or_path",
                 "auto_mapping", "peft_version"}


def is_feedforward(name: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule: a regex matches in full; a list entry matches the end of the name."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


class IA3Method(Method):
    name = "ia3"
    config_class = IA3Config
    description = "(IA)^3: learned vectors rescaling activations; mergeable; PEFT format"
    can_merge = True
    merge_elementwise = True
    peft_type = "IA3"
    adapterhub = IA3AdapterHub()
    supported_blocks = ALL_BLOCKS
    aliases = {"init_weights": "init_ia3_weights"}

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import find_targets, is_linear_like

        assert isinstance(config, IA3Config)
        names = find_targets(model, config, arch, method=self.name)
        if config.feedforward_modules is None:
            default = arch.default_targets(FEEDFORWARD_KEY) if arch is not None else None
            # Written into the config, so the saved file needs no table to be read (PEFT does the same).
            config.feedforward_modules = list(default or [])
        sites = []
        for name in names:
            module = model.get_submodule(name)
            if is_linear_like(module):
                role = FEEDFORWARD if is_feedforward(name, config.feedforward_modules) else ""
                sites.append(Site(name, role=role))
            elif isinstance(config.target_modules, list) and any(
                    name == t or name.endswith("." + t) for t in config.target_modules):
                raise ConfigError(f"ia3: target {name!r} is a {type(module).__name__}; IA3 adapts Linear and "
                                  f"Conv1D layers")
        if not sites:
            raise ConfigError(f"ia3: target_modules={config.target_modules!r} matched no Linear or Conv1D layer "
                              f"({', '.join(names[:5])} ...)")
        # PEFT expects fan_in_fan_out=True for Conv1D targets (GPT-2); keep the file truthful.
        from peftkit.plugin_api import is_conv1d

        config.fan_in_fan_out = any(is_conv1d(_base(model, s.name)) for s in sites)
        return sites

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import adapter_dtype

        from .layer import IA3Vector

        assert isinstance(config, IA3Config)
        dtype = adapter_dtype(base_layer)
        return IA3Vector(base_layer, feedforward=site.role == FEEDFORWARD, init_weights=config.init_ia3_weights,
                         dtype=dtype)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import linear_features

        total = 0
        for site in sites:
            in_f, out_f = linear_features(_base(model, site.name))
            total += in_f if site.role == FEEDFORWARD else out_f
        return total

    # -- PEFT's adapter_config.json -----------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, IA3Config)
        ours = config.to_dict()
        data: dict[str, Any] = {"peft_type": "IA3"}
        for key in _PEFT_FIELDS:
            if key == "layers_to_transform" and ours[key] is None:
                continue  # not a PEFT IA3 field; written only when used
            data[key] = ours[key]
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        fields = {key: key for key in _PEFT_FIELDS}
        return IA3Config.from_dict(read_peft_fields(data, self.name, fields, ignored=_PEFT_IGNORED))


def _base(model: "nn.Module", name: str) -> "nn.Module":
    from peftkit.plugin_api import base_of

    return base_of(model.get_submodule(name))
