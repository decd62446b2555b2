"""The interface every hub backend implements, and the values it exchanges.

A backend stores adapter repos somewhere (the embedded local store, a peftkit
registry, the Hugging Face Hub, or whatever a plugin registers through
``peftkit_register_hub_backends``). It moves files and metadata; everything
else (model cards, the download cache, hash checks, offline mode, composing
at load time) is done once, above it, by :mod:`peftkit.hub_client.api`.

A plugin's factory is called as ``factory(url, token=..., **options)`` and
returns a :class:`HubBackend`.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import AbstractSet, Any, Callable, Mapping, Sequence

from peftkit.hub_rules.cards import ADAPTER_OF_TAG_PREFIX
from peftkit.hub_rules.storage import NamespaceUsage

from .errors import HubError
from .token_rights import TokenRights

#: Called with the number of bytes just transferred (drives progress bars).
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit, with what a download is checked against.

    ``oid`` is the git blob sha1 (what the Hub API calls a file's oid);
    ``sha256`` is known for LFS files on the Hugging Face Hub and for every
    file of a peftkit store.
    """

    path: str
    size: int
    oid: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PushResult:
    """What a push produced: the commit ``revision`` of ``repo_id`` is at afterwards.

    ``changed`` is False when the branch already held exactly these files: no
    commit was made and ``commit`` is the branch's existing head.
    """

    repo_id: str
    revision: str
    commit: str
    hub: str
    created: bool = False
    url: str | None = None
    changed: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _local_digests(path: Path) -> tuple[str, str]:
    """``(sha256, git blob sha1)`` of a local file, read once."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def already_holds(current: Sequence[RemoteFile], files: Mapping[str, Path], *, delete_others: bool = True,
                  ignore: AbstractSet[str] = frozenset()) -> bool:
    """Whether a commit whose tree is ``current`` already holds exactly what a push of ``files`` would make.

    Compares sizes, then the sha256 (when the hub gives it) or the git blob
    sha1. With ``delete_others`` a file of ``current`` that ``files`` lacks
    (other than those in ``ignore``) is a change. Backends call this before
    committing, so an identical push makes no commit on any hub.
    """
    remote = {f.path: f for f in current if f.path not in ignore or f.path in files}
    if delete_others and set(remote) - set(files):
        return False
    for path, local in files.items():
        have = remote.get(path)
        if have is None or have.size != Path(local).stat().st_size or not (have.sha256 or have.oid):
            return False
        sha256, blob = _local_digests(Path(local))
        same = have.sha256.lower() == sha256 if have.sha256 else have.oid == blob
        if not same:
            return False
    return True


@dataclass(frozen=True)
class SearchQuery:
    """Filters of a search; all that are given must match."""

    text: str | None = None
    base_model: str | None = None
    method: str | None = None
    task: str | None = None
    tags: tuple[str, ...] = ()
    author: str | None = None
    dataset: str | None = None
    sort: str = "downloads"  # "downloads" or "recent"
    limit: int = 20

    def filter_tags(self) -> list[str]:
        """The Hub's tag conventions for these filters (``list_models(filter=...)``)."""
        tags = []
        if self.base_model:
            tags.append(f"{ADAPTER_OF_TAG_PREFIX}{self.base_model}")
        if self.method:
            tags.append(self.method.lower())
        if self.dataset:
            tags.append(f"dataset:{self.dataset}")  # the card's ``datasets``, as the Hub tags them
        tags += [t for t in self.tags if t not in tags]
        return tags


@dataclass
class AdapterInfo:
    """An adapter repo as a hub describes it (a search hit, or ``info``)."""

    repo_id: str
    sha: str | None = None
    private: bool = False
    base_model: str | None = None
    method: str | None = None
    task: str | None = None
    library_name: str | None = None
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    downloads: int = 0
    last_modified: datetime | None = None
    created_at: datetime | None = None
    files: list[RemoteFile] | None = None
    branches: dict[str, str] | None = None
    card: dict[str, Any] = field(default_factory=dict)
    hub: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("last_modified", "created_at"):
            value = getattr(self, key)
            data[key] = value.isoformat() if value is not None else None
        return data


class HubBackend(abc.ABC):
    """Storage of adapter repos. Implementations must make :meth:`push` atomic:
    on any failure the repo (and whether it exists) is as it was before."""

    #: The address users see and ``--hub`` accepts (``local:/path``, a URL, ``hf``).
    address: str
    #: A stable, file-name-safe key of this hub, for the download cache and the token file.
    key: str
    #: Whether the backend talks to a server (offline mode then serves pulls from the cache).
    remote: bool = True

    @abc.abstractmethod
    def push(self, repo_id: str, files: Mapping[str, Path], *, private: bool | None, commit_message: str,
             revision: str, delete_others: bool = True, progress: bool = True) -> PushResult:
        """Make ``revision`` of ``repo_id`` hold exactly ``files`` (repo path -> local file), in one commit.

        Creates the repo (and the branch) when missing. ``private`` sets the
        visibility (``None``: public for a new repo, unchanged otherwise).
        With ``delete_others`` files of the previous commit that are not in
        ``files`` are deleted in the same commit.
        """

    @abc.abstractmethod
    def resolve(self, repo_id: str, revision: str) -> str:
        """The 40-hex commit ``revision`` (a branch or a commit) points to."""

    @abc.abstractmethod
    def list_files(self, repo_id: str, commit: str) -> list[RemoteFile]:
        """Every file of ``commit``, with sizes and hashes."""

    @abc.abstractmethod
    def download(self, repo_id: str, commit: str, files: Sequence[RemoteFile], dest: Path, *,
                 progress: bool = True) -> None:
        """Write ``files`` of ``commit`` under ``dest`` (an empty folder), at their repo paths.

        The caller verifies sizes and hashes afterwards and discards ``dest``
        on any failure, so an implementation needs no atomicity of its own.
        """

    @abc.abstractmethod
    def search(self, query: SearchQuery) -> list[AdapterInfo]:
        """Adapter repos matching every filter of ``query``."""

    @abc.abstractmethod
    def info(self, repo_id: str, revision: str | None = None) -> AdapterInfo:
        """The repo at ``revision`` (default: its main branch), with files and branches."""

    @abc.abstractmethod
    def delete(self, repo_id: str, *, missing_ok: bool = False) -> bool:
        """Delete the repo and its history; returns whether there was one (False only with ``missing_ok``)."""

    def whoami(self) -> str | None:
        """The user the token belongs to (``None`` when the hub has no accounts)."""
        return None

    def token_rights(self, where: str | None = None) -> TokenRights | None:
        """Who the token acts as and what it may do (one request), or None when the hub cannot tell;
        ``where`` begins an error's message. :meth:`whoami` is its ``user``."""
        return None

    def check_push_access(self, repo_id: str) -> None:  # noqa: B027 (optional: nothing to check by default)
        """Refuse now, with the fix, a push of ``repo_id`` that is certain to fail: the hub does not answer,
        or the token is missing, invalid, read-only or not allowed to write to the namespace.

        Optional and cheap (at most one request): for jobs that end in a push, such as ``peftkit train
        --push``, to fail before the work rather than after it. What cannot be told in advance is left to
        :meth:`push`; a hub without accounts checks nothing."""

    def storage(self, namespace: str | None) -> NamespaceUsage:
        """How many bytes ``namespace`` stores on this hub and its limit (``None``: the token's user).

        Optional: a hub that cannot tell refuses with a :class:`HubError`, before any request."""
        raise HubError(f"the hub {self.address} does not report storage usage")

    def close(self) -> None:  # noqa: B027 (optional: a backend holding nothing has nothing to close)
        """Release resources (database handles, sessions)."""

    def __enter__(self) -> "HubBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"
