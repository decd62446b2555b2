"""The adaption-prompt module: learned prompt vectors that one attention layer's queries attend to, gated.

At its attention module (a Llama or Mistral ``self_attn``, a GPT-2 ``attn``) the adapter runs the module as
called, then adds, to the attention's output,

    gate * softmax(q k_p^T / sqrt(head_dim)) v_p            (per head; through o_proj where the model has one)

where k_p and v_p are the adapter's ``adapter_len`` prompt vectors through the layer's own key and value
projections (each key/value head serving its group of query heads), and q the layer's queries recomputed from
its input: Llama's and Mistral's with the rotary position embeddings of the call, GPT-2's from ``c_attn``. The
softmax runs in float32 and is cast back to the queries' dtype; the gate starts at zero. This is PEFT's
computation (``AdaptedAttention`` / ``AdaptedAttentionGPT``) step for step, so outputs, gradients and files agree.
The prompt attention holds no state between calls: under ``generate()`` with a KV cache each step's new queries
attend to the same prompt keys and values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import ConfigError, LayerAdapter, linear_features, PeftkitError

#: Weight dtypes of quantized projections: the prompt is then kept in float32 (as PEFT keeps it).
_QUANTIZED_STORAGE = (torch.int8, torch.uint8)


class AdaptionPrompt(LayerAdapter):
    """One layer's adaption prompt (``adaption_prompt``, 1 x adapter_len x hidden) and gate (``adaption_gate``)."""

    reads_call_arguments = True

    def __init__(self, base: nn.Module, model_config: Any, *, adapter_len: int, fused: bool, site: str) -> None:
        super().__init__()
        self.adapter_len = adapter_len
        self.fused = fused
        self.num_heads = int(model_config.num_attention_heads)
        self.head_dim = int(base.head_dim)
        self.kv_heads = self.num_heads if fused else _key_value_heads(base, self.num_heads, self.head_dim, site)
        # PEFT draws the prompt N(0, 1) where the attention's weights are, in their dtype: the same draws.
        weight = (base.c_proj if fused else base.q_proj).weight
        dtype = torch.float32 if weight.dtype in _QUANTIZED_STORAGE else weight.dtype
        hidden = int(model_config.hidden_size)
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden, device=weight.device,
                                                        dtype=dtype).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))  # zero-init

    def call_base(self, base: nn.Module, x: Any, args: tuple, kwargs: dict) -> Any:
        output = base(x, *args, **kwargs)
        first = output[0] if isinstance(output, tuple) else output
        adapted = self.adapted_output(base, x, first, kwargs)
        return (adapted, *output[1:]) if isinstance(output, tuple) else adapted

    def adapted_output(self, base: nn.Module, x: torch.Tensor, output: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The attention's ``output`` plus the gated prompt attention of its input ``x``."""
        keys, values = self._prompt_keys_values(base, output.shape[2])
        queries = self._queries(base, x, kwargs)
        dtype = queries.dtype
        scores = torch.matmul(queries, keys.transpose(2, 3).to(dtype)) / math.sqrt(self.head_dim)
        weights = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        batch, length = output.shape[0], output.shape[1]
        prompt_output = torch.matmul(weights, values).transpose(1, 2).reshape(batch, length, -1)
        if not self.fused:
            prompt_output = base.o_proj(prompt_output)
        return (output + prompt_output).to(dtype)

    def _prompt_keys_values(self, base: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values, each (1, num_heads, adapter_len, head_dim): every key/value head
        repeated for its group of query heads. One copy, broadcast over the batch."""
        # Without gradients the projections get a detached prompt: a module called with a parameter (a leaf that
        # requires grad) in inference mode breaks torch's ModuleTracker (FlopCounterMode raised AttributeError).
        prompt = self.adaption_prompt if torch.is_grad_enabled() else self.adaption_prompt.detach()
        if self.fused:
            _, key, value = base.c_attn(prompt).split(width, dim=2)
        else:
            key, value = base.k_proj(prompt), base.v_proj(prompt)
        groups = self.num_heads // self.kv_heads
        shape = (1, self.adapter_len, self.kv_heads, self.head_dim)
        key = key.view(shape).transpose(1, 2)
        value = value.view(shape).transpose(1, 2)
        if groups > 1:
            key = torch.repeat_interleave(key, groups, dim=1)
            value = torch.repeat_interleave(value, groups, dim=1)
        return key, value

    def _queries(self, base: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The attention's queries (batch, num_heads, length, head_dim), as the model type computes them."""
        if self.fused:
            if kwargs.get("encoder_hidden_states") is not None:
                raise PeftkitError("adaption_prompt adapts self-attention: a GPT-2 attention called with "
                                   "encoder_hidden_states (cross-attention) cannot be adapted")
            query = base.c_attn(x).split(base.split_size, dim=2)[0]
            return query.view(*query.shape[:-1], -1, self.head_dim).transpose(1, 2)
        batch, length = x.shape[0], x.shape[1]
        query = base.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:
            raise PeftkitError(f"adaption_prompt: {type(base).__name__} was called without position_embeddings "
                               f"(cos, sin), which the prompt attention's queries are rotated by; call the whole "
                               f"model, with a transformers version that passes them (4.48 or later)")
        cos, sin = (part.unsqueeze(1) for part in embeddings)
        return query * cos + _rotate_half(query) * sin

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise ConfigError("adaption_prompt: an adaption prompt reads its attention module's call (the position "
                          "embeddings), so it runs alone at its attention (one active adapter); it takes part in "
                          "no composition there")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"adaption_prompt": self.adaption_prompt, "adaption_gate": self.adaption_gate}

    def extra_repr(self) -> str:
        return f"adapter_len={self.adapter_len}, heads={self.num_heads}, kv_heads={self.kv_heads}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) for the halves x1, x2 of the last dimension: the rotary embedding's rotation."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _key_value_heads(base: nn.Module, num_heads: int, head_dim: int, site: str) -> int:
    """The key/value heads of a Llama-like attention, read as PEFT reads them (its query heads divided by
    k_proj's in/out width ratio); a ConfigError when that reading does not fit the projection's width (a
    head_dim other than hidden_size / num_attention_heads: PEFT fails on such a model)."""
    in_features, out_features = linear_features(base.k_proj)
    factor = in_features // out_features if out_features else 0
    kv_heads = num_heads // factor if factor else 0
    if not kv_heads or kv_heads * head_dim != out_features or num_heads % kv_heads:
        raise ConfigError(f"adaption_prompt: cannot adapt {site}: PEFT reads its key/value heads as "
                          f"num_attention_heads / (k_proj in / out) = {num_heads} / ({in_features} / {out_features}), "
                          f"which does not give k_proj's {out_features} outputs of head_dim {head_dim}; adaption "
                          f"prompts need head_dim = hidden_size / num_attention_heads (as PEFT's)")
    return kv_heads
