"""The prompt-tuning method: model geometry, initial prompts, PEFT's file format."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, ConfigError, on_model_device, read_peft_fields, Site,
                                VirtualTokenMethod)

from .adapterhub import PromptTuningAdapterHub
from .config import PromptTuningConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

#: PEFT's prompt_tuning_init values <-> ours.
_INIT_FROM_PEFT = {"RANDOM": "random", "SAMPLE_VOCAB": "sample_vocab", "TEXT": "text"}
_INIT_TO_PEFT = {v: k for k, v in _INIT_FROM_PEFT.items()}
#: PEFT fields -> ours.
_FROM_PEFT = {"num_virtual_tokens": "num_virtual_tokens", "prompt_tuning_init": "init",
              "prompt_tuning_init_text": "init_text", "tokenizer_name_or_path": "tokenizer_name_or_path",
              "tokenizer_kwargs": "tokenizer_kwargs", "token_dim": "token_dim",
              "num_transformer_submodules": "num_transformer_submodules", "modules_to_save": "modules_to_save"}
#: Our fields PEFT lacks, with the defaults that mean PEFT's behaviour (a file leaves them out then).
_PEFTKIT_ONLY = {"placement": "input_embeddings", "combine": "prefix"}
#: PEFT fields that prompt tuning does not use (the geometry of attention) or the core handles.
_PEFT_IGNORED = {"peft_type", "inference_mode", "num_layers", "num_attention_heads"}
#: ``peft_type`` of a prompt PEFT's PROMPT_TUNING cannot express (placement="embedding_output", AdapterHub's): a
#: type PEFT does not have, so PEFT refuses the folder rather than drop placement and combine (fields it does not
#: know, dropped with a warning) and compute a prompt at the input embeddings, another adapter.
NOT_PEFT_TYPE = "PROMPT_TUNING_EMBEDDING_OUTPUT"


class PromptTuningMethod(VirtualTokenMethod):
    name = "prompt_tuning"
    config_class = PromptTuningConfig
    known_as = {"prompt": "prompt tuning is prompt_tuning"}
    description = ("Prompt tuning: a learned soft prompt prepended to the input embeddings (or, as AdapterHub, to "
                   "the embedding output); PEFT and AdapterHub formats")
    adapterhub = PromptTuningAdapterHub()
    peft_type = "PROMPT_TUNING"
    extra_file_types = frozenset({NOT_PEFT_TYPE})
    aliases = {**VirtualTokenMethod.aliases, "prompt_tuning_init": "init", "prompt_tuning_init_text": "init_text"}

    def make_config(self, **values: Any) -> AdapterConfig:
        values = self.resolve_aliases(values)
        if isinstance(values.get("init"), str):
            values["init"] = _INIT_FROM_PEFT.get(values["init"], values["init"])
        return self.config_class.from_dict(values)

    def create_model_adapter(self, model: "nn.Module", config: AdapterConfig, arch: Any) -> "nn.Module":
        from .layer import PromptTuning, initial_prompt

        assert isinstance(config, PromptTuningConfig)
        token_dim, submodules = prompt_geometry(model, config)
        config.token_dim, config.num_transformer_submodules = token_dim, submodules
        rows = config.num_virtual_tokens * submodules
        init = initial_prompt(model, config.init, rows, text=config.init_text,
                              tokenizer_name_or_path=config.tokenizer_name_or_path,
                              tokenizer_kwargs=config.tokenizer_kwargs)
        if config.placement == "embedding_output":
            check_encoder(model)
        adapter = PromptTuning(config.num_virtual_tokens, token_dim, num_transformer_submodules=submodules,
                               init_weight=init, is_encoder_decoder=submodules == 2,
                               after_embeddings=config.placement == "embedding_output",
                               after_bos=config.combine == "prefix_after_bos")
        return on_model_device(adapter, model)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, PromptTuningConfig)
        token_dim, submodules = prompt_geometry(model, config)
        return config.num_virtual_tokens * submodules * token_dim

    # -- PEFT's adapter_config.json ---------------------------------------------------------

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """PROMPT_TUNING for a prompt at the input embeddings, in front; None for another placement or
        combine, which PEFT has no field for."""
        assert isinstance(config, PromptTuningConfig)
        return self.peft_type if all(getattr(config, key) == default for key, default in _PEFTKIT_ONLY.items()) \
            else None

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, PromptTuningConfig)
        ours = config.to_dict()
        peft_type = self.peft_type_of(config) or NOT_PEFT_TYPE
        data: dict[str, Any] = {"peft_type": peft_type, "num_layers": None, "num_attention_heads": None}
        for peft_key, our_key in _FROM_PEFT.items():
            data[peft_key] = ours[our_key]
        data["prompt_tuning_init"] = _INIT_TO_PEFT[config.init]
        for key, default in _PEFTKIT_ONLY.items():  # PEFT has no such fields: written only when needed
            if ours[key] != default:
                data[key] = ours[key]
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, {**_FROM_PEFT, **{k: k for k in _PEFTKIT_ONLY}},
                                  ignored=_PEFT_IGNORED)
        if data.get("peft_type") == NOT_PEFT_TYPE and values.get("placement") != "embedding_output":
            raise ConfigError(f"peft_type {NOT_PEFT_TYPE!r} is a prompt at the embedding output, but the file says "
                              f"placement={values.get('placement', 'input_embeddings')!r}; the file is damaged or "
                              f"was edited: save the adapter again")
        init = values.get("init")
        if isinstance(init, str):
            values["init"] = _INIT_FROM_PEFT.get(init, init)
        # A loaded prompt is overwritten by the file's weights: never load a tokenizer (or the network) for it.
        values["init"] = "random"
        for key in ("init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
            values.pop(key, None)
        return PromptTuningConfig.from_dict(values)


def check_encoder(model: "nn.Module") -> None:
    """Refuse placement="embedding_output" on a model that is not an encoder: a decoder's later generation
    steps would get the prompt again (and GPT-2 reshapes its hidden states to the input's length), and an
    encoder-decoder's decoder embeds its own tokens. Encoders: the families transformers has a masked-LM
    model for, used without causal attention."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if (model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False)
            or getattr(config, "is_decoder", False)):
        raise ConfigError(f"prompt_tuning: placement='embedding_output' (AdapterHub's) is for encoder models "
                          f"(BERT, RoBERTa, ...), not {type(model).__name__} (model_type={model_type!r}); use "
                          f"placement='input_embeddings'")


def prompt_geometry(model: "nn.Module", config: Any) -> tuple[int, int]:
    """(token_dim, num_transformer_submodules) for this model; explicit config values must agree."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "embedding_dim"):
        raise ConfigError(f"{config.method} needs a model with token embeddings (get_input_embeddings()); "
                          f"{type(model).__name__} has none")
    token_dim = embeddings.embedding_dim
    submodules = 2 if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else 1
    for key, value in (("token_dim", token_dim), ("num_transformer_submodules", submodules)):
        given = getattr(config, key)
        if given is not None and given != value:
            raise ConfigError(f"{config.method}: {key}={given} does not fit {type(model).__name__}, which needs "
                              f"{key}={value}; the adapter was made for another model — leave {key} unset")
    return token_dim, submodules
