"""The P-tuning method: model geometry, the encoder it trains with, PEFT's P_TUNING file format (torch-free at
import: the modules are in :mod:`.p_tuning`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import AdapterConfig, ConfigError, on_model_device, read_peft_fields, Site, VirtualTokenMethod

from .method import prompt_geometry
from .p_tuning_config import PTuningConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

#: PEFT fields -> ours.
_FROM_PEFT = {name: name for name in ("num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size",
                                      "encoder_num_layers", "encoder_dropout", "token_dim",
                                      "num_transformer_submodules", "modules_to_save")}
#: PEFT fields P-tuning does not use (the geometry of attention) or the core handles.
_PEFT_IGNORED = {"peft_type", "inference_mode", "num_layers", "num_attention_heads"}


class PTuningMethod(VirtualTokenMethod):
    name = "p_tuning"
    config_class = PTuningConfig
    known_as = {"ptuning": "p-tuning is p_tuning", "prompt_encoder": "PEFT's PromptEncoderConfig is p_tuning"}
    description = ("P-tuning: a soft prompt in front of the input embeddings, made by an MLP or LSTM encoder while "
                   "training; PEFT format")
    peft_type = "P_TUNING"

    def create_model_adapter(self, model: "nn.Module", config: AdapterConfig, arch: Any) -> "nn.Module":
        from .p_tuning import PTuning, make_encoder

        assert isinstance(config, PTuningConfig)
        token_dim, submodules = prompt_geometry(model, config)
        config.token_dim, config.num_transformer_submodules = token_dim, submodules
        adapter = PTuning(config.num_virtual_tokens, token_dim, lambda: make_encoder(config, token_dim),
                          num_transformer_submodules=submodules, is_encoder_decoder=submodules == 2)
        return on_model_device(adapter, model)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        import torch

        from .p_tuning import make_encoder

        assert isinstance(config, PTuningConfig)
        token_dim, submodules = prompt_geometry(model, config)
        with torch.device("meta"):  # shapes only: no memory, no draws from the generator
            encoder = make_encoder(config, token_dim)
        return config.num_virtual_tokens * submodules * token_dim + sum(p.numel() for p in encoder.parameters())

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, PTuningConfig)
        ours = config.to_dict()
        data: dict[str, Any] = {"peft_type": self.peft_type, "num_layers": None, "num_attention_heads": None}
        data.update({peft_key: ours[our_key] for peft_key, our_key in _FROM_PEFT.items()})
        return data

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        values = read_peft_fields(data, self.name, _FROM_PEFT, ignored=_PEFT_IGNORED)
        if values.get("encoder_reparameterization_type", "MLP") == "MLP":
            # PEFT writes what was asked even where the MLP ignores it; a loaded prompt has no encoder anyway.
            values.pop("encoder_num_layers", None)
            values.pop("encoder_dropout", None)
        try:
            return PTuningConfig.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in a P_TUNING adapter_config.json)") from None
