"""The embedded hub: a peftkit registry store on local disk, used in-process.

No server and no token: the store lives in ``$PEFTKIT_HOME/hub`` (else
``~/.cache/peftkit/hub``), or in the folder of a ``local:/path`` /
``file:///path`` hub address. Search, revisions, private flags and download
counts behave as on a registry server, because it is the same store.

The one module of the hub client that imports the registry, and only its store
(:mod:`peftkit.registry.store`, :mod:`peftkit.registry.errors`), never its server.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

from peftkit.hub_rules.cards import DOWNLOAD_COUNTING_FILES
from peftkit.hub_rules.home import peftkit_home
from peftkit.hub_rules.names import is_commit_sha
from peftkit.hub_rules.storage import NamespaceUsage
from peftkit.registry import errors as registry_errors
from peftkit.registry.store import RegistryStore

from .backend import AdapterInfo, HubBackend, PushResult, RemoteFile, SearchQuery, already_holds
from .errors import HubError, InvalidRepoRef, NamespaceNotFound, QuotaExceeded, RepoNotFound, RevisionNotFound
from .near_names import with_near_names


def default_local_dir() -> Path:
    """``$PEFTKIT_HOME/hub``, else ``~/.cache/peftkit/hub``."""
    return peftkit_home() / "hub"


def translate(exc: registry_errors.RegistryError, where: str) -> HubError:
    """A store error as the hub client's error of the same meaning."""
    if isinstance(exc, registry_errors.RepoNotFound):
        return RepoNotFound(f"{where}: {exc.message}")
    if isinstance(exc, registry_errors.RevisionNotFound):
        return RevisionNotFound(f"{where}: {exc.message}")
    if isinstance(exc, (registry_errors.InvalidRepoId, registry_errors.InvalidRevision)):
        return InvalidRepoRef(f"{where}: {exc.message}")
    if isinstance(exc, registry_errors.QuotaExceeded):
        return QuotaExceeded(f"{where}: {exc.message}")
    return HubError(f"{where}: {exc.message}")


def info_from_store(repo: "object", hub: str) -> AdapterInfo:
    """An :class:`AdapterInfo` from the store's ``RepoInfo``."""
    return AdapterInfo(
        repo_id=repo.repo_id,  # type: ignore[attr-defined]
        sha=repo.sha,  # type: ignore[attr-defined]
        private=repo.private,  # type: ignore[attr-defined]
        base_model=(repo.base_models or (None,))[0],  # type: ignore[attr-defined]
        method=(repo.methods or (None,))[0] or _method_from_tags(repo.tags),  # type: ignore[attr-defined]
        task=repo.pipeline_tag or (repo.tasks or (None,))[0],  # type: ignore[attr-defined]
        library_name=repo.library_name,  # type: ignore[attr-defined]
        tags=list(repo.tags),  # type: ignore[attr-defined]
        datasets=list(repo.datasets),  # type: ignore[attr-defined]
        downloads=repo.downloads,  # type: ignore[attr-defined]
        last_modified=repo.last_modified,  # type: ignore[attr-defined]
        created_at=repo.created_at,  # type: ignore[attr-defined]
        card=dict(repo.card),  # type: ignore[attr-defined]
        hub=hub,
    )


def _method_from_tags(tags: Sequence[str]) -> str | None:
    from .metadata import method_from_tags

    return method_from_tags(tags)


class LocalBackend(HubBackend):
    """A :class:`~peftkit.registry.RegistryStore` folder as a hub."""

    remote = False

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_local_dir()
        self.address = f"local:{self.root}"
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]
        self.key = f"local-{digest}"
        self._store: RegistryStore | None = None

    @property
    def store(self) -> RegistryStore:
        if self._store is None:
            try:
                self._store = RegistryStore(self.root)
            except OSError as exc:
                raise HubError(f"cannot open the local hub in {self.root}: {exc.strerror or exc}; set "
                               f"PEFTKIT_HOME to a writable folder or pass --hub local:/some/folder") from None
            except registry_errors.BlobStoreMismatch as exc:  # its blobs/ belong to another registry
                raise HubError(f"cannot open the local hub in {self.root}: {exc}") from None
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- write ---------------------------------------------------------------------------------

    def push(self, repo_id: str, files: Mapping[str, Path], *, private: bool | None, commit_message: str,
             revision: str, delete_others: bool = True, progress: bool = True) -> PushResult:
        store = self.store
        where = f"pushing {repo_id} to {self.address}"
        created_repo = created_branch = False
        try:
            if not store.repo_exists(repo_id):
                store.create_repo(repo_id, private=bool(private), owner=repo_id.split("/")[0])
                created_repo = True
            if revision not in store.list_branches(repo_id):
                if is_commit_sha(revision):
                    raise InvalidRepoRef(f"{where}: {revision!r} is a commit; push to a branch such as 'main'")
                store.create_branch(repo_id, revision)
                created_branch = True
            head, current = store.snapshot(repo_id, revision)
            tree = [RemoteFile(e.path, e.size, e.oid, e.sha256) for e in current.values()]
            changed = not already_holds(tree, files, delete_others=delete_others)
            if changed:
                deletions = sorted(p for p in current if p not in files) if delete_others else []
                sha = store.commit(repo_id, dict(files), deletions, commit_message, revision=revision,
                                   parent=head)
            else:
                sha = head
            if private is not None and not created_repo and store.repo_info(repo_id).private != private:
                store.set_private(repo_id, private)
        except BaseException as exc:
            # The commit itself is atomic; undo what this push created around it.
            if created_repo:
                store.delete_repo(repo_id, missing_ok=True)
            elif created_branch:
                store.delete_branch(repo_id, revision)
            if isinstance(exc, registry_errors.RegistryError):
                raise translate(exc, where) from None
            raise
        return PushResult(repo_id=repo_id, revision=revision, commit=sha, hub=self.address, created=created_repo,
                          changed=changed)

    def delete(self, repo_id: str, *, missing_ok: bool = False) -> bool:
        try:
            return self.store.delete_repo(repo_id, missing_ok=missing_ok)
        except registry_errors.RegistryError as exc:
            raise with_near_names(translate(exc, f"deleting {repo_id} on {self.address}"), self, repo_id) from None

    # -- read ----------------------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str) -> str:
        try:
            return self.store.resolve_revision(repo_id, revision)
        except registry_errors.RevisionNotFound:
            branches = ", ".join(sorted(self.store.list_branches(repo_id))) or "none"
            raise RevisionNotFound(f"revision {revision!r} not found in {repo_id} on {self.address}; its "
                                   f"branches: {branches} (or give a commit sha)") from None
        except registry_errors.RegistryError as exc:
            raise with_near_names(translate(exc, f"{repo_id}@{revision} on {self.address}"), self, repo_id) from None

    def list_files(self, repo_id: str, commit: str) -> list[RemoteFile]:
        try:
            entries = self.store.list_files(repo_id, commit)
        except registry_errors.RegistryError as exc:
            raise translate(exc, f"{repo_id}@{commit} on {self.address}") from None
        return [RemoteFile(e.path, e.size, e.oid, e.sha256) for e in entries]

    def download(self, repo_id: str, commit: str, files: Sequence[RemoteFile], dest: Path, *,
                 progress: bool = True) -> None:
        store = self.store
        try:
            for remote in files:
                target = dest / remote.path
                target.parent.mkdir(parents=True, exist_ok=True)
                with store.open_file(repo_id, remote.path, commit) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        except registry_errors.RegistryError as exc:
            raise translate(exc, f"{repo_id}@{commit} on {self.address}") from None
        if any(f.path in DOWNLOAD_COUNTING_FILES for f in files):
            store.record_download(repo_id)

    def search(self, query: SearchQuery) -> list[AdapterInfo]:
        # The same mapping as the registry's list_models: base model and method as tags, task as a facet.
        sort = {"downloads": "downloads", "recent": "recent"}.get(query.sort, query.sort)
        try:
            hits = self.store.search(query.text, tags=query.filter_tags(), task=query.task, author=query.author,
                                     sort=sort, limit=query.limit)
        except registry_errors.RegistryError as exc:
            raise translate(exc, f"searching {self.address}") from None
        return [info_from_store(h, self.address) for h in hits]

    def info(self, repo_id: str, revision: str | None = None) -> AdapterInfo:
        where = f"{repo_id}{'@' + revision if revision else ''} on {self.address}"
        try:
            repo = self.store.repo_info(repo_id, revision)
            files = self.store.list_files(repo_id, repo.sha)
            branches = self.store.list_branches(repo_id)
        except registry_errors.RegistryError as exc:
            raise with_near_names(translate(exc, where), self, repo_id) from None
        info = info_from_store(repo, self.address)
        info.files = [RemoteFile(e.path, e.size, e.oid, e.sha256) for e in files]
        info.branches = branches
        return info

    def storage(self, namespace: str | None) -> NamespaceUsage:
        """What ``namespace``'s repos store here; no limit unless ``peftkit registry quota set --data`` set one."""
        if namespace is None:
            raise HubError(f"the embedded hub {self.address} has no accounts, so no user of its own: name the "
                           "namespace whose storage to show")
        quotas = self.store.quotas
        known = quotas.known(namespace)
        if known is None:
            raise NamespaceNotFound(f"no namespace '{namespace}' on {self.address}: no repo is stored under it")
        (usage,) = quotas.usage([known])
        return usage
