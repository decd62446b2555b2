"""Model-level adapters that also rewrite the output of the module at an architecture point.

A :class:`~peftkit.core.layer.ModelAdapter` rewrites the model's forward arguments. Some adapters
must act inside the model instead: AdapterHub's soft prompt joins the hidden states the embedding
block returns (after its position embeddings and LayerNorm), which no forward argument can express.
Such an adapter subclasses :class:`PointOutputAdapter` and names the points (``ArchitectureSpec.points``)
whose module output it rewrites; the core hooks each point's module once per model, and while the
adapter is active (and adapters are not disabled) passes that module's output through
:meth:`PointOutputAdapter.point_output`. A point must match exactly one module of the model.

The point ``embedding_output`` (:data:`EMBEDDING_OUTPUT`), the output of the embedding block, is
built in for the BERT family (see :mod:`.architectures`); plugins declare it for other families.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .errors import ConfigError
from .layer import ModelAdapter
from .targets import find_point

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch.utils.hooks import RemovableHandle

    from .architectures import ArchitectureSpec
    from .state import AdapterState

#: The point whose module returns the embedding block's output (BERT: ``embeddings.dropout``, after
#: the position and token-type embeddings and the LayerNorm).
EMBEDDING_OUTPUT = "embedding_output"


class PointOutputAdapter(ModelAdapter):
    """A model-level adapter that also rewrites the output of modules at architecture points."""

    def output_points(self) -> tuple[str, ...]:
        """The points whose module output :meth:`point_output` rewrites; none by default."""
        return ()

    def point_output(self, point: str, output: "torch.Tensor") -> "torch.Tensor":
        """The new output of ``point``'s module (called only for the points named by :meth:`output_points`)."""
        return output


class _PointHook:
    """The forward hook on one point's module: runs the active adapters' ``point_output`` in order.
    An object, not a closure, so that ``copy.deepcopy`` of a model gives the copy's hook the copy's
    state and adapters."""

    def __init__(self, point: str, state: "AdapterState", adapters: nn.ModuleDict) -> None:
        self.point = point
        self.state = state
        self.adapters = adapters

    def __call__(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        if self.state.disabled:
            return None
        for name in self.state.active_names:
            adapter = self.adapters[name] if name in self.adapters else None
            if isinstance(adapter, PointOutputAdapter) and self.point in adapter.output_points():
                output = adapter.point_output(self.point, output)
        return output


class PointOutputHooks:
    """The point hooks of one model: at most one per point, kept until :meth:`remove`.

    A hook sits on whatever module is at the point's path *now*: when peftkit wraps that module (an
    invertible adapter's TunerLayer at the same point) or unwraps it, :meth:`follow` moves the hook to the
    outermost module, so the point's output is rewritten after every layer adapter there has run, whatever
    order the adapters were added in (AdapterHub's order: invertible adapter, then prompt)."""

    def __init__(self) -> None:
        #: point -> (module path, the hooked module, the hook, its handle)
        self._hooks: dict[str, tuple[str, nn.Module, _PointHook, "RemovableHandle"]] = {}

    def attach(self, model: nn.Module, arch: "ArchitectureSpec | None", adapter: ModelAdapter, method: str,
               state: "AdapterState", adapters: nn.ModuleDict) -> None:
        """Hook the modules of ``adapter``'s points (if it is a :class:`PointOutputAdapter`) not hooked yet.
        Raises ConfigError (TargetError) when a point is unknown for the model or matches other than one module."""
        if not isinstance(adapter, PointOutputAdapter):
            return
        for point in adapter.output_points():
            if point in self._hooks:
                continue
            found = find_point(model, arch, point, method)
            if len(found) != 1:
                raise ConfigError(f"method {method!r} rewrites the output of the point {point!r}, which must match "
                                  f"one module, but matches {len(found)} ({', '.join(found[:4])})")
            module, hook = model.get_submodule(found[0]), _PointHook(point, state, adapters)
            self._hooks[point] = (found[0], module, hook, module.register_forward_hook(hook))

    def follow(self, model: nn.Module) -> None:
        """Move each hook to the module now at its path (after layers were wrapped or unwrapped there)."""
        for point, (path, module, hook, handle) in list(self._hooks.items()):
            current = model.get_submodule(path)
            if current is not module:
                handle.remove()
                self._hooks[point] = (path, current, hook, current.register_forward_hook(hook))

    def remove(self) -> None:
        """Take every hook off the model (``unload``)."""
        for *_, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
