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
  holds ``B_new * (scale_new / scale_slot)``.

:func:`prepare_for_hotswap` makes room for higher ranks: it builds the
adapter's modules anew at the target rank (``Method.config_with_rank``) and
swaps the current weights into them in the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .errors import AdapterError, AdapterLoadError, PeftkitError, PluginError
from .labels import read_labels
from .targets import base_of

if TYPE_CHECKING:  # pragma: no cover
    from .layer import LayerAdapter, TunerLayer
    from .method import Method
    from .model import AdaptedModel, AdapterRecord

#: What to do when a folder does not fit the adapter it should replace.
LOAD_SEPARATELY = "load the folder as an adapter of its own instead: load_adapter(path, 'another_name')"


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


def hotswap_adapter(model: "AdaptedModel", path: str | Path, name: str) -> "AdapterRecord":
    """Copy the weights of the adapter saved at ``path`` into loaded adapter ``name``, in place."""
    from .peft_embeddings import load_embedding_base_tensors, take_embedding_base_tensors
    from .serialization import KEY_PREFIX, check_base_model, config_from_data, method_for, read_config, read_weights

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
    _undo_creation(model, incoming)
    _compare_structure(model, record, incoming, refused)
    head_copies = _check_file(model, name, incoming, tensors, where, refused)
    with torch.no_grad():
        _load(incoming, tensors)
    copies = [head_copies]
    for site, layer in model._tuner_layers():
        if name in layer.adapters:
            copies.append(_plan(layer.adapters[name], incoming.layers[site], f"at {site}", refused))
    if incoming.model_adapter is not None:
        copies.append(_plan(model._model_adapters[name], incoming.model_adapter, "in its model-level adapter",
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


def _merged_sites(model: "AdaptedModel", name: str) -> list[str]:
    return [site for site, layer in model._tuner_layers() if name in layer.merged]


def _build(model: "AdaptedModel", method: "Method", config: Any, where: str) -> _Incoming:
    """The folder's modules, made by its method as load_adapter makes them, but not placed in the model."""
    try:
        with _rng_kept(model):  # a swap while serving must not move the sampling random stream
            model_adapter = method.create_model_adapter(model.base_model, config, model.architecture)
            heads = model._resolve_modules_to_save(config, default_head=False)
            sites = model._adapted_sites(method, config, heads)
            shared = model._new_shared_state(method, config, sites)
            layers = {}
            for site in sites:
                adapter = model._new_layer_adapter(method, config, site, shared)
                if adapter is not None:
                    layers[site.name] = adapter
    except PluginError:
        raise
    except PeftkitError as exc:
        raise AdapterLoadError(f"{where}: cannot place this adapter on the model: {exc}") from None
    shared_keys = method.shared_state_file_keys(config, list(shared.tensors())) if shared is not None else {}
    return _Incoming(heads=heads, sites={s.name: s.input_from for s in sites if s.name in layers},
                     layers=layers, model_adapter=model_adapter, shared=shared, shared_keys=shared_keys)


def _undo_creation(model: "AdaptedModel", incoming: _Incoming) -> None:
    """The folder's modules are built only to hold its weights: undo what creating them changed in the
    base layers (LoRA's PiSSA/OLoRA init moves part of the weight into the factors)."""
    for site, layer in incoming.layers.items():
        layer.removed(base_of(model.base_model.get_submodule(site)))


@contextlib.contextmanager
def _rng_kept(model: "AdaptedModel") -> Iterator[None]:
    """Restore torch's random state afterwards (the CPU's, and the GPUs' the model is on): building
    modules initializes their weights at random."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def _compare_structure(model: "AdaptedModel", record: "AdapterRecord", incoming: _Incoming,
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
    ours = {site: layer.input_sources.get(name) for site, layer in model._tuner_layers() if name in layer.adapters}
    fix = f"hot-swapping needs the same target modules; {LOAD_SEPARATELY}"
    for site in ours:
        if site not in incoming.sites:
            raise refused(f"{name!r} adapts {site} and the folder's adapter does not", fix)
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


def _check_file(model: "AdaptedModel", name: str, incoming: _Incoming, tensors: dict[str, torch.Tensor],
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


def _plan(slot: nn.Module, new: nn.Module, where: str, refused: Callable[..., AdapterLoadError]
          ) -> Callable[[], None]:
    try:
        return slot.hotswap_plan(new)
    except AdapterLoadError as exc:
        raise refused(f"{where}: {exc}", None) from None


# -- the default plan of LayerAdapter.hotswap_plan / ModelAdapter.hotswap_plan ---------------------------


def swap_plan(slot: nn.Module, new: nn.Module) -> Callable[[], None]:
    """Check that ``new``'s weights can replace ``slot``'s in place; return the function that copies them.

    Low-rank modules on both sides take the factor path (lower rank zero-padded, scale folded into B);
    any other pair must be of one type with the same settings (:func:`settings_of`) and the same tensor
    keys and shapes. Raises AdapterLoadError naming the first difference, and how to proceed.
    """
    if type(slot) is not type(new):
        raise AdapterLoadError(f"the folder's module is a {type(new).__name__} and the loaded one a "
                               f"{type(slot).__name__}; {LOAD_SEPARATELY}")
    slot_factors, new_factors = _low_rank(slot), _low_rank(new)
    if slot_factors is not None and new_factors is not None:
        return _low_rank_plan(slot, new, slot_factors, new_factors)
    slot_tensors = slot.tensors()
    _check_live(slot, slot_tensors)  # first: a training form (prefix MLP) differs in settings too, less clearly
    _compare_settings(slot, new)
    return _tensor_plan(slot, new, slot_tensors, new.tensors())


def scaled_swap_plan(slot: nn.Module, new: nn.Module, scaled_key: str, scale_attr: str = "scale"
                     ) -> Callable[[], None]:
    """The plan for modules whose only difference may be a scale that multiplies one tensor alone (a LoRA's
    ``scale * B``, in DoRA and convolution forms too): the slot keeps its scale (a constant of compiled
    graphs) and receives ``tensors()[scaled_key] * (new scale / slot scale)``; everything else is compared and
    copied as in :func:`swap_plan`."""
    if type(slot) is not type(new):
        return swap_plan(slot, new)  # names the type difference
    s_slot, s_new = float(getattr(slot, scale_attr)), float(getattr(new, scale_attr))
    if s_slot == 0.0 and s_new != 0.0:
        raise AdapterLoadError(f"the loaded adapter's {scale_attr} is 0 (alpha=0), so no other {scale_attr} can be "
                               f"folded into its weights; {LOAD_SEPARATELY}")
    slot_tensors, new_tensors = slot.tensors(), new.tensors()
    _check_live(slot, slot_tensors)
    _compare_settings(slot, new, lambda ours, theirs: (ours, theirs) == (s_slot, s_new))
    copy_rest = _tensor_plan(slot, new, slot_tensors, new_tensors)
    ratio = s_new / s_slot if s_slot != 0.0 else 1.0
    target, source = slot_tensors[scaled_key], new_tensors[scaled_key]

    def copy() -> None:
        copy_rest()
        if ratio != 1.0:
            target.copy_(_wide(source) * ratio)
    return copy


def _low_rank(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    get = getattr(module, "low_rank", None)
    return get() if get is not None else None


def _low_rank_plan(slot: nn.Module, new: nn.Module, slot_factors: tuple, new_factors: tuple) -> Callable[[], None]:
    (a_slot, b_slot, s_slot), (a_new, b_new, s_new) = slot_factors, new_factors
    r_slot, r_new = a_slot.shape[0], a_new.shape[0]
    if a_slot.shape[1:] != a_new.shape[1:] or b_slot.shape[0] != b_new.shape[0]:
        raise AdapterLoadError(f"the folder's factors are {tuple(b_new.shape)} x {tuple(a_new.shape)} and the loaded "
                               f"ones {tuple(b_slot.shape)} x {tuple(a_slot.shape)}; {LOAD_SEPARATELY}")
    if r_new > r_slot:
        raise AdapterLoadError(f"the folder's adapter has rank {r_new} and the loaded one only {r_slot}; make room "
                               f"once, after loading the first adapter and before compiling: "
                               f"model.prepare_for_hotswap(target_rank={r_new}), or the highest rank you will swap in")
    if float(s_slot) == 0.0 and float(s_new) != 0.0:
        raise AdapterLoadError(f"the loaded adapter's scale is 0 (alpha=0), so no other scale can be folded into "
                               f"its weights; {LOAD_SEPARATELY}")

    def rank_or_scale(ours: Any, theirs: Any) -> bool:
        """A setting that differs only as the rank or the scale do (both are handled below)."""
        return (ours, theirs) == (r_slot, r_new) or (ours, theirs) == (s_slot, s_new)

    _compare_settings(slot, new, rank_or_scale)
    slot_tensors, new_tensors = slot.tensors(), new.tensors()
    key_a, key_b = _key_of(slot_tensors, a_slot, slot), _key_of(slot_tensors, b_slot, slot)
    if new_tensors.get(key_a) is not a_new or new_tensors.get(key_b) is not b_new:
        raise AdapterLoadError(f"{type(new).__name__}.low_rank() does not give the tensors {key_a} and {key_b} "
                               f"of its tensors(); its hotswap_plan() must be overridden")
    rest = _tensor_plan(slot, new, {k: t for k, t in slot_tensors.items() if k not in (key_a, key_b)},
                        {k: t for k, t in new_tensors.items() if k not in (key_a, key_b)})
    ratio = float(s_new) / float(s_slot) if float(s_slot) != 0.0 else 1.0
    _check_live(slot, {key_a: a_slot, key_b: b_slot})

    def copy() -> None:
        a_slot[:r_new].copy_(a_new)
        a_slot[r_new:].zero_()
        b_slot[:, :r_new].copy_(b_new if ratio == 1.0 else _wide(b_new) * ratio)
        b_slot[:, r_new:].zero_()
        rest()
    return copy


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is a half type, so that folding a scale into it rounds once."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _key_of(tensors: dict[str, torch.Tensor], tensor: torch.Tensor, module: nn.Module) -> str:
    for key, value in tensors.items():
        if value is tensor:
            return key
    raise AdapterLoadError(f"{type(module).__name__}.low_rank() gives a tensor that is not among its tensors(); "
                           f"its hotswap_plan() must be overridden")


def _tensor_plan(slot: nn.Module, new: nn.Module, ours: dict[str, torch.Tensor],
                 theirs: dict[str, torch.Tensor]) -> Callable[[], None]:
    for key in ours:
        if key not in theirs:
            raise AdapterLoadError(f"the loaded module has a tensor {key} and the folder's does not; {LOAD_SEPARATELY}")
    for key, value in theirs.items():
        if key not in ours:
            raise AdapterLoadError(f"the folder's module has a tensor {key} and the loaded one does not; "
                                   f"{LOAD_SEPARATELY}")
        if tuple(value.shape) != tuple(ours[key].shape):
            raise AdapterLoadError(f"{key} is {tuple(value.shape)} in the folder and {tuple(ours[key].shape)} in the "
                                   f"loaded adapter; {LOAD_SEPARATELY}")
    _check_live(slot, ours)

    def copy() -> None:
        for key, value in ours.items():
            value.copy_(theirs[key])
    return copy


def _check_live(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that are computed rather than held by ``module``: writing them would change nothing."""
    held = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    for key, value in tensors.items():
        if id(value) not in held:
            raise AdapterLoadError(f"its {key} is computed from other parameters rather than held, so it cannot be "
                                   f"overwritten in place (an adapter still in a training form, such as prefix "
                                   f"tuning's reparametrization MLP: call its eject() first)")


# -- settings ---------------------------------------------------------------------------------------


def settings_of(module: nn.Module) -> dict[str, Any]:
    """What decides a module's computation besides its tensors: the plain public attributes (numbers,
    strings, tuples, dataclasses) and the type of it and of each submodule. Dropout is left out: it acts
    in training only, and the loaded adapter keeps its own."""
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for prefix, sub in module.named_modules():
        if any(prefix.startswith(d + ".") for d in dropped):
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            dropped.append(prefix)
            continue
        if prefix:
            out[f"{prefix} (module)"] = type(sub).__name__
        for key, value in vars(sub).items():
            if not key.startswith("_") and key != "training" and _plain(value):
                out[f"{prefix}.{key}" if prefix else key] = value
    return out


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, enum.Enum)):
        return True
    if isinstance(value, (tuple, list, frozenset)):
        return all(_plain(v) for v in value)
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _compare_settings(slot: nn.Module, new: nn.Module, allowed: Callable[[Any, Any], bool] | None = None) -> None:
    ours, theirs = settings_of(slot), settings_of(new)
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        mine, other = ours.get(key), theirs.get(key)  # absent and None are alike (an unset optional module)
        if mine == other or (allowed is not None and allowed(mine, other)):
            continue
        raise AdapterLoadError(f"its setting {key} is {other!r} in the folder and {mine!r} in the loaded adapter, "
                               f"and weights alone cannot change it; {LOAD_SEPARATELY}")


# -- making room for higher ranks ------------------------------------------------------------------


def prepare_for_hotswap(model: "AdaptedModel", target_rank: int, adapter_names: Sequence[str] | None = None) -> None:
    """Pad low-rank adapters with zeros to ``target_rank`` (all that have a rank, or ``adapter_names``)."""
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise AdapterError(f"target_rank={target_rank!r} must be a positive integer: the highest rank among the "
                           f"adapters you will hot-swap in")
    explicit = adapter_names is not None
    names = list(adapter_names) if adapter_names is not None else list(model.adapters)
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
        layer.adapters[name] = module
        layer.__dict__.pop("_peftkit_cache", None)  # products of the old factors (composition_exec)
    for name, config in configs.items():
        model.adapter_record(name).config = config


def _padded_modules(model: "AdaptedModel", record: "AdapterRecord", config: Any, target_rank: int
                    ) -> list[tuple["TunerLayer", str, nn.Module, Callable[[], None]]]:
    """For each site of ``record``'s adapter below ``target_rank``: (layer, name, new module, its copy)."""
    name, method = record.name, record.method
    merged = _merged_sites(model, name)
    if merged:
        raise AdapterError(f"adapter {name!r} is merged into the base weights (at {merged[0]}); "
                           f"unmerge_adapter() before prepare_for_hotswap()")
    layers = [(site, layer) for site, layer in model._tuner_layers() if name in layer.adapters]
    ranks = {}
    for site, layer in layers:
        factors = _low_rank(layer.adapters[name])
        if factors is None:
            raise AdapterError(f"adapter {name!r} has no low-rank factors at {site} (low_rank() gives None: DoRA, or "
                               f"a convolution), so it cannot be padded; hot-swap adapters of its own rank into it, "
                               f"or load the adapter of the highest rank first")
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
            new = model._new_layer_adapter(method, config, sites[site])
            factors = _low_rank(new) if new is not None else None
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
