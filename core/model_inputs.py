"""Helpers for model-level adapters that rewrite a model's forward arguments.

Soft prompts and KV prefixes (and third-party methods like them) run from a
forward pre-hook on the base model, where arguments may come positionally and
the KV cache is called ``cache`` (transformers 5) or ``past_key_values``
(older releases). These helpers put arguments into one keyword form and
extend attention masks, so each method only states what it changes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from .errors import PeftkitError

#: Names under which transformers models take a KV cache, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")

_PARAMETERS: dict[type, tuple[str, ...]] = {}


def forward_parameters(model: nn.Module) -> tuple[str, ...]:
    """Names of ``model.forward``'s parameters, in order (cached per class)."""
    cls = type(model)
    if cls not in _PARAMETERS:
        params = inspect.signature(model.forward).parameters.values()
        _PARAMETERS[cls] = tuple(p.name for p in params
                                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return _PARAMETERS[cls]


def bind_arguments(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args`` + ``kwargs`` of a forward call as one keyword dict (a new dict)."""
    out = dict(kwargs)
    if args:
        names = forward_parameters(model)
        if len(args) > len(names):
            raise PeftkitError(f"{type(model).__name__}.forward got {len(args)} positional arguments, more "
                               f"than it declares; pass inputs by keyword (input_ids=..., attention_mask=...)")
        for name, value in zip(names, args):
            if name in out:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument {name!r}")
            out[name] = value
    return out


def cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model.forward`` takes a KV cache, or None if it takes none.

    A task model whose forward passes ``**kwargs`` on to its backbone
    (BertForSequenceClassification -> BertModel) takes what the backbone takes.
    """
    params = forward_parameters(model)
    found = next((name for name in CACHE_ARGUMENTS if name in params), None)
    if found is None and _passes_kwargs(model):
        inner = getattr(model, "base_model", None)
        if isinstance(inner, nn.Module) and inner is not model:
            return cache_argument(inner)
    return found


def _passes_kwargs(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the KV cache from ``kwargs``, under whichever name it was given."""
    found = [name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
    if len(found) > 1:
        raise PeftkitError("both 'cache' and 'past_key_values' were given; pass the KV cache once")
    for name in CACHE_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None:
            return value
    return None


def cached_length(cache: Any) -> int:
    """How many positions ``cache`` already holds (0 for None)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise PeftkitError(f"the KV cache is a {type(cache).__name__}; soft prompts and prefixes need a "
                           f"transformers Cache object (e.g. transformers.DynamicCache), not legacy tuples")
    return int(cache.get_seq_length())


def check_growing_cache(cache: Any, count: int) -> None:
    """Refuse a fixed-size (static) KV cache: it was sized for the real tokens only and has no
    room for ``count`` virtual ones."""
    if cache is not None and getattr(cache, "is_compileable", False):
        raise PeftkitError(f"a {type(cache).__name__} has a fixed length sized for the real tokens, with no room "
                           f"for the {count} virtual tokens of a soft prompt or prefix; use the default dynamic "
                           f"cache (leave out cache_implementation='static' and similar)")


def note_prefix(cache: Any, count: int) -> None:
    """Record that ``count`` positions were written into an empty ``cache`` before the forward
    (a KV prefix), so a soft prompt stacked with it still sees the start of a sequence."""
    cache._peftkit_prefix_length = getattr(cache, "_peftkit_prefix_length", 0) + count


def starts_sequence(cache: Any) -> bool:
    """Whether a forward with ``cache`` starts a new sequence (nothing but noted prefixes cached)."""
    return cached_length(cache) == getattr(cache, "_peftkit_prefix_length", 0)


def real_length(cache: Any) -> int:
    """How many real positions ``cache`` holds: its length less the prefixes noted in it (0 for None)."""
    return cached_length(cache) - getattr(cache, "_peftkit_prefix_length", 0) if cache is not None else 0


def extend_mask(mask: torch.Tensor | None, count: int, what: str = "attention_mask") -> torch.Tensor | None:
    """Prepend ``count`` attended positions (ones) to a 2-D ``(batch, length)`` mask."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise PeftkitError(f"{what} must be a 2-D (batch, length) tensor to be extended over the "
                           f"{count} virtual tokens, got {shape}; pass a 2-D padding mask (a static cache "
                           f"or a custom 4-D mask is not supported with soft prompts or prefixes)")
    ones = torch.ones(mask.shape[0], count, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def batch_size(kwargs: dict[str, Any], *names: str) -> int:
    """The batch size of the first tensor found under ``names``."""
    for name in names:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise PeftkitError(f"cannot tell the batch size: none of {', '.join(names)} was given as a tensor")


def text_config(model: nn.Module) -> Any:
    """The (decoder's) text config of a transformers model, or None for a plain module."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config
