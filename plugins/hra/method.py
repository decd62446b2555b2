"""The HRA method: which layers it adapts, and PEFT's adapter_config.json (torch-free)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import HRAConfig
from .shapes import reflected_features

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's HRAConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "apply_GS", "init_weights", "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save")}
#: The layer types HRA adapts (PEFT's HRA takes these only; for error messages).
_ADAPTED = "torch's Linear and Conv2d layers, as PEFT's HRA, not GPT-2's Conv1D"


def _adaptable(module: "nn.Module") -> bool:
    import torch.nn as nn

    from peftkit.plugin_api import base_of, is_conv1d, is_linear_like

    base = base_of(module)
    return (is_linear_like(module) and not is_conv1d(base)) or isinstance(base, nn.Conv2d)


def check_conv(name: str, base: "nn.Module") -> None:
    """Refuse the convolutions PEFT's HRA cannot run as the layer runs them: PEFT sizes the vectors for a
    square kernel, refuses groups, and convolves with the first stride and padding entries only, without
    dilation or padding_mode, so that every file peftkit writes loads in PEFT with the same outputs."""
    import torch.nn as nn

    if not isinstance(base, nn.Conv2d):
        return
    kernel, stride, padding, dilation = (tuple(base.kernel_size), tuple(base.stride), base.padding,
                                         tuple(base.dilation))
    square = kernel[0] == kernel[1] and stride[0] == stride[1] and not isinstance(padding, str) \
        and padding[0] == padding[1]
    if base.groups != 1 or not square or dilation != (1, 1) or base.padding_mode != "zeros":
        raise ConfigError(f"hra: {name!r} is a Conv2d with groups={base.groups}, kernel_size={kernel}, "
                          f"stride={stride}, padding={padding!r}, dilation={dilation}, "
                          f"padding_mode={base.padding_mode!r}; HRA (PEFT's format) adapts a Conv2d only with "
                          f"groups=1, a square kernel, equal strides and paddings, dilation 1 and zero padding. "
                          f"Leave it out of target_modules (or add it to exclude_modules)")


class HraMethod(Method):
    name = "hra"
    config_class = HRAConfig
    description = "Householder reflection adaptation (HRA: the weight times a chain of r reflections); mergeable; " \
                  "PEFT format"
    can_merge = True
    peft_type = "HRA"

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, base_of

        assert isinstance(config, HRAConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=_adaptable, label="HRA", kinds=_ADAPTED,
                                  defaults_of="lora")  # PEFT's HRA defaults are LoRA's
        for name in names:  # every convolution is checked before any adapter is made
            check_conv(name, base_of(model.get_submodule(name)))
        if config.init_weights and config.r % 2:
            warnings.warn(f"hra: r={config.r} is odd, so the symmetric init (reflections in cancelling pairs) "
                          f"cannot be used and the vectors start at random, as in PEFT: the model does not start "
                          f"equal to the base; use an even r (e.g. r={config.r + 1})", stacklevel=2)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import HraLayer

        assert isinstance(config, HRAConfig)
        return HraLayer(base_layer, r=config.r, apply_GS=config.apply_GS, init_weights=config.init_weights)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, HRAConfig)
        return sum(reflected_features(base_of(model.get_submodule(s.name))) * config.r for s in sites)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: a chain of reflections cannot be padded to more of them (a zero vector has no direction);
        HRA adapters hot-swap at equal r."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, HRAConfig)
        return write_peft_fields("HRA", config.to_dict(), _PEFT_FIELDS, layers_pattern=None, bias="none")

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed={"layers_pattern": None, "bias": "none"})
        return HRAConfig.from_dict(values)
