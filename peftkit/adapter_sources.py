"""Adapters named on a command line or in a call: local adapter folders and hub ids, made into local folders.

``peftkit merge`` and automatic composition take their members as adapter folders (``out/sst2``) or hub
ids (``alice/sst2@v2``) mixed freely; :func:`fetch_adapters` pulls the hub ids into the cache (verified)
and gives every member a folder and an adapter name, :func:`check_members_fit_base` refuses a member made
for another model from BASE's config alone, and :func:`plain_base_model` loads the base model the members
were made for. Imports no torch until a model loads.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

from peftkit.core.adapter_names import distinct_names
from peftkit.core.errors import AdapterLoadError, PeftkitError
from peftkit.core.model_source import looks_local

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.core.method import Method
    from peftkit.core.model import AdaptedModel

_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass
class AdapterSource:
    """One member as found: its adapter name, what was given (a folder, or the hub repo id), the commit
    pulled (hub members only) and its local folder."""

    name: str
    source: str
    revision: str | None
    path: str


def fetch_adapters(refs: Sequence[str], hub: Any, token: str | None, progress: bool, *,
                   role: str = "member") -> list[AdapterSource]:
    """Each of ``refs`` as a local folder, in the order given: an existing folder as it is, a hub id
    (``namespace/name[@revision]``) pulled into the cache. Names: a folder's own name (see
    :func:`folder_names`), a hub repo's name (``namespace__name`` where two would clash, as ``peftkit.load``
    names them). A ref that looks like a path but is no folder fails before anything is downloaded,
    naming it as ``role``."""
    from peftkit.hub_client.backend import HubBackend
    from peftkit.hub_client.compose import member_names
    from peftkit.hub_client.resolve import open_hub, parse_ref
    from peftkit.hub_client.snapshot import pull_snapshot

    local = [r for r in refs if Path(r).is_dir()]
    for ref in refs:
        if ref not in local and looks_local(ref.partition("@")[0] if not ref.startswith((".", "/", "~")) else ref):
            what = "a file" if Path(ref).exists() else "no such folder"
            raise AdapterLoadError(f"{role} {ref!r} is not an adapter folder ({what}); give adapter folders or "
                                   f"hub ids such as alice/sentiment@v2")
    remote = {r: parse_ref(r) for r in refs if r not in local}
    local_names = folder_names(local)
    names = member_names(list(remote.values()), taken=set(local_names.values()))
    found = {r: AdapterSource(local_names[r], r, None, str(Path(r))) for r in local}
    if remote:
        backend = open_hub(hub, token=token)
        try:
            for text, ref in remote.items():
                pulled = pull_snapshot(backend, ref, progress=progress)
                found[text] = AdapterSource(names[ref], ref.repo_id, pulled.commit, str(pulled.path))
        finally:
            if not isinstance(hub, HubBackend):
                backend.close()
    return [found[r] for r in refs]


def folder_names(folders: Sequence[str]) -> dict[str, str]:
    """An adapter name for each of ``folders``: the folder's own name (``runs/sst2`` is ``sst2``; ``.`` the
    current folder's name) in the characters adapter names take (``sst2.v2`` is ``sst2_v2``), else
    ``parent__name`` where two folders share a name (``run1/final`` and ``run2/final``), else numbered.
    A name torch keeps for itself (``train``, ``eval``...) gets ``_adapter`` appended."""
    levels = [lambda f: _adapter_name(Path(f).resolve().name),
              lambda f: _adapter_name(f"{Path(f).resolve().parent.name}__{Path(f).resolve().name}")]
    return distinct_names(folders, levels)


def _adapter_name(text: str) -> str:
    from peftkit.core.layer import name_taken_by_torch

    name = _NOT_IN_NAMES.sub("_", text).strip("_-")[:128] or "adapter"
    return f"{name}_adapter" if name_taken_by_torch(name) else name


def adapter_configs(paths: Sequence[str | None]) -> list[dict[str, Any]]:
    """The saved adapter configs of those ``paths`` that are adapter folders (what picks the base model's
    class and the hub id it records)."""
    from peftkit.core.serialization import CONFIG_NAME, read_config

    return [read_config(Path(p)) for p in paths if p and (Path(p) / CONFIG_NAME).is_file()]


def plain_base_model(base: Any, paths: Sequence[str | None], progress: bool, labels: list[str] | None = None, *,
                     who: str = "this command") -> "AdaptedModel":
    """``base`` (a model object, or a folder / hub id loaded with the class the adapters in ``paths`` were
    saved from) wrapped with no adapter; with ``labels``, its classification head sized and named for them.
    An already adapted model is refused: ``who`` loads the members onto the plain model itself."""
    from peftkit.core.model import AdaptedModel

    if isinstance(base, AdaptedModel):
        raise PeftkitError(f"pass the plain base model (or its folder / hub id), not an adapted model: {who} loads "
                           f"the adapters onto it itself")
    if isinstance(base, (str, Path)):
        from peftkit.core.model_source import model_source_options
        from peftkit.hub_client.compose import load_base_model, transformers_progress

        options = model_source_options(str(base), "the base model")
        if labels is not None:
            options.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                           label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
        with transformers_progress(progress):
            module = load_base_model(str(base), adapter_configs(paths), **options)
    else:
        module = base
    return AdaptedModel(module)


def saved_method(data: dict[str, Any], where: str) -> "Method":
    """The installed method that reads a saved adapter config ``data`` (PEFT's, peftkit's or AdapterHub's),
    as loading it would pick; an unknown one fails naming the plugin to install."""
    from peftkit.core.adapterhub_format import claiming_method, is_adapterhub_config
    from peftkit.core.plugins import get_registry
    from peftkit.core.serialization import method_for

    if is_adapterhub_config(data):
        return claiming_method(get_registry().methods.values(), data, where)[0]
    return method_for(data, where)


def check_members_fit_base(base: Any, found: Sequence[AdapterSource]) -> None:
    """Refuse a member made for another model than ``base`` before the base model's weights load (they may
    be gigabytes), from BASE's ``config.json`` and the members' saved configs: the structure peftkit records
    (model type, hidden size, layers: what loading the adapter checks) and the modules each member adapts,
    looked up in an empty model built from that config on torch's meta device (no weights). As loading
    an adapter does, a member recorded for another hub id whose shapes fit is only warned about: the same
    model has many names (a local copy, a renamed repo). A model object, or a BASE whose config cannot be
    read here, is not checked: loading it reports its own errors."""
    if not isinstance(base, (str, Path)):
        return
    config = _base_config(str(base))
    if config is None:
        return
    datas = adapter_configs([source.path for source in found])
    _check_recorded_structure(config, found, datas)
    _check_targets_exist(str(base), config, found, datas)
    for source, data in zip(found, datas):
        _warn_other_hub_id(str(base), data.get("base_model_name_or_path"), source.source)


def _base_config(name_or_path: str) -> Any:
    """BASE's transformers config (only ``config.json`` is read or downloaded), None when it cannot be read."""
    from transformers import AutoConfig

    from peftkit.core.model_source import model_source_options

    options = model_source_options(name_or_path, "the base model")  # offline without a cached copy: fails now
    try:
        return AutoConfig.from_pretrained(name_or_path, **options)
    except Exception:  # noqa: BLE001 - loading the base model reports an unreadable one with its own message
        return None


def _check_recorded_structure(config: Any, found: Sequence[AdapterSource], datas: list[dict[str, Any]]) -> None:
    from peftkit.core.serialization import check_base_model

    shim = SimpleNamespace(base_model=SimpleNamespace(config=config))  # what check_base_model reads
    for source, data in zip(found, datas):
        check_base_model(shim, data, f"member {source.source!r}")  # type: ignore[arg-type]


def _check_targets_exist(base: str, config: Any, found: Sequence[AdapterSource], datas: list[dict[str, Any]]
                         ) -> None:
    """Refuse a member whose target modules or task head the base model does not have (a PEFT folder records
    no structure, only the base's name), as loading it would after the weights."""
    from peftkit.core.adapterhub_format import is_adapterhub_config
    from peftkit.core.errors import PluginError
    from peftkit.core.model import AdaptedModel
    from peftkit.core.serialization import config_from_data

    empty = _empty_model(config, datas)
    if empty is None:
        return
    model = AdaptedModel(empty)
    for source, data in zip(found, datas):
        if is_adapterhub_config(data):  # its sites follow AdapterHub's own layout: loading checks them
            continue
        where = f"member {source.source!r}"
        method = saved_method(data, where)
        try:
            adapter_config = config_from_data(method, data, where)
            model.adapted_sites(method, adapter_config, model.resolve_modules_to_save(adapter_config, False))
        except PluginError:
            continue  # a plugin's own failure on an empty model: loading the real one decides
        except PeftkitError as exc:
            made_for = data.get("base_model_name_or_path")
            raise AdapterLoadError(
                f"{where} does not fit the base model {base!r}: {exc}. It was made for "
                f"{repr(made_for) if made_for else 'another model'}; pass the base model it was trained on, "
                f"or leave this member out") from None


def _empty_model(config: Any, datas: list[dict[str, Any]]) -> "nn.Module | None":
    """The model class the members were saved from, built from ``config`` on the meta device (no memory, no
    weights), or None when it cannot be built so."""
    import torch

    from peftkit.hub_client.compose import model_class_for

    try:
        cls = model_class_for(datas)
        with torch.device("meta"):
            return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except Exception:  # noqa: BLE001 - loading the base model reports a class that does not fit it
        return None


def _warn_other_hub_id(base: str, recorded: Any, source: str) -> None:
    """Warn when BASE and a member's record are two different hub ids (not local folders) though the shapes
    fit: ``peftkit compose``'s rule, as the same model may be named twice."""
    if not isinstance(recorded, str) or recorded == base:
        return
    if "/" in recorded and "/" in base and not looks_local(recorded) and not looks_local(base):
        warnings.warn(f"member {source!r} was made for {recorded!r}; the base model is {base!r}. Its shapes fit, "
                      f"so it is used; check that it is the same model", stacklevel=3)
