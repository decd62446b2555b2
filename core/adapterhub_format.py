"""AdapterHub's folder format (the ``adapters`` library, formerly adapter-transformers), both ways.

A folder ``adapters`` saves holds ``adapter_config.json`` with the method's options under
``"config"`` (plus ``name``, ``model_type``, ``model_class``, ``hidden_size``, ``version``) and
the weights in ``adapter.safetensors`` or ``pytorch_adapter.bin``, keyed by the module the
adapter hangs on: ``<module>.adapters.<name>.adapter_down.0.weight`` (bottleneck) or
``<module>.loras.<name>.lora_A`` (LoRA).

The core knows the folder and the key layout; each method translates its own options and
tensor names through an :class:`AdapterHubFormat` set as ``Method.adapterhub`` (plugins do
this; see docs/plugins.md). The load and save flows are in :mod:`.serialization`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import AdapterLoadError, ConfigError, DAMAGED_FILE_FIX, PeftkitError

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_adapter.bin"
#: The ``version`` written into saved configs: the release the format was checked against.
WRITTEN_VERSION = "adapters.1.3.0"
#: Model families whose module names peftkit has checked against ``adapters`` for saving.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "llama", "gpt2")


class AdapterHubFormat:
    """How one method reads and writes AdapterHub's format (an instance is ``Method.adapterhub``).

    Tensors of the method's layer adapter at site ``S`` are saved by ``adapters`` under
    ``<M>.<module_dict>.<name>.<rest>``, where ``M`` is ``S`` itself (``on_site``) or its parent
    module. The hooks raise ConfigError naming an option they cannot translate; the core adds
    the folder's path.
    """

    #: The ModuleDict holding the method's modules in ``adapters``' keys ("adapters", "loras").
    module_dict: str = "adapters"
    #: Whether ``adapters`` hangs the tensors on the adapted layer itself (LoRA: True) or on
    #: the module around it (bottleneck adapters on BERT's ``output``: False).
    on_site: bool = False
    #: Whether an AdapterHub fusion (``adapter_fusion_config.json``) may have this method's adapters as members:
    #: ``adapters``' fusion attends over what the adapter adds at its site as peftkit computes it (sequential
    #: bottleneck adapters); the member's own options are checked when the fusion loads.
    fusion_member: bool = False

    def claims(self, options: Mapping[str, Any]) -> bool:
        """Whether an AdapterHub config's options (its ``"config"`` dict) describe this method."""
        return False

    def parts(self, options: Mapping[str, Any]) -> list[tuple[str, "AdapterHubFormat", Mapping[str, Any]]]:
        """For a method made of other methods' parts (AdapterHub's ``ConfigUnion``): per part, the prefix of its
        tensors' keys at a site (its method's name: ``lora`` in ``lora.lora_A.weight``), its format and its
        options; the site tensors are translated part by part. ``[]`` (the default): a method of its own."""
        return []

    def module_for(self, site: str, model_type: str | None) -> str:
        """The module path ``adapters`` keys the tensors of the adapter at ``site`` under: the site
        (``on_site``) or its parent by default; a method whose module differs per model family
        (bottleneck adapters on a decoder layer) overrides this."""
        return site if self.on_site else site.rpartition(".")[0]

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        """This method's config values for the options."""
        raise NotImplementedError

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        """AdapterHub's full options dict for ``config``."""
        raise NotImplementedError

    def shared_key(self, tensor_name: str, adapter: str) -> str | None:
        """``adapters``' key, below the model's body (``bert.`` in a task model), of the method's
        adapter-wide tensor ``tensor_name`` (``Method.create_shared_state``), for adapter ``adapter``:
        Compacter's ``shared_parameters.<adapter>.phm_rule``. None: the format has no place for it
        (saving refuses it)."""
        return None

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        """Our tensor key (relative to the site) for AdapterHub's ``rest``; None: a duplicate to skip."""
        return rest

    def tensor_in(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None, *,
                  module: str = "") -> Any:
        """Our tensor for AdapterHub's ``tensor`` of ``module`` (the module path ``adapters`` keyed it under),
        which goes to our ``key`` (after :meth:`key_in`): the same by default; a layout that differs (GPT-2's
        fused LoRA) is rebuilt here, exactly."""
        return tensor

    def tensor_out(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None, *,
                   module: str = "") -> Any:
        """AdapterHub's tensor for our tensor ``key`` of ``module`` (the inverse of :meth:`tensor_in`); raises
        ConfigError naming what the format cannot hold."""
        return tensor

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        """AdapterHub's keys (relative to the adapter) for our tensor ``key``; several: saved as copies."""
        return [key]

    def model_tensors_in(self, tensors: Mapping[str, Any], name: str,
                         options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """For a method with a model-level part (``Method.create_model_adapter``): that part's tensors, keyed
        as its ``tensors()`` keys them, taken from the folder's ``tensors`` (all of them, keyed as
        ``adapters`` saved them) of adapter ``name``, and the file keys used up (copies included), which
        the per-site translation then leaves aside. The default takes nothing."""
        return {}, set()

    def model_tensors_out(self, model: Any, tensors: Mapping[str, Any], name: str,
                          options: Mapping[str, Any]) -> dict[str, Any] | None:
        """The file tensors, keyed as ``adapters`` saves them on ``model`` (the base model, body prefix
        included), of the model-level part's ``tensors`` (its ``tensors()``). None: the format has no place
        for them (saving refuses the adapter). Raises ConfigError naming what does not fit."""
        return None

    @staticmethod
    def refuse_changed(options: Mapping[str, Any], required: Mapping[str, Any], kind: str) -> None:
        """ConfigError for the first option in ``required`` present at another value."""
        for key, value in required.items():
            if key in options and options[key] != value:
                raise ConfigError(f"AdapterHub {kind} option {key}={options[key]!r} is not supported by peftkit "
                                  f"(only {key}={value!r}); see `peftkit docs format#adapterhub-format`")


def is_adapterhub_config(data: Mapping[str, Any]) -> bool:
    """Whether an ``adapter_config.json``'s content is AdapterHub's (not PEFT's or peftkit's)."""
    return (isinstance(data.get("config"), dict) and "peft_type" not in data and "peftkit" not in data
            and ("version" in data or "model_class" in data))


# -- load ------------------------------------------------------------------------------


def claiming_method(methods: Iterable[Any], data: Mapping[str, Any], where: str) -> tuple[Any, dict[str, Any]]:
    """``(method, config values)`` of the installed method that reads this AdapterHub config."""
    options = data["config"]
    methods = list(methods)
    found = [m for m in methods if m.adapterhub is not None and m.adapterhub.claims(options)]
    if not found:
        readers = ", ".join(sorted(m.name for m in methods if m.adapterhub is not None)) or "none"
        raise AdapterLoadError(f"{where}: no installed peftkit method reads this AdapterHub adapter "
                               f"(architecture={options.get('architecture')!r}; methods that read AdapterHub "
                               f"folders: {readers}); see `peftkit docs format#adapterhub-format`")
    # A subclass inherits its parent's translation (a LoRA variant would claim LoRA's folders):
    # the class that declares one itself reads them.
    own = [m for m in found if "adapterhub" in type(m).__dict__]
    method = (own or found)[0]
    try:
        return method, method.adapterhub.config_values(options, data.get("model_type"))
    except ConfigError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None


def read_adapterhub_weights(folder: Path, safe_name: str = SAFE_WEIGHTS_NAME,
                            pickle_name: str = PICKLE_WEIGHTS_NAME) -> dict[str, Any]:
    """The tensors of an AdapterHub folder: ``adapter.safetensors``, else ``pytorch_adapter.bin`` read with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers (the head's
    files with the names given)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    safe, pickled = folder / safe_name, folder / pickle_name
    try:
        if safe.is_file():
            return dict(load_bytes(safe.read_bytes()))
        if pickled.is_file():
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise AdapterLoadError(f"{pickled} does not hold a flat dict of tensors")
            return dict(state)
    except (SafetensorError, RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise AdapterLoadError(f"{folder}: the AdapterHub weights file is damaged or holds more than tensors "
                               f"({type(exc).__name__}: {first}); {DAMAGED_FILE_FIX}") from None
    raise AdapterLoadError(f"{folder} has an AdapterHub {CONFIG_NAME} but neither {safe_name} nor "
                           f"{pickle_name}; the folder is incomplete")


def same_module(ours: str, theirs: str) -> bool:
    """Module paths naming the same module up to a wrapper's prefix (``bert.`` and the like)."""
    return ours == theirs or ours.endswith("." + theirs) or theirs.endswith("." + ours)


def adapterhub_tensors(fmt: AdapterHubFormat, tensors: Mapping[str, Any], sites: list[str],
                       data: Mapping[str, Any], key_prefix: str, where: str,
                       shared: Mapping[str, str] | None = None, part: str = "") -> dict[str, Any]:
    """AdapterHub's tensors keyed as peftkit's (``<key_prefix><site>.<key>``) for the new adapter's ``sites``,
    and its adapter-wide tensors keyed by ``shared`` (our tensor name -> our file key; see
    :meth:`AdapterHubFormat.shared_key`); ``part`` goes before our key (``"lora."`` for a union's part).

    A tensor whose module has no site keeps its key, so the weights check names it as unexpected. A union's
    format (:meth:`AdapterHubFormat.parts`) translates the tensors of each part with that part's format."""
    parts = fmt.parts(data["config"])
    if parts:
        return _part_tensors(parts, tensors, sites, data, key_prefix, where, shared)
    marker = f".{fmt.module_dict}.{data.get('name')}."
    modules = {site: fmt.module_for(site, data.get("model_type")) for site in sites}
    theirs_shared = {fmt.shared_key(name, str(data.get("name"))): ours for name, ours in (shared or {}).items()}
    theirs_shared.pop(None, None)
    out: dict[str, Any] = {}
    for key, tensor in tensors.items():
        ours_shared = next((ours for theirs, ours in theirs_shared.items()
                            if key == theirs or key.endswith("." + str(theirs))), None)
        if ours_shared is not None:
            out[ours_shared] = tensor
            continue
        module, found, rest = key.partition(marker)
        if not found:
            raise AdapterLoadError(f"{where}: weight {key!r} is not one of adapter {data.get('name')!r} named in "
                                   f"{CONFIG_NAME}; the folder mixes adapters")
        ours = fmt.key_in(rest, data["config"])
        if ours is None:
            continue
        try:
            tensor = fmt.tensor_in(ours, tensor, data["config"], data.get("model_type"), module=module)
        except ConfigError as exc:
            raise AdapterLoadError(f"{where}: weight {key!r}: {exc}") from None
        matches = [site for site, m in modules.items() if same_module(m, module)]
        if len(matches) > 1:
            raise AdapterLoadError(f"{where}: weight {key!r} fits several peftkit sites ({', '.join(matches)})")
        out[f"{key_prefix}{matches[0]}.{part}{ours}" if matches else key] = tensor
    missing = [theirs for theirs, ours in theirs_shared.items() if ours not in out]
    if missing:
        raise AdapterLoadError(f"{where}: the folder lacks the adapter-wide tensor {missing[0]!r}; adapters 1.3 "
                               f"leaves such tensors out when it saves from a bare model (BertModel): save the "
                               f"adapter there from a task model or an ...AdapterModel")
    return out


def _part_tensors(parts: list[tuple[str, AdapterHubFormat, Mapping[str, Any]]], tensors: Mapping[str, Any],
                  sites: list[str], data: Mapping[str, Any], key_prefix: str, where: str,
                  shared: Mapping[str, str] | None) -> dict[str, Any]:
    """:func:`adapterhub_tensors` for a union: each part's tensors (found by its ``module_dict``) with its format."""
    if shared:
        raise AdapterLoadError(f"{where}: a union of AdapterHub adapters with adapter-wide tensors "
                               f"({', '.join(shared)}) is not supported by peftkit")
    dicts = [fmt.module_dict for _, fmt, _ in parts]
    if len(set(dicts)) < len(dicts):
        raise AdapterLoadError(f"{where}: two parts of this union keep their tensors under the same name "
                               f"({', '.join(dicts)}); peftkit cannot tell them apart")
    out: dict[str, Any] = {}
    left = dict(tensors)
    for prefix, fmt, options in parts:
        marker = f".{fmt.module_dict}.{data.get('name')}."
        own = {key: left.pop(key) for key in [k for k in left if marker in k]}
        out.update(adapterhub_tensors(fmt, own, sites, {**data, "config": options}, key_prefix, where,
                                      part=f"{prefix}."))
    if left:
        raise AdapterLoadError(f"{where}: weight {next(iter(left))!r} belongs to no part of the union in "
                               f"{CONFIG_NAME}")
    return out


# -- save ------------------------------------------------------------------------------


def adapterhub_config_data(method: Any, config: Any, name: str, model_type: str | None, model_class: str,
                           hidden_size: int | None, model_name: str | None) -> dict[str, Any]:
    """AdapterHub's ``adapter_config.json`` content, or PeftkitError naming what the format cannot hold."""
    def refuse(what: str) -> PeftkitError:
        return PeftkitError(f"cannot save adapter {name!r} in AdapterHub's format: {what}; save it in peftkit's "
                            f"format instead (format='peftkit')")

    if method.adapterhub is None:
        raise refuse(f"method {method.name!r} has no AdapterHub translation")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise refuse(f"model type {model_type!r} is not one peftkit has checked against adapters "
                     f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        options = method.adapterhub.options(config, model_type)
    except ConfigError as exc:
        raise refuse(str(exc)) from None
    return {"config": options, "hidden_size": hidden_size, "model_class": model_class,
            "model_name": model_name or "", "model_type": model_type, "name": name, "version": WRITTEN_VERSION}


def adapterhub_file_tensors(fmt: AdapterHubFormat, site_tensors: Mapping[str, Mapping[str, Any]], name: str,
                            options: Mapping[str, Any], model_type: str | None = None,
                            shared: Mapping[str, Any] | None = None, body_prefix: str = "") -> dict[str, Any]:
    """Tensors keyed as ``adapters`` saves them, from ``{site: {our key: tensor}}`` and the adapter-wide
    ``shared`` tensors (by their names; keyed below ``body_prefix``, the model's body in a task model).
    A union's site tensors (``<part>.<key>``) are written part by part with each part's format."""
    parts = fmt.parts(options)
    if parts:
        if shared:
            raise PeftkitError(f"cannot save adapter {name!r} in AdapterHub's format: a union with adapter-wide "
                               f"tensors ({', '.join(shared)}) has no place there; save it in peftkit's format")
        out_parts: dict[str, Any] = {}
        for prefix, part_fmt, part_options in parts:
            own = {site: {key[len(prefix) + 1:]: t for key, t in tensors.items() if key.startswith(prefix + ".")}
                   for site, tensors in site_tensors.items()}
            out_parts.update(adapterhub_file_tensors(part_fmt, {s: t for s, t in own.items() if t}, name,
                                                     part_options, model_type))
        return out_parts
    out: dict[str, Any] = {}
    for tensor_name, tensor in (shared or {}).items():
        theirs = fmt.shared_key(tensor_name, name)
        if theirs is None:
            raise PeftkitError(f"cannot save adapter {name!r} in AdapterHub's format: its adapter-wide tensor "
                               f"{tensor_name!r} has no place there; save it in peftkit's format instead")
        out[body_prefix + theirs] = tensor
    for site, tensors in site_tensors.items():
        module = fmt.module_for(site, model_type)
        for key, tensor in tensors.items():
            try:
                tensor = fmt.tensor_out(key, tensor, options, model_type, module=module)
            except ConfigError as exc:
                raise PeftkitError(f"cannot save adapter {name!r} in AdapterHub's format: at {site}: {exc}; save "
                                   f"it in peftkit's format instead (format='peftkit')") from None
            for i, theirs in enumerate(fmt.keys_out(key, options)):
                out[f"{module}.{fmt.module_dict}.{name}.{theirs}"] = tensor if i == 0 else tensor.clone()
    return out


def config_json(data: Mapping[str, Any]) -> str:
    """The text of an AdapterHub ``adapter_config.json`` (sorted keys, as ``adapters`` writes it)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
