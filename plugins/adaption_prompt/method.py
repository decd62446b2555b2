"""The adaption-prompt method: its sites (the attention modules of the top layers, found as PEFT finds them) and
PEFT's adapter_config.json (``peft_type`` ADAPTION_PROMPT). Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, read_peft_fields, Site, write_peft_fields

from .config import AdaptionPromptConfig
from .defaults import AttentionKind, MODEL_TYPES

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: PEFT's AdaptionPromptConfig fields, named as ours.
_PEFT_FIELDS = {name: name for name in ("target_modules", "adapter_len", "adapter_layers")}
#: The ``peft_type`` of an adapter that also trains whole modules (a task model's head, which peftkit trains by
#: default): PEFT's AdaptionPromptConfig has no modules_to_save, and PEFT would load such a folder with the head
#: it was trained with left out (an unexpected key); a type PEFT does not have makes PEFT refuse it instead.
WITH_MODULES_TYPE = "ADAPTION_PROMPT_MODULES_TO_SAVE"


def model_type_of(model: "nn.Module") -> str:
    """The transformers ``model_type`` of ``model`` ("" for a model without a config)."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def attention_kind(model: "nn.Module") -> AttentionKind:
    """The attention of ``model``'s type; a ConfigError naming the type for one PEFT does not support."""
    model_type = model_type_of(model)
    kind = MODEL_TYPES.get(model_type)
    if kind is None:
        shown = repr(model_type) if model_type else f"{type(model).__name__} (no transformers model_type)"
        raise ConfigError(f"adaption_prompt: model type {shown} is not supported; adaption prompts recompute the "
                          f"attention's queries as each model type computes them, which peftkit does (as PEFT) for "
                          f"{', '.join(MODEL_TYPES)} models only; use prefix_tuning or lora for this model")
    return kind


def attention_sites(model: "nn.Module", config: AdaptionPromptConfig) -> list[str]:
    """The attention modules named ``config.target_modules`` (PEFT's rule: a module name ending in
    ``.<target_modules>``), in model order, the top ``config.adapter_layers`` of them."""
    found = [name for name, _ in model.named_modules() if name.endswith(f".{config.target_modules}")]
    if not found:
        raise ConfigError(f"adaption_prompt: no module of {type(model).__name__} is named "
                          f"{config.target_modules!r} (target_modules names the attention module's attribute in each "
                          f"layer); leave target_modules unset to take the model type's "
                          f"({attention_kind(model).module!r})")
    layers = config.adapter_layers if config.adapter_layers is not None else len(found)
    if layers > len(found):
        raise ConfigError(f"adaption_prompt: adapter_layers={layers} is more than the {len(found)} "
                          f"{config.target_modules!r} modules of {type(model).__name__}; set adapter_layers to at "
                          f"most {len(found)}")
    return found[-layers:]


class AdaptionPromptMethod(Method):
    name = "adaption_prompt"
    config_class = AdaptionPromptConfig
    known_as = {"llamaadapter": "LLaMA-Adapter's zero-init attention is adaption_prompt"}
    description = "Adaption prompts (LLaMA-Adapter): gated learned prompts attended to in the top attention " \
                  "layers; Llama, Mistral, GPT-2; PEFT format"
    peft_type = "ADAPTION_PROMPT"
    extra_file_types = frozenset({WITH_MODULES_TYPE})
    #: PEFT runs one adaption prompt at a time; the adapter reads the attention's call (its position
    #: embeddings), which no composition hands a layer adapter.
    supported_blocks = frozenset()

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        assert isinstance(config, AdaptionPromptConfig)
        kind = attention_kind(model)
        if config.target_modules is None:  # filled in, as PEFT does, so that the saved config names it
            config.target_modules = kind.module
        names = attention_sites(model, config)
        if config.adapter_layers is None:
            config.adapter_layers = len(names)
        return [Site(name) for name in names]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .layer import AdaptionPrompt

        assert isinstance(config, AdaptionPromptConfig)
        return AdaptionPrompt(base_layer, _model_config(model), adapter_len=config.adapter_len,
                              fused=attention_kind(model).fused, site=site.name)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, AdaptionPromptConfig)
        hidden = int(_model_config(model).hidden_size)
        return len(sites) * (config.adapter_len * hidden + 1)  # the prompt and the gate

    def config_with_rank(self, config: AdapterConfig, rank: int) -> None:
        """None: adaption prompts have no rank."""
        return None

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """ADAPTION_PROMPT; None for an adapter that also trains whole modules (PEFT's config cannot say it)."""
        assert isinstance(config, AdaptionPromptConfig)
        return None if config.modules_to_save else self.peft_type

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, AdaptionPromptConfig)
        if config.modules_to_save:
            return write_peft_fields(WITH_MODULES_TYPE, config.to_dict(),
                                     {**_PEFT_FIELDS, "modules_to_save": "modules_to_save"})
        return write_peft_fields(self.peft_type, config.to_dict(), _PEFT_FIELDS)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        fields = {**_PEFT_FIELDS, "modules_to_save": "modules_to_save"}
        return AdaptionPromptConfig.from_dict(read_peft_fields(data, self.name, fields))


def _model_config(model: "nn.Module") -> Any:
    from peftkit.plugin_api import text_config

    return text_config(model)
