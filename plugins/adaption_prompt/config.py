"""Adaption prompts' config (torch-free), with PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from peftkit.plugin_api import AdapterConfig, ConfigError, option

#: Common fields PEFT's AdaptionPromptConfig has no field for (so its folder could not say them).
_NOT_IN_PEFT = ("exclude_modules", "layers_to_transform")


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter's adaption prompts (PEFT's ``AdaptionPromptConfig``, arXiv 2303.16199): in each of the top
    ``adapter_layers`` attention layers, ``adapter_len`` learned prompt vectors go through the layer's own key
    and value projections; the layer's queries attend to them alone, and that attention's output, scaled by a
    gate that starts at zero, is added to the layer's attention output. Llama, Mistral and GPT-2 models (PEFT's
    list).
    """

    method: ClassVar[str] = "adaption_prompt"

    target_modules: Union[list[str], str, None] = option(
        None, help="the attention module's attribute name in each layer, one name (self_attn for Llama and "
                   "Mistral, attn for GPT-2); null takes the model type's")
    exclude_modules: Union[list[str], str, None] = option(
        None, help="not supported by adaption_prompt (PEFT's config has no such field): set adapter_layers")
    layers_to_transform: Union[list[int], int, None] = option(
        None, help="not supported by adaption_prompt (PEFT's config has no such field): adapter_layers takes the "
                   "top layers")
    modules_to_save: Union[list[str], None] = option(
        None, help="extra modules (a classification head) trained and saved with the adapter; PEFT's adaption "
                   "prompts have none, so such a folder is saved as a type PEFT does not load")
    adapter_len: int = option(10, help="prompt vectors per adapted layer")
    adapter_layers: Optional[int] = option(
        None, help="adapt the top this many layers' attention; null: every layer")

    def check(self) -> None:
        if isinstance(self.adapter_len, bool) or self.adapter_len < 1:
            raise ConfigError(f"adaption_prompt config: adapter_len={self.adapter_len!r} must be a positive integer "
                              f"(the prompt vectors per layer), e.g. adapter_len=10")
        if self.adapter_layers is not None and (isinstance(self.adapter_layers, bool) or self.adapter_layers < 1):
            raise ConfigError(f"adaption_prompt config: adapter_layers={self.adapter_layers!r} must be a positive "
                              f"integer (the top layers to adapt), e.g. adapter_layers=8, or null for every layer")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError(f"adaption_prompt config: target_modules={self.target_modules!r} must be one name, the "
                              f"attention module's attribute in each layer (as in PEFT), e.g. "
                              f"target_modules=self_attn; choose the layers with adapter_layers")
        for name in _NOT_IN_PEFT:
            value = getattr(self, name)
            if value is not None:
                raise ConfigError(f"adaption_prompt config: {name}={value!r} is not supported (PEFT's "
                                  f"AdaptionPromptConfig has no {name} field, so its folder could not say it); "
                                  f"adaption prompts go into the top adapter_layers layers: set adapter_layers")
