"""The prefix-tuning module: learned key/value prefixes injected through transformers' KV cache.

The prefix is one tensor of shape ``(P, num_layers * 2 * token_dim)`` — PEFT's
``prompt_embeddings`` — where each row holds, per layer, the key then the value
of one virtual token (``token_dim = kv_heads * head_dim``). While training with
``prefix_projection`` it is the output of a small MLP; :meth:`eject` replaces
the MLP by that output.

Before every forward of the base model (``generate()`` steps included) the
prefix is written into an empty KV cache, so every attention layer attends to
P extra positions; the attention mask gets P ones on the left and explicit
position ids move by P. Stacked prefix adapters append their prefixes in
stack order. A cache that already holds real positions (later generation
steps, or a cache the caller carries over) already holds the prefix and is left
as it is. As in PEFT, the prefix takes positions 0..P-1 and the real tokens
start at position P; with ``token_positions="from_zero"`` (AdapterHub's
``adapters``, which joins the prefix to the keys and values inside attention)
the real tokens keep positions 0..n-1 instead: explicit position ids that
leave the cached prefix out are passed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit.plugin_api import (batch_size, bind_arguments, cache_argument, check_growing_cache, extend_mask,
                                ModelAdapter, note_prefix, PeftkitError, pop_cache, real_length, starts_sequence)

TENSOR_KEY = "prompt_embeddings"


@dataclass(frozen=True)
class PrefixGeometry:
    """Shape of a prefix: P virtual tokens, per layer a key and a value of kv_heads x head_dim."""

    num_virtual_tokens: int
    num_layers: int
    num_heads: int
    head_dim: int
    num_transformer_submodules: int = 1

    @property
    def token_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the flat prefix tensor."""
        return self.num_layers * 2 * self.token_dim


class PrefixTuning(ModelAdapter):
    """One prefix-tuning adapter.

    Parameters: ``prompt_embeddings`` (P, width) when flat; ``embedding``
    (P, token_dim) and ``transform`` (the MLP) while reparametrized.
    """

    def __init__(self, geometry: PrefixGeometry, *, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None, init_weights: str | None = None,
                 is_encoder_decoder: bool = False, cache_config: Any = None,
                 token_positions: str = "after_prefix") -> None:
        super().__init__()
        self.geometry = geometry
        self.token_positions = token_positions
        self.is_encoder_decoder = is_encoder_decoder
        object.__setattr__(self, "_cache_config", cache_config)  # a transformers config, not a module
        p, d = geometry.num_virtual_tokens, geometry.token_dim
        self.prompt_embeddings: nn.Parameter | None
        if prefix_projection:
            hidden = encoder_hidden_size or d
            self.embedding = nn.Embedding(p, d)
            self.transform = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, geometry.width))
            self.prompt_embeddings = None
            if init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = None
            self.transform = None
            # N(0, 1), like nn.Embedding and PEFT's flat prefix.
            self.prompt_embeddings = nn.Parameter(torch.zeros(p, geometry.width) if init_weights == "zero"
                                                  else torch.randn(p, geometry.width))

    # -- the prefix ----------------------------------------------------------------

    @property
    def reparametrized(self) -> bool:
        """Whether the prefix is still computed by the MLP (see :meth:`eject`)."""
        return self.prompt_embeddings is None

    def flat(self) -> torch.Tensor:
        """The prefix as one (P, num_layers * 2 * token_dim) tensor (PEFT's ``prompt_embeddings``)."""
        if self.prompt_embeddings is not None:
            return self.prompt_embeddings
        return self.transform(self.embedding.weight)

    @torch.no_grad()
    def eject(self) -> None:
        """Replace the reparametrization MLP by its output (a no-op when already flat).

        The flat prefix gives the same outputs, has fewer parameters, and is
        what saving writes anyway. It stays trainable if the MLP was.
        """
        if self.prompt_embeddings is not None:
            return
        trainable = any(p.requires_grad for p in self.parameters())
        flat = self.transform(self.embedding.weight).detach().clone()
        self.embedding = None
        self.transform = None
        self.prompt_embeddings = nn.Parameter(flat, requires_grad=trainable)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the (key, value) prefix, each (batch, kv_heads, P, head_dim)."""
        g = self.geometry
        flat = self.flat().to(dtype)
        # One unbind, not an index per entry: its backward stacks the gradients once, where each index's
        # backward writes its own zero tensor of the whole prefix (quadratic in the layer count).
        entries = flat.view(g.num_virtual_tokens, g.num_layers * 2, g.num_heads, g.head_dim) \
            .permute(1, 2, 0, 3).unbind(0)
        shape = (batch, g.num_heads, g.num_virtual_tokens, g.head_dim)
        out = []
        for layer in range(g.num_layers):
            block = self._block_of(layer)
            out.append((entries[2 * block].unsqueeze(0).expand(shape),
                        entries[2 * block + 1].unsqueeze(0).expand(shape)))
        return out

    def _block_of(self, layer: int) -> int:
        """Which of the flat tensor's per-layer blocks feeds decoder layer ``layer``.

        Decoder-only and encoder-only models: block i feeds layer i. For
        encoder-decoder models PEFT lays the tensor out as [blocks..., blocks...]
        and hands each decoder layer four consecutive entries (self-attention
        key/value, then cross-attention key/value, which it drops), so layer i
        reads block 2i mod num_layers; we follow it so files work both ways.
        """
        if self.geometry.num_transformer_submodules == 2:
            return (2 * layer) % self.geometry.num_layers
        return layer

    # -- the forward hook --------------------------------------------------------------

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = bind_arguments(model, args, kwargs)
        key = cache_argument(model)
        if key is None:
            raise PeftkitError(f"{type(model).__name__}.forward takes no KV cache, which prefix tuning needs")
        cache = pop_cache(kwargs)
        if kwargs.get("use_cache") is False:
            # A forward that keeps no cache starts afresh. (generate(use_cache=False) hands back the
            # cache the previous step returned, with the whole sequence again.)
            cache = None
        count = self.geometry.num_virtual_tokens
        check_growing_cache(cache, count)
        if self.is_encoder_decoder:
            batch = batch_size(kwargs, "decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids",
                               "inputs_embeds")
            if starts_sequence(cache):  # empty, or only prefixes of adapters stacked before this one
                cache = self._fill(cache, batch, model, encoder_decoder=True)
            kwargs["decoder_attention_mask"] = extend_mask(kwargs.get("decoder_attention_mask"), count,
                                                           "decoder_attention_mask")
        else:
            batch = batch_size(kwargs, "input_ids", "inputs_embeds")
            if starts_sequence(cache):  # empty, or only prefixes of adapters stacked before this one
                cache = self._fill(cache, batch, model, encoder_decoder=False)
            kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), count)
            if self.token_positions == "from_zero":
                if kwargs.get("position_ids") is None:
                    kwargs["position_ids"] = positions_from_zero(model, kwargs, real_length(cache))
            elif kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + count
        kwargs[key] = cache
        return (), kwargs

    def _fill(self, cache: Any, batch: int, model: nn.Module, *, encoder_decoder: bool) -> Any:
        """Write the prefix into ``cache`` (an empty Cache, or None: a new one is made)."""
        from transformers import DynamicCache, EncoderDecoderCache

        if cache is None:
            cache = DynamicCache(config=self._cache_config)
            if encoder_decoder:
                cache = EncoderDecoderCache(cache, DynamicCache(config=self._cache_config))
        target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        dtype = _model_dtype(model)
        for layer, (k, v) in enumerate(self.key_values(batch, dtype)):
            target.update(k, v, layer)
        note_prefix(cache, self.geometry.num_virtual_tokens)
        return cache

    # -- files --------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.prompt_embeddings is not None:
            return {TENSOR_KEY: self.prompt_embeddings}
        return {TENSOR_KEY: self.flat().detach()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load PEFT's flat ``prompt_embeddings``; a reparametrized adapter becomes flat (ejected)."""
        value = tensors[TENSOR_KEY]
        expected = (self.geometry.num_virtual_tokens, self.geometry.width)
        if tuple(value.shape) != expected:
            raise PeftkitError(f"prefix tensor {TENSOR_KEY!r} has shape {tuple(value.shape)}, expected {expected}")
        if self.prompt_embeddings is None:
            self.eject()
        with torch.no_grad():
            self.prompt_embeddings.copy_(value)

    def extra_repr(self) -> str:
        g = self.geometry
        mode = "reparametrized" if self.reparametrized else "flat"
        return (f"virtual_tokens={g.num_virtual_tokens}, layers={g.num_layers}, kv_heads={g.num_heads}, "
                f"head_dim={g.head_dim}, {mode}")


def positions_from_zero(model: nn.Module, kwargs: dict, start: int) -> torch.Tensor:
    """Position ids of the real tokens counted from ``start`` (the real tokens already cached), as the model
    numbers them without a prefix: RoBERTa-like embeddings (a ``padding_idx`` and transformers'
    ``create_position_ids_from_input_ids``) number the non-padding tokens after ``padding_idx``, the others
    ``start..start+n-1``."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if padding_idx is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        if ids is not None:
            return embeddings.create_position_ids_from_input_ids(ids, padding_idx, start)
        length = embeds.shape[1]
        first = padding_idx + 1 + start
        return torch.arange(first, first + length, device=embeds.device).expand(embeds.shape[0], -1)
    reference = ids if ids is not None else embeds
    batch, length = reference.shape[0], reference.shape[1]
    return torch.arange(start, start + length, device=reference.device).expand(batch, -1)


def _model_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
