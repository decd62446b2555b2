"""The prompt-tuning module: a soft prompt prepended to the input embeddings.

Before a forward that starts a sequence (no KV cache yet, or an empty one) the
token ids are embedded with the model's own input embedding and the P prompt
vectors are put in front; the attention mask gets P ones on the left, labels
P ignored positions (-100), token type ids P zeros, and explicit position ids
become 0..P-1 followed by the given ones moved by P. Later generation steps
only feed new tokens (the prompt is already in the KV cache), so they just get
the longer mask and moved position ids. Outputs cover the P prompt positions
too (as with PEFT): a causal LM returns logits of length P + L.

Encoder-decoder models (T5) get the prompt in front of the encoder input;
``generate()`` runs their encoder itself, so :meth:`PromptTuning.prepare_generate`
hands it the prompted embeddings up front.

With ``placement="embedding_output"`` (AdapterHub's) the token ids go through the
whole embedding block unchanged (positions 0..L-1, token types, LayerNorm) and the
prompt joins its output (the point ``embedding_output``, through
:meth:`PromptTuning.point_output`), in front or after the first token
(``combine="prefix_after_bos"``); the forward hook only widens the attention mask
and token-level labels at the same place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from peftkit.plugin_api import (CACHE_ARGUMENTS, bind_arguments, check_growing_cache, ConfigError,
                                EMBEDDING_OUTPUT, extend_mask, PeftkitError, PointOutputAdapter, starts_sequence)

TENSOR_KEY = "prompt_embeddings"
IGNORE_INDEX = -100


class PromptTuning(PointOutputAdapter):
    """One soft prompt: ``prompt_embeddings`` of shape (P * submodules, hidden); the first P rows are used.

    ``after_embeddings``: join the embedding block's output (AdapterHub's placement) rather than the
    input embeddings; ``after_bos``: there, after the first token rather than in front."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, num_transformer_submodules: int = 1,
                 init_weight: torch.Tensor | None = None, is_encoder_decoder: bool = False,
                 after_embeddings: bool = False, after_bos: bool = False) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.is_encoder_decoder = is_encoder_decoder
        self.after_embeddings = after_embeddings
        self.after_bos = after_bos
        rows = num_virtual_tokens * num_transformer_submodules
        if init_weight is None:
            init_weight = torch.randn(rows, token_dim)  # N(0, 1), like nn.Embedding and PEFT's RANDOM
        if tuple(init_weight.shape) != (rows, token_dim):
            raise ConfigError(f"prompt_tuning: initial prompt has shape {tuple(init_weight.shape)}, "
                              f"expected {(rows, token_dim)}")
        self.prompt_embeddings = nn.Parameter(init_weight.detach().clone().float())

    def prompt(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt for a batch: (batch, P, hidden), a view of the parameter (no copy unless ``dtype``
        differs). The parameter is used as it is when it has exactly P rows: a slice would add an
        autograd node whose backward fills a zero gradient of the whole parameter and copies into it,
        and ``expand`` adds the batch dimension itself (no ``unsqueeze`` node)."""
        rows = self.prompt_rows()
        if rows.shape[0] != self.num_virtual_tokens:  # encoder-decoder: the first P of 2P rows
            rows = rows[: self.num_virtual_tokens]
        return rows.to(dtype).expand(batch, -1, -1)

    def prompt_rows(self) -> torch.Tensor:
        """Every row of the prompt (P * submodules, hidden): the parameter itself here."""
        return self.prompt_embeddings

    # -- the forward hook ----------------------------------------------------------------

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = bind_arguments(model, args, kwargs)
        if self.after_embeddings:
            self._widen_for_embedding_output(kwargs)
            return (), kwargs
        if self.is_encoder_decoder:
            if kwargs.get("encoder_outputs") is None:
                self._prepend_prompt(model, kwargs, pad_labels=False)
            # Otherwise the encoder already ran on the prompted input (generate() via prepare_generate()).
            return (), kwargs
        cache = next((kwargs[k] for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), None)
        check_growing_cache(cache, self.num_virtual_tokens)
        # A forward that keeps no cache gets the whole sequence: it always starts afresh.
        if kwargs.get("use_cache") is False or starts_sequence(cache):
            self._prepend_prompt(model, kwargs, pad_labels=True)
        else:  # a later step: the prompt is in the cache already
            count = self.num_virtual_tokens
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), count)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + count
        return (), kwargs

    def prepare_generate(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Encoder-decoder models: give generate() the prompted encoder input.

        Decoder-only models need nothing here: each generation step goes
        through :meth:`prepare`.
        """
        if not self.is_encoder_decoder:
            return args, kwargs
        kwargs = dict(kwargs)
        if args:
            if len(args) > 1 or "inputs" in kwargs:
                raise PeftkitError("generate() with prompt tuning: pass the input ids as the first argument or "
                                   "as input_ids=, and everything else by keyword")
            kwargs["inputs"] = args[0]
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        if kwargs.get("encoder_outputs") is not None:
            raise PeftkitError("generate() with prompt tuning: do not pass encoder_outputs; the soft prompt has "
                               "to go through the encoder, so pass input_ids (or inputs_embeds)")
        ids = kwargs.get("input_ids")
        if kwargs.get("attention_mask") is None and isinstance(ids, torch.Tensor):
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
            kwargs["attention_mask"] = (ids != pad).long() if pad is not None else torch.ones_like(ids)
        self._prepend_prompt(model, kwargs, pad_labels=False)
        return (), kwargs

    def _prepend_prompt(self, model: nn.Module, kwargs: dict, *, pad_labels: bool) -> None:
        count = self.num_virtual_tokens
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.get("input_ids")
            if ids is None:
                raise PeftkitError("prompt tuning needs input_ids or inputs_embeds to put the soft prompt in front of")
            embeds = model.get_input_embeddings()(ids)
        batch, length = embeds.shape[0], embeds.shape[1]
        kwargs["inputs_embeds"] = torch.cat([self.prompt(batch, embeds.dtype), embeds], dim=1)
        kwargs["input_ids"] = None
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), count)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            if position_ids.dim() != 2:
                raise PeftkitError(f"prompt tuning supports (batch, length) position_ids, got shape "
                                   f"{tuple(position_ids.shape)}; leave position_ids out to let the model count")
            head = torch.arange(count, dtype=position_ids.dtype, device=position_ids.device)
            kwargs["position_ids"] = torch.cat([head.expand(position_ids.shape[0], count), position_ids + count], 1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], count), token_types], 1)
        labels = kwargs.get("labels")
        if pad_labels and isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
            pad = labels.new_full((labels.shape[0], count, *labels.shape[2:]), IGNORE_INDEX)
            kwargs["labels"] = torch.cat([pad, labels], dim=1)

    # -- placement="embedding_output" ------------------------------------------------------

    def output_points(self) -> tuple[str, ...]:
        return (EMBEDDING_OUTPUT,) if self.after_embeddings else ()

    def point_output(self, point: str, output: torch.Tensor) -> torch.Tensor:
        """The embedding block's output (batch, L, hidden) with the prompt joined: (batch, P + L, hidden)."""
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise PeftkitError(f"prompt tuning (placement='embedding_output'): the module at the point {point!r} "
                               f"returned {type(output).__name__}, not (batch, length, hidden) hidden states; "
                               f"declare the point on the module whose output the first layer reads")
        return self._joined(self.prompt(output.shape[0], output.dtype), output)

    def _joined(self, head: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """``head`` (batch, P, ...) put into ``tensor`` (batch, L, ...) where the prompt goes."""
        if self.after_bos:
            return torch.cat([tensor[:, :1], head, tensor[:, 1:]], dim=1)
        return torch.cat([head, tensor], dim=1)

    def _widen_for_embedding_output(self, kwargs: dict) -> None:
        """The attention mask and token-level labels, widened where the prompt joins; token ids, token
        types and positions stay as they are (the embedding block reads them for the L tokens). Only
        encoders get this placement (``method.check_encoder``): no KV cache to continue from."""
        count = self.num_virtual_tokens
        source = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
        length = source.shape[1] if isinstance(source, torch.Tensor) and source.dim() >= 2 else None
        mask = kwargs.get("attention_mask")
        if mask is not None:
            widened = extend_mask(mask, count)  # P ones in front; refuses what is not a 2-D padding mask
            kwargs["attention_mask"] = self._joined(widened[:, :count], mask) if self.after_bos else widened
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
            kwargs["labels"] = self._joined(labels.new_full((labels.shape[0], count, *labels.shape[2:]),
                                                            IGNORE_INDEX), labels)

    def extra_repr(self) -> str:
        rows, dim = self.prompt_embeddings.shape
        where = (", placement=embedding_output" + (", after the first token" if self.after_bos else "")
                 if self.after_embeddings else "")
        return f"virtual_tokens={self.num_virtual_tokens}, hidden={dim}, rows={rows}{where}"


# -- initial prompts -----------------------------------------------------------------------


def initial_prompt(model: nn.Module, init: str, rows: int, *, text: str | None = None,
                   tokenizer_name_or_path: str | None = None,
                   tokenizer_kwargs: dict[str, Any] | None = None) -> torch.Tensor | None:
    """The starting prompt (rows, hidden), or None for a random one."""
    if init == "random":
        return None
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings
    if init == "sample_vocab":
        ids = torch.randint(0, vocab, (rows,))
    else:
        ids = _text_token_ids(text or "", rows, tokenizer_name_or_path or "", tokenizer_kwargs or {})
        if int(ids.max()) >= vocab:
            raise ConfigError(f"prompt_tuning: the tokenizer {tokenizer_name_or_path!r} gives token id "
                              f"{int(ids.max())}, but the model's vocabulary has {vocab} entries; use the base "
                              f"model's own tokenizer")
    with torch.no_grad():
        return embeddings(ids.to(embeddings.weight.device)).detach().float().cpu()


def _text_token_ids(text: str, rows: int, tokenizer_name_or_path: str, kwargs: dict[str, Any]) -> torch.Tensor:
    from transformers import AutoTokenizer

    from peftkit.plugin_api import model_source_options

    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}  # never run a checkpoint's code
    kwargs = {**model_source_options(tokenizer_name_or_path, "the tokenizer"), **kwargs}  # fails fast offline
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"prompt_tuning: cannot load the tokenizer {tokenizer_name_or_path!r} for init='text' "
                          f"({exc}); give a local tokenizer folder or a reachable hub id") from None
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning: init_text {text!r} gives no tokens")
    # Cut, or repeat the whole token sequence, to exactly `rows` tokens (PEFT's rule).
    ids = (ids * -(-rows // len(ids)))[:rows]
    return torch.tensor(ids, dtype=torch.long)
