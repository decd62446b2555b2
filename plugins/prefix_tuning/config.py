"""Prefix tuning's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from peftkit.plugin_api import (AdapterConfig, option, check_num_transformer_submodules, check_num_virtual_tokens,
                                ConfigError, refuse_layer_selection, LAYER_SELECTION_FIELDS)


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
    token_positions: where the real tokens sit: "after_prefix" (PEFT's
      placement: the prefix takes positions 0..P-1 and the tokens P..P+n-1)
      or "from_zero" (AdapterHub's ``adapters``: the tokens keep 0..n-1 and
      the prefix has no position; loaded AdapterHub folders get it).
    use_gating: UniPELT's gate (AdapterHub's PrefixTuningConfig.use_gating): in each attention
      layer the prefix keys and values are multiplied by the mean over the sequence of
      sigmoid(W x + b) on the attention's input x (shared_gating=false: one gate each).
    """

    method: ClassVar[str] = "prefix_tuning"
    refused_options: ClassVar[tuple[str, ...]] = LAYER_SELECTION_FIELDS

    num_virtual_tokens: int = option(20, help='length of the prefix each attention layer attends to')
    prefix_projection: bool = option(
        False, help='train through a reparametrization MLP (embedding, Linear, tanh, Linear); its output is saved')
    encoder_hidden_size: Optional[int] = option(
        None, help='hidden width of the prefix_projection MLP (null: token_dim)')
    init_weights: Optional[Literal["zero"]] = option(
        None, help='null: random normal (PEFT\'s default); "zero": the prefix (or the MLP\'s last layer) starts at zero')
    num_layers: Optional[int] = option(None, help='number of layers that get a prefix (null: read from the model)')
    token_dim: Optional[int] = option(
        None, help='key/value heads x head dim of each prefix token (null: read from the model)')
    num_attention_heads: Optional[int] = option(None, help='key/value heads of the prefix (null: read from the model)')
    num_transformer_submodules: Optional[int] = option(
        None, help='2 for encoder-decoder models, else 1 (null: read from the model)')
    token_positions: Literal["after_prefix", "from_zero"] = option(
        "after_prefix", help='"after_prefix": the real tokens start at position P (PEFT); "from_zero": they keep '
                             '0..n-1 and the prefix has no position (AdapterHub\'s adapters)')

    use_gating: bool = option(
        False, help="a learned gate per attention layer (sequence mean of sigmoid(W x + b) on the attention's "
                    "input, per example) scales the prefix's keys and values (AdapterHub's UniPELT)")
    shared_gating: bool = option(
        True, help="with use_gating, one gate for the keys and values (false: one each)")

    def check(self) -> None:
        check_num_virtual_tokens(self)
        for key in ("encoder_hidden_size", "num_layers", "token_dim", "num_attention_heads"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"prefix_tuning config: {key}={value} must be a positive integer (or null "
                                  f"to read it from the model)")
        check_num_transformer_submodules(self)
        if self.token_dim is not None and self.num_attention_heads is not None \
                and self.token_dim % self.num_attention_heads:
            raise ConfigError(f"prefix_tuning config: token_dim={self.token_dim} is not a multiple of "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.token_positions not in ("after_prefix", "from_zero"):
            raise ConfigError(f"prefix_tuning config: token_positions={self.token_positions!r} is not one of "
                              f"'after_prefix' (PEFT's placement) or 'from_zero' (AdapterHub's)")
        if self.token_positions == "from_zero" and self.num_transformer_submodules == 2:
            raise ConfigError("prefix_tuning config: token_positions='from_zero' is for encoder-only and "
                              "decoder-only models; leave it at 'after_prefix' on an encoder-decoder model")
        refuse_layer_selection(self, "prefix tuning adds a prefix to every attention layer")
        if self.use_gating and self.num_transformer_submodules == 2:
            raise ConfigError("prefix_tuning config: use_gating=true is for encoder-only and decoder-only models "
                              "(as in AdapterHub's adapters); set use_gating=false on an encoder-decoder model")
