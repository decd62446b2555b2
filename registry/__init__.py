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

import importlib
from typing import Any

# Names load on first use, so importing one module (the embedded hub imports
# only the store) does not import the HTTP server with it.
_WHERE = {
    **dict.fromkeys(("Accounts", "Principal", "TokenInfo"), "accounts"),
    "StagedBlob": "blobs",
    **dict.fromkeys(("BadRequest", "Conflict", "EntryNotFound", "Forbidden", "InvalidPath", "InvalidRepoId",
                     "InvalidRevision", "MalformedPayload", "NotFound", "ParentCommitMismatch", "PayloadTooLarge",
                     "QuotaExceeded", "RegistryError", "RepoExists", "RepoNotFound", "RevisionNotFound",
                     "Unauthorized"), "errors"),
    **dict.fromkeys(("ApiConfig", "HubApi"), "hub_api"),
    "default_data_dir": "paths",
    **dict.fromkeys(("RunningServer", "ServerOptions", "serve", "start_server"), "server"),
    **dict.fromkeys(("DEFAULT_BRANCH", "CommitInfo", "FileEntry", "RegistryStore", "RepoInfo"), "store"),
}

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
    "QuotaExceeded",
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


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'peftkit.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"peftkit.registry.{module}"), name)
