"""The activation state shared by every peftkit module of one adapted model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .composition import Node, Routing, run_node

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .layer import TunerLayer


class AdapterState:
    """Which composition runs now. One object per AdaptedModel, referenced (not
    owned) by its TunerLayers, so switching adapters touches no layer."""

    def __init__(self) -> None:
        self.active: Node | None = None
        self.active_names: tuple[str, ...] = ()
        self.disabled = False
        self.routing: Routing | None = None

    def run(self, layer: "TunerLayer", x: "torch.Tensor", h: "torch.Tensor") -> "torch.Tensor":
        if self.routing is not None:
            return self.routing.run(layer, x, h)
        return run_node(self.active, layer, x, h)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"AdapterState(active={self.active!s}, disabled={self.disabled})"


