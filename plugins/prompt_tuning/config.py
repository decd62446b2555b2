"""Prompt tuning's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

from peftkit.plugin_api import (AdapterConfig, option, check_num_transformer_submodules, check_num_virtual_tokens,
                                ConfigError, refuse_layer_selection, LAYER_SELECTION_FIELDS)


@dataclass
class PromptTuningConfig(AdapterConfig):
    """A learned soft prompt prepended to the input embeddings (arXiv 2104.08691).

    placement: where the prompt joins the sequence: "input_embeddings" (PEFT's:
      in front of the token embeddings, so the embedding block adds position
      embeddings and LayerNorm to it too) or "embedding_output" (AdapterHub's:
      after the embedding block, raw, in front of what the first layer reads;
      the tokens keep positions 0..L-1). combine: with "embedding_output",
      "prefix" (in front) or "prefix_after_bos" (after the first token).

    num_virtual_tokens: length P of the soft prompt.
    init: "random" (N(0, 1), PEFT's RANDOM), "sample_vocab" (embeddings of
      random vocabulary tokens) or "text" (embeddings of ``init_text``'s
      tokens, cut or repeated to P; needs ``tokenizer_name_or_path``).
    init_text, tokenizer_name_or_path, tokenizer_kwargs: for init="text"
      (PEFT: prompt_tuning_init_text, tokenizer_name_or_path,
      tokenizer_kwargs); the tokenizer is loaded with
      ``transformers.AutoTokenizer.from_pretrained`` (remote code never runs).
    token_dim, num_transformer_submodules: the prompt's width (the model's
      hidden size) and 2 for encoder-decoder models (PEFT keeps 2P rows there
      and uses the first P). None: read from the model when the adapter is added.
    """

    method: ClassVar[str] = "prompt_tuning"
    refused_options: ClassVar[tuple[str, ...]] = LAYER_SELECTION_FIELDS

    num_virtual_tokens: int = option(20, help='length of the soft prompt')
    init: Literal["random", "sample_vocab", "text"] = option(
        "random", help='"random" (N(0, 1)), "sample_vocab" (embeddings of random tokens) or "text" (embeddings of init_text)')
    init_text: Optional[str] = option(
        None, help='with init="text", the text whose token embeddings start the prompt (cut or repeated)')
    tokenizer_name_or_path: Optional[str] = option(
        None, help='with init="text", the tokenizer to read init_text with (no remote code runs)')
    tokenizer_kwargs: Optional[dict[str, Any]] = option(
        None, help='with init="text", extra arguments for AutoTokenizer.from_pretrained')
    token_dim: Optional[int] = option(
        None, help="width of each prompt token, the model's hidden size (null: read from the model)")
    num_transformer_submodules: Optional[int] = option(
        None, help='2 for encoder-decoder models, else 1 (null: read from the model)')
    placement: Literal["input_embeddings", "embedding_output"] = option(
        "input_embeddings", help='"input_embeddings" (PEFT: before the embedding block adds positions and '
                                 'LayerNorm) or "embedding_output" (AdapterHub: after the embedding block)')
    combine: Literal["prefix", "prefix_after_bos"] = option(
        "prefix", help='"prefix" (prompt first) or, with placement="embedding_output", "prefix_after_bos" '
                       '(after the first token, as AdapterHub\'s combine)')

    def check(self) -> None:
        check_num_virtual_tokens(self)
        if self.init == "text":
            if not self.init_text:
                raise ConfigError("prompt_tuning config: init='text' needs init_text (the text whose token "
                                  "embeddings start the prompt)")
            if not self.tokenizer_name_or_path:
                raise ConfigError("prompt_tuning config: init='text' needs tokenizer_name_or_path (the base "
                                  "model's tokenizer, a folder or a hub id)")
        elif self.tokenizer_kwargs:
            raise ConfigError("prompt_tuning config: tokenizer_kwargs only apply with init='text'")
        if self.token_dim is not None and self.token_dim <= 0:
            raise ConfigError(f"prompt_tuning config: token_dim={self.token_dim} must be a positive integer")
        check_num_transformer_submodules(self)
        if self.placement not in ("input_embeddings", "embedding_output"):
            raise ConfigError(f"prompt_tuning config: placement={self.placement!r} is not one of "
                              f"'input_embeddings' (PEFT's) or 'embedding_output' (AdapterHub's)")
        if self.combine not in ("prefix", "prefix_after_bos"):
            raise ConfigError(f"prompt_tuning config: combine={self.combine!r} is not one of 'prefix' or "
                              f"'prefix_after_bos'")
        if self.combine == "prefix_after_bos" and self.placement != "embedding_output":
            raise ConfigError("prompt_tuning config: combine='prefix_after_bos' needs placement='embedding_output' "
                              "(PEFT's placement puts the prompt first)")
        if self.placement == "embedding_output" and self.num_transformer_submodules == 2:
            raise ConfigError("prompt_tuning config: placement='embedding_output' is for encoder or decoder models, "
                              "not encoder-decoder ones (num_transformer_submodules=2); use "
                              "placement='input_embeddings'")
        refuse_layer_selection(self, "prompt tuning prepends a soft prompt to the input embeddings")
