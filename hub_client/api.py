"""The hub client's Python API: ``peftkit.hub.push/pull/search/info/delete/storage``, ``peftkit.load``.

Every function takes ``hub=``: ``None`` (``PEFTKIT_HUB``, else the embedded
local hub), ``"local"``, ``"local:/folder"``, a registry URL
(``"http://host:8080"``), ``"hf"`` (the Hugging Face Hub), or a backend
object. See :mod:`peftkit.hub_client.resolve`.

Imports neither torch nor huggingface_hub until a function needs them.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from peftkit.hub_rules.names import is_commit_sha, name_problem
from peftkit.hub_rules.storage import NamespaceUsage

from .backend import AdapterInfo, HubBackend, PushResult, SearchQuery
from .cache import offline_setting
from .compose import load, save_composed
from .errors import HubAuthError, HubError, InvalidRepoRef, OfflineError, ReadOnlyTokenWarning
from .resolve import hub_address, open_hub, parse_ref
from .snapshot import pull_snapshot
from .upload import CardOptions, prepare

__all__ = ["push", "pull", "search", "info", "delete", "login", "logout", "whoami", "storage", "load",
           "save_composed"]

SORTS = ("downloads", "recent")


def push(model_or_folder: Any, repo_id: str, *, hub: str | HubBackend | None = None,
         adapter_name: str | None = None, private: bool | None = None, commit_message: str | None = None,
         revision: str = "main", task: str | None = None, dataset: str | Sequence[str] | None = None,
         metrics: dict[str, float] | None = None, tags: Sequence[str] | None = None,
         base_model: str | None = None, description: str | None = None, license: str | None = None,
         language: str | Sequence[str] | None = None, token: str | None = None,
         progress: bool = True, format: str | None = None) -> PushResult:
    """Publish an adapter (a saved folder, or ``adapter_name`` of an adapted model) as ``repo_id``.

    ``format="adapters"`` publishes it in AdapterHub's folder format (a live model's adapter is saved
    so; a folder in peftkit's format is loaded onto its base model and saved so), ``"peftkit"`` the
    other way; None pushes a folder as it is and a live model's adapter in peftkit's format.

    Writes the model card (base model, method, task, dataset, metrics, tags,
    usage), sets the visibility (``private``: ``None`` keeps an existing
    repo's, new repos are public), and commits everything at once to
    ``revision`` (a branch, created from ``main`` when missing). Files of the
    previous commit that the folder no longer has are removed in the same
    commit. A failed push leaves the hub as it was. Returns the new commit.
    """
    ref = parse_ref(repo_id)
    if ref.revision is not None:
        raise HubError(f"push to {ref.repo_id} with revision={ref.revision!r}, not {repo_id!r}")
    _check_branch(revision)
    options = CardOptions(task=task, dataset=list(dataset) if isinstance(dataset, (list, tuple)) else dataset,
                          metrics=_metrics(metrics), tags=[tags] if isinstance(tags, str) else list(tags or []),
                          base_model=base_model,
                          description=description, license=license,
                          language=list(language) if isinstance(language, (list, tuple)) else language)
    with _opened_online(hub, token, f"pushing {ref.repo_id} to", "push") as backend, \
            tempfile.TemporaryDirectory(prefix="peftkit-push-") as tmp:
        upload = prepare(model_or_folder, ref.repo_id, Path(tmp), adapter_name=adapter_name, options=options,
                         format=format)
        return backend.push(ref.repo_id, upload.files, private=private,
                            commit_message=commit_message or upload.default_message, revision=revision,
                            progress=progress)


@contextlib.contextmanager
def _opened_online(hub: str | HubBackend | None, token: str | None, doing: str, verb: str) -> Iterator[HubBackend]:
    """The backend of ``hub`` for a call that needs it to answer (no cache to fall back on): refused at once
    in offline mode when it is across the network (:func:`refuse_offline`), closed afterwards unless ``hub``
    was a backend object the caller keeps."""
    backend = open_hub(hub, token=token)
    try:
        refuse_offline(backend, doing, verb)
        yield backend
    finally:
        if not isinstance(hub, HubBackend):
            backend.close()


def refuse_offline(backend: HubBackend, doing: str, verb: str) -> None:
    """Fail at once, before any request, when offline mode is on and ``backend`` is across the network.

    Only pulls have a cache to fall back on; a search, info or push would
    otherwise wait for a connection that offline mode forbids. The embedded
    hub is on this machine and is never refused.
    """
    setting = offline_setting()
    if setting is None or not backend.remote:
        return
    name = setting.split("=", 1)[0]
    raise OfflineError(f"offline mode is on ({setting}): {doing} {backend.address} needs the network; unset "
                       f"{name} to {verb} there, or use the embedded hub (--hub local), which works offline")


def _check_branch(revision: str) -> None:
    if not isinstance(revision, str) or not revision.strip():
        raise HubError("revision is empty; push to a branch such as 'main'")
    if is_commit_sha(revision):
        raise HubError(f"revision {revision!r} is a commit sha; a push goes to a branch (e.g. 'main' or 'v2')")


def _metrics(metrics: dict[str, float] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    out = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise HubError(f"metric {key!r} must be a number, got {value!r}") from None
    return out


def pull(ref: str, hub: str | HubBackend | None = None, *, revision: str | None = None, token: str | None = None,
         cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Download ``namespace/name[@revision]`` into the cache and return its folder (do not modify it).

    Files are checked against the sizes and hashes the hub announces and
    appear only once complete. With ``PEFTKIT_OFFLINE=1`` or
    ``HF_HUB_OFFLINE=1`` the folder comes from the cache, without any request.
    """
    backend = open_hub(hub, token=token)
    try:
        return pull_snapshot(backend, parse_ref(ref, revision), cache_dir=cache_dir, progress=progress).path
    finally:
        if not isinstance(hub, HubBackend):
            backend.close()


def search(text: str | None = None, hub: str | HubBackend | None = None, *, base_model: str | None = None,
           method: str | None = None, task: str | None = None, tags: Iterable[str] = (), author: str | None = None,
           dataset: str | None = None, sort: str = "downloads", limit: int = 20,
           token: str | None = None) -> list[AdapterInfo]:
    """Adapter repos matching every filter given: free ``text``, ``base_model``, ``method``, ``task``,
    ``tags``, ``author``, ``dataset`` (a dataset the card lists); sorted by ``downloads`` or ``recent``;
    at most ``limit``."""
    if sort not in SORTS:
        raise HubError(f"unknown sort {sort!r}; use one of: {', '.join(SORTS)}")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise HubError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(tags, str):
        tags = [tags]
    query = SearchQuery(text=text or None, base_model=base_model or None, method=method or None, task=task or None,
                        tags=tuple(tags), author=author or None, dataset=dataset or None, sort=sort, limit=limit)
    with _opened_online(hub, token, "searching", "search") as backend:
        return backend.search(query)


def info(ref: str, hub: str | HubBackend | None = None, *, revision: str | None = None,
         token: str | None = None) -> AdapterInfo:
    """A repo's metadata, files (with sizes and hashes) and branches, at a revision (default ``main``)."""
    parsed = parse_ref(ref, revision)
    with _opened_online(hub, token, f"reading {parsed.repo_id} on", "read it") as backend:
        return backend.info(parsed.repo_id, parsed.revision)


def delete(repo_id: str, hub: str | HubBackend | None = None, *, token: str | None = None,
           missing_ok: bool = False) -> bool:
    """Delete a repo with its whole history (there is no undo); returns whether there was one (False only with
    ``missing_ok``: nothing was deleted)."""
    parsed = parse_ref(repo_id)
    if parsed.revision:
        raise HubError(f"delete removes a whole repo; give {parsed.repo_id}, without @{parsed.revision}")
    with _opened_online(hub, token, f"deleting {parsed.repo_id} on", "delete it") as backend:
        return backend.delete(parsed.repo_id, missing_ok=missing_ok)


def login(token: str, hub: str | None = None, *, verify: bool = True) -> str | None:
    """Store ``token`` for ``hub`` in ``$PEFTKIT_HOME/hub_tokens.json`` (mode 0600).

    With ``verify`` the hub is asked who the token belongs to first, and a
    refused token is not stored. Returns that user name (``None`` unverified).
    A read-only token is stored with a :class:`ReadOnlyTokenWarning`.
    """
    from .auth import checked_token, is_huggingface_address, save_token, write_token_hint

    token = checked_token(token)
    backend = open_hub(hub, token=token)
    try:
        if not backend.remote:
            raise HubError(f"the hub {backend.address} is on this machine and needs no token; log in to a registry "
                           f"(--hub http://host:port) or to the Hugging Face Hub (--hub hf)")
        if not verify:
            save_token(backend.key, token)
            return None
        refuse_offline(backend, "checking a token with", "log in")
        try:
            rights = backend.token_rights()
            user = rights.user if rights is not None else backend.whoami()
        except HubAuthError as exc:
            raise HubAuthError(f"{exc}. The token was not saved.") from None
        if not user:
            raise HubAuthError(f"the hub at {backend.address} did not accept the token; it was not saved")
        save_token(backend.key, token)
        if rights is not None and rights.read_only:
            hint = write_token_hint(backend.address, user, huggingface=is_huggingface_address(backend.address))
            warnings.warn(ReadOnlyTokenWarning(
                f"the token of {user} is read-only: pulls, searches and private repos work, pushes will be refused; "
                f"to push, {hint}"), stacklevel=2)
        return user
    finally:
        backend.close()


def logout(hub: str | None = None) -> bool:
    """Forget the token stored for ``hub``; returns whether one was stored."""
    from .auth import delete_token

    backend = open_hub(hub)
    try:
        return delete_token(backend.key)
    finally:
        backend.close()


def whoami(hub: str | None = None, *, token: str | None = None) -> str | None:
    """The user a hub knows the token as (``None`` for the local hub)."""
    backend = open_hub(hub, token=token)
    try:
        if backend.remote and not getattr(backend, "token", None):
            from .auth import missing_token_message

            raise HubAuthError(missing_token_message(backend.address, "whoami"))
        refuse_offline(backend, "asking", "ask")
        return backend.whoami()
    finally:
        backend.close()


def storage(namespace: str | None = None, hub: str | HubBackend | None = None, *,
            token: str | None = None) -> NamespaceUsage:
    """How many bytes ``namespace`` (a user or organization; default: the token's user) stores on ``hub``,
    and its limit: ``used_bytes``, ``quota_bytes`` (None: no limit) and ``source`` of the limit.

    A registry tells only a user their own usage, and an organization's to its members; anyone else gets
    :class:`NamespaceNotFound`, as for a namespace that does not exist. The embedded hub has no accounts:
    name the namespace; it has no limit unless one was set there. The Hugging Face Hub has no such API
    and is refused before any request.
    """
    if namespace is not None and (problem := name_problem(namespace, "namespace")):
        raise InvalidRepoRef(problem)
    with _opened_online(hub, token, "reading storage usage on", "read it") as backend:
        return backend.storage(namespace)


def describe_hub(hub: str | None = None) -> str:
    return hub_address(hub)


__all__ += ["describe_hub", "refuse_offline", "SORTS"]
