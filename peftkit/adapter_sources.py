"""Adapters named on a command line or in a call: local adapter folders and hub ids, made into local folders.

``peftkit merge`` and automatic composition take their members as adapter folders (``out/sst2``) or hub
ids (``alice/sst2@v2``) mixed freely; :func:`fetch_adapters` pulls the hub ids into the cache (verified)
and gives every member a folder and an adapter name, :func:`plain_base_model` loads the base model the
members were made for. Imports no torch until a model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from peftkit.core.adapter_names import distinct_names
from peftkit.core.errors import AdapterLoadError, PeftkitError
from peftkit.core.model_source import looks_local

if TYPE_CHECKING:  # pragma: no cover
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
