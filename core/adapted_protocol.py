"""What the modules behind AdaptedModel's features use of the model they act on (a ``typing.Protocol``).

Fusion, merging, saving and loading, hot-swapping, composition folders and the composition methods live in
modules of their own (``fusion``, ``adapterhub_fusion``, ``merging``, ``serialization``, ``peft_embeddings``,
``hotswap``, ``composition_io``, ``composition_api``), which ``core/model.py`` imports. They are handed the
model and type it as :class:`AdaptedModelProtocol` rather than ``AdaptedModel``: no import, not even one
for type checking only, runs from them back up to ``core/model.py``, so the core's import graph has no
cycle at all. The protocol is also the list of what they may use: AdaptedModel's public members below and
nothing else (its underscore attributes never). ``AdaptedModel`` provides every member with the same
signature; ``tests/test_architecture.py`` holds the class and the modules' uses to this list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import os

    import torch
    import torch.nn as nn

    from . import composition
    from .architectures import ArchitectureSpec
    from .config import AdapterConfig
    from .layer import LayerAdapter, ModelAdapter, TunerLayer
    from .method import Method, Site
    from .shared_state import SharedState
    from .state import AdapterRecord, AdapterState, FusionRecord


class AdaptedModelProtocol(Protocol):
    """An adapted model as the feature modules see it (module docstring); ``AdaptedModel`` is the one class
    that provides it."""

    #: The wrapped transformers model (its TunerLayers in place of the adapted modules).
    base_model: "nn.Module"
    #: Which composition runs now, and the fusions on the model (shared with every TunerLayer).
    adapter_state: "AdapterState"

    # -- what is on the model -----------------------------------------------------------

    @property
    def adapters(self) -> dict[str, "AdapterConfig"]: ...

    @property
    def adapter_records(self) -> dict[str, "AdapterRecord"]: ...

    def adapter_record(self, name: str) -> "AdapterRecord": ...

    def adapter_labels(self, name: str) -> list[str] | None: ...

    @property
    def base_labels(self) -> list[str] | None: ...

    def adapter_parameters(self, name: str) -> Iterator["nn.Parameter"]: ...

    def parameters(self, recurse: bool = True) -> Iterator["nn.Parameter"]: ...

    def tuner_layers(self) -> Iterator[tuple[str, "TunerLayer"]]: ...

    def model_adapter(self, name: str) -> "ModelAdapter | None": ...

    def shared_state(self, name: str) -> "SharedState | None": ...

    @property
    def fusions(self) -> dict[str, "composition.Fuse"]: ...

    @property
    def architecture(self) -> "ArchitectureSpec | None": ...

    @property
    def device(self) -> "torch.device": ...

    # -- adding, loading and removing adapters and fusions --------------------------------

    def check_adapter_name(self, name: str) -> None: ...

    def add_adapter(self, name: str | None = None, spec: "str | AdapterConfig | None" = None, *,
                    config: "str | AdapterConfig | None" = None, default_head: bool = True,
                    adapter_name: str | None = None, peft_config: Any = None) -> "AdapterRecord": ...

    def load_adapter(self, path: str, adapter_name: str = "default", *, activate: bool = True,
                     trainable: bool = False, hotswap: bool = False, is_trainable: bool | None = None,
                     load_as: str | None = None, set_active: bool | None = None) -> "AdapterRecord": ...

    def delete_adapter(self, name: str) -> None: ...

    def merge_adapters(self, adapters: Sequence[str], weights: Sequence[float] | None = None,
                       name: str = "merged", strategy: str = "svd", **options: Any) -> "AdapterRecord": ...

    def load_fusion(self, path: "str | os.PathLike", name: str | None = None, *, activate: bool = False) -> "FusionRecord": ...

    def delete_fusion(self, name: str) -> None: ...

    # -- building an adapter's modules without placing them (hot-swapping) ----------------

    def resolve_modules_to_save(self, config: "AdapterConfig", default_head: bool = True) -> list[str]: ...

    def adapted_sites(self, method: "Method", config: "AdapterConfig", modules_to_save: list[str]) -> list["Site"]: ...

    def new_shared_state(self, method: "Method", config: "AdapterConfig",
                         sites: list["Site"]) -> "SharedState | None": ...

    def new_layer_adapter(self, method: "Method", config: "AdapterConfig", site: "Site",
                          shared: "SharedState | None" = None) -> "LayerAdapter | None": ...

    # -- what runs ------------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]: ...

    @property
    def active_composition(self) -> "composition.Node | None": ...

    def set_active(self, *adapters: "str | composition.Block | Sequence[str] | None") -> None: ...

    def check_composition(self, node: "composition.Node") -> None: ...

    def check_heads(self, node: "composition.Node") -> None: ...
