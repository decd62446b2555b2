"""AdapterHub's prediction heads (``head_config.json`` + head weights) onto transformers' task models, both ways.

``adapters`` saves a head beside an adapter in two forms:

- a *flex* head of its ``...AdapterModel`` classes: ``head_config.json``'s ``"config"`` gives
  ``head_type``, ``layers``, ``activation_function``, ``use_pooler`` and ``label2id``; the
  weights are ``heads.<name>.<i>.weight``, ``i`` counting the head's Dropout/Linear/activation
  modules (two layers: 1 and 4; one layer: 1);
- a *static* head of a transformers task class (``"config": null``, ``model_class`` such as
  ``BertForSequenceClassification``): the task model's own head tensors (``classifier.weight``).

peftkit keeps a head as the adapter's copy of the task model's modules (``modules_to_save``), so a
head loads when its function is exactly the task model's: a two-layer tanh classification head on
the first token is BERT's pooler + classifier or RoBERTa's classifier; a one-layer head reading the
pooled output is BERT's classifier; a one-layer tagging head is the token classifier; a masked-LM
head (``add_masked_lm_head``: Linear, GELU, LayerNorm, Linear onto the vocabulary) is BERT's
``cls.predictions`` or RoBERTa's ``lm_head``.

A masked-LM or causal-LM head equal to the model's own (the frozen pretrained head a MAD-X language
adapter is trained with), flex or static, needs no copy: it is not loaded, and the model's own computes
it (and takes the invertible adapter's inverse on its input).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .adapterhub_format import WRITTEN_VERSION, is_adapterhub_config, read_adapterhub_weights
from .errors import AdapterLoadError, PeftkitError
from .layer import ModulesToSave, TunerLayer

HEAD_CONFIG_NAME = "head_config.json"
SAFE_HEAD_WEIGHTS_NAME = "model_head.safetensors"
PICKLE_HEAD_WEIGHTS_NAME = "pytorch_model_head.bin"
#: transformers task-class suffix -> AdapterHub's flex head type.
HEAD_TYPES = {"ForSequenceClassification": "classification", "ForTokenClassification": "tagging",
              "ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForMaskedLM": "masked_lm"}
#: A masked-LM head's modules in transformers' masked-LM classes: (dense, LayerNorm, decoder), by the
#: indices ``adapters`` gives them (its GELU is index 1).
MASKED_LM_MODULES = (("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder"),
                     ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder"))
MASKED_LM_INDICES = (0, 2, 3)
#: model_type -> the prefix of ``adapters``' flex-head model class (``BertAdapterModel``).
ADAPTER_MODEL_FAMILIES = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "gpt2": "GPT2"}
#: The key under which :func:`with_head_config` puts a folder's ``head_config.json`` into its AdapterHub config.
HEAD_CONFIG_KEY = "head_config"
#: AdapterHub's flex head type -> transformers' table of the task model class by model_type, whose head it is.
TASK_CLASS_TABLES = {"classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                     "tagging": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                     "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked_lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES"}


@dataclass
class HeadLayout:
    """Where one AdapterHub head's Linear layers live in a transformers task model.

    ``modules`` maps AdapterHub's key prefix (``heads.task.1``, ``classifier``) to our module's
    path in the task model; ``config`` is the flex head's config (None for a static head)."""

    modules: dict[str, str]
    config: dict[str, Any] | None


def has_head(folder: Path) -> bool:
    return (folder / HEAD_CONFIG_NAME).is_file()


def read_head_config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / HEAD_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{folder / HEAD_CONFIG_NAME} is not readable JSON ({exc}); download the adapter "
                               f"again or delete the file to load the adapter without its head") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), (dict, type(None))):
        raise AdapterLoadError(f"{folder / HEAD_CONFIG_NAME} is not an AdapterHub head config (no \"config\" "
                               f"object or null)")
    return data


def with_head_config(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """An AdapterHub ``adapter_config.json``'s content ``data`` with the head saved beside it (``head_config.json``)
    under :data:`HEAD_CONFIG_KEY`: one dict that says which model class loads the adapter with its head
    (:func:`head_model_class`). Other configs, and folders without a head, are returned unchanged."""
    if not is_adapterhub_config(data) or not has_head(folder):
        return data
    return {**data, HEAD_CONFIG_KEY: read_head_config(folder)}


def head_model_class(data: Mapping[str, Any]) -> str | None:
    """The name of the transformers class whose head the AdapterHub head in config ``data`` is (put there by
    :func:`with_head_config`): a static head's own class (``BertForSequenceClassification``); for a flex
    head, the task class of its ``head_type`` for the config's ``model_type`` (classification on BERT:
    ``BertForSequenceClassification``; tagging: ``...ForTokenClassification``; causal_lm, masked_lm). None
    when there is no head, or it is of a kind or model family peftkit knows no task class for."""
    head = data.get(HEAD_CONFIG_KEY)
    if not isinstance(head, Mapping):
        return None
    config = head.get("config")
    if not isinstance(config, Mapping):
        cls = head.get("model_class")
        return cls if isinstance(cls, str) and cls.endswith(tuple(HEAD_TYPES)) else None
    table = TASK_CLASS_TABLES.get(str(config.get("head_type")))
    model_type = head.get("model_type") or data.get("model_type")
    if table is None or not isinstance(model_type, str):
        return None
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, table, {}).get(model_type)


def head_module_names(model: nn.Module, data: Mapping[str, Any]) -> list[str]:
    """The modules of ``model`` whose weights the AdapterHub head in config ``data`` (see
    :func:`with_head_config`) brings: a flex head's layers, or a static head's task modules outside the
    model's body. Empty when there is none or it does not fit ``model`` (loading the adapter says why)."""
    head = data.get(HEAD_CONFIG_KEY)
    if not isinstance(head, Mapping):
        return []
    try:
        layout = head_layout(model, head, "")
    except AdapterLoadError:
        return []
    if layout is None:
        return []
    if layout.config is not None:
        return sorted(layout.modules.values())
    body = getattr(model, "base_model_prefix", "")
    return [name for name, _ in model.named_children() if name != body]


def _task_kind(model: nn.Module) -> str | None:
    """"classification", "tagging", "causal_lm" or None from the task model's class name."""
    cls = type(model).__name__
    return next((kind for suffix, kind in HEAD_TYPES.items() if cls.endswith(suffix)), None)


def _unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(module, (ModulesToSave, TunerLayer)):
        module = module.original_module if isinstance(module, ModulesToSave) else module.base_layer
    return module


def _original(model: nn.Module, path: str) -> nn.Module | None:
    """The model's own module at ``path``, seen through adapters' head copies (ModulesToSave) and
    adapted layers (TunerLayer)."""
    module = model
    for part in path.split(".") if path else []:
        module = getattr(_unwrapped(module), part, None)
        if not isinstance(module, nn.Module):
            return None
    return _unwrapped(module)


def _masked_lm_layout(model: nn.Module, head_config: Mapping[str, Any], name: str) -> dict[str, str] | str:
    layers, activation = head_config.get("layers"), str(head_config.get("activation_function")).lower()
    model_activation = str(getattr(getattr(model, "config", None), "hidden_act", "gelu")).lower()
    if layers != 2 or activation != model_activation or not head_config.get("layer_norm") \
            or head_config.get("bias") is False:
        return (f"layers={layers}, activation_function={head_config.get('activation_function')!r}, "
                f"layer_norm={head_config.get('layer_norm')!r} computes other than {type(model).__name__}'s head")
    for dense, norm, decoder in MASKED_LM_MODULES:
        if _linear(model, dense) and isinstance(_original(model, norm), nn.LayerNorm) and _linear(model, decoder):
            return {f"heads.{name}.{i}": path for i, path in zip(MASKED_LM_INDICES, (dense, norm, decoder))}
    return f"{type(model).__name__} has no masked-LM head peftkit knows (BERT's or RoBERTa's)"


def _linear(model: nn.Module, path: str) -> bool:
    return isinstance(_original(model, path), nn.Linear)


def _pooler_dense(model: nn.Module) -> str | None:
    """BERT's pooler projection (``bert.pooler.dense``: tanh of it on the first token), if the model has one."""
    prefix = getattr(model, "base_model_prefix", "")
    pooler = _original(model, f"{prefix}.pooler") if prefix else None
    if pooler is not None and isinstance(getattr(pooler, "activation", None), nn.Tanh) and _linear(pooler, "dense"):
        return f"{prefix}.pooler.dense"
    return None


def flex_layout(model: nn.Module, head_config: Mapping[str, Any], name: str) -> dict[str, str] | str:
    """AdapterHub key prefix -> our module for a flex head on ``model``; a str says why it does not fit."""
    kind, layers = head_config.get("head_type"), head_config.get("layers", 1)
    wanted = _task_kind(model)
    if kind != wanted:
        return (f"a {kind!r} head needs a transformers model whose class ends with "
                f"{next((s for s, k in HEAD_TYPES.items() if k == kind), 'one peftkit knows')}")
    if kind == "masked_lm":
        return _masked_lm_layout(model, head_config, name)
    if kind == "causal_lm":  # one bias-free Linear onto the vocabulary: the model's own lm_head
        lm_head = _original(model, "lm_head")
        if layers == 1 and not head_config.get("bias") and isinstance(lm_head, nn.Linear) and lm_head.bias is None:
            return {f"heads.{name}.0": "lm_head"}
        return (f"layers={layers}, bias={head_config.get('bias')!r} computes other than "
                f"{type(model).__name__}'s lm_head")
    if head_config.get("bias", True) is not True:
        return "bias=false (transformers' heads have a bias)"
    tanh = str(head_config.get("activation_function")).lower() == "tanh"
    pooled = bool(head_config.get("use_pooler"))
    pooler = _pooler_dense(model)
    if kind == "tagging" and layers == 1 and _linear(model, "classifier"):
        return {f"heads.{name}.1": "classifier"}
    if kind == "classification" and layers == 1 and pooled and pooler and _linear(model, "classifier"):
        return {f"heads.{name}.1": "classifier"}
    if kind == "classification" and layers == 2 and tanh and not pooled:
        if _linear(model, "classifier.dense") and _linear(model, "classifier.out_proj"):  # RoBERTa's
            return {f"heads.{name}.1": "classifier.dense", f"heads.{name}.4": "classifier.out_proj"}
        if pooler and _linear(model, "classifier"):  # BERT's pooler is that first layer
            return {f"heads.{name}.1": pooler, f"heads.{name}.4": "classifier"}
    return (f"layers={layers}, activation_function={head_config.get('activation_function')!r}, "
            f"use_pooler={pooled} computes other than {type(model).__name__}'s head")


def head_layout(model: nn.Module, data: Mapping[str, Any], where: str) -> HeadLayout | None:
    """The layout of a saved head on ``model``; None when ``model`` has no head of that kind (the caller
    loads the adapter without it). A head of the right kind that computes otherwise is refused."""
    config = data.get("config")
    if config is None:  # static: the task model's own head, for the same class
        if data.get("model_class") != type(model).__name__:
            return None
        return HeadLayout({}, None)
    if _task_kind(model) is None:
        return None
    layout = flex_layout(model, config, str(data.get("name")))
    if isinstance(layout, str):
        raise AdapterLoadError(f"{where}: the AdapterHub {config.get('head_type')!r} head cannot load into "
                               f"{type(model).__name__}: {layout}; load the adapter onto the base model "
                               f"without a head, or delete {HEAD_CONFIG_NAME} to leave the head out")
    return HeadLayout(layout, config)


def head_labels(data: Mapping[str, Any]) -> list[str] | None:
    """Label names by id from the head config's ``label2id`` (flex: in ``"config"``; static: top level)."""
    table = (data.get("config") or {}).get("label2id") or data.get("label2id")
    if not isinstance(table, dict) or not table:
        return None
    try:
        by_id = {int(i): str(label) for label, i in table.items()}
    except (TypeError, ValueError):  # ids that are no numbers: the names are left out, not the head
        return None
    if sorted(by_id) != list(range(len(by_id))):
        return None
    return [by_id[i] for i in range(len(by_id))]


def our_head_tensors(layout: HeadLayout, tensors: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The head's tensors keyed by our module path (``classifier.weight``)."""
    if layout.config is None:
        return dict(tensors)
    out = {}
    heads = {prefix.rpartition(".")[0] + "." for prefix in layout.modules}  # {"heads.sb."}
    for key, tensor in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if key.startswith("heads.") and not key.startswith(tuple(heads)):
            # another head whose name begins with this one's (heads.sb2 beside heads.sb): adapters 1.3's
            # save_adapter picks heads by "heads.<name>" in the key, so it writes them too; they are not this head
            continue
        if prefix not in layout.modules:
            raise AdapterLoadError(f"{where}: head weight {key!r} is not one of the head's layers "
                                   f"({', '.join(sorted(layout.modules))})")
        out[f"{layout.modules[prefix]}.{leaf}"] = tensor
    return out


def static_modules(model: nn.Module, tensors: Mapping[str, Any], where: str) -> list[str]:
    """The task model's modules a static head's tensors belong to (``classifier``)."""
    modules = sorted({key.rpartition(".")[0] for key in tensors})
    wrong = [m for m in modules if not m or not _linear(model, m)]
    if wrong:
        raise AdapterLoadError(f"{where}: static head weights name no Linear layer of {type(model).__name__}: "
                               f"{', '.join(wrong[:3])}")
    return modules


@dataclass
class LoadedHead:
    """A saved head made ready for peftkit: the task model's modules the adapter keeps copies of
    (``modules_to_save``), their tensors keyed by module path, and the label names if saved."""

    modules: list[str]
    tensors: dict[str, Any]
    labels: list[str] | None


def load_head(model: nn.Module, folder: Path, where: str) -> LoadedHead | None:
    """The head saved in ``folder`` for ``model``; None when there is none, or (with a warning) when
    ``model`` has no head of that kind."""
    if not has_head(folder):
        return None
    data = read_head_config(folder)
    layout = head_layout(model, data, where)
    if layout is None:
        config = data.get("config") or {}
        wanted = (next((s for s, k in HEAD_TYPES.items() if k == config.get("head_type")), None) if config
                  else data.get("model_class"))
        warnings.warn(f"{where}: the adapter's AdapterHub prediction head is not loaded: {type(model).__name__} "
                      f"has no head of its kind ({wanted or config.get('head_type') or 'unknown'}); load it onto "
                      f"such a model to get the head", stacklevel=3)
        return None
    tensors = read_adapterhub_weights(folder, SAFE_HEAD_WEIGHTS_NAME, PICKLE_HEAD_WEIGHTS_NAME)
    ours = our_head_tensors(layout, tensors, where)
    if _task_kind(model) in ("masked_lm", "causal_lm") and _is_models_own(model, ours):
        return None
    modules = sorted(layout.modules.values()) if layout.config is not None else static_modules(model, ours, where)
    return LoadedHead(modules, ours, head_labels(data))


def _is_models_own(model: nn.Module, tensors: Mapping[str, Any]) -> bool:
    """Whether every head tensor (``{module path.leaf: tensor}``) equals the model's own."""
    for key, tensor in tensors.items():
        path, _, leaf = key.rpartition(".")
        module = _original(model, path)
        own = getattr(module, leaf, None) if module is not None else None
        if not isinstance(own, torch.Tensor) or own.shape != tensor.shape \
                or not torch.equal(own.detach().cpu(), tensor.to(own.dtype)):
            return False
    return True


# -- save ------------------------------------------------------------------------------


def _saved_layout(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The flex head config (without labels) and layout peftkit writes for ``model``'s head, if it has one.

    BERT's classification head is written as two layers on the first token (pooler + classifier), so it
    does not depend on the pooler of the model it is loaded into."""
    kind = _task_kind(model)
    if kind is None:
        return None
    model_config = getattr(model, "config", None)
    if kind == "masked_lm":  # BertStyleMaskedLMHead's options, as adapters writes them
        hidden = getattr(model_config, "hidden_size", None)
        config = {"activation_function": getattr(model_config, "hidden_act", "gelu"), "bias": True,
                  "embedding_size": getattr(model_config, "embedding_size", hidden), "head_type": kind, "layers": 2,
                  "layer_norm": True, "shift_labels": False, "vocab_size": getattr(model_config, "vocab_size", None)}
        layout = flex_layout(model, config, name)
        return None if isinstance(layout, str) else (config, layout)
    for layers in (2, 1):
        config: dict[str, Any] = {"activation_function": "tanh", "dropout_prob": None, "head_type": kind,
                                  "layers": layers}
        if kind == "classification":
            config.update(bias=True, use_pooler=False)
        if kind == "causal_lm":  # CausalLMHead's options, as adapters writes them
            hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
            config.update(activation_function=None, bias=False, layer_norm=False, shift_labels=True,
                          vocab_size=getattr(model_config, "vocab_size", None),
                          embedding_size=getattr(model_config, "embedding_size", hidden))
        layout = flex_layout(model, config, name)
        if not isinstance(layout, str):
            return config, layout
    return None


def head_modules(model: nn.Module, name: str) -> list[str]:
    """Our modules the flex head peftkit writes for ``model`` reads (empty when ``model`` has no such head)."""
    found = _saved_layout(model, name)
    return list(found[1].values()) if found else []


def flex_head_files(model: nn.Module, name: str, tensors: Mapping[str, Any], labels: list[str] | None,
                    model_name: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(head_config.json content, head tensors keyed as adapters saves them)`` from our head tensors
    (``{module path.leaf: tensor}`` for every module of :func:`head_modules`)."""
    found = _saved_layout(model, name)
    if found is None:
        raise PeftkitError(f"cannot save adapter {name!r}'s head in AdapterHub's format: {type(model).__name__} "
                           f"has no head AdapterHub's classification or tagging heads compute; save it in "
                           f"peftkit's format instead (format='peftkit')")
    config, layout = found
    last = layout[max(layout, key=lambda k: int(k.rpartition(".")[2]))]
    config = {**config, "label2id": {label: i for i, label in enumerate(labels)} if labels else None}
    if config["head_type"] not in ("causal_lm", "masked_lm"):
        config["num_labels"] = int(tensors[f"{last}.weight"].shape[0])
    out = {f"{prefix}.{key[len(module) + 1:]}": tensor for prefix, module in layout.items()
           for key, tensor in tensors.items() if key.startswith(module + ".")}
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    family = ADAPTER_MODEL_FAMILIES.get(model_type or "", "")
    data = {"config": config, "hidden_size": getattr(model_config, "hidden_size", None),
            "model_class": f"{family}AdapterModel", "model_name": model_name or "", "model_type": model_type,
            "name": name, "version": WRITTEN_VERSION}
    return data, out


def head_files(model: nn.Module, name: str, labels: list[str] | None,
               model_name: str | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(head_config.json content, head tensors)`` for adapter ``name``'s own head copies (None: it keeps none).

    Copies that make AdapterHub's classification or tagging head are written as its flex head (BERT's pooler
    taken from the model when the adapter keeps only the classifier); other copies outside the model's body
    (a causal LM's ``lm_head``) as a static head of the model's class, as ``adapters`` saves one."""
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
    owned = [n for n, m in wrappers.items() if name in m.copies]
    if not owned:
        return None
    modules = head_modules(model, name)
    if modules and all(any(p == n or p.startswith(n + ".") for p in modules) for n in owned):
        return flex_head_files(model, name, _module_tensors(model, name, modules, wrappers), labels, model_name)
    prefix = getattr(model, "base_model_prefix", "")
    inside = [n for n in owned if prefix and (n == prefix or n.startswith(prefix + "."))]
    if inside:
        raise PeftkitError(f"cannot save adapter {name!r} in AdapterHub's format: it keeps its own copy of "
                           f"{', '.join(inside)}, inside the model's body, which AdapterHub's heads do not hold; "
                           f"save it in peftkit's format instead (format='peftkit')")
    config = getattr(model, "config", None)
    data = {"config": None, "hidden_size": getattr(config, "hidden_size", None),
            "label2id": {label: i for i, label in enumerate(labels)} if labels else None,
            "model_class": type(model).__name__, "model_name": model_name or "",
            "model_type": getattr(config, "model_type", None), "name": None,
            "num_labels": len(labels) if labels else getattr(config, "num_labels", None), "version": WRITTEN_VERSION}
    return data, _module_tensors(model, name, owned, wrappers)


def _module_tensors(model: nn.Module, name: str, modules: list[str],
                    wrappers: dict[str, ModulesToSave]) -> dict[str, Any]:
    """``{module path.leaf: tensor}`` of ``modules``: adapter ``name``'s copy where it keeps one, else the
    model's own module."""
    out: dict[str, Any] = {}
    for path in modules:
        owner = next((n for n in wrappers if path == n or path.startswith(n + ".")), None)
        if owner is None:
            module = model.get_submodule(path)
        else:
            wrapper = wrappers[owner]
            inner = wrapper.copies[name] if name in wrapper.copies else wrapper.original_module
            rest = path[len(owner) + 1:]
            module = inner.get_submodule(rest) if rest else inner
        for leaf, tensor in module.state_dict().items():
            out[f"{path}.{leaf}"] = tensor.detach().to("cpu").contiguous()
    return out
