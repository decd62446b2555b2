"""The VB-LoRA method: which layers it adapts, the shared vector bank, and PEFT's adapter_config.json
(torch-free)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import VBLoRAConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's VBLoRAConfig fields, all named as ours.
_PEFT_FIELDS = {name: name for name in (
    "r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "vblora_dropout",
    "init_vector_bank_bound", "init_logits_std", "target_modules", "exclude_modules", "layers_to_transform",
    "modules_to_save")}
#: PEFT fields peftkit takes only at one value: bias "all" / "vblora_only" trains base biases, layers_pattern
#: names the layer list (peftkit finds it from the model family).
_PEFT_FIXED = {"bias": "none", "layers_pattern": None}
#: The bank's name in the shared state and its key in PEFT's weights file (once per adapter).
BANK = "vblora_vector_bank"
_BANK_FILE_KEY = f"base_model.{BANK}"


class VBLoRAMethod(Method):
    name = "vblora"
    config_class = VBLoRAConfig
    description = "VB-LoRA: LoRA factors mixed from a shared vector bank (top-k); mergeable; PEFT format"
    can_merge = True
    peft_type = "VBLORA"
    identity_at_init = False  # PEFT draws the bank and the logits at random: the update is not zero at the start

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_linear_like, linear_features

        assert isinstance(config, VBLoRAConfig)
        names = adaptable_targets(model, config, arch, self.name, accepts=is_linear_like, label="VB-LoRA",
                                  kinds="Linear and transformers' Conv1D layers", defaults_of="lora")
        check_vector_length({name: linear_features(model.get_submodule(name)) for name in names}, config.vector_length)
        return [Site(name) for name in names]

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """The vector bank (num_vectors, vector_length), trained. Its initial values are drawn by the layer
        adapters, each drawing a bank just before its logits and handing it over, the last one staying: PEFT's
        sequence of draws from torch's global generator, so a seed gives PEFT's initial adapter."""
        import torch
        import torch.nn as nn

        assert isinstance(config, VBLoRAConfig)
        return {BANK: nn.Parameter(torch.zeros(config.num_vectors, config.vector_length))}

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        return {BANK: _BANK_FILE_KEY}

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from peftkit.plugin_api import linear_features

        from .layer import VBLoRALayer

        assert isinstance(config, VBLoRAConfig)
        in_features, out_features = linear_features(base_layer)
        return VBLoRALayer(base_layer, in_features, out_features, config)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        """The bank, plus per layer r * num_vectors logits for each vector_length-piece of an input row of A
        and of an output column of B."""
        from peftkit.plugin_api import linear_features

        assert isinstance(config, VBLoRAConfig)
        sizes = (linear_features(model.get_submodule(s.name)) for s in sites)
        pieces = sum((in_ + out) // config.vector_length for in_, out in sizes)
        return config.num_vectors * config.vector_length + pieces * config.r * config.num_vectors

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: VB-LoRA's factors are mixtures of bank vectors, never zero, so they have no zero-padded form."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, VBLoRAConfig)
        # fan_in_fan_out is rewritten from each layer's type when the folder is saved (True for GPT-2's Conv1D).
        return write_peft_fields("VBLORA", config.to_dict(), _PEFT_FIELDS, fan_in_fan_out=False, **_PEFT_FIXED)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _PEFT_FIELDS, fixed=_PEFT_FIXED, ignored={"fan_in_fan_out"})
        return VBLoRAConfig.from_dict(values)


def check_vector_length(features: dict[str, tuple[int, int]], vector_length: int) -> None:
    """Refuse layers whose input or output size vector_length does not divide (PEFT refuses them too), naming
    the first, how many more, and the largest vector_length that divides every size."""
    bad = {name: sizes for name, sizes in features.items() if any(n % vector_length for n in sizes)}
    if not bad:
        return
    name, (in_features, out_features) = next(iter(bad.items()))
    side, size = ("input", in_features) if in_features % vector_length else ("output", out_features)
    others = f" (so do {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    common = math.gcd(*(n for sizes in features.values() for n in sizes))
    nearest = max(d for d in range(1, min(common, vector_length) + 1) if common % d == 0)
    raise ConfigError(f"vblora: vector_length={vector_length} does not divide the {side} size {size} of layer "
                      f"{name!r}{others}; A and B are cut into pieces of vector_length entries along every "
                      f"layer's input and output, so set vector_length to a divisor of {common} (the largest up to "
                      f"{vector_length}: vector_length={nearest}), or leave such layers out with exclude_modules")
