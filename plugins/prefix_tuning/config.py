"""Prefix tuning's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import ConfigError


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Learned key/value prefixes in every attention layer (arXiv 2101.00190).

    num_virtual_tokens: length P of the prefix each layer attends to.
    prefix_projection: train through a reparametrization MLP (embedding ->
      Linear -> tanh -> Linear) instead of the flat prefix; the MLP's output is
      what is saved (PEFT's format) and ``eject()`` replaces the MLP by it.
    encoder_hidden_size: width of that MLP's hidden layer (None: token_dim).
    init_weights: None (random normal, PEFT's default) or "zero" (the flat
      prefix, or the MLP's last layer, starts at zero).
    num_layers, token_dim, num_attention_heads, num_transformer_submodules:
      the prefix's geometry (layers; key/value heads x head dim; key/value
      heads; 2 for encoder-decoder models). None: read from the model when the
      adapter is added (and written to the file, as PEFT does).
    """

    method: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    init_weights: Optional[Literal["zero"]] = None
    num_layers: Optional[int] = None
    token_dim: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_transformer_submodules: Optional[int] = None

    def check(self) -> None:
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"prefix_tuning config: num_virtual_tokens={self.num_virtual_tokens} must be a "
                              f"positive integer")
        for key in ("encoder_hidden_size", "num_layers", "token_dim", "num_attention_heads"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"prefix_tuning config: {key}={value} must be a positive integer (or null "
                                  f"to read it from the model)")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"prefix_tuning config: num_transformer_submodules={self.num_transformer_submodules} "
                              f"must be 1 (decoder-only or encoder-only models) or 2 (encoder-decoder models)")
        if self.token_dim is not None and self.num_attention_heads is not None \
                and self.token_dim % self.num_attention_heads:
            raise ConfigError(f"prefix_tuning config: token_dim={self.token_dim} is not a multiple of "
                              f"num_attention_heads={self.num_attention_heads}")
        for key in ("target_modules", "exclude_modules", "layers_to_transform"):
            if getattr(self, key) is not None:
                raise ConfigError(f"prefix_tuning config: {key} is not used — prefix tuning adds a prefix to "
                                  f"every attention layer; remove {key}")
