"""Adapter-wide state: tensors a method creates once per adapter and all its layer adapters share.

VeRA's frozen random projections are one example: every layer adapter of one
VeRA adapter reads slices of the same two matrices. The core keeps them in a
:class:`SharedState` module registered once per adapter on the AdaptedModel,
so ``model.to(...)`` moves them once and every layer adapter still reads the
same storage afterwards (a layer adapter reaches them through
``LayerAdapter.shared`` at each use, never by keeping the tensors).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import PluginError


class SharedState(nn.Module):
    """One adapter's shared tensors as attributes: an ``nn.Parameter`` is registered as a parameter
    (trained with the adapter), any other tensor as a buffer (frozen)."""

    def __init__(self, method_name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name.isidentifier() or hasattr(self, name):
                raise PluginError(f"method {method_name!r}: create_shared_state() returned the name {name!r}, "
                                  f"which is not a free attribute name; use a plain identifier such as 'vera_A'")
            if not isinstance(tensor, torch.Tensor):
                raise PluginError(f"method {method_name!r}: create_shared_state() returned "
                                  f"{type(tensor).__name__} for {name!r}; return torch tensors")
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors by the names create_shared_state() gave them."""
        return dict(self.state_dict(keep_vars=True))
