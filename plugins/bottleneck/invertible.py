"""Invertible adapters (MAD-X, Pfeiffer et al., arXiv 2005.00052): a NICE coupling block on the
embedding output, and its exact inverse on the input of the LM head's output layer.

With the hidden state split into halves ``x = [x1, x2]`` (x1 the first ``hidden // 2`` features)::

    forward:  y1 = x1 + F(x2);  y2 = x2 + G(y1)
    inverse:  x2 = y2 - G(y1);  x1 = y1 - F(x2)

F and G are two-layer networks (Linear, activation, Linear) whose bottleneck is the size of their
input divided by ``inv_adapter_reduction_factor``. One block serves both places, so its tensors are
adapter-wide state (``Method.create_shared_state``), named ``inv_F_0_weight`` and so on (AdapterHub's
``invertible_adapters.<name>.F.0.weight``). With ``init_weights`` the networks' output layers start
at zero: the block starts as the identity.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import LayerAdapter

#: The Linear layers of a coupling network, by AdapterHub's index in its Sequential (1 is the activation).
LINEAR_INDICES = (0, 2)
#: Site roles: the embedding output (forward block), the LM head's output layer (inverse on its input).
EMBEDDING_ROLE, OUTPUT_ROLE = "inv_embedding", "inv_output"
#: Std of the coupling networks' weights (AdapterHub draws them as BERT's).
INIT_STD = 0.02


def nice_shapes(hidden: int, reduction_factor: float) -> dict[str, tuple[int, ...]]:
    """Shared-tensor name -> shape of a NICE block on ``hidden`` features."""
    first, second = hidden // 2, hidden - hidden // 2
    shapes: dict[str, tuple[int, ...]] = {}
    for net, (size_in, size_out) in (("F", (second, first)), ("G", (first, second))):
        inner = int(size_in // reduction_factor)
        shapes[f"inv_{net}_0_weight"], shapes[f"inv_{net}_0_bias"] = (inner, size_in), (inner,)
        shapes[f"inv_{net}_2_weight"], shapes[f"inv_{net}_2_bias"] = (size_out, inner), (size_out,)
    return shapes


def nice_tensors(hidden: int, reduction_factor: float, identity: bool,
                 factory: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A NICE block's trainable tensors, drawn (output layers zero with ``identity``)."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in nice_shapes(hidden, reduction_factor).items():
        tensor = torch.zeros(shape, **factory)
        if name.endswith("_weight") and not (identity and "_2_" in name):
            tensor.normal_(0.0, INIT_STD)
        out[name] = nn.Parameter(tensor)
    return out


def adapterhub_name(name: str) -> str:
    """``inv_F_0_weight`` -> ``F.0.weight`` (the key below ``invertible_adapters.<adapter>.``)."""
    _, net, index, leaf = name.split("_")
    return f"{net}.{index}.{leaf}"


class InvertibleAdapter(LayerAdapter):
    """The NICE block at one of its two sites: the forward block on the embedding output
    (``inverse=False``), or the inverse on the input of the LM head's output layer.

    Alone at the output layer, the inverse is the layer's input (``base_input``). Composed with
    other adapters there, it adds ``base(inverse(x)) - base(x)`` to their output, so an adapter at
    its identity init changes nothing."""

    def __init__(self, inverse: bool, hidden: int, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.inverse, self.hidden, self._act = inverse, hidden, activation
        self.additive = inverse
        #: The width of the embedding output (a fusion at the embedding site reads it: a dropout has none).
        self.out_features = hidden

    def _net(self, name: str, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared
        w0, b0 = getattr(shared, f"inv_{name}_0_weight"), getattr(shared, f"inv_{name}_0_bias")
        w2, b2 = getattr(shared, f"inv_{name}_2_weight"), getattr(shared, f"inv_{name}_2_bias")
        return F.linear(self._act(F.linear(x, w0.to(x.dtype), b0.to(x.dtype))), w2.to(x.dtype), b2.to(x.dtype))

    def couple(self, x: torch.Tensor) -> torch.Tensor:
        split = self.hidden // 2
        x1, x2 = x[..., :split], x[..., split:]
        y1 = x1 + self._net("F", x2)
        return torch.cat((y1, x2 + self._net("G", y1)), dim=-1)

    def uncouple(self, y: torch.Tensor) -> torch.Tensor:
        split = self.hidden // 2
        y1, y2 = y[..., :split], y[..., split:]
        x2 = y2 - self._net("G", y1)
        return torch.cat((y1 - self._net("F", x2), x2), dim=-1)

    def base_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.uncouple(x) if self.inverse else None

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.inverse:
            return base(self.uncouple(x)) - base(x)
        return self.couple(h) - h

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.inverse:
            return h + self.delta(x, h, base)
        return self.couple(h)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}  # the block is adapter-wide state, saved once

    def extra_repr(self) -> str:
        return f"{'inverse ' if self.inverse else ''}NICE, hidden={self.hidden}"
