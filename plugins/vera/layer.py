"""The VeRA module for one Linear or GPT-2 Conv1D layer.

The update is ``lambda_b * B[:out] (lambda_d * A[:, :in] x)``: A and B are the
adapter's shared projections (read through ``self.shared`` at each use, so
every layer uses the same storage, wherever ``model.to`` put it); only the two
vectors here train. File keys are PEFT's (``vera_lambda_b``, ``vera_lambda_d``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, is_conv1d, LayerAdapter


def projection_slices(adapter: LayerAdapter, names: tuple[str, str], a_rows: int, r: int, in_features: int,
                      out_features: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's top-left slices of its adapter's shared A (``a_rows``, in) and B (out, r), in ``like``'s
    dtype and device. ``names`` are the shared tensors' names (A's, B's)."""
    shared = adapter.shared
    if shared is None:
        raise RuntimeError(f"this {type(adapter).__name__} is not bound to its adapter's projections; create the "
                           f"adapter through AdaptedModel.add_adapter or load_adapter")
    a = getattr(shared, names[0])[:a_rows, :in_features].to(device=like.device, dtype=like.dtype)
    b = getattr(shared, names[1])[:out_features, :r].to(device=like.device, dtype=like.dtype)
    return a, b


def scaled_delta_weight(lambda_b: torch.Tensor, b: torch.Tensor, lambda_d: torch.Tensor, a: torch.Tensor,
                        base: nn.Module) -> torch.Tensor:
    """diag(lambda_b) B diag(lambda_d) A, in the layout ``base`` stores its weight (GPT-2's Conv1D: (in, out))."""
    delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
    return delta.t() if is_conv1d(base) else delta


class VeraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, *, dropout: float = 0.0,
                 d_initial: float = 0.1, init_weights: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        if init_weights:  # lambda_b = 0: the adapter starts as the identity
            self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **factory))
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), **factory))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(out_features, **factory))
            self.vera_lambda_d = nn.Parameter(torch.randn(r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        return projection_slices(self, ("vera_A", "vera_B"), self.r, self.r, self.in_features, self.out_features,
                                 self.vera_lambda_d)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b = self._projections()
        dtype = self.vera_lambda_d.dtype
        x = x if x.dtype == dtype else x.to(dtype)
        out = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), a), b)
        return out.to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in the layout the layer stores (GPT-2's Conv1D: (in, out))."""
        a, b = self._projections()
        return scaled_delta_weight(self.vera_lambda_b, b, self.vera_lambda_d, a, base)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"
