"""A value built from a layer adapter's tensors, kept on the adapter between forwards that train none of them.

Methods whose forward first builds something from their trained tensors (VB-LoRA's factors from its bank,
FourierFT's and C3A's weight change, DeLoRA's folded A, OFT's and BOFT's rotations) can build it once for
inference instead of at every call: decoding calls each layer once per token, where the build can cost more
than the layer's products. Training builds it anew at every forward (it must record gradients) and keeps
nothing between steps.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

import torch
import torch.nn as nn

Built = TypeVar("Built")

#: Where an owner lists the names its kept values are under (for :func:`drop_kept_values`).
KEPT_NAMES = "_kept_value_names"


def kept_while_unchanged(owner: nn.Module, name: str, tensors: Sequence[torch.Tensor], build: Callable[[], Built],
                         extra: Hashable = ()) -> Built:
    """``build()``, kept on ``owner`` (in its ``__dict__`` under ``name``, as (key, value, storages)) between
    forwards that record no gradients for ``tensors``, until one of them changes (its values: version counter;
    its storage, device or dtype: ``.to()`` and ``.data =`` give new storage without moving the version) or
    ``extra`` does. The kept entry holds the storages it was built from, so none can be freed and its address
    reused by a new tensor. A forward recording gradients for any of ``tensors`` builds anew and drops the kept
    value (nothing stays between training steps); under torch.compile it always builds (reading addresses
    would break the graph)."""
    compiling = torch.compiler.is_compiling()
    if compiling or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        if not compiling:
            owner.__dict__.pop(name, None)
        return build()
    key = (tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors), extra)
    kept = owner.__dict__.get(name)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, build(), [t.untyped_storage() for t in tensors])
        owner.__dict__[name] = kept
        owner.__dict__.setdefault(KEPT_NAMES, set()).add(name)
    return kept[1]


def drop_kept_values(owner: nn.Module) -> None:
    """Free every value :func:`kept_while_unchanged` keeps on ``owner`` (the next inference forward builds it
    again). The model calls it for an adapter's layer modules when the adapter stops being active, so the dense
    weights some methods keep (C3A's, FourierFT's, GLoRA's, HiRA's) stay only for the active adapters."""
    for name in owner.__dict__.pop(KEPT_NAMES, ()):
        owner.__dict__.pop(name, None)
