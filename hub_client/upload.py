"""What a push uploads: the folder's files and a model card written for the hub.

A push takes a saved folder (an adapter, a composition from
``save_composition()``, or a fusion from ``save_fusion()``) or an adapter of a
live model (saved to a temporary folder first). It uploads every file of the
folder except hidden ones and a training run's checkpoints and records
(:func:`stays_local`), refuses pickle weights, and writes ``README.md``
itself with the Hub's conventions (``library_name``, ``base_model``, tags
``base_model:adapter:<id>`` and the method, ``pipeline_tag``, datasets,
metrics, a usage snippet), through :mod:`peftkit.core.card`. The card's
existing metadata (license, language, extra tags...) and metrics are kept
(pushed metrics add to them or replace those of the same name). A body
peftkit wrote (``save_adapter``, ``peftkit train``) is written anew for the
repo, keeping its description; a body the user wrote or edited is kept as it is.

Nothing here imports torch unless a live model is pushed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from peftkit.core.adapterhub_format import SAFE_WEIGHTS_NAME as ADAPTERHUB_WEIGHTS
from peftkit.core.adapterhub_format import is_adapterhub_config
from peftkit.core.card import card_metadata, card_metrics, generated_body, read_card_metadata, render_card
from peftkit.core.model_source import looks_local
from peftkit.core.peft_format import file_in_peft_format, method_name_of_folder
from peftkit.hub_rules.adapterhub import LIBRARY as ADAPTERHUB_LIBRARY
from peftkit.hub_rules.cards import ADAPTER_OF_TAG_PREFIX, TASK_TYPE_TO_PIPELINE, split_front_matter

from .convert import PUSH_FORMATS, converted
from .errors import BaseModelWarning, HubError

CONFIG = "adapter_config.json"
COMPOSITION = "composition.json"
FUSION = "fusion_config.json"
CARD = "README.md"
#: Suffixes of pickle files: peftkit never loads them, so it never publishes them either.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: A training run's own state, never published (see :func:`stays_local`).
_RUN_FOLDERS = frozenset({"checkpoints", "runs"})
#: The resume state a training run (peftkit train, AdapterTrainer) writes beside its adapter: every trainable
#: tensor by parameter name. The adapter folder is the portable result; this file restores training exactly,
#: also for methods whose trained form differs from the saved one (prefix tuning's MLP).
TRAINABLE_STATE_FILE = "trainable_state.safetensors"
_RUN_FILES = frozenset({"train_results.json", "trainer_state.json", "training_args.bin", TRAINABLE_STATE_FILE})


@dataclass
class Upload:
    files: dict[str, Path]
    kind: str
    method: str | None
    base_model: str | None
    default_message: str


@dataclass
class CardOptions:
    task: str | None = None
    dataset: str | list[str] | None = None
    metrics: dict[str, float] | None = None
    tags: list[str] | None = None
    base_model: str | None = None
    description: str | None = None
    license: str | None = None
    language: str | list[str] | None = None


def adapter_name_for(repo_id: str) -> str:
    """The adapter name a converted folder records: the repo's name in peftkit's adapter-name alphabet."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", repo_id.rpartition("/")[2]).strip("_-")
    return name[:64] or "adapter"


def is_live_model(source: Any) -> bool:
    return hasattr(source, "save_adapter") and hasattr(source, "adapters") and not isinstance(source, (str, Path))


def pick_adapter(model: Any, adapter_name: str | None) -> str:
    names = list(model.adapters)
    if adapter_name is not None:
        if adapter_name not in names:
            raise HubError(f"the model has no adapter {adapter_name!r}; its adapters: {', '.join(names) or 'none'}")
        return adapter_name
    if "default" in names:
        return "default"
    if len(names) == 1:
        return names[0]
    raise HubError(f"the model holds several adapters ({', '.join(names) or 'none'}); say which to push with "
                   f"adapter_name=... (--adapter on the command line)")


def prepare(source: Any, repo_id: str, workdir: Path, *, adapter_name: str | None, options: CardOptions,
            format: str | None = None) -> Upload:
    """Collect the files to upload for ``source`` and write their card into ``workdir``. ``format``
    ("peftkit" or "adapters"; None: as the folder is saved) converts an adapter (see :mod:`.convert`)."""
    if format is not None and format not in PUSH_FORMATS:
        raise HubError(f"unknown folder format {format!r}; choose one of {', '.join(PUSH_FORMATS)}")
    if is_live_model(source):
        name = pick_adapter(source, adapter_name)
        folder = workdir / "adapter"
        source.save_adapter(str(folder), name, format=format or "peftkit")
    else:
        if adapter_name is not None:
            raise HubError("adapter_name applies to a live model; a folder is pushed as it is")
        folder = Path(os.fspath(source)).expanduser()
        if not folder.is_dir():
            raise HubError(f"{str(folder)!r} is not a folder; push a saved adapter folder or an adapted model")
        if format is not None:
            if not (folder / CONFIG).is_file():
                raise HubError(f"format={format!r} converts an adapter folder; {folder} has no {CONFIG}")
            folder = converted(folder, _read_json(folder / CONFIG), format, workdir, options.base_model,
                               adapter_name_for(repo_id))
    files = _collect(folder)
    if (folder / CONFIG).is_file():
        return _adapter_upload(folder, files, repo_id, workdir, options)
    if (folder / COMPOSITION).is_file():
        return _composition_upload(folder, files, repo_id, workdir, options)
    if (folder / FUSION).is_file():
        return _fusion_upload(folder, files, repo_id, workdir, options)
    present = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())[:8]) or "nothing"
    raise HubError(f"{str(folder)!r} is not an adapter, composition or fusion folder (no {CONFIG}, {COMPOSITION} "
                   f"or {FUSION}; it holds: {present}); save one with save_adapter(), save_composition() "
                   f"or save_fusion() first")


def stays_local(rel: PurePosixPath) -> bool:
    """Whether a path of a pushed folder is left out: hidden files and a training run's own state.

    A ``peftkit train`` (or ``transformers.Trainer``) output folder holds
    resumable checkpoints and run records beside the adapter; they describe
    the local run (optimizer state in pickle files, local paths), so the
    folder can be pushed as it is and only the adapter goes up.
    """
    if any(part.startswith(".") for part in rel.parts):
        return True
    top = rel.parts[0]
    if len(rel.parts) > 1:
        return top in _RUN_FOLDERS or top.startswith("checkpoint-")
    return top in _RUN_FILES


def _collect(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    pickles = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if stays_local(PurePosixPath(rel.as_posix())) or not path.is_file():
            continue
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            pickles.append(rel.as_posix())
            continue
        files[rel.as_posix()] = path
    if pickles:
        raise HubError(f"{folder} holds pickle files ({', '.join(pickles[:3])}), which peftkit never loads or "
                       f"publishes (they can run code when loaded); save the weights as safetensors and remove them")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HubError(f"{path} is not valid JSON ({exc}); save the folder again") from None
    if not isinstance(data, dict):
        raise HubError(f"{path} must hold a JSON object")
    return data




def _method_of(config: dict[str, Any], folder: Path) -> str | None:
    from peftkit.core.errors import AdapterLoadError
    from peftkit.core.own_metadata import read_own_metadata

    try:
        own = read_own_metadata(folder, config)  # peftkit.json, or the config's "peftkit" key
    except AdapterLoadError as exc:
        raise HubError(str(exc)) from None
    method = method_name_of_folder(config, own)
    return method.lower() if method else None


def _adapterhub_method_of(config: dict[str, Any], where: str) -> str:
    """The peftkit method that reads an AdapterHub folder's config (HubError when none does)."""
    from peftkit.core.adapterhub_format import claiming_method
    from peftkit.core.errors import AdapterLoadError
    from peftkit.core.plugins import get_registry

    try:
        method, _ = claiming_method(get_registry().methods.values(), config, where)
    except AdapterLoadError as exc:
        raise HubError(str(exc)) from None
    return method.name


def _resolve_base(recorded: str | None, given: str | None, where: str) -> tuple[str | None, bool]:
    """The base model id for the card, and whether the config must be rewritten to record it."""
    if given:
        if recorded and recorded != given and not looks_local(recorded):
            raise HubError(f"{where} was saved for base model {recorded!r}, not {given!r}; push it without "
                           f"base_model, or load and save it on {given!r} first")
        return given, recorded != given
    if not recorded:
        warnings.warn(f"{where} records no base model, so nobody can find it by base model; pass "
                      f"base_model='org/name' (--base-model)", BaseModelWarning, stacklevel=4)
    elif looks_local(recorded):
        warnings.warn(f"{where} records its base model as the local folder {recorded!r}, which nobody else can "
                      f"find; pass base_model='org/name' (--base-model) to publish the hub id instead",
                      BaseModelWarning, stacklevel=4)
    return recorded, False


def _existing_card(folder: Path) -> tuple[dict[str, Any], str]:
    card = folder / CARD
    if not card.is_file():
        return {}, ""
    text = card.read_text(encoding="utf-8", errors="replace")
    try:
        meta, body = split_front_matter(text)
    except ValueError:
        return read_card_metadata(text) if text.startswith("---") else {}, ""
    return meta, body


def _card_datasets(meta: dict[str, Any]) -> list[str] | None:
    """The datasets a folder's card already names (e.g. ``peftkit train``'s), so that metrics pushed
    without ``--dataset`` are still recorded against one in the model-index."""
    datasets = meta.get("datasets")
    datasets = [datasets] if isinstance(datasets, str) else datasets
    if isinstance(datasets, list) and datasets and all(isinstance(d, str) and d for d in datasets):
        return datasets
    return None


def _merged_metrics(old_meta: dict[str, Any], pushed: dict[str, float] | None, where: str
                    ) -> dict[str, float] | None:
    """The card's metrics after the push: the folder card's, with ``pushed`` added or replacing those of the
    same name (None: none at all, or a model-index fuller than peftkit writes, which is then kept as it is)."""
    old = card_metrics(old_meta)
    if old is None:
        if pushed:
            raise HubError(f"{where}/{CARD} has a model-index with more than one result or fields peftkit does "
                           f"not write, so the pushed metrics ({', '.join(pushed)}) cannot be merged into it; "
                           f"add them to its model-index yourself and push without metrics (--metric)")
        return None
    return {**old, **(pushed or {})} or None


def _merged_meta(new: dict[str, Any], old: dict[str, Any], options: CardOptions) -> dict[str, Any]:
    """``new`` (from this push) wins; the old card's other keys and tags are kept."""
    meta = dict(new)
    for key, value in old.items():
        if key == "tags" or key in meta:
            continue
        if key == "pipeline_tag" and options.task:
            continue
        meta[key] = value
    old_tags = old.get("tags") or []
    if isinstance(old_tags, str):
        old_tags = [old_tags]
    tags = list(meta.get("tags") or [])
    for tag in old_tags:
        tag = str(tag)
        if tag.startswith(ADAPTER_OF_TAG_PREFIX) and new.get("base_model"):
            continue  # the base model recorded now replaces the old one
        if tag.startswith("task:") and options.task:
            continue
        if tag not in tags:
            tags.append(tag)
    meta["tags"] = tags
    return meta


def _write_card(workdir: Path, meta: dict[str, Any], old_body: str, description: str | None,
                **render: Any) -> Path:
    """README.md for the push: ``meta`` over the folder card's body when the user wrote or edited it, else
    over a body written anew for the repo (``description``, else the old body's own, else a default)."""
    generated = generated_body(old_body) if old_body.strip() else None
    if old_body.strip() and generated is None:
        import yaml

        text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + old_body
    else:
        text = render_card(meta, description=description or (generated and generated.description), **render)
    path = workdir / CARD
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path


def _parameters(folder: Path, weights: str, config: dict[str, Any] | None = None) -> int | None:
    """The adapter's own trained numbers in ``folder / weights`` (``config``: its adapter_config.json): not the
    base embeddings PEFT saves beside an adapter, nor the tensors training does not change (``peftkit info``
    counts alike), or None without the file."""
    from peftkit.core.inspect_folder import tensor_counts
    from peftkit.core.own_metadata import read_own_metadata
    from peftkit.core.peft_format import frozen_tensors_of_folder

    path = folder / weights
    if not path.is_file():
        return None
    config = config or {}
    frozen = frozen_tensors_of_folder(config, read_own_metadata(folder, config)) if config else frozenset()
    try:
        return tensor_counts(path, config.get("modules_to_save"), frozen).parameters
    except Exception as exc:
        raise HubError(f"{path} is not a valid safetensors file ({exc}); save the adapter again") from None


def _adapter_upload(folder: Path, files: dict[str, Path], repo_id: str, workdir: Path,
                    options: CardOptions) -> Upload:
    where = str(folder)
    config = _read_json(folder / CONFIG)
    adapterhub = is_adapterhub_config(config)
    method = _adapterhub_method_of(config, where) if adapterhub else _method_of(config, folder)
    if method is None:
        raise HubError(f"{folder / CONFIG} names no method ('peftkit.method' or 'peft_type'); is it an adapter?")
    weights, base_key = ((ADAPTERHUB_WEIGHTS, "model_name") if adapterhub
                         else ("adapter_model.safetensors", "base_model_name_or_path"))
    if weights not in files:
        raise HubError(f"{folder} has no {weights}; save the adapter again")
    parameters = _parameters(folder, weights, config)
    base, rewrite = _resolve_base(config.get(base_key) or None, options.base_model, where)
    if rewrite:
        config = dict(config, **{base_key: base})
        patched = workdir / CONFIG
        patched.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files[CONFIG] = patched
    old_meta, old_body = _existing_card(folder)
    metrics = _merged_metrics(old_meta, options.metrics, where)
    task = options.task or old_meta.get("pipeline_tag") or TASK_TYPE_TO_PIPELINE.get(
        str(config.get("task_type") or "").upper())
    meta = card_metadata(method=method, base_model=base, peft_format=file_in_peft_format(config), task=task,
                         dataset=options.dataset or _card_datasets(old_meta), metrics=metrics,
                         tags=options.tags, license=options.license, language=options.language, name=repo_id)
    if adapterhub:  # as AdapterHub's repos on the Hugging Face Hub describe themselves
        meta = {**meta, "library_name": ADAPTERHUB_LIBRARY, "tags": [*meta["tags"], "adapters"]}
    meta = _merged_meta(meta, old_meta, options)
    files[CARD] = _write_card(workdir, meta, old_body, options.description, method=method,
                              adapter_name=repo_id.split("/")[-1], repo_id=repo_id, parameters=parameters,
                              metrics=metrics)
    return Upload(files, "adapter", method, base, f"Upload {method} adapter with peftkit")


def _composition_upload(folder: Path, files: dict[str, Path], repo_id: str, workdir: Path,
                        options: CardOptions) -> Upload:
    from peftkit.core.composition_io import read_composition

    try:
        data = read_composition(folder)
    except Exception as exc:
        raise HubError(str(exc)) from None
    methods = []
    parameters = 0
    for name, sub in sorted(data.get("adapters", {}).items()):
        sub_folder = folder / sub
        if not (sub_folder / CONFIG).is_file():
            raise HubError(f"{folder / COMPOSITION} lists adapter {name!r} in {sub!r}, which has no {CONFIG}; "
                           f"save the composition again")
        member = _read_json(sub_folder / CONFIG)
        method = _method_of(member, sub_folder)
        if method and method not in methods:
            methods.append(method)
        parameters += _parameters(sub_folder, "adapter_model.safetensors", member) or 0
    base, _ = _resolve_base(data.get("base_model_name_or_path"), options.base_model, str(folder))
    old_meta, old_body = _existing_card(folder)
    metrics = _merged_metrics(old_meta, options.metrics, str(folder))
    label = methods[0] if methods else "composition"
    extra = [m for m in methods[1:]] + ["composition"] + list(options.tags or [])
    meta = card_metadata(method=label, base_model=base, peft_format=False, task=options.task,
                         dataset=options.dataset or _card_datasets(old_meta), metrics=metrics, tags=extra,
                         license=options.license, language=options.language, name=repo_id)
    meta = _merged_meta(meta, old_meta, options)
    spec = data.get("composition_string") or str(data["node"])
    default = (
        f"A peftkit composition, `{spec}`, of {len(data.get('adapters', {}))} adapters"
        f"{' and ' + str(len(data.get('fusions', {}))) + ' fusions' if data.get('fusions') else ''} for "
        f"`{base or 'its base model'}`, made with peftkit. `peftkit.load` puts every member on the model and "
        f"activates the composition.")
    files[CARD] = _write_card(workdir, meta, old_body, options.description,
                              method=", ".join(methods) or "composition", adapter_name=repo_id.split("/")[-1],
                              repo_id=repo_id, default_description=default, parameters=parameters, metrics=metrics)
    return Upload(files, "composition", label, base, f"Upload composition {spec} with peftkit")


def _fusion_upload(folder: Path, files: dict[str, Path], repo_id: str, workdir: Path,
                   options: CardOptions) -> Upload:
    data = _read_json(folder / FUSION)
    base, _ = _resolve_base(data.get("base_model_name_or_path"), options.base_model, str(folder))
    old_meta, old_body = _existing_card(folder)
    metrics = _merged_metrics(old_meta, options.metrics, str(folder))
    meta = card_metadata(method="fusion", base_model=base, peft_format=False, task=options.task,
                         dataset=options.dataset or _card_datasets(old_meta), metrics=metrics, tags=options.tags,
                         license=options.license, language=options.language, name=repo_id)
    meta = _merged_meta(meta, old_meta, options)
    spec = data.get("composition") or "fuse(...)"
    default = (
        f"AdapterFusion weights for `{spec}` on `{base or 'its base model'}`, made with peftkit. Load the fused "
        f"adapters first, under the names the fusion lists, then this fusion.")
    files[CARD] = _write_card(workdir, meta, old_body, options.description, method="fusion",
                              adapter_name=repo_id.split("/")[-1], repo_id=repo_id, default_description=default,
                              parameters=_parameters(folder, "fusion_model.safetensors"), metrics=metrics)
    return Upload(files, "fusion", "fusion", base, f"Upload fusion {spec} with peftkit")
