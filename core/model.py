"""AdaptedModel: a thin torch module over any model that holds named adapters.

It adds, deletes, activates, trains, merges, saves and loads adapters. Being
an ordinary ``nn.Module`` it works with transformers' Trainer, accelerate,
torch.compile and DDP/FSDP.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from . import composition, heads
from .architectures import ArchitectureSpec
from .composition import BASE_MODEL, Node
from . import composition_api
from .composition_api import CompositionMixin
from .composition_exec import Routing
from .config import AdapterConfig
from .errors import AdapterError, MergeError, TargetError
from .kept_values import drop_kept_values
from .labels import config_labels, set_config_labels
from .layer import (LayerAdapter, ModelAdapter, ModulesToSave, TunerLayer, merge_order_message, name_taken_by_torch,
                    refuse_quantized_copy)
from .method import Method, Site
from .method_training import layer_adapters_of
from .output_points import PointOutputHooks
from .plugins import architecture_for, parse_spec
from .shared_state import SharedState
from .state import AdapterRecord, AdapterState
from .targets import NO_LAYERS, name_matches

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")
#: Model classes whose task head is trained and saved with the adapter by default.
_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                  "ForMultipleChoice", "ForImageClassification")


#: PEFT's and AdapterHub's names that AdaptedModel spells otherwise: a clear AttributeError names peftkit's.
_OTHER_LIBRARY_NAMES = {
    "disable_adapter": "`with model.disable_adapters():`",
    "active_adapter": "model.active_adapters",
    "peft_config": "model.adapters (name -> config)",
    "get_nb_trainable_parameters": "model.trainable_parameters()",
    "enable_adapter_layers": "model.set_active(name)",
    "disable_adapter_layers": "model.set_active(None), or `with model.disable_adapters():`",
    "set_active_adapters": "model.set_active(...)",
    "add_adapter_fusion": "model.add_fusion(Fuse(...))",
    "train_adapter_fusion": "model.train_fusion(Fuse(...))",
    "save_adapter_fusion": "model.save_fusion(path, name)",
    "load_adapter_fusion": "model.load_fusion(path)",
    "save_all_adapters": "model.save_pretrained(path)",
    "adapter_summary": "model.print_trainable_parameters(), model.adapters (name -> config), or "
                       "`peftkit info FOLDER` for a saved adapter",
    "add_classification_head": "the task model's own head: load the base model with "
                               "AutoModelForSequenceClassification.from_pretrained(..., num_labels=N); peftkit trains "
                               "and saves that head with the adapter (modules_to_save)",
    "add_tagging_head": "the task model's own head: load the base model with "
                        "AutoModelForTokenClassification.from_pretrained(..., num_labels=N); peftkit trains and "
                        "saves that head with the adapter (modules_to_save)",
    "freeze_model": "nothing: peftkit.adapt() freezes the base model, and model.train_adapter(name) makes one "
                    "adapter trainable",
    "push_adapter_to_hub": "peftkit.hub.push(model, repo_id, adapter_name=name, format=\"adapters\")",
}


def peft_trainable(trainable: bool, is_trainable: bool | None) -> bool:
    """``trainable``, or PEFT's ``is_trainable`` when given; AdapterError when both are given and differ."""
    if is_trainable is None:
        return trainable
    if trainable and not is_trainable:
        raise AdapterError("trainable=True and is_trainable=False disagree; pass one of them (is_trainable is "
                           "PEFT's name for trainable)")
    return bool(is_trainable)


def merge_finite_or_refuse(site: str, name: str, layer: TunerLayer) -> None:
    """Merge adapter ``name`` into ``layer`` (at ``site``), or, when that leaves a NaN or inf in the base layer's
    parameters, put them back exactly as they were (unmerging cannot: NaN - NaN is NaN) and raise MergeError.
    Holds a copy of one layer's parameters at a time, as PEFT's ``safe_merge`` does."""
    params = dict(layer.base_layer.named_parameters(recurse=False))
    before = {n: p.detach().clone() for n, p in params.items()}
    layer.merge(name)
    broken = [n for n, p in params.items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if broken:
        layer.unmerge(name)
        for param_name, param in params.items():
            param.detach().copy_(before[param_name])
        raise MergeError(f"merging adapter {name!r} into {site} gives a {broken[0]} with NaN or inf values "
                         f"(safe_merge): the adapter's weights are broken; nothing was merged")


class AdaptedModel(CompositionMixin, nn.Module):
    """A model with peftkit adapters. Create one with :func:`peftkit.adapt`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, AdaptedModel):
            raise AdapterError("this model is already adapted; call add_adapter() on it instead")
        self.base_model = model
        #: Which composition runs now, shared with every TunerLayer and ModulesToSave of the model
        #: (their ``adapter_state``): switching adapters changes this object, not the layers.
        self.adapter_state = AdapterState()
        self._records: dict[str, AdapterRecord] = {}
        self._model_adapters = nn.ModuleDict()
        #: Adapter name -> its adapter-wide tensors (Method.create_shared_state), held once here.
        self._shared_states = nn.ModuleDict()
        # The wrapper, and every module an adapter adds, starts in the mode of what it wraps (a model loaded
        # for inference stays in eval mode: no adapter dropout or sampling until model.train()). PEFT leaves
        # new modules training (huggingface/peft#3753).
        for own in (self, self._model_adapters, self._shared_states):
            own.training = model.training
        self._hook_handle: Any = None
        #: Hooks on the modules whose output model-level adapters rewrite (core/output_points.py).
        self._point_hooks = PointOutputHooks()
        #: The config's label names while an adapter's head (with other labels) is shown there.
        self._labels_before: list[str] | None = None
        for param in model.parameters():
            param.requires_grad_(False)
        #: Whether the base model holds quantized layers (they need care when training starts).
        self._quantized = any(not p.dtype.is_floating_point for p in model.parameters())

    # -- attribute access falls through to the wrapped model ---------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _OTHER_LIBRARY_NAMES:  # before the base model: transformers' own would act on its adapters
                raise AttributeError(f"AdaptedModel has no {name!r} (the PEFT / AdapterHub name); "
                                     f"use {_OTHER_LIBRARY_NAMES[name]} (see `peftkit docs migrating`)") from None
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def train(self, mode: bool = True) -> "AdaptedModel":
        super().train(mode)
        if mode and self._quantized:
            from .base_layers import unpack_for_training

            unpack_for_training(self.base_model)  # gradients through 4-bit layers on CPU, see there
        return self

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "trainable adapters are attached": its Trainer refuses to fine-tune a
        quantized model without them, and accepts this wrapper (set here, never on the base model, whose
        save_pretrained would read it)."""
        return bool(self._records)

    @property
    def architecture(self) -> ArchitectureSpec | None:
        return architecture_for(self.base_model)

    # -- adapters ----------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, AdapterConfig]:
        """Adapter name -> config, in the order they were added."""
        return {name: rec.config for name, rec in self._records.items()}

    @property
    def adapter_records(self) -> dict[str, AdapterRecord]:
        """Adapter name -> its record (method, config, sites, heads), in the order they were added;
        a new dict (the records themselves are the model's)."""
        return dict(self._records)

    def adapter_record(self, name: str) -> AdapterRecord:
        try:
            return self._records[name]
        except KeyError:
            raise AdapterError(f"no adapter named {name!r}; adapters on this model: "
                               f"{', '.join(self._records) or 'none'}") from None

    def add_adapter(self, name: str | None = None, spec: str | AdapterConfig | None = None, *,
                    config: str | AdapterConfig | None = None, default_head: bool = True,
                    adapter_name: str | None = None, peft_config: Any = None) -> AdapterRecord:
        """Inject a new adapter. ``spec`` is a shorthand (``"lora[r=8]"``), a config (default ``"lora"``) or a
        Hugging Face PEFT config object (``peft.LoraConfig(r=8)``, read as the folder PEFT would save for it);
        ``config=`` is AdapterHub's name for it (``add_adapter("a", config="seq_bn")``), and ``adapter_name=``
        and ``peft_config=`` are PEFT's names for ``name`` and ``spec``.

        The new adapter is neither active nor trainable until set_active() /
        train_adapter(). On any error the model is left as it was.
        ``default_head=False`` keeps a task model's head out of
        ``modules_to_save`` unless the config names it (loading uses this:
        the file says what was saved).
        """
        from . import peft_objects  # reads PEFT's format (serialization): loaded when an adapter is first added
        if adapter_name is not None:
            if name is not None and name != adapter_name:
                raise AdapterError(f"add_adapter() got name {name!r} and adapter_name={adapter_name!r}; pass the "
                                   f"name once (adapter_name is PEFT's name for it)")
            name = adapter_name
        if name is None:
            raise AdapterError("add_adapter() needs the new adapter's name: add_adapter(name, spec)")
        if isinstance(spec, str) and (isinstance(name, AdapterConfig) or peft_objects.is_peft_config(name)):
            raise AdapterError(f"add_adapter() takes the adapter's name first, then its method: "
                               f"add_adapter({spec!r}, {type(name).__name__}(...)) (transformers' own add_adapter "
                               f"takes the config first)")
        self.check_adapter_name(name)
        given = [label for label, value in (("spec", spec), ("config=", config), ("peft_config=", peft_config))
                 if value is not None]
        if len(given) > 1:
            raise AdapterError(f"add_adapter({name!r}) got {' and '.join(given)}; pass the method once "
                               f"(config= is AdapterHub's name for spec, peft_config= PEFT's)")
        chosen = next((s for s in (spec, config, peft_config) if s is not None), "lora")
        method, parsed = peft_objects.method_and_config(chosen) if peft_objects.is_peft_config(chosen) \
            else parse_spec(chosen)
        parsed = parsed.replace()  # our own copy: defaults get filled in below
        record = AdapterRecord(name=name, method=method, config=parsed)
        self._records[name] = record
        try:
            self._inject(record, default_head)
        except Exception:
            self._remove(name)
            raise
        return record

    def check_adapter_name(self, name: str) -> None:
        """Refuse (AdapterError) ``name`` for a new adapter: malformed, taken by torch, or already used."""
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_MODEL:
            raise AdapterError(f"adapter name {name!r} is invalid; use letters, digits, '_' and '-' "
                               f"(at most 128), and not {BASE_MODEL!r}")
        if name_taken_by_torch(name):
            raise AdapterError(f"adapter name {name!r} is taken by torch (every nn.Module has an attribute "
                               f"{name!r}); choose another name, e.g. {name + '_adapter'!r}")
        if name in self._records:
            raise AdapterError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first "
                               f"or choose another name")

    def _inject(self, record: AdapterRecord, default_head: bool = True) -> None:
        model, method, config = self.base_model, record.method, record.config
        arch = self.architecture
        model_adapter = method.create_model_adapter(model, config, arch)
        if model_adapter is not None:
            model_adapter.train(self.training)
            self._model_adapters[record.name] = model_adapter
            record.model_adapter = True
            self._ensure_input_hook()
            self._point_hooks.attach(model, arch, model_adapter, method.name, self.adapter_state,
                                     self._model_adapters)
        record.modules_to_save = self.resolve_modules_to_save(config, default_head)
        record.sites = self.adapted_sites(method, config, record.modules_to_save)
        self._create_shared_state(record)
        for site in record.sites:
            adapter = self.new_layer_adapter(method, config, site, self.shared_state(record.name))
            if adapter is None:
                continue
            current = model.get_submodule(site.name)
            layer = current if isinstance(current, TunerLayer) else None
            base = layer.base_layer if layer is not None else current
            if layer is None:
                layer = TunerLayer(base, self.adapter_state)
                _set_submodule(model, site.name, layer)
            layer.add_adapter(record.name, adapter, site.input_from)  # each adapter reads its own site's input
            if site.input_from is not None:
                _capture_input(model, site.input_from, layer)
        self._point_hooks.follow(model)  # a point's module may be wrapped now
        for module_name in record.modules_to_save:
            current = model.get_submodule(module_name)
            if not isinstance(current, ModulesToSave):
                refuse_quantized_copy(current, module_name)
                current = ModulesToSave(current, self.adapter_state)
                _set_submodule(model, module_name, current)
            current.add(record.name)
        for param in self.adapter_parameters(record.name):
            param.requires_grad_(False)

    def adapted_sites(self, method: Method, config: AdapterConfig, modules_to_save: list[str]) -> list[Site]:
        """The method's sites for ``config``, less those inside modules trained whole (a task head)."""
        saved_prefixes = tuple(m + "." for m in modules_to_save)
        if config.target_modules == NO_LAYERS and not modules_to_save:
            raise TargetError(f"target_modules={NO_LAYERS!r} adapts no layer, and modules_to_save names no module "
                              f"to train whole, so the adapter would change nothing; name the task head in "
                              f"modules_to_save (e.g. modules_to_save=[classifier]) or target some layers")
        sites = method.sites(self.base_model, config, self.architecture)
        kept = [s for s in sites if s.name not in modules_to_save and not s.name.startswith(saved_prefixes)]
        if sites and not kept:  # every target is inside a head trained whole: the adapter would adapt nothing
            raise TargetError(f"method {method.name!r}: every module it targets ({', '.join(s.name for s in sites)}) "
                              f"is inside modules_to_save={modules_to_save!r}, which is trained whole, so it "
                              f"would adapt nothing; target modules outside it (set target_modules)")
        return kept

    def _create_shared_state(self, record: AdapterRecord) -> None:
        """Keep the method's adapter-wide tensors for ``record`` (if any)."""
        shared = self.new_shared_state(record.method, record.config, record.sites)
        if shared is not None:
            shared.train(self.training)
            self._shared_states[record.name] = shared

    def new_shared_state(self, method: Method, config: AdapterConfig, sites: list[Site]) -> SharedState | None:
        """The method's adapter-wide tensors for ``sites`` (None when it has none), on the first site's
        device, not yet placed in the model."""
        tensors = method.create_shared_state(self.base_model, config, sites)
        if not tensors:
            return None
        shared = SharedState(method.name, tensors)
        if sites:
            first = self.base_model.get_submodule(sites[0].name)
            _match_device(shared, first.base_layer if isinstance(first, TunerLayer) else first)
        return shared

    def shared_state(self, name: str) -> SharedState | None:
        """Adapter ``name``'s adapter-wide tensors (``Method.create_shared_state``), or None."""
        return self._shared_states[name] if name in self._shared_states else None

    def model_adapter(self, name: str) -> ModelAdapter | None:
        """Adapter ``name``'s model-level part (``Method.create_model_adapter``: a soft prompt, a
        prefix), or None for an adapter that acts at layers only."""
        return self._model_adapters[name] if name in self._model_adapters else None

    def new_layer_adapter(self, method: Method, config: AdapterConfig, site: Site,
                          shared: SharedState | None = None) -> LayerAdapter | None:
        """The method's module for ``site`` (None where it makes none), on the base layer's device,
        bound to the adapter's ``shared`` state, not yet placed in the model."""
        current = self.base_model.get_submodule(site.name)
        base = current.base_layer if isinstance(current, TunerLayer) else current
        adapter = method.create_layer_adapter(site, base, config, self.base_model)
        if adapter is None:
            return None
        if not isinstance(adapter, LayerAdapter):
            raise TypeError(f"method {method.name!r} returned {type(adapter).__name__} for site "
                            f"{site.name!r}; create_layer_adapter must return a LayerAdapter")
        _match_device(adapter, base)
        adapter.bind_shared(shared)
        return adapter

    def resolve_modules_to_save(self, config: AdapterConfig, default_head: bool = True) -> list[str]:
        """The modules ``config`` trains whole (``modules_to_save``, matched against the base model's
        names); with ``default_head``, a task model's head when the config names none (written into it)."""
        names = list(config.modules_to_save or [])
        if not names and default_head and type(self.base_model).__name__.endswith(_HEAD_SUFFIXES):
            names = [n for n in ("classifier", "score", "qa_outputs") if _has_submodule(self.base_model, n)]
            if names:
                config.modules_to_save = names
        resolved = []
        for wanted in names:
            hits = [n for n, m in self.base_model.named_modules()
                    if n and name_matches(n, [wanted]) and ".copies." not in n
                    and not n.endswith(".original_module") and ".original_module." not in n]
            resolved.extend(h for h in hits if not any(h.startswith(o + ".") for o in hits if o != h))
        if names and not resolved:
            # Like PEFT, the list holds candidates (["classifier", "score"]); none matching is an error.
            raise TargetError(f"modules_to_save={names!r} names no module of this model; top-level modules: "
                              f"{', '.join(n for n, _ in self.base_model.named_children())}")
        return resolved

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; the model is left as if it had never been added."""
        record = self.adapter_record(name)
        composition_api.refuse_if_fused(self, name)
        for site in record.sites:
            layer = self.base_model.get_submodule(site.name)
            if isinstance(layer, TunerLayer) and name in layer.merged:
                raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge_adapter() "
                                 f"before deleting it")
        self._remove(name)

    def _remove(self, name: str) -> None:
        model = self.base_model
        record = self._records.pop(name, None)
        for module_name, module in list(model.named_modules()):
            if isinstance(module, TunerLayer) and name in module.adapters:
                module.remove_adapter(name)
                if len(module.adapters) == 0:
                    _unwrap_layer(model, module_name, module)
            elif isinstance(module, ModulesToSave) and name in module.copies:
                del module.copies[name]
                if len(module.copies) == 0:
                    _set_submodule(model, module_name, module.original_module)
        self._point_hooks.follow(model)  # a point's module may be unwrapped now
        if name in self._model_adapters:
            self._model_adapters[name].removed(model)
            del self._model_adapters[name]
            if not self._model_adapters:
                self._remove_input_hook()
        if name in self._shared_states:
            del self._shared_states[name]
        state = self.adapter_state
        if record is not None and name in state.active_names:
            remaining = [n for n in state.active_names if n != name]
            state.active = composition.as_node(remaining) if remaining else None
            state.active_names = tuple(remaining)
        self._show_labels(None if state.disabled else state.active)

    # -- activation ----------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self.adapter_state.active_names)

    @property
    def active_composition(self) -> Node | None:
        """What ``set_active`` chose; it runs unless :attr:`adapters_disabled` (which keeps it unchanged)."""
        return self.adapter_state.active

    @property
    def adapters_disabled(self) -> bool:
        """Whether ``disable_adapters()`` holds: the bare base model runs, whatever is active."""
        return self.adapter_state.disabled

    def set_active(self, *adapters: str | composition.Block | Sequence[str] | None) -> None:
        """Activate one adapter, several (applied as a Stack), or a composition block.

        ``set_active(None)`` deactivates all.
        """
        state = self.adapter_state
        before = set(state.active_names)
        if not adapters or (len(adapters) == 1 and adapters[0] is None):
            state.active, state.active_names = None, ()
            self._show_labels(None)
        else:
            node = composition.as_node(adapters[0] if len(adapters) == 1 else list(adapters))
            self.check_composition(node)
            state.active, state.active_names = node, tuple(composition.adapter_leaves(node))
            self._show_labels(node)
        for name in before - set(state.active_names):  # free what their layers keep for inference
            for adapter in layer_adapters_of(self, name).values() if name in self._records else ():
                drop_kept_values(adapter)

    set_adapter = set_active  # PEFT's spelling

    def check_composition(self, node: Node) -> None:
        composition.check_supported(node, {n: r.method for n, r in self._records.items()})
        composition_api.check_composition_extras(self, node)  # input-rewriting adapters, fusions (composition_api.py)
        composition.check_stack_heads(node, lambda n: bool(self._records[n].modules_to_save))
        self.check_heads(node)

    def check_heads(self, node: Node) -> None:
        """Refuse ``node`` when it averages or fuses classification heads that predict different labels,
        or runs heads with different numbers of labels side by side in one batch (parallel, batch_split)."""
        heads.check_heads(node, lambda n: composition_api.head_of(self, n),
                          lambda o: composition_api.labels_of_head(self, o))

    # -- classification labels ---------------------------------------------------------

    @property
    def base_labels(self) -> list[str] | None:
        """The label names of the base model's own head, as its config had them before an adapter's
        labels were shown there (None when the model is no classifier)."""
        if not heads.is_classifier(self.base_model):
            return None
        return self._labels_before if self._labels_before is not None else config_labels(self.base_model.config)

    def adapter_labels(self, name: str) -> list[str] | None:
        """The label names, in id order, that adapter ``name``'s own classification head predicts (from
        its labels.json, else the model config's, else ``LABEL_0``...); None when it keeps no such head.

        The model config's ``id2label`` / ``label2id`` always describe the head that runs: they follow
        set_active() (a stack predicts with its last adapter's head)."""
        record = self.adapter_record(name)
        base = self.base_labels
        return heads.adapter_labels(self.base_model, name, record.labels, base) if base is not None else None

    def _show_labels(self, node: Node | None) -> None:
        """Put the labels of the head that ``node`` runs into the model config (the base's when none)."""
        if not heads.is_classifier(self.base_model):
            return
        owner = composition_api.head_of(self, node)
        config = self.base_model.config
        if owner is None:
            if self._labels_before is not None:
                set_config_labels(config, self._labels_before)
                self._labels_before = None
            return
        labels = self.adapter_labels(owner)
        if self._labels_before is None:
            self._labels_before = config_labels(config)
        set_config_labels(config, labels)  # type: ignore[arg-type]

    def disable_adapters(self) -> "AdaptersDisabled":
        """Run the bare base model (merged adapters stay in the weights): inside ``with
        model.disable_adapters():`` (PEFT's ``disable_adapter()``), or from a bare call until
        ``model.enable_adapters()`` (transformers' spelling). It was a context manager only, so a bare call
        silently did nothing."""
        return AdaptersDisabled(self)

    def enable_adapters(self) -> None:
        """Run the active adapters again after a bare ``disable_adapters()`` call (transformers' spelling)."""
        self._set_disabled(False)

    def _set_disabled(self, disabled: bool) -> None:
        """Adapters off or on, and the labels the config shows with them."""
        self.adapter_state.disabled = disabled
        self._show_labels(None if disabled else self.adapter_state.active)

    # -- training ------------------------------------------------------------------

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Every parameter that belongs to adapter ``name`` (modules_to_save copies included)."""
        self.adapter_record(name)
        seen: set[int] = set()
        for module in self.base_model.modules():
            if isinstance(module, TunerLayer) and name in module.adapters:
                params = module.adapters[name].parameters()
            elif isinstance(module, ModulesToSave) and name in module.copies:
                params = module.copies[name].parameters()
            else:
                continue
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p
        if name in self._model_adapters:
            yield from self._model_adapters[name].parameters()
        if name in self._shared_states:
            yield from self._shared_states[name].parameters()

    def train_adapter(self, *adapters: str | composition.Block | Sequence[str], train_embeddings: bool = False) -> None:
        """Activate these adapters and make only their parameters trainable
        (all adapters of the active composition when none is named). Adapters inside a
        fuse() stay frozen and the fusion's weights train instead (AdapterFusion).

        Like PEFT, it does not switch train/eval mode: call ``model.train()``
        (transformers' Trainer does) so that dropout is on while training. New
        adapters start in the mode of the modules they wrap (docs/guide.md).

        ``train_embeddings=True`` (AdapterHub's option) is refused with how peftkit does it: the embedding
        belongs to an adapter, as a module it keeps a trained copy of.
        """
        if train_embeddings:
            raise AdapterError("train_embeddings=True: in peftkit an adapter trains the embedding itself; add the "
                               "adapter with modules_to_save=['embed_tokens'] (a trained copy saved with it, "
                               "e.g. 'lora[modules_to_save=[embed_tokens]]'), or put embed_tokens in a LoRA's "
                               "target_modules (a low-rank change of it)")
        if adapters:
            self.set_active(*adapters)
        active = self.adapter_state.active
        names = composition.trained_leaves(active)
        if not names and not composition.fuse_blocks(active):
            raise AdapterError("no adapter to train: name one, e.g. train_adapter('default')")
        for param in self.parameters():
            param.requires_grad_(False)
        for name in names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(True)
        composition_api.unfreeze_model_fusions(self, active)

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total counts the base model once."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def parameter_report(self) -> dict[str, Any]:
        trainable, total = self.trainable_parameters()
        per_adapter = {n: sum(p.numel() for p in self.adapter_parameters(n)) for n in self._records}
        return {"trainable": trainable, "total": total,
                "trainable_percent": 100.0 * trainable / max(total, 1), "adapters": per_adapter}

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100.0 * trainable / max(total, 1):.4f}")

    # -- merging ---------------------------------------------------------------------

    def tuner_layers(self) -> Iterator[tuple[str, TunerLayer]]:
        """(site name, TunerLayer) for every module of the base model that peftkit wraps."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, TunerLayer):
                yield name, module

    def merge_adapter(self, adapter_names: str | Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        """Fold adapters (one name, a list of names, or the active ones by default) into the base weights.

        ``safe_merge`` (PEFT's option): check every merged weight for NaN and inf, and undo the whole merge
        with a MergeError naming the layer if one is not finite."""
        names = self.names_to_merge(adapter_names)
        self._refuse_unmergeable(names)
        done: list[tuple[TunerLayer, str]] = []
        with torch.no_grad():
            try:
                for name in names:
                    for site, layer in self.tuner_layers():
                        if name in layer.adapters and name not in layer.merged:
                            if safe_merge:
                                merge_finite_or_refuse(site, name, layer)
                            else:
                                layer.merge(name)
                            done.append((layer, name))
            except BaseException:
                for layer, name in reversed(done):  # a refusal part way leaves no layer merged
                    layer.unmerge(name)
                raise

    def _refuse_unmergeable(self, names: Sequence[str]) -> None:
        """MergeError, before any weight changes, when one of ``names`` cannot be merged: its method cannot,
        a layer refuses it, another merged adapter's change would be read, or a weight is tied."""
        for name in names:
            record = self.adapter_record(name)
            if not record.method.can_merge:
                raise MergeError(f"adapter {name!r} uses method {record.method.name!r}, which cannot be "
                                 f"merged into base weights; keep it unmerged")
        owners: dict[int, list[str]] = {}  # weight -> the modules holding it (tied weights have several)
        for module_name, module in self.base_model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(module_name)
        order = {id(layer): list(layer.merged) for _, layer in self.tuner_layers()}  # merged so far, per layer
        for name in names:  # refusals before any weight changes
            carrying = {f"{site}.base_layer" for site, layer in self.tuner_layers() if name in layer.adapters}
            for site, layer in self.tuner_layers():
                layer.check_mergeable(name)
                before = order[id(layer)]
                if name in layer.adapters and name not in before:
                    if layer.adapters[name].merge_reads_weight and before:
                        raise MergeError(f"at {site}: {merge_order_message(name, before[0])}")
                    before.append(name)
                weight = getattr(layer.base_layer, "weight", None)
                shared = [o for o in owners.get(id(weight), []) if o != f"{site}.base_layer"]
                if name in layer.adapters and layer.adapters[name].merges_tied_weight:
                    shared = [o for o in shared if o not in carrying]  # its tied partners write the same
                if name in layer.adapters and shared:
                    raise MergeError(f"adapter {name!r} cannot be merged into {site}: its weight is tied to "
                                     f"{shared[0]} (tie_word_embeddings), so merging would change that module too; "
                                     f"keep the adapter unmerged, or load the model with tie_word_embeddings=False")

    def unmerge_adapter(self) -> None:
        with torch.no_grad():
            for _, layer in self.tuner_layers():
                for name in list(reversed(layer.merged)):
                    layer.unmerge(name)

    @property
    def merged_adapters(self) -> list[str]:
        return sorted({n for _, layer in self.tuner_layers() for n in layer.merged})

    def merge_and_unload(self, adapter_names: str | Sequence[str] | None = None, *, progressbar: bool = False,
                         safe_merge: bool = False) -> nn.Module:
        """Merge adapters into the base weights and return the bare base model. ``safe_merge`` as for
        :meth:`merge_adapter`; ``progressbar`` is accepted for PEFT's calls and shows nothing (a merge
        takes a fraction of a second a layer).

        The modules_to_save copies of the last of ``adapter_names`` that has them (as a
        stack of them would run) replace the originals, and a classifier's config gets
        that head's labels. The AdaptedModel must not be used afterwards.
        """
        names = self.names_to_merge(adapter_names, fold_average=True)
        self.merge_adapter(names, safe_merge=safe_merge)
        return self._unwrapped(composition.as_node(names) if names else None)  # heads as a stack's: the last one's

    def unload(self) -> nn.Module:
        """Remove every adapter without merging it and return the bare base model (PEFT's ``unload``):
        its original modules, task head and labels, as before it was adapted. Refused while an adapter
        is merged into the weights (``unmerge_adapter()`` first, or ``merge_and_unload()`` to keep it).
        The AdaptedModel must not be used afterwards."""
        merged = self.merged_adapters
        if merged:
            raise MergeError(f"adapter(s) {', '.join(map(repr, merged))} are merged into the base weights, which "
                             f"unload() would keep changed; unmerge_adapter() first, or merge_and_unload() to "
                             f"keep them in the weights")
        return self._unwrapped(None)

    def _unwrapped(self, node: Node | None) -> nn.Module:
        """The base model with every peftkit module and hook taken out, keeping the task head (and, in
        the config, the labels) that ``node`` predicts with: the base model's own for None."""
        self._show_labels(node)
        self._labels_before = None
        model = self.base_model
        for module_name, module in list(model.named_modules()):
            if isinstance(module, TunerLayer):
                _unwrap_layer(model, module_name, module)
            elif isinstance(module, ModulesToSave):
                owner = composition.head_leaf(node, module.copies.__contains__)
                chosen = module.copies[owner] if owner is not None else module.original_module
                _set_submodule(model, module_name, chosen)
        for adapter in self._model_adapters.values():
            adapter.removed(model)
        self._remove_input_hook()
        self._point_hooks.remove()
        self._records.clear()
        return model

    # -- forward -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _routing(self, adapter_names: Sequence[str] | None, batch_size: int | None) -> Iterator[None]:
        state = self.adapter_state
        if adapter_names is None:
            state.routing = None  # drops one kept for a recomputing backward (below)
            yield
            return
        entries = composition_api.routing_entries(self, adapter_names, batch_size)  # checked in composition_api.py
        state.routing = Routing.build(entries, self.device)
        try:
            yield
        finally:
            if not torch.is_grad_enabled():
                # With gradients, keep it until the next forward: activation checkpointing
                # recomputes layers during backward(), and they must route rows the same way.
                state.routing = None

    @property
    def device(self) -> torch.device:
        for param in self.base_model.parameters():
            return param.device
        return torch.device("cpu")

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        batch = _batch_size(args, kwargs)
        with self._routing(adapter_names, batch), composition_api.composition_inputs(self, args, kwargs, batch) as (args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        batch = _batch_size(args, kwargs)
        with self._routing(adapter_names, batch), composition_api.composition_inputs(self, args, kwargs, batch) as (args, kwargs):
            state = self.adapter_state
            if not state.disabled:
                for name in state.active_names:
                    if name in self._model_adapters:
                        args, kwargs = self._model_adapters[name].prepare_generate(self.base_model, args, kwargs)
            return self.base_model.generate(*args, **kwargs)

    def _ensure_input_hook(self) -> None:
        if self._hook_handle is None:
            self._hook_handle = self.base_model.register_forward_pre_hook(self._prepare_inputs, with_kwargs=True)

    def _remove_input_hook(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def _prepare_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.adapter_state
        if state.disabled or not self._model_adapters:
            return None
        for name in state.active_names:
            if name in self._model_adapters:
                args, kwargs = self._model_adapters[name].prepare(module, args, kwargs)
        return args, kwargs

    # -- files -------------------------------------------------------------------------

    def save_adapter(self, path: str, adapter_name: str = "default", *, format: str = "peftkit",
                     **card: Any) -> None:
        """Save one adapter as a folder (PEFT's format for methods PEFT has; ``format="adapters"``:
        AdapterHub's, see docs/format.md)."""
        from .serialization import save_adapter

        save_adapter(self, adapter_name, path, format=format, **card)

    def save_pretrained(self, path: str, adapter_names: str | Sequence[str] | None = None, **card: Any) -> None:
        """PEFT's layout: the adapter named "default" (or the first) at ``path``,
        every other one in ``path/<name>/``."""
        from .serialization import save_pretrained

        save_pretrained(self, path, adapter_names, **card)

    def load_adapter(self, path: str, adapter_name: str = "default", *, activate: bool = True,
                     trainable: bool = False, hotswap: bool = False, is_trainable: bool | None = None,
                     load_as: str | None = None, set_active: bool | None = None) -> AdapterRecord:
        """Load an adapter folder under ``adapter_name``. On any error the model
        is left exactly as it was. ``is_trainable`` is PEFT's name for ``trainable``; ``load_as`` and
        ``set_active`` are AdapterHub's names for ``adapter_name`` and ``activate``.

        ``hotswap=True``: ``adapter_name`` exists already and the folder's weights replace its
        weights in place (:meth:`hotswap_adapter`); ``activate`` then activates it only if it is
        not active yet, so that a compiled model sees no change but the weights.
        """
        trainable = peft_trainable(trainable, is_trainable)
        if load_as is not None:
            if adapter_name not in ("default", load_as):
                raise AdapterError(f"load_adapter() got adapter_name={adapter_name!r} and load_as={load_as!r}; pass "
                                   f"the name once (load_as is AdapterHub's name for adapter_name)")
            adapter_name = load_as
        if set_active is not None:
            activate = bool(set_active)  # AdapterHub's name; its default (False) is not peftkit's (activate=True)
        if hotswap:
            record = self.hotswap_adapter(path, adapter_name)
        else:
            from .serialization import load_adapter

            record = load_adapter(self, path, adapter_name)
        if activate and not (hotswap and adapter_name in self.adapter_state.active_names):
            self.set_active(adapter_name)
        if trainable:
            for param in self.adapter_parameters(adapter_name):
                param.requires_grad_(True)
        return record

    def hotswap_adapter(self, path: str, adapter_name: str = "default") -> AdapterRecord:
        """Replace the weights of loaded adapter ``adapter_name`` in place with those of the adapter
        saved at ``path`` (PEFT's ``hotswap_adapter``): the same parameter objects keep their
        places, so a ``torch.compile``d model does not recompile and an optimizer keeps its
        parameters. The folder must hold an adapter of the same method on the same sites; a LoRA
        of lower rank (zero-padded) or another alpha (folded into B) fits too. The adapter keeps
        its name, activation and config (that of its slot, in which save_adapter() writes the new
        weights). Anything that does not fit is refused, naming the first difference, and the
        model is left exactly as it was."""
        from .hotswap import hotswap_adapter

        return hotswap_adapter(self, path, adapter_name)

    def prepare_for_hotswap(self, target_rank: int, adapter_names: str | Sequence[str] | None = None) -> None:
        """Pad low-rank adapters (LoRA; all of them, or ``adapter_names``) with zeros to rank
        ``target_rank``, so that adapters of any rank up to it can be hot-swapped in. The outputs
        do not change. Call it after loading the first adapter and before compiling the model or
        making an optimizer: the padded adapters are new parameters."""
        from .hotswap import prepare_for_hotswap

        prepare_for_hotswap(self, target_rank, adapter_names)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str, adapter_name: str = "default",
                        trainable: bool = False, *, is_trainable: bool | None = None) -> "AdaptedModel":
        """``model`` with the adapter saved at ``path`` loaded and active (PEFT's ``PeftModel.from_pretrained``;
        ``is_trainable`` is PEFT's name for ``trainable``)."""
        trainable = peft_trainable(trainable, is_trainable)
        adapted = model if isinstance(model, AdaptedModel) else cls(model)
        adapted.load_adapter(path, adapter_name, trainable=trainable)
        if not trainable:
            adapted.eval()
        return adapted

    def extra_repr(self) -> str:
        return f"adapters={list(self._records)}, active={self.adapter_state.active}"


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("pixel_values")):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _match_device(adapter: nn.Module, base: nn.Module) -> None:
    ref = next((p for p in base.parameters()), None)
    if ref is not None:
        adapter.to(device=ref.device)
        for param in adapter.parameters():
            if param.is_floating_point() and ref.is_floating_point() and param.dtype != ref.dtype \
                    and ref.dtype in (torch.float32, torch.float64):
                param.data = param.data.to(ref.dtype)


def _unwrap_layer(model: nn.Module, name: str, layer: TunerLayer) -> None:
    """Put the original module back, dropping the input-capturing hooks of its adapters."""
    layer.remove_captures()
    _set_submodule(model, name, layer.base_layer)


def _capture_input(model: nn.Module, source: str, layer: TunerLayer) -> None:
    """Keep ``source``'s first input on ``layer`` for every forward (adapters with ``input_from``).

    The hook goes on the original module, so wrapping or unwrapping ``source`` itself
    (an adapter on the FFN block) keeps it.
    """
    module = model.get_submodule(source)
    layer.add_capture(source, module.base_layer if isinstance(module, TunerLayer) else module)


class AdaptersDisabled:
    """What ``AdaptedModel.disable_adapters()`` returns: the adapters are off from the call on; leaving a
    ``with`` block over it turns them back to what they were before the call."""

    def __init__(self, model: AdaptedModel) -> None:
        self.model = model
        self.previous = model.adapter_state.disabled
        model._set_disabled(True)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.model._set_disabled(self.previous)
