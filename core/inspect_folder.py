"""Describe an adapter folder without loading torch (for ``peftkit info``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

from .errors import AdapterLoadError
from .fileio import read_folder_json
from .labels import read_labels
from .own_metadata import read_own_metadata
from .peft_format import file_in_peft_format, frozen_tensors_of_folder, method_name_of_folder

#: In the keys of the base model's own weights that PEFT saves beside an adapter on embed_tokens or
#: lm_head (see peft_embeddings): not the adapter's parameters.
BASE_WEIGHT_INFIX = ".base_layer."
#: Files a tokenizer's ``save_pretrained`` writes (``peftkit train`` saves the run's tokenizer beside the adapter,
#: as transformers' Trainer does): counted apart from the adapter's own files.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model",
                             "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json"})
#: The embedding modules whose whole base weights PEFT saves as ``<module>.weight`` when the vocabulary was
#: resized (peft_embeddings): transformers' names for input and output embeddings.
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "shared",
                               "tok_embeddings"})
#: The prefix PEFT's keys start with.
PEFT_KEY_PREFIX = "base_model.model."
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes), checked
    against the file size so a truncated file is caught."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterLoadError(f"{path} is truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise AdapterLoadError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AdapterLoadError(f"{path} has a corrupted safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise AdapterLoadError(f"{path} is truncated: the header describes {end} bytes of data, "
                               f"the file holds {size - 8 - length}")
    return header


def describe_folder(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterLoadError(_not_an_adapter(path))
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {exc}") from None
    own = read_own_metadata(path, data)
    weights = path / "adapter_model.safetensors"
    counts = tensor_counts(weights, data.get("modules_to_save"), frozen_tensors_of_folder(data, own))
    size, checkpoints, checkpoint_bytes, tokenizer_files, tokenizer_bytes = _sizes(path)
    fmt = _file_format(data)
    return {
        "path": str(path),
        "method": method_name_of_folder(data, own) or "?",
        "format": fmt,
        "base_model": data.get("base_model_name_or_path"),
        "base_model_type": (own.get("base_model") or {}).get("model_type"),
        "target_modules": data.get("target_modules"),
        # a union (several methods as one adapter): each part's method and its targets
        "parts": [{"method": part.get("method"), "target_modules": part.get("target_modules")}
                  for part in data["parts"] if isinstance(part, dict)] if isinstance(data.get("parts"), list) else None,
        "task_type": data.get("task_type"),
        "labels": read_labels(path),  # a classifier's label names (labels.json), else None
        "plugin": own.get("plugin"),
        "plugin_version": own.get("plugin_version"),
        "parameters": counts.parameters,
        "fixed_numbers": counts.fixed,
        "tensors": counts.tensors,
        "size_bytes": size,
        "checkpoints": checkpoints,
        "checkpoints_size_bytes": checkpoint_bytes,
        "base_embeddings": counts.base_embeddings,
        "tokenizer_files": tokenizer_files,
        "tokenizer_size_bytes": tokenizer_bytes,
    }


def _sizes(path: Path) -> tuple[int, int, int, int, int]:
    """(bytes of the adapter's own files, number of training checkpoints, their bytes, number of tokenizer
    files, their bytes).

    A ``peftkit train`` (or ``transformers.Trainer``) output folder holds resumable checkpoints
    (``checkpoints/checkpoint-N/`` or ``checkpoint-N/``) and the run's tokenizer (:data:`TOKENIZER_FILES`)
    beside the adapter: they are counted apart, so the adapter's own size is what loading it reads.
    """
    own = kept = tokenizer = tokenizer_files = 0
    for file in path.rglob("*"):
        if file.is_file():
            parts = file.relative_to(path).parts
            if len(parts) > 1 and (parts[0] == "checkpoints" or parts[0].startswith("checkpoint-")):
                kept += file.stat().st_size
            elif len(parts) == 1 and parts[0] in TOKENIZER_FILES:
                tokenizer += file.stat().st_size
                tokenizer_files += 1
            else:
                own += file.stat().st_size
    found = [d for d in [*path.glob("checkpoint-*"), *path.glob("checkpoints/checkpoint-*")] if d.is_dir()]
    return own, len(found), kept, tokenizer_files, tokenizer


def describe_composition(path: str | Path) -> dict[str, Any]:
    """A composition folder (``save_composition()``, ``peftkit compose``): its composition, base model,
    member adapters (each described as by :func:`describe_folder`), fusions, and totals."""
    path = Path(path)
    data = read_folder_json(path, "composition.json", "composition")
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{path / 'composition.json'} must hold a JSON object; save the composition again")
    adapters = {name: describe_folder(path / str(sub)) for name, sub in sorted((data.get("adapters") or {}).items())}
    fusions = sorted(data.get("fusions") or {})
    base = data.get("base_model") or {}
    return {
        "path": str(path),
        "kind": "composition",
        "composition": data.get("composition_string"),
        "base_model": data.get("base_model_name_or_path"),
        "base_model_type": base.get("model_type") if isinstance(base, dict) else None,
        "adapters": adapters,
        "fusions": fusions,
        "parameters": sum(a["parameters"] for a in adapters.values()) + sum(
            tensor_counts(path / str(sub) / "fusion_model.safetensors")[0] for sub in (data.get("fusions") or {}).values()),
        "size_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
    }


class TensorCounts(NamedTuple):
    """What an adapter file holds: its ``parameters`` (the numbers training changes), its ``tensors`` and the
    ``fixed`` numbers it saves that training does not change (``Method.frozen_tensors``, integer indices)."""

    parameters: int
    tensors: int
    fixed: int
    #: The base embedding weights the file carries beside the adapter: module path -> shape (rows = the
    #: vocabulary a model needs to load it).
    base_embeddings: dict[str, list[int]]


#: safetensors dtypes of integer and boolean tensors: indices and masks, never parameters.
_INTEGER_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"})


def tensor_counts(path: Path, modules_to_save: Any = None, frozen: frozenset[str] = frozenset()) -> TensorCounts:
    """What a safetensors file holds, from its header (zeros when there is no file). The base embedding weights
    PEFT saves beside an adapter (:func:`_base_embedding_keys`) are not counted at all; tensors whose key ends in
    a name of ``frozen`` and integer tensors count as fixed, not as parameters."""
    if not path.is_file():
        return TensorCounts(0, 0, 0, {})
    parameters = tensors = fixed = 0
    header = safetensors_header(path)
    base = _base_embedding_keys(header, modules_to_save)
    for key, value in header.items():
        if key != "__metadata__" and key not in base:
            n = 1
            for dim in value["shape"]:
                n *= dim
            tensors += 1
            if value.get("dtype") in _INTEGER_DTYPES or key.rpartition(".")[2] in frozen:
                fixed += n
            else:
                parameters += n
    embeddings = {module: list(header[key]["shape"]) for key, module in base.items() if key.endswith(".weight")}
    return TensorCounts(parameters, tensors, fixed, embeddings)


def _base_embedding_keys(header: dict[str, Any], modules_to_save: Any) -> dict[str, str]:
    """The keys holding the base model's own embedding weights -> the embedding module's path: under
    ``.base_layer.`` (an adapted embedding, as PEFT saves it), or ``<module>.weight`` for an embedding module
    (:data:`EMBEDDING_MODULES`) not in ``modules_to_save`` (PEFT after a vocabulary resize)."""
    saved = set(modules_to_save) if isinstance(modules_to_save, list) else set()
    found = {}
    for key in header:
        if key == "__metadata__":
            continue
        if BASE_WEIGHT_INFIX in key:
            module = key.partition(BASE_WEIGHT_INFIX)[0].removesuffix(".token_adapter")
        elif key.endswith(".weight") and key.removesuffix(".weight").rpartition(".")[2] in EMBEDDING_MODULES:
            module = key.removesuffix(".weight")
        else:
            continue
        if module.rpartition(".")[2] not in saved:
            found[key] = module.removeprefix(PEFT_KEY_PREFIX)
    return found


def _not_an_adapter(path: Path) -> str:
    """Why ``path`` is not an adapter folder, naming what it is instead and what to pass."""
    where = f"{str(path)!r} is not an adapter folder (no adapter_config.json)"
    if (path / "composition.json").is_file():
        try:
            folders = dict(json.loads((path / "composition.json").read_text()).get("adapters") or {})
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError, OSError):
            folders = {}
        first = min(folders, default=None)
        inner = path / str(folders[first]) if first is not None else path / "adapters" / "NAME"
        return (f"{where}: it is a composition folder (composition.json, from save_composition or peftkit "
                f"compose) of adapters {', '.join(sorted(folders)) or '(none)'}; describe one of them: "
                f"peftkit info {inner}")
    if (path / "fusion_config.json").is_file():
        return (f"{where}: it holds fusion weights (fusion_config.json, from save_fusion), not an adapter; "
                f"describe the fused adapters' own folders")
    nested = sorted(p.parent.name for p in path.glob("*/adapter_config.json"))
    if nested:
        return f"{where}; its sub-folders {', '.join(nested)} are adapters: peftkit info {path / nested[0]}"
    if (path / "config.json").is_file():
        return (f"{where}: it holds a model (config.json); give a folder written by save_adapter(), "
                f"`peftkit train --out` or PEFT's save_pretrained()")
    present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    return (f"{where}; it holds: {present}. Give a folder written by save_adapter(), `peftkit train --out` or "
            f"PEFT's save_pretrained()")


def _file_format(config: dict[str, Any]) -> str:
    """"peft" when Hugging Face PEFT loads the folder as the adapter it is (its ``peft_type`` is one PEFT has),
    else "peftkit": a method PEFT lacks, or a config PEFT's type cannot express, saved under a type PEFT
    does not have (``PROMPT_TUNING_EMBEDDING_OUTPUT``)."""
    return "peft" if file_in_peft_format(config) else "peftkit"
