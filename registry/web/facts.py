"""The facts panel of an adapter page, read from the repo's files (never from what the card claims alone).

Sources: ``adapter_config.json`` (PEFT's keys, and peftkit's record under its
``peftkit`` key or in ``peftkit.json``), the safetensors header of the weights
(parameter count, no tensor data read), ``composition.json`` and
``fusion_config.json`` (members), and the card's front matter (license,
datasets, ``model-index`` metrics). Every file is read only when small
(:data:`MAX_JSON_BYTES`); anything malformed is skipped, never an error page.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peftkit.hub_rules import adapterhub
from peftkit.hub_rules.peft_types import file_in_peft_format

from ..store import FileEntry

MAX_JSON_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER = 4 << 20
MAX_OPTIONS = 24
MAX_METRICS = 40
MAX_MEMBERS = 100
MAX_LIST = 20  # licenses, datasets, base models
MAX_TARGETS = 64
MAX_VALUE_CHARS = 200

CONFIG = "adapter_config.json"
OWN_RECORD = "peftkit.json"
COMPOSITION = "composition.json"
FUSION = "fusion_config.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTERHUB_WEIGHTS = "adapter.safetensors"

# adapter_config.json keys shown elsewhere in the panel, or bookkeeping.
_NOT_OPTIONS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "target_modules", "revision", "inference_mode",
    "auto_mapping", "peftkit", "peft_version", "base_model", "modules_to_save",
})

ReadBytes = Callable[[FileEntry, int], bytes]


@dataclass(frozen=True)
class Member:
    """One adapter or fusion inside a composition repo (a folder of the repo), or a fused adapter's name."""

    name: str
    kind: str  # "adapter" or "fusion"
    folder: str | None  # its folder in the repo, when the repo holds it


@dataclass
class Facts:
    kind: str = "files"  # "adapter", "composition", "fusion" or "files"
    format: str | None = None
    #: Whether PEFT loads the folder (its peft_type is one PEFT has): the page shows PEFT's loading snippet then.
    peft_loads: bool = False
    method: str | None = None
    options: list[tuple[str, str]] = field(default_factory=list)
    target_modules: list[str] = field(default_factory=list)
    base_model: str | None = None
    architecture: str | None = None
    task_type: str | None = None
    parameters: int | None = None
    size: int = 0
    licenses: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    metrics: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, dataset)
    composition: str | None = None
    members: list[Member] = field(default_factory=list)


def _loads(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)) and str(value) != "":
        return str(value)[:MAX_VALUE_CHARS]
    return None


def short_name(value: Any) -> str | None:
    """A name (a base model id) as it is, or None when it is no string or too long to be one."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_VALUE_CHARS else None


def _strings(value: Any, limit: int = MAX_LIST) -> list[str]:
    """A string or a list of them, as at most ``limit`` values of at most :data:`MAX_VALUE_CHARS` each: the
    files may hold a megabyte of them, the panel shows names."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [str(v)[:MAX_VALUE_CHARS] for v in values if isinstance(v, (str, int, float))][:limit]


def parameter_count(header: bytes) -> int | None:
    """Parameters in a safetensors file, from its JSON header (no tensor data read)."""
    data = _loads(header)
    total = 0
    for name, tensor in data.items():
        if name == "__metadata__" or not isinstance(tensor, dict):
            continue
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        total += math.prod(shape)
    return total


def card_metrics(card: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(metric, value, dataset)`` from the card's ``model-index`` (the Hub's evaluation results format)."""
    out: list[tuple[str, str, str]] = []
    index = card.get("model-index")
    for model in index if isinstance(index, list) else []:
        for result in model.get("results", []) if isinstance(model, dict) else []:
            if not isinstance(result, dict):
                continue
            dataset = result.get("dataset") if isinstance(result.get("dataset"), dict) else {}
            dataset_name = _scalar(dataset.get("name")) or _scalar(dataset.get("type")) or ""
            for metric in result.get("metrics", []) if isinstance(result.get("metrics"), list) else []:
                if not isinstance(metric, dict):
                    continue
                name = _scalar(metric.get("name")) or _scalar(metric.get("type")) or "metric"
                raw = metric.get("value")
                # a float as the card's own results table shows it (4 significant digits), not 0.6819996237754822
                value = f"{raw:.4g}" if isinstance(raw, float) and math.isfinite(raw) else _scalar(raw)
                if value is not None:
                    out.append((name, value, dataset_name))
                if len(out) >= MAX_METRICS:
                    return out
    return out


class FactsReader:
    """Builds :class:`Facts`; parameter counts are cached by the weights' sha256 (blobs never change)."""

    def __init__(self, read: ReadBytes) -> None:
        self._read = read
        self._params: OrderedDict[str, int | None] = OrderedDict()
        self._lock = threading.Lock()

    def _json(self, files: Mapping[str, FileEntry], path: str) -> dict[str, Any]:
        entry = files.get(path)
        if entry is None or entry.size > MAX_JSON_BYTES:
            return {}
        return _loads(self._read(entry, entry.size))

    def _parameters(self, entry: FileEntry | None) -> int | None:
        if entry is None or entry.size < 8:
            return None
        with self._lock:
            if entry.sha256 in self._params:
                return self._params[entry.sha256]
        (length,) = struct.unpack("<Q", self._read(entry, 8))
        count = None
        if 0 < length <= min(MAX_SAFETENSORS_HEADER, entry.size - 8):
            count = parameter_count(self._read(entry, 8 + length)[8:])
        with self._lock:
            self._params[entry.sha256] = count
            while len(self._params) > 4096:
                self._params.popitem(last=False)
        return count

    def facts(self, files: Mapping[str, FileEntry], card: Mapping[str, Any], folder: str = "") -> Facts:
        """Facts of the repo's files under ``folder`` ('' for the repo root; a member of a composition)."""
        prefix = f"{folder}/" if folder else ""
        here = {p[len(prefix):]: e for p, e in files.items() if p.startswith(prefix)}
        facts = Facts(size=sum(e.size for e in here.values()))
        if not folder:
            facts.licenses = _strings(card.get("license"))
            facts.datasets = _strings(card.get("datasets"))
            facts.metrics = card_metrics(card)
        if CONFIG in here:
            self._adapter(facts, here)
        elif COMPOSITION in here:
            self._composition(facts, here)
        elif FUSION in here:
            self._fusion(facts, here)
        if not facts.base_model and not folder:
            bases = card.get("base_model")
            facts.base_model = short_name(bases[0] if isinstance(bases, list) and bases else bases)
        return facts

    def _adapter(self, facts: Facts, files: Mapping[str, FileEntry]) -> None:
        config = self._json(files, CONFIG)
        if adapterhub.is_adapterhub_config(config):
            self._adapterhub(facts, files, config)
            return
        record = config.get("peftkit") if isinstance(config.get("peftkit"), dict) else {}
        peft_type = config.get("peft_type") if isinstance(config.get("peft_type"), str) else None
        if not record and OWN_RECORD in files:
            record = self._json(files, OWN_RECORD)
        # By the folder's own peft_type, as the index's library: peftkit writes one PEFT does not have
        # (BITFIT, PROMPT_TUNING_EMBEDDING_OUTPUT) for what PEFT cannot load, in PEFT's layout or its own.
        facts.peft_loads = file_in_peft_format(config)
        if facts.peft_loads:
            facts.format = "PEFT (loads with PEFT and peftkit)" if record else "PEFT"
        elif record or peft_type:
            facts.format = "peftkit"
        facts.kind = "adapter"
        own_method = record.get("method") if isinstance(record.get("method"), str) else None
        facts.method = own_method or (peft_type.lower() if peft_type else None)
        options = record.get("config") if isinstance(record.get("config"), dict) else {
            k: v for k, v in config.items() if k not in _NOT_OPTIONS
        }
        for key, value in sorted(options.items()):
            shown = _scalar(value)
            if shown is not None and key not in _NOT_OPTIONS and value is not None:
                facts.options.append((key, shown))
        facts.options = facts.options[:MAX_OPTIONS]
        targets = config.get("target_modules", options.get("target_modules"))
        facts.target_modules = _strings(targets, MAX_TARGETS)
        base = config.get("base_model_name_or_path")
        facts.base_model = short_name(base)
        arch = record.get("base_model") if isinstance(record.get("base_model"), dict) else {}
        if arch:
            parts = [_scalar(arch.get(k)) for k in ("class", "model_type")]
            sizes = [f"{k.replace('_', ' ')} {arch[k]}" for k in ("hidden_size", "num_hidden_layers")
                     if _scalar(arch.get(k))]
            facts.architecture = ", ".join([p for p in parts if p] + sizes) or None
        task_type = config.get("task_type")
        facts.task_type = task_type if isinstance(task_type, str) else None
        facts.parameters = self._parameters(files.get(WEIGHTS))

    def _adapterhub(self, facts: Facts, files: Mapping[str, FileEntry], config: Mapping[str, Any]) -> None:
        """An AdapterHub folder (``adapters``' layout): the method and options are under ``"config"``, the base
        model is ``model_name``, the weights ``adapter.safetensors``."""
        options = config["config"]
        facts.kind, facts.format = "adapter", "AdapterHub (adapters; loads with peftkit)"
        facts.method = adapterhub.method_of(options)
        facts.options = [(key, shown) for key, value in sorted(options.items())
                         if value is not None and (shown := _scalar(value)) is not None][:MAX_OPTIONS]
        facts.base_model = short_name(config.get("model_name"))
        model_type = _scalar(config.get("model_type"))
        model_class = _scalar(config.get("model_class"))
        facts.architecture = ", ".join(p for p in (model_class, model_type) if p) or None
        facts.parameters = self._parameters(files.get(ADAPTERHUB_WEIGHTS))

    def _composition(self, facts: Facts, files: Mapping[str, FileEntry]) -> None:
        data = self._json(files, COMPOSITION)
        facts.kind, facts.format = "composition", "peftkit composition"
        facts.composition = _scalar(data.get("composition_string"))
        for key, kind in (("adapters", "adapter"), ("fusions", "fusion")):
            table = data.get(key) if isinstance(data.get(key), dict) else {}
            for name, folder in sorted(table.items()):
                if isinstance(folder, str) and len(facts.members) < MAX_MEMBERS:
                    folder = folder.strip("/")
                    inside = any(p.startswith(folder + "/") for p in files)
                    facts.members.append(Member(str(name)[:MAX_VALUE_CHARS], kind, folder if inside else None))
        base = data.get("base_model_name_or_path")
        facts.base_model = short_name(base)

    def _fusion(self, facts: Facts, files: Mapping[str, FileEntry]) -> None:
        data = self._json(files, FUSION)
        facts.kind, facts.format = "fusion", "peftkit fusion"
        facts.composition = _scalar(data.get("composition"))
        fuse = data.get("fuse") if isinstance(data.get("fuse"), dict) else {}
        children = fuse.get("children") if isinstance(fuse.get("children"), list) else []
        names = [c[:MAX_VALUE_CHARS] for c in children if isinstance(c, str)][:MAX_MEMBERS]
        facts.members = [Member(name, "adapter", None) for name in names]
        base = data.get("base_model_name_or_path")
        facts.base_model = short_name(base)
        facts.parameters = self._parameters(files.get("fusion_model.safetensors"))
