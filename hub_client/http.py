"""Hubs that speak the Hugging Face Hub HTTP API: a peftkit registry server and huggingface.co.

One code path for both: ``huggingface_hub.HfApi`` with an ``endpoint``. The
registry answers every upload with ``regular`` (files travel inside the
commit), so a push is one NDJSON commit, atomic on the server; what the
push creates around it (a new repo, a new branch) is removed again when the
commit fails.

``huggingface_hub`` is imported when a backend is first used, never at
``import peftkit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import quote, urlsplit

from peftkit.core.reachability import name_not_resolved, unreachable
from peftkit.hub_rules import adapterhub
from peftkit.hub_rules.cards import as_list
from peftkit.hub_rules.storage import NamespaceUsage

from .auth import (EXPLICIT_TOKEN_SOURCE, missing_token_message, redact, refused_token_fix, resolve_token,
                   write_token_hint)
from .backend import AdapterInfo, HubBackend, PushResult, RemoteFile, SearchQuery, already_holds
from .errors import (HubAuthError, HubError, HubUnreachable, NamespaceNotFound, OfflineError, RepoNotFound,
                     QuotaExceeded, RevisionNotFound)
from .metadata import base_model_from, method_from_tags
from .near_names import with_near_names
from .token_rights import TokenRights, push_refusal
from .upload_progress import upload_bar

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
#: A peftkit registry's answer to "how much does a namespace store" (not part of the Hugging Face Hub's API).
STORAGE_PATH = "/api/namespaces/{namespace}/storage"
#: Files the Hub adds to every new repo; a push never deletes them.
_KEEP = frozenset({".gitattributes"})
_CONNECTION_ERROR_NAMES = frozenset({
    "ConnectError", "ConnectTimeout", "ConnectionError", "Timeout", "TimeoutException", "ReadTimeout",
    "NetworkError", "RemoteProtocolError", "ProxyError", "SSLError", "ReadError", "WriteError",
    "ConnectionRefusedError", "ConnectionResetError", "gaierror", "MaxRetryError", "NewConnectionError",
})


def hf_endpoint() -> str:
    """The Hugging Face Hub's address: ``HF_ENDPOINT`` when set (a mirror), else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def endpoint_key(endpoint: str) -> str:
    """A file-name-safe key for a hub URL: ``huggingface.co`` or ``127.0.0.1_8080-1a2b3c4d``."""
    parts = urlsplit(endpoint)
    host = parts.hostname or "hub"
    if host == "huggingface.co" and parts.scheme == "https" and parts.port in (None, 443) and not parts.path.strip("/"):
        return "huggingface.co"
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{host}_{parts.port}" if parts.port else host)
    return f"{slug}-{hashlib.sha256(endpoint.encode()).hexdigest()[:8]}"


def _is_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionRefusedError, ConnectionResetError, TimeoutError)):
            return True
        if any(cls.__name__ in _CONNECTION_ERROR_NAMES for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def _foreign_address_message(where: str, address: str, uri_error: str) -> str:
    """What to say when the hub named a repo at a URL on another host than ``address`` (huggingface_hub then
    refuses the URL: ``HfUriError``): a peftkit registry started with --public-url reached by another name."""
    found = re.search(r"'(https?://[^/'\s]+)", uri_error)
    if found is None:
        return f"{where}: the hub at {address} gave a link huggingface_hub refuses ({uri_error})"
    origin = found.group(1)
    return (f"{where}: the hub at {address} names its repos at {origin}, another address (a peftkit registry's "
            f"--public-url), and huggingface_hub refuses links to another host: use --hub {origin} (or "
            f"PEFTKIT_HUB={origin}) on this machine")


def _from_the_wire(exc: BaseException) -> bool:
    """Whether an exception comes from talking to the hub (huggingface_hub, the HTTP stack, the network)."""
    module = type(exc).__module__ or ""
    return (isinstance(exc, OSError) or _is_connection_error(exc)
            or module.split(".")[0] in ("huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3"))


def _root_reason(exc: BaseException) -> str:
    """The innermost message of a connection error ("[Errno 111] Connection refused")."""
    reason = str(exc)
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if str(current):
            reason = str(current)
        current = current.__cause__ or current.__context__
    return reason.splitlines()[0] if reason else type(exc).__name__


def is_name_lookup_error(exc: BaseException) -> bool:
    """Whether a failed request failed at the host name lookup (DNS), anywhere in its chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return True
        current = current.__cause__ or current.__context__
    return False


def unreachable_message(endpoint: str, reason: str, *, name_lookup_failed: bool) -> str:
    """What to tell a user whose hub does not answer: a host name that does not resolve is a wrong address
    (nothing was asked, so whether a server runs is beside the point); anything else may be a server
    that is down."""
    if name_lookup_failed:
        lookup = "" if name_not_resolved(reason) else " The host name could not be resolved (DNS)."
        return f"cannot reach hub at {endpoint}: {reason}.{lookup} Check the address (--hub / PEFTKIT_HUB)"
    return (f"cannot reach hub at {endpoint}: {reason}. Is the server running and the address right? "
            f"(--hub / PEFTKIT_HUB)")


def _tree(api: Any, repo_id: str, commit: str) -> list[RemoteFile]:
    """Every file of ``commit``, with its size, git blob id and (for LFS files) sha256."""
    out = []
    for entry in api.list_repo_tree(repo_id, revision=commit, recursive=True):
        if type(entry).__name__ != "RepoFile":
            continue
        lfs = getattr(entry, "lfs", None)
        out.append(RemoteFile(entry.path, int(entry.size), entry.blob_id,
                              getattr(lfs, "sha256", None) if lfs is not None else None))
    return out


class _Silent:
    """A tqdm stand-in that shows nothing (``--quiet``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        kwargs.pop("name", None)
        kwargs["disable"] = True
        self._bar = tqdm(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    def __enter__(self) -> Any:
        return self._bar.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._bar.__exit__(*exc)


class HttpBackend(HubBackend):
    """A hub behind an HTTP endpoint speaking the Hub API (a peftkit registry, or huggingface.co)."""

    def __init__(self, endpoint: str, *, token: str | None = None, huggingface: bool = False,
                 address: str | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.huggingface = huggingface
        self.address = address or self.endpoint
        self.key = endpoint_key(self.endpoint)
        self._explicit_token = token
        self._token: tuple[str | None, str] | None = None
        self._probed = False

    # -- tokens ------------------------------------------------------------------------------

    def _resolved_token(self) -> tuple[str | None, str]:
        if self._token is None:
            self._token = resolve_token(self.key, explicit=self._explicit_token, huggingface=self.huggingface)
        return self._token

    @property
    def token(self) -> str | None:
        return self._resolved_token()[0]

    def _require_token(self, action: str) -> str:
        token = self.token
        if not token:
            raise HubAuthError(missing_token_message(self.address, action))
        return token

    def _probe(self) -> None:
        """Fail fast when nothing can answer at the endpoint (huggingface_hub would retry for ~25 s).

        One probe per backend object, the same one model loading uses
        (:func:`peftkit.core.reachability.unreachable`, through a proxy when one is set).
        """
        if self._probed:
            return
        self._probed = True
        reason = unreachable(self.endpoint)
        if reason:
            raise HubUnreachable(unreachable_message(self.endpoint, reason,
                                                     name_lookup_failed=name_not_resolved(reason)))

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        self._probe()

        from peftkit import __version__

        # token=False, not None: never let huggingface_hub pick a stored huggingface.co token
        # for another server; resolve_token() already looked where a token may come from.
        return HfApi(endpoint=self.endpoint, token=self.token or False, library_name="peftkit",
                     library_version=__version__)

    # -- errors ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, where: str, *, repo_id: str | None = None, revision: str | None = None) -> Iterator[None]:
        """Turn huggingface_hub/network exceptions into hub errors that say what to do; never leak the token."""
        try:
            yield
        except HubError:
            raise
        except Exception as exc:
            if not _from_the_wire(exc):
                raise  # a bug, not the hub's answer: keep its traceback
            raise self._translate(exc, where, repo_id, revision) from None

    def _translate(self, exc: Exception, where: str, repo_id: str | None, revision: str | None) -> HubError:
        from huggingface_hub import errors as hf_errors

        token = self.token
        if isinstance(exc, hf_errors.OfflineModeIsEnabled):
            return OfflineError(
                f"{where}: huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported); "
                f"unset HF_HUB_OFFLINE and PEFTKIT_OFFLINE before starting Python to reach {self.address}")
        if _is_connection_error(exc) and not isinstance(exc, hf_errors.HfHubHTTPError):
            return HubUnreachable(redact(unreachable_message(
                self.endpoint, _root_reason(exc), name_lookup_failed=is_name_lookup_error(exc)), token))
        server_message = server_code = None
        status = None
        response = getattr(exc, "response", None)
        if response is not None:
            status = getattr(response, "status_code", None)
            headers = getattr(response, "headers", {}) or {}
            server_message, server_code = headers.get("X-Error-Message"), headers.get("X-Error-Code")
        text = str(exc).strip()
        detail = redact(server_message or (text.splitlines()[-1] if text else type(exc).__name__), token)
        if isinstance(exc, hf_errors.HfUriError):
            return HubError(redact(_foreign_address_message(where, self.address, text), token))
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            return RevisionNotFound(redact(
                f"{where}: revision {revision!r} not found in {repo_id} on {self.address}; "
                f"`peftkit hub info {repo_id} --hub {self.address}` lists its branches", token))
        if isinstance(exc, hf_errors.RepositoryNotFoundError) or (status == 404 and repo_id and not server_message):
            hint = "" if token else " (if it is private, log in first: `peftkit hub login`)"
            return with_near_names(RepoNotFound(redact(f"{where}: repo {repo_id} not found on {self.address}{hint}",
                                                       token)), self, repo_id)
        if status == 401:
            if not token:
                return HubAuthError(missing_token_message(self.address, where))
            source = self._resolved_token()[1]
            whose = "" if source == EXPLICIT_TOKEN_SOURCE else f" from {source}"
            return HubAuthError(redact(f"{where}: the hub at {self.address} refused the token{whose} ({detail}); "
                                       f"{refused_token_fix(self.address)}", token))
        if status == 403:
            return HubAuthError(redact(f"{where}: not allowed on {self.address}: {detail}", token))
        if isinstance(exc, hf_errors.EntryNotFoundError):
            return HubError(redact(f"{where}: a file is missing on {self.address}: {detail}", token))
        if server_code == "QuotaExceeded":
            return QuotaExceeded(redact(f"{where}: {detail}", token))
        if status is not None:
            return HubError(redact(f"{where}: the hub at {self.address} answered {status}: {detail}", token))
        return HubError(redact(f"{where}: {type(exc).__name__}: {detail}", token))

    # -- write ---------------------------------------------------------------------------------

    def push(self, repo_id: str, files: Mapping[str, Path], *, private: bool | None, commit_message: str,
             revision: str, delete_others: bool = True, progress: bool = True) -> PushResult:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub import errors as hf_errors

        where = f"pushing {repo_id} to {self.address}"
        self._require_token(where)
        api = self._api()
        created_repo = created_branch = False
        with self._errors(where, repo_id=repo_id, revision=revision):
            try:
                if not api.repo_exists(repo_id):
                    try:
                        api.create_repo(repo_id, private=bool(private))
                        created_repo = True
                    except hf_errors.HfUriError:
                        created_repo = True  # the hub made it, then named it at another address: remove it
                        raise
                    except hf_errors.HfHubHTTPError as exc:
                        if getattr(exc.response, "status_code", None) != 409:  # created meanwhile: fine
                            raise
                else:  # changes nothing (409), but its answer names the repo's URL, as the commit's will: a hub
                    # naming its repos at another address fails here, before the commit, not after it
                    api.create_repo(repo_id, exist_ok=True)
                if revision != "main":
                    branches = {b.name for b in api.list_repo_refs(repo_id).branches}
                    if revision not in branches:
                        api.create_branch(repo_id, branch=revision)
                        created_branch = True
                head = api.model_info(repo_id, revision=revision).sha
                tree = _tree(api, repo_id, head)
                # Decided here, not by the server: huggingface_hub would log its own "no files have been
                # modified" line and the bar would stay at 0%.
                changed = not already_holds(tree, files, delete_others=delete_others, ignore=_KEEP)
                commit, url = head, None
                if changed:
                    operations: list[Any] = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
                                             for path, local in sorted(files.items())]
                    if delete_others:
                        operations += [CommitOperationDelete(path_in_repo=f.path) for f in tree
                                       if f.path not in files and f.path not in _KEEP]
                    with upload_bar(f"Uploading {len(files)} files to {repo_id}", progress=progress):
                        info = api.create_commit(repo_id, operations, commit_message=commit_message,
                                                 revision=revision, parent_commit=head)
                    commit, url = info.oid, getattr(info, "commit_url", None)
                if private is not None and not created_repo:
                    if bool(api.model_info(repo_id).private) != private:
                        api.update_repo_settings(repo_id, private=private)
            except BaseException:
                # The commit is atomic on the server; remove what this push created around it.
                with contextlib.suppress(Exception):
                    if created_repo:
                        api.delete_repo(repo_id, missing_ok=True)
                    elif created_branch:
                        api.delete_branch(repo_id, branch=revision)
                raise
        return PushResult(repo_id=repo_id, revision=revision, commit=commit, hub=self.address,
                          created=created_repo, url=url, changed=changed)

    def delete(self, repo_id: str, *, missing_ok: bool = False) -> bool:
        where = f"deleting {repo_id} on {self.address}"
        self._require_token(where)
        try:
            with self._errors(where, repo_id=repo_id):
                self._api().delete_repo(repo_id)
        except RepoNotFound:
            if not missing_ok:
                raise
            return False
        return True

    # -- read ----------------------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str) -> str:
        with self._errors(f"resolving {repo_id}@{revision}", repo_id=repo_id, revision=revision):
            sha = self._api().model_info(repo_id, revision=revision).sha
        if not sha:
            raise HubError(f"the hub at {self.address} did not say which commit {repo_id}@{revision} is")
        return sha

    def list_files(self, repo_id: str, commit: str) -> list[RemoteFile]:
        with self._errors(f"listing the files of {repo_id}@{commit}", repo_id=repo_id, revision=commit):
            return _tree(self._api(), repo_id, commit)

    def download(self, repo_id: str, commit: str, files: Sequence[RemoteFile], dest: Path, *,
                 progress: bool = True) -> None:
        from huggingface_hub import hf_hub_download

        where = f"downloading {repo_id}@{commit[:12]} from {self.address}"
        with self._errors(where, repo_id=repo_id, revision=commit):
            for remote in files:
                hf_hub_download(repo_id, remote.path, revision=commit, endpoint=self.endpoint,
                                token=self.token or False, local_dir=dest, library_name="peftkit",
                                tqdm_class=None if progress else _Silent)  # type: ignore[arg-type]
        shutil.rmtree(dest / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping in local_dir

    def search(self, query: SearchQuery) -> list[AdapterInfo]:
        sort = {"downloads": "downloads", "recent": "last_modified"}.get(query.sort, query.sort)
        tags = query.filter_tags()
        with self._errors(f"searching {self.address}"):
            models = list(self._api().list_models(search=query.text or None, filter=tags or None,
                                                  author=query.author or None, pipeline_tag=query.task or None,
                                                  sort=sort, limit=query.limit, cardData=True))
        return [self._info(m) for m in models]

    def info(self, repo_id: str, revision: str | None = None) -> AdapterInfo:
        where = f"reading {repo_id}{'@' + revision if revision else ''}"
        with self._errors(where, repo_id=repo_id, revision=revision):
            api = self._api()
            model = api.model_info(repo_id, revision=revision, files_metadata=True)
            refs = api.list_repo_refs(repo_id)
        info = self._info(model)
        info.files = [RemoteFile(s.rfilename, int(s.size or 0), getattr(s, "blob_id", None),
                                 getattr(getattr(s, "lfs", None), "sha256", None))
                      for s in (model.siblings or [])]
        info.branches = {b.name: b.target_commit for b in refs.branches}
        return info

    def whoami(self) -> str | None:
        return self.token_rights().user

    def token_rights(self, where: str | None = None) -> TokenRights:
        """Who the token acts as and what it may do, from the hub's whoami answer (one request); ``where``
        begins an error's message."""
        with self._errors(where or f"checking the token with {self.address}"):
            return TokenRights.from_whoami(self._api().whoami())

    def check_push_access(self, repo_id: str) -> None:
        """One whoami request: the hub answers, knows the token, and lets it write to the namespace.

        Refuses only for certain (see :mod:`peftkit.hub_client.token_rights`); a hub that answers whoami
        with another error (an older server, a rate limit) is left to the push."""
        self._require_token(f"pushing {repo_id} to {self.address}")
        try:
            rights = self.token_rights(f"before pushing {repo_id}, checking the token with {self.address}")
        except (HubAuthError, HubUnreachable, OfflineError):
            raise
        except HubError:
            return
        hint = write_token_hint(self.address, rights.user, huggingface=self.huggingface)
        problem = push_refusal(rights, repo_id, self.address, new_token_hint=hint)
        if problem:
            raise HubAuthError(problem)


    def storage(self, namespace: str | None) -> NamespaceUsage:
        """GET /api/namespaces/{namespace}/storage of a peftkit registry, with the token (``None``: its user)."""
        if self.huggingface:
            raise HubError(
                f"the Hugging Face Hub ({self.address}) has no API for a namespace's storage usage and limit; "
                "see yours in your account settings on its web site. `peftkit hub storage` works with a peftkit "
                "registry (--hub http://host:port) and the embedded hub (--hub local)")
        where = f"reading the storage usage of {namespace or 'your namespace'} on {self.address}"
        token = self._require_token(where)
        if namespace is None:
            namespace = self.whoami()
            if not namespace:
                raise HubAuthError(f"{where}: the hub did not say whose token this is; name the namespace")
            where = f"reading the storage usage of {namespace} on {self.address}"
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        from peftkit import __version__

        url = self.endpoint + STORAGE_PATH.format(namespace=quote(namespace, safe=""))
        with self._errors(where):
            self._probe()
            response = get_session().get(url, headers=build_hf_headers(
                token=token, library_name="peftkit", library_version=__version__))
            if response.status_code == 404:
                raise self._storage_not_found(response, namespace, where)
            hf_raise_for_status(response)
        try:
            return NamespaceUsage.from_json(response.json())
        except ValueError as exc:  # also a body that is not JSON
            raise HubError(f"{where}: the hub answered something other than a storage report: {exc}") from None

    def _storage_not_found(self, response: Any, namespace: str, where: str) -> HubError:
        message = redact(response.headers.get("X-Error-Message") or "not found", self.token)
        if response.headers.get("X-Error-Code") == "NamespaceNotFound":
            return NamespaceNotFound(f"{where}: {message}")
        return HubError(f"{where}: the hub at {self.address} does not serve storage usage ({message}); it needs a "
                        f"peftkit registry that answers GET {STORAGE_PATH.format(namespace=namespace)}: upgrade it")

    def _info(self, model: Any) -> AdapterInfo:
        card_data = getattr(model, "card_data", None)
        card = card_data.to_dict() if card_data is not None and hasattr(card_data, "to_dict") else dict(card_data or {})
        tags = list(getattr(model, "tags", None) or [])
        return AdapterInfo(
            repo_id=model.id,
            sha=getattr(model, "sha", None),
            private=bool(getattr(model, "private", False)),
            base_model=base_model_from(card, tags),
            method=method_from_tags(tags + as_list(card.get("tags"))),
            task=getattr(model, "pipeline_tag", None) or card.get("pipeline_tag")
            or next(iter(adapterhub.tasks_from_tags(tags)), None),  # AdapterHub's repos: adapterhub:<task>/...
            library_name=getattr(model, "library_name", None) or card.get("library_name"),
            tags=tags,
            datasets=as_list(card.get("datasets")),
            downloads=int(getattr(model, "downloads", 0) or 0),
            last_modified=getattr(model, "last_modified", None),
            created_at=getattr(model, "created_at", None),
            card=card,
            hub=self.address,
        )
