"""Hot-swapping: another saved adapter's weights copied in place into a loaded adapter.

A server that keeps many adapters behind one ``torch.compile``d model swaps
them without recompiling: the adapter's parameters stay the same tensor
objects (compiled graphs and optimizers keep pointing at them) and only their
values change. The incoming folder is first built off the model, exactly as
``load_adapter`` would build it (the method's own modules, holding the file's
weights); each of its modules is then compared with the loaded adapter's
module at the same site (:meth:`LayerAdapter.hotswap_plan`), and only when
everything fits are the values copied. A refusal leaves the model as it was.

Low-rank adapters (``low_rank()`` gives ``(A, B, scale)``: LoRA) swap more
freely, since what they add is ``scale * B @ A`` and nothing else:

- a lower rank is zero-padded: the rows of A and columns of B beyond it are
  zero and add nothing;
- another scale (alpha / r) is folded into B: the loaded module keeps its own
  scale, a Python float that a compiled graph holds as a constant, and its B
  holds ``B_new * (scale_new / scale_slot)``;
- a folder that adapts only some of the loaded adapter's modules leaves the
  others' factors zero, so they add nothing (PEFT's ``hotswap_adapter`` does
  the same); a folder adapting a module the loaded adapter does not is refused.

:func:`prepare_for_hotswap` makes room for higher ranks: it builds the
adapter's modules anew at the target rank (``Method.config_with_rank``) and
swaps the current weights into them in the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .adapter_names import adapter_name_list
from .composition_exec import forget_products
from .errors import AdapterError, AdapterLoadError, PeftkitError, PluginError
from .labels import read_labels
from .swap_plan import LOAD_SEPARATELY, low_rank_of
from .targets import base_of

if TYPE_CHECKING:  # pragma: no cover
    from .layer import LayerAdapter, TunerLayer
    from .method import Method
    from .adapted_protocol import AdaptedModelProtocol
    from .state import AdapterRecord


@dataclasses.dataclass
class _Incoming:
    """The folder's adapter built off the model: what load_adapter would have put in."""

    heads: list[str]
    sites: dict[str, str | None]  # site -> the module whose input its adapter reads (None: its own)
    layers: dict[str, "LayerAdapter"]
    model_adapter: nn.Module | None
    #: Its adapter-wide tensors (Method.create_shared_state), with the folder's saved ones loaded.
    shared: nn.Module | None = None
    #: Shared-tensor name -> its key in the weights file (those the method saves).
    shared_keys: dict[str, str] = dataclasses.field(default_factory=dict)


# -- hot-swapping -----------------------------------------------------------------------


def hotswap_adapter(model: "AdaptedModelProtocol", path: str | Path, name: str) -> "AdapterRecord":
    """Copy the weights of the adapter saved at ``path`` into loaded adapter ``name``, in place."""
    from .peft_embeddings import load_embedding_base_tensors, take_embedding_base_tensors
    from .serialization import (KEY_PREFIX, check_base_model, config_from_data, live_layout, method_for, read_config,
                                read_weights)

    record = model.adapter_record(name)
    where = str(path)
    data = read_config(Path(path))
    method = method_for(data, where)
    check_base_model(model, data, where)

    def refused(what: str, fix: str | None = LOAD_SEPARATELY) -> AdapterLoadError:
        return AdapterLoadError(f"{where}: cannot hot-swap it into adapter {name!r}: {what}"
                                + (f"; {fix}" if fix else ""))

    if method.name != record.method.name:
        raise refused(f"the folder holds a {method.name!r} adapter and {name!r} is a {record.method.name!r} "
                      f"adapter, and hot-swapping only replaces weights")
    merged = _merged_sites(model, name)
    if merged:
        raise refused(f"{name!r} is merged into the base weights (at {merged[0]})", "unmerge_adapter() first")
    config = config_from_data(method, data, where)
    tensors = read_weights(Path(path))
    embedding_base = take_embedding_base_tensors(model, tensors, KEY_PREFIX, where)  # PEFT's: loaded as a load does
    labels = read_labels(Path(path))
    incoming = _build(model, method, config, where)
    tensors = live_layout(incoming.layers, tensors, where)  # a module that saves less rebuilds the rest
    _compare_structure(model, record, incoming, refused)
    head_copies = _check_file(model, name, incoming, tensors, where, refused)
    with torch.no_grad():
        _load(incoming, tensors)
    copies = [head_copies]
    for site, layer in model.tuner_layers():
        if name in layer.adapters and site in incoming.layers:
            copies.append(_plan(layer.adapters[name], incoming.layers[site], f"at {site}", refused))
        elif name in layer.adapters:  # a site the folder leaves out: it adds nothing from now on (as PEFT)
            copies.append(_silence(layer.adapters[name]))
    if incoming.model_adapter is not None:
        copies.append(_plan(model.model_adapter(name), incoming.model_adapter, "in its model-level adapter",
                            refused))
    copies.append(_shared_plan(name, model.shared_state(name), incoming.shared, refused))
    with torch.no_grad():  # everything fits: now, and only now, the model changes
        for copy in copies:
            copy()
    load_embedding_base_tensors(model, embedding_base)
    before = model.adapter_labels(name)
    record.labels = labels if labels is not None and before is not None and len(labels) == len(before) else None
    if model.adapter_labels(name) != before and name in model.active_adapters:
        model.set_active(model.active_composition)  # the config names the swapped-in head's labels
    return record


def _merged_sites(model: "AdaptedModelProtocol", name: str) -> list[str]:
    return [site for site, layer in model.tuner_layers() if name in layer.merged]


def _build(model: "AdaptedModelProtocol", method: "Method", config: Any, where: str) -> _Incoming:
    """The folder's modules, made by its method as load_adapter makes them, but not placed in the model.

    Whatever creating them changed in the model is undone before this returns or raises: after a failure
    part-way (a site the method refuses, a plugin's error) as after success, so a refused swap leaves no
    hook of a half-built model-level adapter and no base weight a layer's init moved."""
    incoming = _Incoming(heads=[], sites={}, layers={}, model_adapter=None)
    try:
        with _rng_kept(model):  # a swap while serving must not move the sampling random stream
            incoming.model_adapter = method.create_model_adapter(model.base_model, config, model.architecture)
            incoming.heads = model.resolve_modules_to_save(config, default_head=False)
            sites = model.adapted_sites(method, config, incoming.heads)
            incoming.shared = model.new_shared_state(method, config, sites)
            for site in sites:
                adapter = model.new_layer_adapter(method, config, site, incoming.shared)
                if adapter is not None:
                    incoming.layers[site.name] = adapter
                    incoming.sites[site.name] = site.input_from
        if incoming.shared is not None:
            incoming.shared_keys = method.shared_state_file_keys(config, list(incoming.shared.tensors()))
    except PluginError:
        raise
    except PeftkitError as exc:
        raise AdapterLoadError(f"{where}: cannot place this adapter on the model: {exc}") from None
    finally:
        _undo_creation(model, incoming)
    return incoming


def _undo_creation(model: "AdaptedModelProtocol", incoming: _Incoming) -> None:
    """The folder's modules are built only to hold its weights: undo what creating them changed in the
    base layers (LoRA's PiSSA/OLoRA init moves part of the weight into the factors) and in the model (a
    gated prefix's hooks)."""
    for site, layer in incoming.layers.items():
        layer.removed(base_of(model.base_model.get_submodule(site)))
    if incoming.model_adapter is not None:
        incoming.model_adapter.removed(model.base_model)


@contextlib.contextmanager
def _rng_kept(model: "AdaptedModelProtocol") -> Iterator[None]:
    """Restore torch's random state afterwards (the CPU's, and the GPUs' the model is on): building
    modules initializes their weights at random."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def _compare_structure(model: "AdaptedModelProtocol", record: "AdapterRecord", incoming: _Incoming,
                       refused: Callable[..., AdapterLoadError]) -> None:
    """Same task heads, same sites (reading the same inputs), a model-level adapter on both sides or neither."""
    name = record.name
    for head in record.modules_to_save:
        if head not in incoming.heads:
            raise refused(f"{name!r} trains and saves module {head} whole (modules_to_save) and the folder "
                          f"does not")
    for head in incoming.heads:
        if head not in record.modules_to_save:
            raise refused(f"the folder trains and saves module {head} whole (modules_to_save) and {name!r} "
                          f"does not")
    layers = {site: layer for site, layer in model.tuner_layers() if name in layer.adapters}
    ours = {site: layer.input_sources.get(name) for site, layer in layers.items()}
    fix = f"hot-swapping needs the same target modules; {LOAD_SEPARATELY}"
    for site in ours:
        if site not in incoming.sites and silenced_factors(layers[site].adapters[name]) is None:
            raise refused(f"{name!r} adapts {site} and the folder's adapter does not, and its module there "
                          f"({type(layers[site].adapters[name]).__name__}) cannot be set to add nothing: only a "
                          f"low-rank change (plain LoRA) is zeroed where the folder has no weights", fix)
    for site, source in incoming.sites.items():
        if site not in ours:
            raise refused(f"the folder's adapter adapts {site} and {name!r} does not", fix)
        if source != ours[site]:
            raise refused(f"at {site} the folder's adapter reads the input of {source or 'that module'} and "
                          f"{name!r} reads the input of {ours[site] or 'that module'}", fix)
    if record.model_adapter and incoming.model_adapter is None:
        raise refused(f"{name!r} rewrites the model's inputs and the folder's adapter does not")
    if incoming.model_adapter is not None and not record.model_adapter:
        raise refused(f"the folder's adapter rewrites the model's inputs and {name!r} does not")


def _check_file(model: "AdaptedModelProtocol", name: str, incoming: _Incoming, tensors: dict[str, torch.Tensor],
                   where: str, refused: Callable[..., AdapterLoadError]) -> Callable[[], None]:
    """Refuse a file whose keys or shapes do not fit; return the copy of the task heads' weights."""
    from .serialization import check_weights, head_tensors, site_key

    heads = head_tensors(model, name)
    for key, live in heads.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(live.shape):
            raise refused(f"the task head (modules_to_save) tensor {key} is {tuple(tensors[key].shape)} in the "
                          f"folder and {tuple(live.shape)} in {name!r} (a head for another number of labels?)",
                          "a head of another shape cannot replace this one in place; load the folder onto a "
                          "model with such a head")
    expected = dict(heads)
    for site, layer in incoming.layers.items():
        expected.update({site_key(site, key): t for key, t in layer.tensors().items()})
    if incoming.model_adapter is not None:
        expected.update(incoming.model_adapter.tensors())
    if incoming.shared is not None:
        shared = incoming.shared.tensors()
        expected.update({key: shared[tensor_name] for tensor_name, key in incoming.shared_keys.items()})
    check_weights(expected, tensors, where)

    def copy_heads() -> None:
        for key, live in heads.items():
            live.copy_(tensors[key])
    return copy_heads


def _load(incoming: _Incoming, tensors: dict[str, torch.Tensor]) -> None:
    from .serialization import site_key

    for site, layer in incoming.layers.items():
        layer.load_tensors({key: tensors[site_key(site, key)] for key in layer.tensors()})
    if incoming.model_adapter is not None:
        adapter = incoming.model_adapter
        adapter.load_tensors({key: tensors[key] for key in adapter.tensors()})
    if incoming.shared is not None:  # those not saved were drawn again from the folder's config
        shared = incoming.shared.tensors()
        for tensor_name, key in incoming.shared_keys.items():
            shared[tensor_name].copy_(tensors[key])


def _shared_plan(name: str, slot: nn.Module | None, new: nn.Module | None,
                 refused: Callable[..., AdapterLoadError]) -> Callable[[], None]:
    """Copy the folder's adapter-wide tensors into adapter ``name``'s, in place, when they have the same names
    and shapes (the same parameter and buffer objects stay, read by every site)."""
    if slot is None and new is None:
        return lambda: None
    if slot is None or new is None:
        holder = "the folder's adapter" if slot is None else repr(name)
        raise refused(f"{holder} has adapter-wide tensors (its method's shared state) and the other does not")
    ours, theirs = slot.tensors(), new.tensors()
    if set(ours) != set(theirs):
        raise refused(f"the adapter-wide tensors differ: {sorted(theirs)} in the folder, {sorted(ours)} in {name!r}")
    for key, tensor in ours.items():
        if tuple(tensor.shape) != tuple(theirs[key].shape):
            raise refused(f"its adapter-wide tensor {key} is {tuple(theirs[key].shape)} in the folder and "
                          f"{tuple(tensor.shape)} in {name!r} (another r, or other target modules)")

    def copy() -> None:
        for key, tensor in ours.items():
            tensor.copy_(theirs[key])
    return copy


def silenced_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The live (A, B) of a module whose change is exactly ``scale * B @ A`` (LoRA on a linear, embedding
    or convolution layer, not DoRA), which zeros make add nothing; None for any other module."""
    get = getattr(adapter, "weight_factors", None) or getattr(adapter, "low_rank", None)
    factors = get() if get is not None else None
    return None if factors is None else (factors[0], factors[1])


def _silence(adapter: nn.Module) -> Callable[[], None]:
    """The copy for a site the folder's adapter does not adapt: zero the loaded factors in place."""
    factors = silenced_factors(adapter)
    assert factors is not None  # _compare_structure refused every other module

    def copy() -> None:
        for tensor in factors:
            tensor.zero_()
    return copy


def _plan(slot: nn.Module, new: nn.Module, where: str, refused: Callable[..., AdapterLoadError]
          ) -> Callable[[], None]:
    try:
        return slot.hotswap_plan(new)
    except AdapterLoadError as exc:
        raise refused(f"{where}: {exc}", None) from None


# -- making room for higher ranks ------------------------------------------------------------------


def prepare_for_hotswap(model: "AdaptedModelProtocol", target_rank: int,
                        adapter_names: str | Sequence[str] | None = None) -> None:
    """Pad low-rank adapters with zeros to ``target_rank`` (all that have a rank, or ``adapter_names``)."""
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise AdapterError(f"target_rank={target_rank!r} must be a positive integer: the highest rank among the "
                           f"adapters you will hot-swap in")
    explicit = adapter_names is not None
    names = adapter_name_list(adapter_names)
    names = list(model.adapters) if names is None else names
    swaps: list[tuple["TunerLayer", str, nn.Module, Callable[[], None]]] = []
    configs: dict[str, Any] = {}
    for name in names:
        record = model.adapter_record(name)
        config = record.method.config_with_rank(record.config, target_rank)
        if config is None:
            if explicit:
                raise AdapterError(f"adapter {name!r} ({record.method.name}) has no rank to pad: its weights have "
                                   f"fixed shapes and hot-swap as they are")
            continue
        configs[name] = config
        swaps.extend(_padded_modules(model, record, config, target_rank))
    if not configs:
        raise AdapterError("no adapter on this model has a rank to pad (prepare_for_hotswap pads low-rank adapters "
                           "such as LoRA); adapters of other methods hot-swap without it")
    with torch.no_grad():  # everything is built and checked: now the model changes
        for _, _, _, copy in swaps:
            copy()
    for layer, name, module, _ in swaps:
        module.train(layer.training)
        layer.adapters[name] = module
        forget_products(layer)  # products of the old factors
    for name, config in configs.items():
        model.adapter_record(name).config = config


def _padded_modules(model: "AdaptedModelProtocol", record: "AdapterRecord", config: Any, target_rank: int
                    ) -> list[tuple["TunerLayer", str, nn.Module, Callable[[], None]]]:
    """For each site of ``record``'s adapter below ``target_rank``: (layer, name, new module, its copy)."""
    name, method = record.name, record.method
    merged = _merged_sites(model, name)
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into the base weights (at {merged[0]}); "
                           f"unmerge_adapter() before prepare_for_hotswap()")
    layers = [(site, layer) for site, layer in model.tuner_layers() if name in layer.adapters]
    ranks = {}
    for site, layer in layers:
        factors = low_rank_of(layer.adapters[name])
        if factors is None:
            raise AdapterError(f"adapter {name!r} has no low-rank factors at {site} (low_rank() gives None: DoRA, "
                               f"lora_bias, or a convolution), so it cannot be padded; hot-swap adapters of its own "
                               f"rank into it, or load the adapter of the highest rank first")
        ranks[site] = factors[0].shape[0]
        if ranks[site] > target_rank:
            raise AdapterError(f"adapter {name!r} has rank {ranks[site]} at {site}, more than "
                               f"target_rank={target_rank}; give the highest rank among all the adapters")
    sites = {s.name: s for s in record.sites}
    out = []
    with _rng_kept(model):
        for site, layer in layers:
            if ranks[site] == target_rank:
                continue
            old = layer.adapters[name]
            new = model.new_layer_adapter(method, config, sites[site])
            factors = low_rank_of(new) if new is not None else None
            if factors is None or factors[0].shape[0] != target_rank:
                raise AdapterError(f"method {method.name!r}: config_with_rank({target_rank}) does not give a "
                                   f"module of rank {target_rank} at {site}; the method must override it")
            try:
                copy = new.hotswap_plan(old)
            except AdapterLoadError as exc:
                raise AdapterError(f"adapter {name!r} cannot be padded at {site}: {exc}") from None
            new.train(old.training)
            trainable = {key: t.requires_grad for key, t in old.tensors().items()}
            for key, tensor in new.tensors().items():
                tensor.requires_grad_(trainable.get(key, False))
            out.append((layer, name, new, copy))
    return out
