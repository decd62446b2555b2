"""The prefix-tuning method: geometry from the model, PEFT's file format."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, ConfigError, on_model_device, read_peft_fields, Site,
                                VirtualTokenMethod)

from .adapterhub import PrefixTuningAdapterHub
from .config import PrefixTuningConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from .layer import PrefixGeometry

#: Fields of PEFT's PrefixTuningConfig that map 1:1 onto ours.
_PEFT_FIELDS = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "init_weights", "num_layers",
                "token_dim", "num_attention_heads", "num_transformer_submodules", "modules_to_save")
#: PEFT fields with no meaning for peftkit (the core handles the base-model fields).
_PEFT_IGNORED = {"peft_type", "inference_mode"}
#: ``peft_type`` of prefixes PEFT's PREFIX_TUNING cannot express: types PEFT does not have, so PEFT refuses the folder.
#: PEFT 0.21 drops the fields it does not know with only a warning, and would load another adapter: a prefix at
#: PEFT's positions without gates (an output 0.03 apart for from_zero), and the gate weights as unexpected keys.
GATED_TYPE = "PREFIX_TUNING_GATED"  # use_gating=true (UniPELT's gates), either token_positions
FROM_ZERO_TYPE = "PREFIX_TUNING_FROM_ZERO"  # token_positions="from_zero" (AdapterHub's), no gates


class PrefixTuningMethod(VirtualTokenMethod):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig
    known_as = {"prefix": "prefix tuning is prefix_tuning"}
    description = "Prefix tuning: learned key/value prefixes in every attention layer (optional MLP); PEFT format"
    peft_type = "PREFIX_TUNING"
    extra_file_types = frozenset({GATED_TYPE, FROM_ZERO_TYPE})
    adapterhub = PrefixTuningAdapterHub()

    def create_model_adapter(self, model: "nn.Module", config: AdapterConfig, arch: Any) -> "nn.Module":
        from peftkit.plugin_api import cache_argument

        from .layer import PrefixTuning

        assert isinstance(config, PrefixTuningConfig)
        if cache_argument(model) is None:
            raise ConfigError(f"prefix_tuning: {type(model).__name__}.forward takes no KV cache "
                              f"('cache' or 'past_key_values'), which prefix tuning writes its prefix into; "
                              f"use prompt_tuning for this model")
        geometry = prefix_geometry(model, config)
        # Fill the config in (its own copy, made by the core), so the saved file is complete as PEFT's is.
        config.num_layers = geometry.num_layers
        config.token_dim = geometry.token_dim
        config.num_attention_heads = geometry.num_heads
        config.num_transformer_submodules = geometry.num_transformer_submodules
        if config.prefix_projection and config.encoder_hidden_size is None:
            config.encoder_hidden_size = geometry.token_dim
        options = dict(prefix_projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size,
                       init_weights=config.init_weights, is_encoder_decoder=geometry.num_transformer_submodules == 2,
                       cache_config=geometry_config(model), token_positions=config.token_positions)
        if not config.use_gating:
            return on_model_device(PrefixTuning(geometry, **options), model)
        from .gating import GatedPrefixTuning

        if geometry.num_transformer_submodules == 2:
            raise ConfigError(f"prefix_tuning: use_gating=true is for encoder-only and decoder-only models (as in "
                              f"AdapterHub's adapters), and {type(model).__name__} is an encoder-decoder model; set "
                              f"use_gating=false")
        gated = GatedPrefixTuning(geometry, hidden_size=_hidden_size(model), shared_gating=config.shared_gating,
                                  **options)
        gated.attach(model)
        return on_model_device(gated, model)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, PrefixTuningConfig)
        g = prefix_geometry(model, config)
        gates = g.num_layers * (_hidden_size(model) + 1) * (1 if config.shared_gating else 2) \
            if config.use_gating else 0
        if not config.prefix_projection:
            return g.num_virtual_tokens * g.width + gates
        hidden = config.encoder_hidden_size or g.token_dim
        return (g.num_virtual_tokens * g.token_dim + (g.token_dim + 1) * hidden + (hidden + 1) * g.width + gates)

    # -- PEFT's adapter_config.json ---------------------------------------------------------

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """PREFIX_TUNING for PEFT's prefix; None with gates or token_positions="from_zero" (PEFT has neither)."""
        assert isinstance(config, PrefixTuningConfig)
        return None if config.use_gating or config.token_positions != "after_prefix" else self.peft_type

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, PrefixTuningConfig)
        own_type = GATED_TYPE if config.use_gating else FROM_ZERO_TYPE
        data: dict[str, Any] = {"peft_type": self.peft_type_of(config) or own_type}
        ours = config.to_dict()
        for key in _PEFT_FIELDS:
            data[key] = ours[key]
        if data["encoder_hidden_size"] is None:
            data["encoder_hidden_size"] = config.token_dim  # PEFT fills it in the same way
        if config.token_positions != "after_prefix":  # PEFT has no such field: written only when needed
            data["token_positions"] = config.token_positions
        if config.use_gating:  # nor gates
            data.update(use_gating=True, shared_gating=config.shared_gating)
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        fields = {key: key for key in (*_PEFT_FIELDS, "token_positions", "use_gating", "shared_gating")}
        values = read_peft_fields(data, self.name, fields, ignored=_PEFT_IGNORED)
        if not values.get("prefix_projection"):
            values.pop("encoder_hidden_size", None)  # PEFT writes token_dim here even without the MLP
        # Folders of earlier versions say PREFIX_TUNING with these fields: read as saved.
        gated, positions = bool(values.get("use_gating")), values.get("token_positions", "after_prefix")
        if (data.get("peft_type") == GATED_TYPE and not gated) or \
                (data.get("peft_type") == FROM_ZERO_TYPE and (gated or positions != "from_zero")):
            raise ConfigError(f"peft_type {data.get('peft_type')!r} does not fit the file's use_gating={gated} and "
                              f"token_positions={positions!r}; the file is damaged or was edited: save the adapter "
                              f"again")
        return PrefixTuningConfig.from_dict(values)


def _hidden_size(model: "nn.Module") -> int:
    """The width of the attention's input, which a prefix gate reads (the model's hidden size)."""
    from peftkit.plugin_api import text_config

    hidden = _first(text_config(model), "hidden_size", "n_embd", "d_model")
    if not hidden:
        raise ConfigError(f"prefix_tuning use_gating=true: cannot read the hidden size of {type(model).__name__} "
                          f"from its config")
    return int(hidden)


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def geometry_config(model: "nn.Module") -> Any:
    """The config that describes the attention the prefix joins (and sizes its cache, as the model's own
    decoder does). An encoder-decoder model's own config: transformers' decoder text config of BART-like
    models is rebuilt from defaults for the decoder fields (decoder_layers=12 whatever the model has)."""
    from peftkit.plugin_api import text_config

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return model.config
    return text_config(model)


def prefix_geometry(model: "nn.Module", config: PrefixTuningConfig) -> "PrefixGeometry":
    """The prefix shape this model needs; explicit config values must agree with it."""

    from .layer import PrefixGeometry

    model_config = geometry_config(model)
    if model_config is None:
        raise ConfigError(f"prefix_tuning needs a transformers model (with a .config); "
                          f"{type(model).__name__} has none")
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if encoder_decoder:
        layers = _first(model_config, "num_decoder_layers", "decoder_layers", "num_hidden_layers", "num_layers")
    else:
        layers = _first(model_config, "num_hidden_layers", "num_layers", "n_layer")
    heads = _first(model_config, "decoder_attention_heads", "num_attention_heads", "n_head", "num_heads") \
        if encoder_decoder else _first(model_config, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _first(model_config, "num_key_value_heads") or heads
    hidden = _first(model_config, "hidden_size", "n_embd", "d_model")
    head_dim = _first(model_config, "head_dim", "d_kv")
    if head_dim is None and hidden is not None and heads:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim):
        raise ConfigError(f"prefix_tuning: cannot read the attention geometry of {type(model).__name__} from its "
                          f"config (layers={layers}, key/value heads={kv_heads}, head_dim={head_dim})")
    found = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim,
             "num_transformer_submodules": 2 if encoder_decoder else 1}
    for key, value in found.items():
        given = getattr(config, key)
        if given is not None and given != value:
            raise ConfigError(f"prefix_tuning: {key}={given} does not fit {type(model).__name__}, which needs "
                              f"{key}={value} (key/value heads x head_dim for token_dim); the adapter was made for "
                              f"another model — leave {key} unset to read it from the model")
    return PrefixGeometry(config.num_virtual_tokens, layers, kv_heads, head_dim, found["num_transformer_submodules"])
