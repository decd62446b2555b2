"""A union's modules: its parts' adapters at one site, and its input-rewriting part."""

from __future__ import annotations

import torch
import torch.nn as nn

from peftkit.plugin_api import LayerAdapter, ModelAdapter


def _prefixed(parts: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Every part's tensors, keyed ``<method>.<key>`` so that parts never collide in the file."""
    return {f"{method}.{key}": tensor for method, part in parts.items() for key, tensor in part.tensors().items()}


def _load_prefixed(parts: nn.ModuleDict, tensors: dict[str, torch.Tensor]) -> None:
    for method, part in parts.items():
        part.load_tensors({key[len(method) + 1:]: t for key, t in tensors.items() if key.startswith(method + ".")})


class UnionLayerAdapter(LayerAdapter):
    """The union's parts that act at one site, applied in the union's order: each part gets the output of
    the one before it (so for additive parts the union's change is the sum of their changes, each part
    seeing what the earlier ones made)."""

    def __init__(self, parts: dict[str, LayerAdapter]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.additive = all(part.additive for part in self.parts.values())

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        for part in self.parts.values():
            h = part(x, h, base)
        return h

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if len(self.parts) == 1:
            return next(iter(self.parts.values())).delta(x, h, base)
        return self.forward(x, h, base) - h

    def low_rank(self, forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The one part's (A, B, scale) when a single low-rank part acts here (LoRA), so that per-row routing
        keeps its batched path; None otherwise."""
        if len(self.parts) != 1:
            return None
        get = getattr(next(iter(self.parts.values())), "low_rank", None)
        return get(forward=forward) if get is not None else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return _prefixed(self.parts)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _load_prefixed(self.parts, tensors)


class UnionModelAdapter(ModelAdapter):
    """The union's one part that rewrites the model's inputs (prefix or prompt tuning), its keys prefixed."""

    def __init__(self, parts: dict[str, ModelAdapter]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for part in self.parts.values():
            args, kwargs = part.prepare(model, args, kwargs)
        return args, kwargs

    def prepare_generate(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for part in self.parts.values():
            args, kwargs = part.prepare_generate(model, args, kwargs)
        return args, kwargs

    def removed(self, model: nn.Module) -> None:
        for part in self.parts.values():
            part.removed(model)

    def tensors(self) -> dict[str, torch.Tensor]:
        return _prefixed(self.parts)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        _load_prefixed(self.parts, tensors)
