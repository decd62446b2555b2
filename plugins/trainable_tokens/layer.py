"""Trainable tokens' module: an embedding (or output layer) with some rows replaced.

The new rows live once per adapter and embedding, in the adapter's shared state (``rows_<slot>``,
with the original rows as ``original_<slot>``), so that the output layer tied to an input embedding
(``tie_word_embeddings``) reads and trains the very same tensor, as PEFT's tied adapter does.

- At an ``nn.Embedding``: positions whose token id is one of ``token_indices`` take the new row
  (through ``F.embedding`` with the embedding's padding_idx, max_norm, norm_type and
  scale_grad_by_freq, times its ``embed_scale`` when it has one, as PEFT's ``F.embedding`` on the
  patched weight); every other position keeps the output computed before it (the base's, or the
  previous adapter's inside a stack). The same numbers as PEFT's, without copying the whole weight
  at each forward.
- At an ``nn.Linear`` (a tied or targeted output layer): the output columns of those token ids are
  ``x @ row`` (plus the layer's bias there).

Merging writes the new rows into the weight (``index_copy``) and unmerging writes the original rows
back, as PEFT does; the rows are replaced, never added to.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import AdapterLoadError, LayerAdapter, MergeError, PeftkitError

#: The tensor attribute naming the token rows an adapter already wrote into an output (inside a stack).
_WRITTEN = "_peftkit_token_rows"
#: The base-module attribute recording the rows each merged adapter wrote into its weight.
_MERGED = "_peftkit_merged_token_rows"
#: PEFT's name of the new rows in its files.
FILE_KEY = "trainable_tokens_delta"


def rows_name(slot: int) -> str:
    """The shared-state name of the new rows of embedding ``slot``."""
    return f"rows_{slot}"


def original_name(slot: int) -> str:
    """The shared-state name of the original rows of embedding ``slot``."""
    return f"original_{slot}"


def overlap_message(indices: list[int], what: str) -> str:
    return (f"trainable_tokens: token ids {indices} are trained by two adapters {what}; each row can hold one "
            f"adapter's value: give the adapters disjoint token_indices, or activate one of them")


class TokenRows(LayerAdapter):
    """One adapter's replaced rows at one embedding or output layer. File key ``trainable_tokens_delta``:
    (len(token_indices), dim). ``tied``: the rows belong to the input embedding this layer's weight is
    tied to; this module only reads them."""

    additive = False
    #: Merging writes absolute rows: merging into a weight tied to another module that carries the same
    #: adapter (its tied partner) writes the same values twice.
    merges_tied_weight = True

    def __init__(self, base: nn.Module, slot: int, indices: tuple[int, ...], tied: bool) -> None:
        super().__init__()
        self.slot, self.tied = slot, tied
        self.embedding = isinstance(base, nn.Embedding)
        weight = base.weight
        self.register_buffer("index", torch.tensor(indices, dtype=torch.long, device=weight.device),
                             persistent=False)
        slots = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slots[self.index] = torch.arange(len(indices), device=weight.device)
        self.register_buffer("slot_of_token", slots, persistent=False)
        self.token_indices = tuple(indices)  # in the order of the rows
        self.indices = frozenset(indices)

    # -- the shared rows --------------------------------------------------------------

    def rows(self) -> torch.Tensor:
        """The new rows (a parameter of the adapter's shared state)."""
        return getattr(self.shared, rows_name(self.slot))

    def original(self) -> torch.Tensor:
        return getattr(self.shared, original_name(self.slot))

    # -- forward ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        written = getattr(h, _WRITTEN, None)
        if written is not None and not written.isdisjoint(self.indices):
            raise PeftkitError(overlap_message(sorted(written & self.indices), "stacked at one layer"))
        out = self._embedded(x, h, base) if self.embedding else self._projected(x, h, base)
        setattr(out, _WRITTEN, self.indices if written is None else written | self.indices)
        return out

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.forward(x, h, base) - h

    def _embedded(self, x: torch.Tensor, h: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
        """Every position looks up a row, those of other token ids a zero row appended after the new ones,
        and keeps ``h`` (static shapes: a torch.compile'd model traces this as one graph, where selecting the
        positions would give a tensor of data-dependent length). The appended row's own count keeps
        scale_grad_by_freq's counts of the new rows exact, and its gradient is zero."""
        slots = self.slot_of_token[x]
        chosen = slots >= 0
        rows = self.rows().to(base.weight.dtype)
        # a new tensor, never the parameter: F.embedding renormalizes the rows it reads in place (max_norm)
        table = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        padding = self.token_indices.index(base.padding_idx) if base.padding_idx in self.indices else None
        values = F.embedding(slots.where(chosen, len(self.token_indices)), table, padding_idx=padding,
                             max_norm=base.max_norm, norm_type=base.norm_type,
                             scale_grad_by_freq=base.scale_grad_by_freq)
        scale = embed_scale(base)
        if scale is not None:
            values = values * scale.to(values.dtype)
        return values.to(h.dtype).where(chosen.unsqueeze(-1), h)

    def _projected(self, x: torch.Tensor, h: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        columns = F.linear(x.to(base.weight.dtype), self.rows().to(base.weight.dtype))
        if base.bias is not None:
            columns = columns + base.bias[self.index]
        return h.index_copy(-1, self.index, columns.to(h.dtype))

    # -- merging ---------------------------------------------------------------------

    def merge(self, base: nn.Module) -> None:
        merged: dict[int, frozenset[int]] = base.__dict__.setdefault(_MERGED, {})
        for other, rows in merged.items():
            if other != id(self) and not rows.isdisjoint(self.indices):
                raise MergeError(overlap_message(sorted(rows & self.indices), "merged into one weight"))
        weight = base.weight
        weight.data.index_copy_(0, self.index, self.rows().detach().to(weight.dtype))
        merged[id(self)] = self.indices

    def unmerge(self, base: nn.Module) -> None:
        base.__dict__.get(_MERGED, {}).pop(id(self), None)
        weight = base.weight
        weight.data.index_copy_(0, self.index, self.original().to(weight.dtype))

    # -- files -----------------------------------------------------------------------

    def hotswap_plan(self, new: "LayerAdapter") -> Callable[[], None]:
        """The rows live in the adapter's shared state, which the core's swap copies; a folder's adapter fits
        when it replaces the same token ids here."""
        if not isinstance(new, TokenRows) or (new.tied, new.token_indices) != (self.tied, self.token_indices):
            theirs = list(new.token_indices) if isinstance(new, TokenRows) else type(new).__name__
            raise AdapterLoadError(f"the folder's adapter trains token ids {theirs} here and the loaded one "
                                   f"{list(self.token_indices)}; load the folder as an adapter of its own instead: "
                                   f"load_adapter(path, 'another_name')")
        return lambda: None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {FILE_KEY: self.rows()}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """A tied layer saves a copy under its own key, as PEFT does (safetensors refuses two keys of one
        tensor)."""
        return {FILE_KEY: self.rows().detach().clone()} if self.tied else self.tensors()

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT wraps a tied output layer twice when a second adapter is added to the model and then saves the
        rows under ``base_layer.trainable_tokens_delta`` too: a copy, dropped here (a different tensor there
        is refused)."""
        nested = f"base_layer.{FILE_KEY}"
        if nested not in saved or FILE_KEY not in saved:
            return saved
        if not torch.equal(saved[nested], saved[FILE_KEY]):
            raise PeftkitError(f"{nested} and {FILE_KEY} hold different rows; the file is damaged: save the "
                               f"adapter again")
        return {key: tensor for key, tensor in saved.items() if key != nested}

    def extra_repr(self) -> str:
        return f"tokens={len(self.indices)}, slot={self.slot}" + (", tied" if self.tied else "")


def embed_scale(base: nn.Module) -> torch.Tensor | None:
    """The scalar an embedding multiplies its output by (Gemma's ``embed_scale``), as PEFT reads it: a
    number or a one-element tensor; None otherwise."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None
