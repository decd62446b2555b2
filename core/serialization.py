"""Saving and loading adapter folders.

A folder holds ``adapter_config.json``, ``adapter_model.safetensors`` and a
``README.md`` card. For methods that Hugging Face PEFT also has, keys and
config are PEFT's, so each library loads what the other saves. peftkit's own
record lives where PEFT does not read it (see :mod:`.own_metadata`). Weights
are read with safetensors only; pickle files are refused.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .adapter_names import adapter_name_list
from .adapterhub_format import (adapterhub_config_data, adapterhub_file_tensors, adapterhub_tensors,
                                claiming_method, config_json, is_adapterhub_config, read_adapterhub_weights)
from .adapterhub_format import CONFIG_NAME as ADAPTERHUB_CONFIG_NAME
from .adapterhub_format import SAFE_WEIGHTS_NAME as ADAPTERHUB_WEIGHTS_NAME
from .card import card_metadata, check_card_fields, render_card
from .errors import AdapterLoadError, ConfigError, DAMAGED_FILE_FIX, PeftkitError, PluginError
from .fileio import atomic_folder, write_bytes_atomic, write_text_atomic
from .adapterhub_heads import HEAD_CONFIG_NAME, SAFE_HEAD_WEIGHTS_NAME, head_files, load_head, with_head_config
from .heads import fit_heads
from .labels import LABELS_FILE, is_default, labels_text, read_labels
from .layer import ModulesToSave, TunerLayer
from .own_metadata import OWN_METADATA_NAME, split_own_metadata, with_own_metadata
from .peft_embeddings import embedding_base_tensors, load_embedding_base_tensors, take_embedding_base_tensors
from .peft_format import file_in_peft_format, method_reading
from .plugins import get_registry, major_version, unknown_method_message

if TYPE_CHECKING:  # pragma: no cover
    from .adapted_protocol import AdaptedModelProtocol

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin",
                "adapter_model.ckpt")
FORMAT_VERSION = 1
KEY_PREFIX = "base_model.model."

#: PEFT's task_type by the transformers class-name suffix of the base model.
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForQuestionAnswering", "QUESTION_ANS"), ("LMHeadModel", "CAUSAL_LM"),  # GPT2LMHeadModel
               ("Model", "FEATURE_EXTRACTION"))
#: PEFT's task types whose model class, when it loads a folder, adds these head modules to modules_to_save and
#: then expects their weights in the folder (PeftModelForSequenceClassification and the like).
_TASKS_ADDING_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                       "QUESTION_ANS": ("qa_outputs",)}


# -- what is saved ------------------------------------------------------------------


def adapter_tensors(model: "AdaptedModelProtocol", name: str, live: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name``, keyed as in its weights file: what peftkit's format saves (each
    layer adapter's ``file_tensors()``) or, ``live``, the modules' own tensors (``tensors()``), which a
    file's tensors are copied into once :func:`live_layout` has rebuilt them."""
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.base_model.named_modules():
        if isinstance(module, TunerLayer) and name in module.adapters:
            adapter = module.adapters[name]
            for key, tensor in (adapter.tensors() if live else adapter.file_tensors()).items():
                out[site_key(module_name, key)] = tensor
    out.update(head_tensors(model, name))
    out.update(shared_tensors(model, name))
    model_adapter = model.model_adapter(name)
    if model_adapter is not None:
        out.update(model_adapter.tensors())
    return out


def site_key(site: str, key: str) -> str:
    """The file key of a layer adapter's tensor ``key`` (relative to its site) at ``site``."""
    return f"{KEY_PREFIX}{site}.{key}"


def shared_tensors(model: "AdaptedModelProtocol", name: str) -> dict[str, torch.Tensor]:
    """The live adapter-wide tensors of adapter ``name`` that its method saves, keyed as in its file
    (``Method.shared_state_file_keys``); once per adapter however many sites share them."""
    shared = model.shared_state(name)
    if shared is None:
        return {}
    record = model.adapter_record(name)
    tensors = shared.tensors()
    keys = record.method.shared_state_file_keys(record.config, list(tensors))
    return {key: tensors[tensor_name] for tensor_name, key in keys.items()}


def head_key_prefix(record: Any) -> str:
    """The file-key prefix of an adapter's modules_to_save copies. PEFT wraps a model one level less for
    prompt learning (soft prompts, prefixes): their copies are keyed base_model.<module>, not
    base_model.model.<module>."""
    return "base_model." if record.model_adapter else KEY_PREFIX


def head_tensors(model: "AdaptedModelProtocol", name: str) -> dict[str, torch.Tensor]:
    """The live tensors of adapter ``name``'s modules_to_save copies (task heads), keyed as in its file."""
    saved_prefix = head_key_prefix(model.adapter_record(name))
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.base_model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.copies:
            for key, tensor in module.copies[name].state_dict(keep_vars=True).items():
                out[f"{saved_prefix}{module_name}.{key}"] = tensor
    return out


def base_model_info(model: "AdaptedModelProtocol") -> dict[str, Any]:
    config = getattr(model.base_model, "config", None)
    info: dict[str, Any] = {"class": type(model.base_model).__name__}
    if config is not None:
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "d_model", "n_embd"):
            value = getattr(config, key, None)
            if value is not None:
                info[key] = value
    return info


def base_model_id(model: "AdaptedModelProtocol") -> str | None:
    config = getattr(model.base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def task_type_of(model: "AdaptedModelProtocol") -> str | None:
    cls = type(model.base_model).__name__
    for suffix, task in _TASK_TYPES:
        if cls.endswith(suffix):
            return task
    return None


def _file_task_type(model: "AdaptedModelProtocol", name: str) -> str | None:
    """The task_type written for adapter ``name``: the model's (:func:`task_type_of`), or None when PEFT's class for
    that task would add a head module the adapter does not save to modules_to_save and then fail to find its
    weights in the folder (an adapter loaded from a PEFT folder saved without task_type or head: PEFT then
    loads it as the plain PeftModel it was)."""
    task = task_type_of(model)
    heads = _TASKS_ADDING_HEADS.get(task or "", ())
    saved = model.adapter_record(name).modules_to_save
    for module_name, _ in model.base_model.named_modules():
        leaf = module_name.rpartition(".")[2]
        if leaf in heads and not any(module_name == s or module_name.startswith(s + ".") for s in saved):
            return None
    return task


def config_file_data(model: "AdaptedModelProtocol", name: str) -> dict[str, Any]:
    record = model.adapter_record(name)
    method = record.method
    data = method.config_to_file(record.config)
    if "fan_in_fan_out" in data:  # PEFT's flag for layers that store their weight (in, out): GPT-2's Conv1D
        data["fan_in_fan_out"] = _stores_weights_in_out(model, name)
    data.setdefault("base_model_name_or_path", base_model_id(model))
    data.setdefault("task_type", _file_task_type(model, name))
    data.setdefault("inference_mode", True)
    data["peftkit"] = {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "plugin": method.distribution,
        "plugin_version": method.distribution_version,
        "peftkit_version": peftkit_version(),
        "base_model": base_model_info(model),
        "config": record.config.to_dict(),
    }
    return data


def _stores_weights_in_out(model: "AdaptedModelProtocol", name: str) -> bool:
    from .base_layers import is_conv1d

    return any(is_conv1d(module.base_layer) for module in model.base_model.modules()
               if isinstance(module, TunerLayer) and name in module.adapters)


def peftkit_version() -> str | None:
    """The installed peftkit's version, recorded in the files it writes (None from a bare source tree)."""
    try:
        return metadata.version("peftkit")
    except metadata.PackageNotFoundError:
        return None


# -- save ------------------------------------------------------------------------------


def write_adapter(model: "AdaptedModelProtocol", name: str, folder: Path, card: dict[str, Any]) -> None:
    """Write adapter ``name``'s config, weights and model card into ``folder`` (which exists)."""
    from safetensors.torch import save

    record = model.adapter_record(name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(model, name).items()}
    # A method in PEFT's format keeps PEFT's layout for every config (the record in peftkit.json, the base
    # embeddings); whether PEFT loads this folder is what its peft_type says (the card's library_name).
    peft_layout = record.method.peft_type is not None
    data, own = split_own_metadata(config_file_data(model, name), peft_layout)
    # PEFT's default save_embedding_layers="auto": the base embeddings go along when they are targeted
    # (unless the method says its folders never carry them: Method.saves_base_embeddings).
    base = embedding_base_tensors(model, data.get("target_modules"), KEY_PREFIX) \
        if peft_layout and record.method.saves_base_embeddings else {}
    meta = card_metadata(method=record.method.name, base_model=data.get("base_model_name_or_path"),
                         peft_format=file_in_peft_format(data), task=card.get("task"),
                         dataset=card.get("dataset"), metrics=card.get("metrics"), tags=card.get("tags"),
                         license=card.get("license"), language=card.get("language"),
                         name=card.get("repo_id") or name)
    text = render_card(meta, method=record.method.name, adapter_name=name, repo_id=card.get("repo_id"),
                       description=card.get("description"),
                       parameters=sum(t.numel() for t in tensors.values()), metrics=card.get("metrics"))
    # Weights first, config last: a folder with a config is a complete folder.
    base = {k: v.detach().to("cpu").contiguous() for k, v in base.items()}
    write_bytes_atomic(folder / WEIGHTS_NAME, save({**tensors, **base}, metadata={"format": "pt"}))
    write_text_atomic(folder / CARD_NAME, text)
    if own is not None:
        write_text_atomic(folder / OWN_METADATA_NAME, json.dumps(own, indent=2, sort_keys=True) + "\n")
    else:
        (folder / OWN_METADATA_NAME).unlink(missing_ok=True)  # a record from an earlier save would be stale
    labels = model.adapter_labels(name)
    if labels is not None and not is_default(labels):
        write_text_atomic(folder / LABELS_FILE, labels_text(labels))
    write_text_atomic(folder / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")


#: Folder formats save_adapter writes: peftkit's (PEFT's for the methods PEFT has) and AdapterHub's.
SAVE_FORMATS = ("peftkit", "adapters")


def write_adapterhub_adapter(model: "AdaptedModelProtocol", name: str, folder: Path) -> None:
    """Write adapter ``name`` as AdapterHub's ``adapters`` library saves it with ``use_safetensors=True``
    (see :mod:`.adapterhub_format`): ``adapter_config.json`` and ``adapter.safetensors``. No pickle file:
    peftkit publishes none (``adapters`` reads the folder with ``load_adapter(path, use_safetensors=True)``)."""
    from safetensors.torch import save

    record = model.adapter_record(name)
    head = head_files(model.base_model, name, model.adapter_labels(name), base_model_id(model))
    config = getattr(model.base_model, "config", None)
    data = adapterhub_config_data(record.method, record.config, name, getattr(config, "model_type", None),
                                  type(model.base_model).__name__, getattr(config, "hidden_size", None),
                                  base_model_id(model))
    site_tensors = {site: {k: v.detach().to("cpu").contiguous() for k, v in layer.adapters[name].tensors().items()}
                    for site, layer in _layers_with(model, name)}
    shared_state = model.shared_state(name)
    shared = {key: tensor.detach().to("cpu").contiguous()
              for key, tensor in (shared_state.tensors().items() if shared_state is not None else ())}
    tensors = adapterhub_file_tensors(record.method.adapterhub, site_tensors, name, data["config"], data["model_type"],
                                      shared=shared, body_prefix=_body_prefix(model.base_model))
    tensors.update(_adapterhub_model_tensors(model, name, data["config"]))
    if head is not None:
        head_data, head_file = head
        write_bytes_atomic(folder / SAFE_HEAD_WEIGHTS_NAME, save(head_file, metadata={"format": "pt"}))
        write_text_atomic(folder / HEAD_CONFIG_NAME, config_json(head_data))
    else:  # a head from an earlier save into this folder would load with this adapter
        (folder / HEAD_CONFIG_NAME).unlink(missing_ok=True)
        (folder / SAFE_HEAD_WEIGHTS_NAME).unlink(missing_ok=True)
    write_bytes_atomic(folder / ADAPTERHUB_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    write_text_atomic(folder / ADAPTERHUB_CONFIG_NAME, config_json(data))


def _adapterhub_model_tensors(model: "AdaptedModelProtocol", name: str, options: dict[str, Any]) -> dict[str,
                              torch.Tensor]:
    """The file tensors of adapter ``name``'s model-level part (prefix tuning's prefix), or PeftkitError when
    the format has no place for them."""
    record = model.adapter_record(name)
    model_adapter = model.model_adapter(name)
    if model_adapter is None:
        return {}
    own = {k: v.detach().to("cpu").contiguous() for k, v in model_adapter.tensors().items()}
    try:
        out = record.method.adapterhub.model_tensors_out(model.base_model, own, name, options)
    except ConfigError as exc:
        out, why = None, str(exc)
    else:
        why = "its model-level parts have no place in that format"
    if out is None:
        raise PeftkitError(f"cannot save adapter {name!r} in AdapterHub's format: {why}; save it in peftkit's "
                           f"format instead")
    return out


def _body_prefix(model: torch.nn.Module) -> str:
    """``"bert."`` for a task model whose body is ``model.bert`` (transformers' ``base_model``), else ``""``."""
    body = getattr(model, "base_model", model)
    return next((f"{n}." for n, m in model.named_children() if m is body), "")


def _layers_with(model: "AdaptedModelProtocol", name: str) -> list[tuple[str, TunerLayer]]:
    return [(site, module) for site, module in model.base_model.named_modules()
            if isinstance(module, TunerLayer) and name in module.adapters]


def save_adapter(model: "AdaptedModelProtocol", name: str, path: str | os.PathLike, format: str = "peftkit",
                 **card: Any) -> None:
    """Save one adapter. A new folder appears whole or not at all; in an
    existing folder each file is replaced atomically. ``format="adapters"``
    writes AdapterHub's format instead of peftkit's."""
    path = Path(path)
    model.adapter_record(name)
    check_card_fields(card, "save_adapter()")
    if format not in SAVE_FORMATS:
        raise PeftkitError(f"unknown adapter folder format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if path.exists() and not path.is_dir():
        raise PeftkitError(f"cannot save adapter to {str(path)!r}: it is a file, not a folder")

    def write(folder: Path) -> None:
        if format == "adapters":
            write_adapterhub_adapter(model, name, folder)
        else:
            write_adapter(model, name, folder, card)

    if path.exists():
        write(path)
        return
    with atomic_folder(path) as tmp:
        write(tmp)


def save_pretrained(model: "AdaptedModelProtocol", path: str | os.PathLike,
                    adapter_names: str | Sequence[str] | None = None, **card: Any) -> None:
    check_card_fields(card, "save_pretrained()")
    names = adapter_name_list(adapter_names)
    names = list(model.adapters) if names is None else names
    if not names:
        raise PeftkitError("there is no adapter to save; add one first")
    root = "default" if "default" in names else names[0]
    with atomic_folder(path) as tmp:
        write_adapter(model, root, tmp, card)
        for name in names:
            if name != root:
                (tmp / name).mkdir()
                write_adapter(model, name, tmp / name, card)


# -- load ------------------------------------------------------------------------------


def hub_id_hint(text: str) -> str:
    """For a missing folder spelled like a hub repo id (``alice/ner``, ``alice/ner@v2``): how to load it."""
    from ..hub_rules.names import repo_id_problem

    if Path(text).exists() or repo_id_problem(text.partition("@")[0]) is not None:
        return ""
    return (f"; for the hub repo {text!r}, give the folder peftkit.hub.pull({text!r}) returns (hub=... for "
            f"another hub), or add it with peftkit.load(model, {text!r})")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter folder's config (no weights are touched): peftkit's record under the
    ``peftkit`` key wherever it was saved, an AdapterHub folder's head config under ``head_config``."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterLoadError(f"{str(path)!r} is not an adapter folder (it does not exist or is a file)"
                               f"{hub_id_hint(str(path))}")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        entries = sorted(path.iterdir())
        present = ", ".join(p.name for p in entries) or "nothing"
        inner = [p.name for p in entries if (p / CONFIG_NAME).is_file()]
        where = "; save adapters with save_adapter() or PEFT's save_pretrained()"
        if inner:
            where = (f"; it holds adapters in {', '.join(f'{n}/' for n in inner)} (a save_pretrained() of several "
                     f"adapters keeps all but 'default' in subfolders): load one of them, e.g. "
                     f"{str(path / inner[0])!r}")
        raise AdapterLoadError(f"{str(path)!r} has no {CONFIG_NAME} (it holds: {present}){where}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{config_path} is not valid JSON ({exc}); the file is damaged: "
                               f"{DAMAGED_FILE_FIX}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object, not {type(data).__name__}")
    return with_head_config(path, with_own_metadata(path, data))


def method_for(data: dict[str, Any], where: str) -> Any:
    registry = get_registry()
    own = data.get("peftkit") if isinstance(data.get("peftkit"), dict) else {}
    name = own.get("method")
    if name is None:
        peft_type = data.get("peft_type")
        if peft_type is None:
            raise AdapterLoadError(f"{where}: the config names no method (neither 'peftkit.method' nor "
                                   f"'peft_type'); is this an adapter folder?")
        method = method_reading(registry.methods.values(), peft_type)
        if method is None:
            raise AdapterLoadError(f"{where}: PEFT method {peft_type!r} is not supported by the installed "
                                   f"peftkit methods ({', '.join(sorted(registry.methods))}); install a "
                                   f"plugin that provides it")
        return method
    if name not in registry.methods:
        raise AdapterLoadError(f"{where}: " + unknown_method_message(name, registry, own.get("plugin"),
                                                                       own.get("plugin_version")))
    method = registry.methods[name]
    _check_plugin_version(method, own, where)
    return method


def _check_plugin_version(method: Any, own: dict[str, Any], where: str) -> None:
    saved, installed = own.get("plugin_version"), method.distribution_version
    if not saved or not installed or own.get("plugin") != method.distribution:
        return
    if major_version(saved) > major_version(installed):
        raise AdapterLoadError(
            f"{where}: made by {method.distribution} {saved}, but {installed} is installed, and a newer "
            f"major version may use a format this one cannot read; upgrade: pip install -U "
            f"'{method.distribution}>={major_version(saved)}'")


def check_base_model(model: "AdaptedModelProtocol", data: dict[str, Any], where: str) -> None:
    """Refuse (AdapterLoadError) an adapter config ``data`` saved for another base model than ``model``'s."""
    own = data.get("peftkit") if isinstance(data.get("peftkit"), dict) else {}
    saved = own.get("base_model") or {}
    current = base_model_info(model)
    for key in ("model_type", "hidden_size", "d_model", "n_embd", "num_hidden_layers"):
        if key in saved and key in current and saved[key] != current[key]:
            raise AdapterLoadError(
                f"{where}: this adapter was made for a model with {key}={saved[key]!r} "
                f"({data.get('base_model_name_or_path') or 'unknown base'}), but this model has "
                f"{key}={current[key]!r}; load it on the base model it was trained for")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise AdapterLoadError(
                f"{path} holds weights only as {pickles[0]}, a pickle file, which peftkit never loads "
                f"(it can run arbitrary code). Convert it where you trust it: load it with torch.load and "
                f"save with safetensors.torch.save_file(state_dict, '{WEIGHTS_NAME}')")
        raise AdapterLoadError(f"{path} has no {WEIGHTS_NAME}; the folder is incomplete — save or "
                               f"download the adapter again")
    try:
        return dict(load_bytes(weights.read_bytes()))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterLoadError(f"{weights} is truncated or corrupted ({exc}): {DAMAGED_FILE_FIX}") from None


def config_from_data(method: Any, data: dict[str, Any], where: str) -> Any:
    """The method's config from a folder's ``adapter_config.json`` (the core's own fields left aside)."""
    body = {k: v for k, v in data.items() if k not in ("peftkit", "base_model_name_or_path", "task_type",
                                                        "inference_mode", "peft_version", "revision",
                                                        "auto_mapping")}
    try:
        return method.config_from_file(body)
    except (ConfigError, TypeError) as exc:
        raise AdapterLoadError(f"{where}: {CONFIG_NAME} does not describe a valid {method.name} adapter: "
                               f"{exc}") from None


def load_adapter(model: "AdaptedModelProtocol", path: str | os.PathLike, name: str) -> Any:
    """Load a folder as adapter ``name``; on any error the model is left as it was."""
    path = Path(path)
    where = str(path)
    data = read_config(path)
    adapterhub = is_adapterhub_config(data)
    head = None
    if adapterhub:
        method, config = _adapterhub_method_config(data, where)
        tensors = read_adapterhub_weights(path)
        head = load_head(model.base_model, path, where)
        if head is not None:
            config.modules_to_save = head.modules
    else:
        method = method_for(data, where)
        check_base_model(model, data, where)
        config = config_from_data(method, data, where)
        tensors = read_weights(path)
    labels = read_labels(path) or (head.labels if head is not None else None)
    model.check_adapter_name(name)
    try:
        record = model.add_adapter(name, config, default_head=False)
    except PluginError:
        raise
    except PeftkitError as exc:
        raise AdapterLoadError(f"{where}: cannot place this adapter on the model: {exc}") from None
    try:
        if adapterhub:
            sites = [site for site, _ in _layers_with(model, name)]
            shared_state = model.shared_state(name)
            shared = (record.method.shared_state_file_keys(record.config, list(shared_state.tensors()))
                      if shared_state is not None else {})
            model_level, used = _adapterhub_model_level(method.adapterhub, tensors, data, where)
            tensors = adapterhub_tensors(method.adapterhub, {k: v for k, v in tensors.items() if k not in used},
                                         sites, data, KEY_PREFIX, where, shared)
            tensors.update(model_level)
            tensors.update({head_key_prefix(record) + key: tensor
                            for key, tensor in (head.tensors if head else {}).items()})
        record.labels = _fit_head(model, name, tensors, labels, where)
        _copy_into(model, name, tensors, where)
    except BaseException:
        model.delete_adapter(name)
        raise
    return record


def _adapterhub_model_level(fmt: Any, tensors: dict[str, torch.Tensor], data: dict[str, Any],
                            where: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model-level part's tensors of an AdapterHub folder and the file keys they used."""
    try:
        return fmt.model_tensors_in(tensors, str(data.get("name")), data["config"])
    except ConfigError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None


def _adapterhub_method_config(data: dict[str, Any], where: str) -> tuple[Any, Any]:
    """The installed method and its config for an AdapterHub ``adapter_config.json``."""
    method, values = claiming_method(get_registry().methods.values(), data, where)
    try:
        return method, method.config_class.from_dict(values)
    except (ConfigError, TypeError) as exc:
        raise AdapterLoadError(f"{where}: this AdapterHub adapter's options do not make a valid {method.name} "
                               f"adapter: {exc}") from None


def _fit_head(model: "AdaptedModelProtocol", name: str, tensors: dict[str, torch.Tensor], labels: list[str] | None,
              where: str) -> list[str] | None:
    """Size adapter ``name``'s classification head for the saved one's labels; the names it keeps."""
    base = model.base_labels
    if base is None:
        return None
    size = fit_heads(model.base_model, name, len(base), head_tensors(model, name), tensors)
    if size is None:
        return None
    if labels is not None and len(labels) != size:
        raise AdapterLoadError(f"{where}: {LABELS_FILE} names {len(labels)} labels ({', '.join(labels)}) but the "
                               f"adapter's classification head predicts {size}; fix {LABELS_FILE} or delete it")
    return labels


def _copy_into(model: "AdaptedModelProtocol", name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    embedding_base = take_embedding_base_tensors(model, tensors, KEY_PREFIX, where)  # PEFT's, see there
    tensors = live_layout({site: layer.adapters[name] for site, layer in _layers_with(model, name)}, tensors, where)
    own = adapter_tensors(model, name, live=True)
    check_weights(own, tensors, where)
    # A model-level adapter loads its own tensors: what it saves may be computed (prefix
    # tuning's MLP output), so it may have to change form to hold them.
    model_adapter = model.model_adapter(name)
    model_keys = set(model_adapter.tensors()) if model_adapter is not None else set()
    with torch.no_grad():
        for key, target in own.items():
            if key not in model_keys:
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    if model_adapter is not None:
        model_adapter.load_tensors({key: tensors[key] for key in model_keys})
    load_embedding_base_tensors(model, embedding_base)


def live_layout(layers: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A weights file's ``tensors`` with those of each site in ``layers`` (site -> its LayerAdapter) passed
    through the adapter's ``tensors_from_file()``: keyed and shaped as its ``tensors()``. A key goes to the
    innermost site it lies under; keys under no site pass unchanged."""
    prefixes = {f"{KEY_PREFIX}{site}.": adapter for site, adapter in layers.items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        dots = [i for i, char in enumerate(key) if char == "."]
        prefix = next((key[:i + 1] for i in reversed(dots) if key[:i + 1] in prefixes), None)
        if prefix is None:
            out[key] = tensor
        else:
            grouped.setdefault(prefix, {})[key[len(prefix):]] = tensor
    for prefix, saved in grouped.items():
        try:
            rebuilt = prefixes[prefix].tensors_from_file(saved)
        except PeftkitError as exc:
            raise AdapterLoadError(f"{where}: the tensors at {prefix[len(KEY_PREFIX):-1]}: {exc}") from None
        out.update({prefix + key: tensor for key, tensor in rebuilt.items()})
    return out


def check_weights(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a weights file whose keys or shapes differ from ``own`` (the tensors the model expects)."""
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}"
                         + (" ..." if len(unexpected) > 5 else ""))
        raise AdapterLoadError(f"{where}: the weights do not fit this model and config: {'; '.join(parts)}. "
                               f"Was it saved for another base model or with other target modules?")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if bad:
        raise AdapterLoadError(f"{where}: shape mismatch in {len(bad)} tensors ({'; '.join(bad[:3])}); "
                               f"the adapter was made for a model of another size or with another config")
