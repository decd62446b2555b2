"""Which token positions ReFT intervenes on in the current forward: read from the model's inputs.

``adapters`` reads each row's first real token and its number of real tokens from the
attention mask the model is called with (left or right padding alike), and intervenes on the
first ``prefix_positions`` and the last ``suffix_positions`` of them. peftkit intervenes on the
first and last positions where the mask is 1: the same positions for any padding, and the
right ones for a mask with a gap (a soft prompt put before left padding), where counting from
the first real token would not be:
a :class:`ForwardBatch` per base model reads the mask in a forward pre-hook on the model (kept
until the next forward, so that activation checkpointing recomputes a layer with the same
positions) and every ReFT intervention on that model asks it for its position indices.

Rules (docs/methods/reft.md):

- No attention mask: every token is real.
- A position past a row's real tokens is skipped (``adapters`` 1.3.0 intervenes there on
  padding, or fails with an index error); where prefix and suffix positions overlap, the
  suffix intervention's result is kept (as in ``adapters``). Both read the layer's output.
- A forward that continues a KV cache (``generate()`` after the prompt) intervenes nowhere:
  the prompt's positions were intervened on when the prompt ran, and the cache holds them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn

from peftkit.plugin_api import CACHE_ARGUMENTS, PeftkitError, bind_arguments, starts_sequence

#: Key of a base model's ForwardBatch in the model's ``__dict__`` (not a submodule: nothing is saved or moved).
BATCH_KEY = "peftkit_reft_batch"


class ForwardBatch:
    """The rows of the base model's current forward, as its ReFT interventions need them."""

    def __init__(self, model: nn.Module) -> None:
        self.real: torch.Tensor | None = None     # (rows, length) bool: the mask's real tokens
        self.shape: tuple[int, int] | None = None  # (rows, length) of the forward's tokens, when known
        self.continuing = False                    # the forward continues a KV cache
        self.problem: str | None = None            # why this forward's mask cannot be read
        self.interventions: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self.indices: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.model = model  # a cycle through the model's __dict__: copy.deepcopy(model) copies both together
        self.handle = model.register_forward_pre_hook(self.read_inputs, with_kwargs=True)

    # -- the hook --------------------------------------------------------------------------

    def read_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        values = bind_arguments(model, args, kwargs)
        self.indices = {}
        self.continuing = continues_cache(values)
        tokens = next((values[k] for k in ("input_ids", "inputs_embeds") if isinstance(values.get(k), torch.Tensor)),
                      None)
        self.shape = (int(tokens.shape[0]), int(tokens.shape[1])) if tokens is not None and tokens.dim() >= 2 \
            else None
        mask = values.get("attention_mask")
        self.real = None
        self.problem = None  # raised when an intervention runs: the hook runs whichever adapters are active
        if mask is None or self.continuing:
            return
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            self.problem = (f"ReFT reads each row's real tokens from a 2-D (batch, length) attention_mask; "
                            f"got {shape}. Pass the tokenizer's padding mask")
            return
        if self.shape is not None and tuple(mask.shape) != self.shape:
            self.problem = (f"attention_mask has shape {tuple(mask.shape)} but the tokens {self.shape}; ReFT "
                            f"needs one mask entry per token")
            return
        self.real = mask == 1
        self.shape = (int(mask.shape[0]), int(mask.shape[1]))

    # -- what interventions ask ------------------------------------------------------------------

    def positions(self, hidden: torch.Tensor, prefix: int, suffix: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(prefix index (rows, p), suffix index (rows, s))`` into ``hidden`` (rows, length, width),
        where a skipped position holds ``length`` (a slot past the end); None: intervene nowhere."""
        if self.problem is not None:
            raise PeftkitError(self.problem)
        if self.continuing:
            return None
        rows, length = int(hidden.shape[0]), int(hidden.shape[1])
        if self.shape is not None and self.shape != (rows, length):
            raise PeftkitError(f"a ReFT intervention got hidden states for {rows} rows of {length} tokens, but the "
                               f"model's forward had {self.shape[0]} rows of {self.shape[1]}; ReFT cannot run "
                               f"inside a row split (parallel, batch_split, adapter_names) or on a layer called "
                               f"outside the model's forward, and a soft prompt or prefix stacked with it must "
                               f"be added to the model before the first ReFT adapter (its tokens then count)")
        key = (prefix, suffix, rows, length, hidden.device)
        found = self.indices.get(key)
        if found is None:
            found = position_index(self.real, rows, length, prefix, suffix, hidden.device)
            self.indices[key] = found
        return found

    def attach(self, intervention: nn.Module) -> None:
        self.interventions.add(intervention)

    def detach(self, intervention: nn.Module) -> None:
        """Forget ``intervention``; with none left, remove the hook and this object from the model."""
        self.interventions.discard(intervention)
        if not len(self.interventions):
            self.handle.remove()
            if self.model.__dict__.get(BATCH_KEY) is self:
                del self.model.__dict__[BATCH_KEY]


def forward_batch(model: nn.Module) -> ForwardBatch:
    """The model's ForwardBatch, made (and its hook registered) on first use."""
    found = model.__dict__.get(BATCH_KEY)
    if found is None:
        found = ForwardBatch(model)
        model.__dict__[BATCH_KEY] = found
    return found


def continues_cache(values: dict[str, Any]) -> bool:
    """Whether a forward's arguments continue a sequence already in a KV cache."""
    cache = next((values[name] for name in CACHE_ARGUMENTS if values.get(name) is not None), None)
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return not starts_sequence(cache)
        return len(cache) > 0 and cache[0] is not None  # legacy tuples of (key, value) per layer
    position = values.get("cache_position")
    return isinstance(position, torch.Tensor) and position.numel() > 0 and int(position.reshape(-1)[0]) > 0


def position_index(real: torch.Tensor | None, rows: int, length: int, prefix: int, suffix: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (rows, p) and (rows, s), in increasing order, of the first ``prefix`` and the last
    ``suffix`` real tokens of each row (``real``: a bool mask, None: every token); ``length`` where a
    row has fewer real tokens."""
    real = torch.ones(rows, length, dtype=torch.bool, device=device) if real is None else real.to(device)
    positions = torch.arange(length, device=device).expand(rows, length)
    count = real.sum(dim=1, keepdim=True)
    p, s = min(prefix, length), min(suffix, length)
    # real positions first, in order; then the others
    ahead = torch.where(real, positions, positions + length).argsort(dim=1, stable=True)[:, :p]
    first = torch.where(torch.arange(p, device=device) < count, ahead, length)
    # real positions from the last one back; then the others
    behind = torch.where(real, positions, -1).argsort(dim=1, descending=True, stable=True)[:, :s]
    last = torch.where(torch.arange(s, device=device) < count, behind, length).flip(1)
    return first, last
