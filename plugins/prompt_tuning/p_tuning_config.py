"""P-tuning's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from peftkit.plugin_api import (AdapterConfig, ConfigError, check_num_transformer_submodules,
                                check_num_virtual_tokens, option, refuse_layer_selection, LAYER_SELECTION_FIELDS)

#: The MLP encoder's fixed depth (PEFT's: two hidden layers, whatever encoder_num_layers says).
MLP_LAYERS = 2


@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning (Liu et al., arXiv 2103.10385): a soft prompt in front of the input embeddings, as in prompt
    tuning, produced while training by a small encoder (PEFT's ``PromptEncoderConfig``).

    The prompt is ``encoder(E)`` for learned virtual-token embeddings E (P x hidden, N(0, 1) at the start):
    "MLP" (PEFT's default): Linear(hidden, h) - ReLU - Linear(h, h) - ReLU - Linear(h, hidden); "LSTM": a
    bidirectional LSTM of ``encoder_num_layers`` layers (width h, ``encoder_dropout`` between layers), then
    Linear(2h, 2h) - ReLU - Linear(2h, hidden). h is ``encoder_hidden_size`` (null: the model's hidden size).
    A saved adapter holds the prompt the encoder gives (PEFT's file), so a loaded one is a plain soft prompt:
    training it further trains those vectors directly.
    """

    method: ClassVar[str] = "p_tuning"
    refused_options: ClassVar[tuple[str, ...]] = LAYER_SELECTION_FIELDS

    num_virtual_tokens: int = option(20, help='length of the soft prompt')
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = option(
        "MLP", help='the encoder that makes the prompt from the virtual-token embeddings while training: '
                    '"MLP" (two hidden layers) or "LSTM" (bidirectional, then an MLP)')
    encoder_hidden_size: Optional[int] = option(
        None, help="width of the encoder's hidden layers (null: the model's hidden size)")
    encoder_num_layers: int = option(
        MLP_LAYERS, help='layers of the LSTM encoder (the MLP has two hidden layers; leave it at 2 there)')
    encoder_dropout: float = option(0.0, help='dropout between the LSTM encoder\'s layers (LSTM only)')
    token_dim: Optional[int] = option(
        None, help="width of each prompt token, the model's hidden size (null: read from the model)")
    num_transformer_submodules: Optional[int] = option(
        None, help='2 for encoder-decoder models, else 1 (null: read from the model)')

    def check(self) -> None:
        check_num_virtual_tokens(self)
        kind = self.encoder_reparameterization_type  # its values: checked by the field's type
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            raise ConfigError(f"p_tuning config: encoder_hidden_size={self.encoder_hidden_size!r} must be a "
                              f"positive integer (or null: the model's hidden size)")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ConfigError(f"p_tuning config: encoder_num_layers={self.encoder_num_layers!r} must be a "
                              f"positive integer")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"p_tuning config: encoder_dropout={self.encoder_dropout!r} must be a number in "
                              f"[0, 1)")
        if kind == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            raise ConfigError(f"p_tuning config: encoder_num_layers={self.encoder_num_layers} has no effect with "
                              f"the MLP encoder, which always has {MLP_LAYERS} hidden layers (PEFT ignores it "
                              f"with a warning); leave it out, or use encoder_reparameterization_type='LSTM'")
        if kind == "MLP" and self.encoder_dropout:
            raise ConfigError(f"p_tuning config: encoder_dropout={self.encoder_dropout} has no effect with the MLP "
                              f"encoder (PEFT applies it only between LSTM layers); leave it out, or use "
                              f"encoder_reparameterization_type='LSTM'")
        if self.token_dim is not None and self.token_dim <= 0:
            raise ConfigError(f"p_tuning config: token_dim={self.token_dim} must be a positive integer")
        check_num_transformer_submodules(self)
        refuse_layer_selection(self, "p-tuning prepends a soft prompt to the input embeddings")
