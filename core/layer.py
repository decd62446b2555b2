"""The modules peftkit puts into a model.

- :class:`TunerLayer` wraps one original module (a *site*). It holds every
  adapter's module for that site, keyed by adapter name, possibly of several
  methods, and runs the active composition on the site's output.
- :class:`LayerAdapter` is one adapter's module at one site; methods subclass it.
- :class:`ModelAdapter` is a model-level adapter (soft prompts, prefixes)
  that rewrites the model's inputs instead of a layer's output.
- :class:`ModulesToSave` keeps one trainable copy of a module (a task head)
  per adapter.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from .base_layers import quantized_part
from .composition import head_leaf
from .errors import CompositionError, ConfigError, MergeError
from .swap_plan import swap_plan


def name_taken_by_torch(name: str) -> bool:
    """Whether ``name`` cannot key an ``nn.ModuleDict`` because torch uses it (``to``, ``half``, ``train``...).

    Adapters and fusions are stored in ModuleDicts keyed by their names, and
    a ModuleDict refuses a key that shadows one of its own attributes.
    """
    return hasattr(nn.ModuleDict(), name)


class LayerAdapter(nn.Module):
    """One adapter at one site.

    ``forward(x, h, base)`` gets the site's input ``x`` (or the input of the
    site's ``input_from`` module), the current output ``h`` (the base output,
    or the previous adapter's output inside a Stack) and the wrapped base
    module, and returns the new output.
    """

    #: Set by methods whose output is h + delta(x): Average and Fuse then
    #: combine deltas directly, and routing can add deltas in place.
    additive: bool = True

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return h + self.delta(x, h, base)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    #: Whether merging may write into a weight other modules share (``tie_word_embeddings``) when each of them
    #: carries this adapter too: set by adapters whose merge writes absolute values that their tied partner
    #: computes with as well (trainable tokens' rows), so the shared weight ends the same whichever merges.
    merges_tied_weight: bool = False

    #: Whether merging reads the weight it merges into (DoRA's row norms): such an adapter must be the
    #: first merged into its layer, or its merged result would include the earlier adapters' changes.
    merge_reads_weight: bool = False

    @property
    def shared(self) -> "nn.Module | None":
        """The adapter-wide tensors of this adapter (``Method.create_shared_state``) as attributes
        (``self.shared.vera_A``), the same module for every site of the adapter; None for a method
        without them. Read them here at each use rather than keeping them: ``model.to(...)``
        replaces the tensors."""
        return self.__dict__.get("_peftkit_shared")

    def bind_shared(self, shared: nn.Module | None) -> None:
        """Called by the core right after ``create_layer_adapter``; not a submodule, so the
        tensors are saved, moved and counted once per adapter rather than once per site."""
        self.__dict__["_peftkit_shared"] = shared

    def base_changed(self) -> None:
        """Called after the base layer's weight changed in place (an adapter merged or unmerged at this
        layer): drop anything computed from it. Nothing to drop by default."""

    def removed(self, base: nn.Module) -> None:
        """Called when this (unmerged) adapter leaves its layer (``delete_adapter``, ``unload``): undo any
        change it made to ``base`` when it was created (LoRA's PiSSA/OLoRA init moves part of the weight
        into the adapter and puts it back here). Nothing to undo by default."""

    def base_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """For an adapter that, alone at its site, equals the base module run on a changed input
        (IA3 on a feed-forward layer: ``W (x * l) + b``): that input. The TunerLayer then runs the
        base module once on it instead of running it on ``x`` and adding a correction (one matrix
        product instead of two). None (the default) for every other adapter."""
        return None

    def fusion_query(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """What a fusion with ``FuseConfig(query_from="adapter_input")`` whose last member is this adapter
        computes its query from: the tensor this adapter's branch reads at this site. The default is ``h``
        (the query of every other fusion); a sequential bottleneck adapter reading through the model's
        LayerNorm (``original_ln_before``) returns that LayerNorm's output, as AdapterHub's fusion queries."""
        return h

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """For an adapter active alone at its site (unmerged, reading the site's own input): the site's
        whole output, the base module's work included, or None (the default) to let the TunerLayer
        run the base module and then ``forward(x, h, base)``. Lets a method fuse its work with the
        base product (LoRA adds its update into the base output in place and keeps one autograd node
        per layer). Asked only when ``base`` is called with ``x`` alone and has no forward hooks
        (which this path would skip); the result must equal the unfused one up to float rounding."""
        return None

    #: Set by adapters that change the base module's parameters instead of its output (LoRA on
    #: ``nn.Parameter``s such as stacked MoE experts): active alone at their site, the TunerLayer
    #: calls :meth:`call_base` instead of running the base module and ``forward``.
    changes_parameters: bool = False

    #: Set by adapters that need the arguments the base module is called with besides its input (an
    #: attention module's position embeddings): active alone at their site, the TunerLayer calls
    #: :meth:`call_base`, which runs the base module and returns the site's whole output.
    reads_call_arguments: bool = False

    def call_base(self, base: nn.Module, x: Any, args: tuple, kwargs: dict) -> Any:
        """For ``changes_parameters`` adapters: ``base(x, *args, **kwargs)`` computed with the adapted
        parameters (the base module may take any arguments, e.g. an experts block's routing). For
        ``reads_call_arguments`` adapters: the site's output, from the base module's output and the call."""
        raise NotImplementedError

    def low_rank(self, forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` (A: r x in, B: out x r, the live parameters) when this adapter's
        weight change is exactly ``scale * B @ A`` in (out, in) layout; None otherwise.

        With ``forward=True``, return them only if ``delta(x, h, base)`` is exactly
        ``scale * (x A^T) B^T`` for a float input right now (no active dropout, independent
        of ``h``): composition then batches such adapters (stack/average as one product,
        per-row routing with batched matmuls) and weight-space merging reads them.
        """
        return None

    # -- merging (methods with can_merge implement these) ----------------------

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change this adapter makes to ``base.weight`` (same shape)."""
        raise MergeError(f"{type(self).__name__} cannot be merged into base weights")

    def merge(self, base: nn.Module) -> None:
        """Fold this adapter into ``base``'s weights, in place."""
        weight = base.weight
        weight.data += self.delta_weight(base).to(weight.dtype)

    def unmerge(self, base: nn.Module) -> None:
        weight = base.weight
        weight.data -= self.delta_weight(base).to(weight.dtype)

    # -- files -----------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors of this adapter at this site, keyed by their file
        name relative to the site (PEFT's names for PEFT-format methods).
        Loading copies a file's tensors into these; AdapterHub's format,
        hot-swapping and merging read them."""
        return dict(self.state_dict(keep_vars=True))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """What peftkit's own format saves for this adapter at this site: ``tensors()`` by
        default. A module that holds more than determines its function (ReFT's orthogonal
        frame: a hidden x hidden matrix that only fixes r rows) saves less here and
        rebuilds its ``tensors()`` from it in :meth:`tensors_from_file`."""
        return self.tensors()

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`file_tensors`: ``saved`` (a file's tensors of this site, keys
        relative to it) keyed and shaped as ``tensors()``, for loading. Keys it does not know
        pass unchanged (the weights check then names them). Must not change the module; raise
        PeftkitError naming what is wrong with the file. The identity by default."""
        return saved

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.tensors()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)

    def hotswap_plan(self, new: "LayerAdapter") -> Callable[[], None]:
        """Check that ``new`` (this method's module for the same site, built from another saved adapter
        and holding its weights) can replace this module's weights in place, and return the function
        that copies them. Raise ``AdapterLoadError`` naming the first difference otherwise; change
        nothing before the returned function runs (every site is checked before any is copied).

        The default (:func:`peftkit.core.swap_plan.swap_plan`) copies ``tensors()`` when both modules
        have the same settings and shapes, and for low-rank adapters (``low_rank()``) also takes a
        lower rank (zero-padded) and another scale (folded into B). Override it for state that
        ``tensors()`` does not hold."""
        return swap_plan(self, new)


class ModelAdapter(nn.Module):
    """A model-level adapter: rewrites the model's forward arguments.

    ``prepare(args, kwargs)`` is called before every forward of the base model
    (generate() included) while the adapter is active, and returns new
    ``(args, kwargs)``.
    """

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def prepare_generate(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Rewrite the arguments of ``AdaptedModel.generate()`` once, before generation
        starts; for inputs that generate() consumes without a forward of the whole
        model (an encoder-decoder model runs its encoder directly)."""
        return args, kwargs

    def removed(self, model: nn.Module) -> None:
        """Called when this adapter leaves ``model`` (``delete_adapter``, ``merge_and_unload``), or when it was
        built only to hold a folder's weights (``hotswap_adapter``): undo what its creation changed in
        ``model`` (a gated prefix takes its hooks off the attention modules). Nothing to undo by default."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict(keep_vars=True))

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.tensors()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)

    def hotswap_plan(self, new: "ModelAdapter") -> Callable[[], None]:
        """As :meth:`LayerAdapter.hotswap_plan`, for the model-level adapter."""
        return swap_plan(self, new)


class _InputCapture:
    """A forward pre-hook writing its module's first positional input into a TunerLayer's
    ``captured`` dict. An object, not a closure, so that ``copy.deepcopy`` of a model
    gives the copy's hook the copy's dict."""

    def __init__(self, captured: dict[str, Any], source: str) -> None:
        self.captured = captured
        self.source = source

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        self.captured[self.source] = args[0] if args else None


def _defined_in(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


#: (LayerAdapter class, shortcut) -> :func:`shortcut_is_current`'s answer. A plain dict rather than
#: functools.cache: torch.compile warns about every cache-wrapped call it traces.
_CURRENT_SHORTCUTS: dict[tuple[type, str], bool] = {}


def shortcut_is_current(cls: type, shortcut: str) -> bool:
    """Whether ``cls``'s ``shortcut`` (``forward_alone`` or ``base_input``) was written together with
    its ``forward`` and ``delta``: a subclass that overrides either of those but not the shortcut
    would be short-cut past its own code, so the TunerLayer then takes the plain path."""
    key = (cls, shortcut)
    current = _CURRENT_SHORTCUTS.get(key)
    if current is None:
        owner = _defined_in(cls, shortcut)
        current = _CURRENT_SHORTCUTS[key] = all(issubclass(owner, _defined_in(cls, name))
                                                for name in ("forward", "delta"))
    return current


def merge_order_message(name: str, earlier: str) -> str:
    return (f"adapter {name!r} cannot be merged after {earlier!r} into the same layer: its merge reads the "
            f"weight it merges into (its change is computed from that weight: DoRA's row norms, the rotations of "
            f"OFT, BOFT, HRA and RoAd, HiRA's elementwise scaling), which would "
            f"then include {earlier!r}'s change; merge {name!r} first (merge_adapter([{name!r}, {earlier!r}]) gives "
            f"stack({name}, {earlier})) unless {earlier!r} reads the weight too (then only one of the two can be "
            f"merged), or keep it unmerged")


#: TunerLayer.forward's default input: the module was called with its input by keyword.
_KEYWORD_INPUT: Any = object()


@functools.lru_cache(maxsize=None)
def _input_name(kind: type) -> str | None:
    """The name of the first parameter of ``kind.forward`` after ``self`` (its input), None if it has none."""
    names = list(inspect.signature(kind.forward).parameters)[1:]
    return names[0] if names else None


def keyword_input(module: nn.Module, kwargs: dict) -> tuple[Any, dict]:
    """``module``'s input taken out of keyword arguments: the value of its forward's first parameter, and
    the other keyword arguments (a TypeError naming the parameter when the call has none)."""
    name = _input_name(type(module))
    if name is None or name not in kwargs:
        raise TypeError(f"{type(module).__name__}.forward() was called without its input "
                        f"({name or 'a positional argument'})")
    rest = dict(kwargs)
    return rest.pop(name), rest


class TunerLayer(nn.Module):
    """Wraps an original module and applies the active adapters to its output."""

    def __init__(self, base_layer: nn.Module, state: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        for own in (self, self.adapters, self.fusions):  # the mode of the module it replaces (and adapters added)
            own.training = base_layer.training
        self.merged: list[str] = []
        #: Adapter name -> the module whose *input* it reads instead of this module's
        #: (a Site's ``input_from``); adapters reading this module's own input are absent.
        self.input_sources: dict[str, str] = {}
        #: Source module -> its input in the current forward, kept by a forward pre-hook
        #: on that module (one hook per source, removed when no adapter here reads it).
        self.captured: dict[str, Any] = {}
        self._capture_handles: dict[str, Any] = {}
        object.__setattr__(self, "adapter_state", state)  # shared, not a submodule

    @property
    def weight(self) -> torch.Tensor:  # transformers sometimes reads .weight of linear layers
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: Any = _KEYWORD_INPUT, *args: Any, **kwargs: Any) -> Any:
        if x is _KEYWORD_INPUT:  # the input passed by keyword (transformers' Llama: self_attn(hidden_states=...))
            x, kwargs = keyword_input(self.base_layer, kwargs)
        state = self.adapter_state
        plan = state.current
        adapters = self.adapters  # read once: a module attribute costs a lookup each time (decoding: every token)
        if plan is None or state.disabled or not adapters:
            return self.base_layer(x, *args, **kwargs)
        if type(plan) is str and plan in adapters and plan not in self.merged \
                and plan not in self.input_sources:
            adapter = adapters[plan]
            base = self.base_layer
            if adapter.changes_parameters or adapter.reads_call_arguments:
                return adapter.call_base(base, x, args, kwargs)
            kind = type(adapter)
            if not args and not kwargs and not base._forward_hooks and not base._forward_pre_hooks \
                    and shortcut_is_current(kind, "forward_alone"):
                whole = adapter.forward_alone(x, base)  # one adapter alone: maybe fused with the base
                if whole is not None:
                    return whole
            changed = adapter.base_input(x) if shortcut_is_current(kind, "base_input") else None
            if changed is not None:  # or the base on a new input
                return self.base_layer(changed, *args, **kwargs)
        h = self.base_layer(x, *args, **kwargs)
        if isinstance(h, tuple):
            return (state.run(self, x, h[0]),) + h[1:]
        return state.run(self, x, h)

    # -- inputs --------------------------------------------------------------------

    @property
    def input_from(self) -> str | None:
        """The module whose input every adapter here reads, when they all read the same
        other module's input; None when some adapter reads this module's own input."""
        sources = set(self.input_sources.values())
        if len(sources) == 1 and len(self.input_sources) == len(self.adapters):
            return sources.pop()
        return None

    def input_of(self, name: str, x: Any) -> Any:
        """The input adapter ``name`` reads: ``x`` (this module's input, or the rows of it a
        composition runs) or the captured input of its source module (the same rows)."""
        source = self.input_sources.get(name)
        if source is None:
            return x
        value = self.captured.get(source)
        if value is None:
            raise CompositionError(f"adapter {name!r} reads the input of module {source!r}, which did not run "
                                   f"(with a positional input) before this layer in this forward; call the "
                                   f"model as a whole rather than this layer alone")
        return value

    def add_adapter(self, name: str, adapter: LayerAdapter, input_from: str | None = None) -> None:
        """Hold ``adapter`` under ``name``; it reads the input of module ``input_from`` if given
        (the caller captures that input: ``add_capture``)."""
        for shortcut in ("forward_alone", "base_input"):  # answered now: filled in during a torch.compile
            shortcut_is_current(type(adapter), shortcut)   # trace, the memo would recompile the next call
        adapter.train(self.training)
        self.adapters[name] = adapter
        if input_from is not None:
            self.input_sources[name] = input_from

    def add_capture(self, source: str, module: nn.Module) -> None:
        """Keep ``module``'s first positional input as ``captured[source]`` on every forward
        (one hook per source, however many adapters read it)."""
        if source in self._capture_handles:
            return
        self._capture_handles[source] = module.register_forward_pre_hook(_InputCapture(self.captured, source))

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``, and the capture of its source when no adapter here reads it any more."""
        adapter = self.adapters.pop(name)
        if name not in self.merged:
            adapter.removed(self.base_layer)
            self._base_changed()
        source = self.input_sources.pop(name, None)
        if source is not None and source not in self.input_sources.values():
            handle = self._capture_handles.pop(source, None)
            if handle is not None:
                handle.remove()
            self.captured.pop(source, None)

    def remove_captures(self) -> None:
        """Remove every capture hook (the layer is being unwrapped)."""
        for handle in self._capture_handles.values():
            handle.remove()
        self._capture_handles.clear()
        self.captured.clear()

    # -- merging ---------------------------------------------------------------

    def check_mergeable(self, name: str) -> None:
        """Raise MergeError if adapter ``name`` cannot be folded into this layer's weights."""
        from .base_layers import quantization_of

        quantized = quantization_of(self.base_layer)
        if quantized and name in self.adapters:
            raise MergeError(f"adapter {name!r} cannot be merged into {type(self.base_layer).__name__}: its weights "
                             f"are quantized ({quantized}) and merging would re-quantize them; keep the adapter "
                             f"unmerged, or load the base model unquantized (e.g. torch_dtype=torch.bfloat16), load "
                             f"the adapter onto it and merge there")
        if name in self.adapters and self.adapters[name].merge_reads_weight and \
                any(n != name for n in self.merged):
            raise MergeError(merge_order_message(name, self.merged[0]))
        own_check = getattr(self.adapters[name], "check_mergeable", None) if name in self.adapters else None
        if own_check is not None:  # what the adapter itself cannot fold in (LoRA on a grouped convolution)
            own_check()

    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.adapters:
            return
        self.check_mergeable(name)
        self.adapters[name].merge(self.base_layer)
        self.merged.append(name)
        self._base_changed()

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        self.adapters[name].unmerge(self.base_layer)
        self.merged.remove(name)
        self._base_changed()

    def _base_changed(self) -> None:
        for adapter in self.adapters.values():
            adapter.base_changed()

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={self.merged}"


def adapters_at(module: nn.Module) -> dict[str, LayerAdapter]:
    """The layer adapters at ``module`` by adapter name (a copy): those of a :class:`TunerLayer`
    (its ``.adapters``), none for a module peftkit has not wrapped. ``base_of(module)`` gives the
    wrapped original module (a TunerLayer's ``.base_layer``)."""
    return dict(module.adapters) if isinstance(module, TunerLayer) else {}


def refuse_quantized_copy(module: nn.Module, name: str) -> None:
    """ConfigError when ``module`` (``name``, a module to train whole: a task head) holds a quantized layer: its
    trainable copy would be a quantized layer too, which can neither train nor, when new, run."""
    found = quantized_part(module, name)
    if found is not None:
        raise ConfigError(f"modules_to_save names {name!r}, and {found[0]} is quantized ({found[1]}); the adapter "
                          f"trains a float copy of it, which a quantized layer cannot give: load the base model with "
                          f"that module in float, e.g. BitsAndBytesConfig(..., llm_int8_skip_modules=[{name!r}])")


class ModulesToSave(nn.Module):
    """One trainable copy of a module per adapter; the original stays frozen.

    The copy of the adapter that the active composition takes its head from
    runs (:func:`~peftkit.core.composition.head_leaf`: a stack's ``head=`` member, else its last part
    that has one); with none, the original runs.
    """

    def __init__(self, original: nn.Module, state: Any) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        for own in (self, self.copies):  # the mode of the module it replaces (its copies keep that mode too)
            own.training = original.training
        object.__setattr__(self, "adapter_state", state)  # shared, not a submodule

    def add(self, name: str) -> None:
        if name not in self.copies:
            self.copies[name] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        state = self.adapter_state
        if not state.disabled:
            owner = head_leaf(state.active, self.copies.__contains__)
            if owner is not None:
                return self.copies[owner]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        split = self.adapter_state.run_copies(self, args, kwargs)  # rows routed to different adapters
        if split is not None:
            return split
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)
