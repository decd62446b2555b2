"""The BitFit method: which biases it adapts, and its file format (peftkit's own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, Site

from .config import BitFitConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: ``peft_type`` written to adapter_config.json (PEFT has no BitFit method).
FILE_TYPE = "BITFIT"
#: Module types whose bias BitFit adapts, by class (subclasses included).
_BIAS_TYPES = ("Linear", "Conv1D", "LayerNorm", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "BatchNorm1d",
               "BatchNorm2d", "BatchNorm3d")


def _kind(module: "nn.Module") -> str | None:
    """'bias' if BitFit can adapt the module's bias, 'missing' if it is a bias-free
    Linear/Conv1D (adaptable with add_missing), None otherwise."""
    import torch
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    known = (nn.Linear, Conv1D, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm,
             nn.modules.batchnorm._BatchNorm)
    if not isinstance(module, known):
        return None
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        return "bias"
    return "missing" if isinstance(module, (nn.Linear, Conv1D)) else None


class BitFitMethod(Method):
    name = "bitfit"
    config_class = BitFitConfig
    description = "BitFit: train bias terms only (as per-adapter deltas); mergeable"
    can_merge = True
    merge_elementwise = True
    supported_blocks = ALL_BLOCKS

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import base_of, find_targets, output_head_names

        assert isinstance(config, BitFitConfig)
        explicit = isinstance(config.target_modules, list)
        if config.target_modules is None:
            # Every module, then keep those with a bias; the output head is left out.
            names = find_targets(model, config.replace(target_modules=r".+"), arch, method=self.name)
            heads = output_head_names(model)
            names = [n for n in names if not any(n == h or n.startswith(h + ".") for h in heads)]
        else:
            names = find_targets(model, config, arch, method=self.name)
        sites = []
        for name in names:
            module = base_of(model.get_submodule(name))
            kind = _kind(module)
            if kind == "bias" or (kind == "missing" and config.add_missing):
                sites.append(Site(name))
            elif explicit and _named(name, config.target_modules):
                if kind == "missing":
                    raise ConfigError(f"bitfit: target {name!r} ({type(module).__name__}) has no bias; set "
                                      f"add_missing=true to give it a zero-initialized trainable one")
                raise ConfigError(f"bitfit: target {name!r} is a {type(module).__name__}, whose bias BitFit "
                                  f"cannot adapt; it adapts the biases of {', '.join(_BIAS_TYPES)}")
        if not sites:
            hint = ("; set add_missing=true to give its Linear layers zero-initialized trainable biases"
                    if not config.add_missing else "")
            raise ConfigError(f"bitfit: target_modules={config.target_modules!r} selects no module with a bias "
                              f"in this model{hint}")
        return sites

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        import torch

        from .layer import BiasDelta

        assert isinstance(config, BitFitConfig)
        ref = getattr(base_layer, "bias", None)
        ref = ref if isinstance(ref, torch.Tensor) else getattr(base_layer, "weight", None)
        dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else torch.float32
        return BiasDelta(base_layer, init_weights=config.init_weights, dtype=dtype)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        import math

        from peftkit.plugin_api import base_of

        from .layer import bias_shape

        return sum(math.prod(bias_shape(base_of(model.get_submodule(s.name)))) for s in sites)

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        return {"peft_type": FILE_TYPE, **config.to_dict()}


def _named(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)
