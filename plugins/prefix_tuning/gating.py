"""UniPELT's gated prefix (``prefix_tuning[use_gating=true]``), as AdapterHub's ``adapters`` computes it.

In every attention layer a gate reads the attention's input x (the hidden states its key and value
projections read): ``g = mean_t sigmoid(W x_t + b)``, one value per example (two with
``shared_gating=false``: one for the keys, one for the values), and the layer's prefix keys and
values are multiplied by it before attention. So the gate needs a point inside attention: the
prefix is still written into the KV cache before the forward (layer.py), and the adapter's forward
pre-hook on each attention module, which sees the input and the cache, replaces that layer's prefix
positions in the cache by the gated prefix just before the attention appends its own keys and values
(the hooks leave with the adapter: :meth:`GatedPrefixTuning.removed`). The
rewrite starts from the ungated prefix each time, so at every generation step the prefix is gated
by that step's input (with a KV cache, the new tokens alone: cached and uncached decoding differ,
as in ``adapters``). Gated prefixes are registered on the cache they were written into, so the
hook acts only on caches that hold one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from peftkit.plugin_api import cache_argument, ConfigError, real_length, SequenceGate

from .layer import PrefixTuning

#: The attribute of a cache holding its gated prefixes: id(adapter) -> GatedPrefixEntry.
GATES_ATTRIBUTE = "_peftkit_prefix_gates"
#: Child module names of the attention modules the hook goes on (BERT family, Llama-like, GPT-2).
ATTENTION_CHILDREN = (("key", "value"), ("k_proj", "v_proj"), ("c_attn",))


@dataclass
class GatedPrefixEntry:
    """One gated prefix in a cache: where its positions start, and its ungated (key, value) per layer for the
    current forward."""

    offset: int
    key_values: list[tuple[torch.Tensor, torch.Tensor]]


class GatedPrefixTuning(PrefixTuning):
    """Prefix tuning with a gate per attention layer (``prefix_gates.<layer>.weight`` / ``.bias``)."""

    def __init__(self, geometry: Any, *, hidden_size: int, shared_gating: bool = True, **options: Any) -> None:
        super().__init__(geometry, **options)
        outputs = 1 if shared_gating else 2
        self.prefix_gates = nn.ModuleList(SequenceGate(hidden_size, outputs) for _ in range(geometry.num_layers))
        self._gate_handles: list[RemovableHandle] = []  # the hooks attach() puts on the model

    def attach(self, model: nn.Module) -> None:
        """Put this adapter's gate hook on every attention module of ``model`` (taken off by :meth:`removed`)."""
        modules = attention_modules(model)
        if len(modules) != self.geometry.num_layers:
            raise ConfigError(f"prefix_tuning use_gating=true: found {len(modules)} attention modules with a "
                              f"layer_idx and key/value projections in {type(model).__name__}, but the prefix has "
                              f"{self.geometry.num_layers} layers; gated prefixes need one attention module per "
                              f"layer (use_gating=false works on any model)")
        # Private: the handles are not a setting (hot-swapping compares public attributes). A deep copy of
        # the model copies them with the hooks dicts they point into, so the copy removes its own hooks.
        self._gate_handles = [module.register_forward_pre_hook(PrefixGateHook(self), with_kwargs=True)
                             for module in modules]

    def removed(self, model: nn.Module) -> None:
        """Take this adapter's gate hooks off the attention modules (the adapter leaves the model)."""
        for handle in self._gate_handles:
            handle.remove()
        self._gate_handles = []

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = super().prepare(model, args, kwargs)
        target = self_attention_cache(kwargs[cache_argument(model)])
        batch = target.layers[0].keys.shape[0]
        entries = target.__dict__.setdefault(GATES_ATTRIBUTE, {})
        previous = entries.get(id(self))
        # Written just now: this prefix is the last one noted in the cache; later steps keep their offset.
        offset = previous.offset if previous is not None else \
            target.get_seq_length() - real_length(target) - self.geometry.num_virtual_tokens
        entries[id(self)] = GatedPrefixEntry(offset, self.key_values(batch, target.layers[0].keys.dtype))
        return args, kwargs

    def gate_layer(self, entry: GatedPrefixEntry, layer_cache: Any, layer: int, hidden: torch.Tensor) -> None:
        """Replace this prefix's positions of ``layer_cache`` (layer ``layer``) by the prefix gated on ``hidden``."""
        gate = self.prefix_gates[layer](hidden)
        key, value = entry.key_values[layer]
        gated_key = key * gate[:, 0].reshape(-1, 1, 1, 1).to(key.dtype)
        gated_value = value * gate[:, -1].reshape(-1, 1, 1, 1).to(value.dtype)
        start, end = entry.offset, entry.offset + self.geometry.num_virtual_tokens
        keys, values = layer_cache.keys, layer_cache.values
        layer_cache.keys = torch.cat([keys[:, :, :start], gated_key, keys[:, :, end:]], dim=2)
        layer_cache.values = torch.cat([values[:, :, :start], gated_value, values[:, :, end:]], dim=2)

    def tensors(self) -> dict[str, torch.Tensor]:
        gates = {f"prefix_gates.{i}.{name}": p for i, gate in enumerate(self.prefix_gates)
                 for name, p in (("weight", gate.weight), ("bias", gate.bias))}
        return {**super().tensors(), **gates}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        own = self.tensors()
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("prefix_gates."):
                    own[key].copy_(value)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gated ({self.prefix_gates[0].out_features} per layer)"


class PrefixGateHook:
    """One gated prefix's forward pre-hook on one attention module: gates that prefix when it is registered
    on the cache this forward passes (an object, not a closure, so that a deep copy of the model gives the
    copy's hook the copy's adapter). Each adapter has its own hooks, so that deleting it removes them."""

    def __init__(self, adapter: GatedPrefixTuning) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = next((v for v in (*args, *kwargs.values()) if hasattr(v, "layers") and hasattr(v, "update")), None)
        if cache is None:
            return None
        target = self_attention_cache(cache)
        entry = getattr(target, GATES_ATTRIBUTE, {}).get(id(self.adapter))
        if entry is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        layer = module.layer_idx
        self.adapter.gate_layer(entry, target.layers[layer], layer, hidden)
        return None


def self_attention_cache(cache: Any) -> Any:
    """The self-attention part of a cache (an encoder-decoder cache's), or the cache itself."""
    return getattr(cache, "self_attention_cache", cache)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model``: an integer ``layer_idx`` and key/value projections, by layer."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and any(all(hasattr(m, child) for child in children) for children in ATTENTION_CHILDREN)]
    return sorted(found, key=lambda m: m.layer_idx)
