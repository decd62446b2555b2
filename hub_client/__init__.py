"""peftkit.hub_client: publish, find, pull and compose adapters on a hub.

Three kinds of hub behind one interface: the embedded local store (the
default), a peftkit registry server, and the Hugging Face Hub. The public
functions are :mod:`peftkit.hub_client.api`'s, also reachable as
``peftkit.hub.push`` / ``pull`` / ``search`` / ``info`` / ``delete`` / ``storage`` and
``peftkit.load``. Importing this package imports neither torch nor
huggingface_hub.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = ("push", "pull", "search", "info", "delete", "login", "logout", "whoami", "storage", "load")
_OTHER = {
    "HubBackend": "peftkit.hub_client.backend",
    "AdapterInfo": "peftkit.hub_client.backend",
    "PushResult": "peftkit.hub_client.backend",
    "RemoteFile": "peftkit.hub_client.backend",
    "SearchQuery": "peftkit.hub_client.backend",
    "NamespaceUsage": "peftkit.hub_rules.storage",
    "HubError": "peftkit.hub_client.errors",
    "HubUnreachable": "peftkit.hub_client.errors",
    "HubAuthError": "peftkit.hub_client.errors",
    "RepoNotFound": "peftkit.hub_client.errors",
    "RevisionNotFound": "peftkit.hub_client.errors",
    "NamespaceNotFound": "peftkit.hub_client.errors",
    "QuotaExceeded": "peftkit.hub_client.errors",
    "OfflineError": "peftkit.hub_client.errors",
    "IntegrityError": "peftkit.hub_client.errors",
    "InvalidRepoRef": "peftkit.hub_client.errors",
    "open_hub": "peftkit.hub_client.resolve",
    "parse_ref": "peftkit.hub_client.resolve",
}

__all__ = ["hub", *_API, *_OTHER]


def __getattr__(name: str) -> Any:
    if name == "hub":  # peftkit.hub: the module of push/pull/search/info/delete
        return importlib.import_module("peftkit.hub_client.api")
    if name in _API:
        return getattr(importlib.import_module("peftkit.hub_client.api"), name)
    module = _OTHER.get(name)
    if module is None:
        raise AttributeError(f"module 'peftkit.hub_client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
