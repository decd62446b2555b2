"""peftkit.registry: a self-hostable adapter hub.

* :class:`RegistryStore` — adapter repos on local disk (content-addressed
  blobs, SQLite metadata, FTS5 search). peftkit's embedded hub uses it
  in-process.
* :func:`start_server` / :func:`serve` — the same store over the subset of the
  Hugging Face Hub HTTP API that ``huggingface_hub`` (and so PEFT) uses,
  served by uvicorn (the ``registry`` extra; imported only when a server
  starts) with the limits in :class:`ServerOptions`.
* ``peftkit registry ...`` — the CLI (:mod:`peftkit.registry.cli`).

Nothing here imports torch or transformers.
"""

from .accounts import Accounts, Principal, TokenInfo
from .blobs import StagedBlob
from .errors import (
    BadRequest,
    Conflict,
    EntryNotFound,
    Forbidden,
    InvalidPath,
    InvalidRepoId,
    InvalidRevision,
    MalformedPayload,
    NotFound,
    ParentCommitMismatch,
    PayloadTooLarge,
    RegistryError,
    RepoExists,
    RepoNotFound,
    RevisionNotFound,
    Unauthorized,
)
from .hub_api import ApiConfig, HubApi
from .paths import default_data_dir
from .server import RunningServer, ServerOptions, serve, start_server
from .store import DEFAULT_BRANCH, CommitInfo, FileEntry, RegistryStore, RepoInfo

__all__ = [
    "Accounts",
    "ApiConfig",
    "BadRequest",
    "CommitInfo",
    "Conflict",
    "DEFAULT_BRANCH",
    "EntryNotFound",
    "FileEntry",
    "Forbidden",
    "HubApi",
    "InvalidPath",
    "InvalidRepoId",
    "InvalidRevision",
    "MalformedPayload",
    "NotFound",
    "ParentCommitMismatch",
    "PayloadTooLarge",
    "Principal",
    "RegistryError",
    "RegistryStore",
    "RepoExists",
    "RepoInfo",
    "RepoNotFound",
    "RevisionNotFound",
    "RunningServer",
    "ServerOptions",
    "StagedBlob",
    "TokenInfo",
    "Unauthorized",
    "default_data_dir",
    "serve",
    "start_server",
]
