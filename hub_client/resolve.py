"""Which hub to talk to, and what a repo reference means.

Hub addresses (``--hub``, ``hub=``, else ``PEFTKIT_HUB``, else ``local``):

=============================  ======================================================
``local``                      the embedded store in ``$PEFTKIT_HOME/hub``
``local:/some/folder``         an embedded store in that folder (also ``file:///...``
                               or a path starting with ``/``, ``./`` or ``~``)
``http://host:port``           a peftkit registry (``peftkit registry serve``)
``hf``                         the Hugging Face Hub (``HF_ENDPOINT`` if set, else
                               https://huggingface.co)
``<scheme>://...``             a backend a plugin registered for ``<scheme>``
=============================  ======================================================

Backends come from the ``peftkit_register_hub_backends`` hook; the built-in
ones (``file``, ``http``, ``https``, ``hf``) are registered by
:mod:`peftkit.hub_client.backends` like any plugin's.

A repo reference is ``namespace/name`` with an optional ``@revision`` (a
branch or a 40-hex commit): ``alice/ner@v2``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from peftkit.hub_rules.names import repo_id_problem, revision_problem

from .backend import HubBackend
from .errors import InvalidRepoRef

LOCAL_NAMES = frozenset({"local", "embedded"})
HF_NAMES = frozenset({"hf", "huggingface", "hf.co", "huggingface.co"})
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.I)


@dataclass(frozen=True)
class RepoRef:
    """``namespace/name`` at ``revision`` (``None``: the main branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.repo_id.split("/", 1)[1]


def parse_ref(text: str, revision: str | None = None) -> RepoRef:
    """Parse ``alice/ner`` or ``alice/ner@v2``; ``revision`` overrides an absent ``@``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRepoRef("a repo reference is empty; write it as namespace/name[@revision], e.g. alice/ner@v2")
    text = text.strip()
    repo_id, sep, rev = text.partition("@")
    if sep and not rev:
        raise InvalidRepoRef(f"{text!r} ends with '@': name a branch or commit after it, e.g. {repo_id}@main")
    problem = repo_id_problem(repo_id)
    if problem:
        raise InvalidRepoRef(problem)
    if sep and revision is not None and revision != rev:
        raise InvalidRepoRef(f"{text!r} names revision {rev!r} but revision={revision!r} was passed too; give one")
    rev = rev if sep else revision
    problem = None if rev is None else revision_problem(rev)
    if problem:
        raise InvalidRepoRef(f"{problem} (in {text!r})")
    return RepoRef(repo_id, rev or None)


def hub_address(hub: str | None = None) -> str:
    """The hub address in force: ``hub``, else ``PEFTKIT_HUB``, else ``local``."""
    value = hub if hub is not None else os.environ.get("PEFTKIT_HUB")
    value = (value or "").strip()
    return value or "local"


def _split(address: str) -> tuple[str, str]:
    """``(scheme, url)`` for a hub address; ``url`` is what the scheme's factory receives."""
    lowered = address.lower()
    if lowered in LOCAL_NAMES:
        return "file", ""
    if lowered.startswith("local:"):
        return "file", os.path.expanduser(address[len("local:"):])
    if lowered in HF_NAMES:
        return "hf", ""
    if address.startswith(("/", "./", "../", "~")):
        return "file", os.path.expanduser(address)
    match = _SCHEME.match(address)
    if match:
        scheme = match.group(1).lower()
        if scheme == "file":
            parts = urlsplit(address)
            if parts.netloc not in ("", "localhost"):
                raise InvalidRepoRef(f"hub {address!r}: a file:// hub must be on this machine (file:///path)")
            return "file", unquote(parts.path)
        if scheme in ("http", "https") and urlsplit(address).hostname in ("huggingface.co", "hf.co"):
            return "hf", address
        return scheme, address
    raise InvalidRepoRef(
        f"unknown hub {address!r}: use 'local' (the embedded hub), 'local:/folder', 'hf' (the Hugging Face Hub), "
        f"or a registry URL such as http://host:8080")


def open_hub(hub: "str | HubBackend | None" = None, *, token: str | None = None) -> HubBackend:
    """The backend for a hub address (see the module docstring); a backend object is returned as is."""
    if isinstance(hub, HubBackend):
        return hub
    from peftkit.core.plugins import get_registry

    address = hub_address(hub)
    scheme, url = _split(address)
    registry = get_registry()
    factory = registry.hub_backends.get(scheme)
    if factory is None:
        known = ", ".join(sorted(registry.hub_backends)) or "none"
        broken = [r.name for r in registry.records.values() if r.broken]
        hint = f"; broken plugins: {', '.join(broken)} (run `peftkit plugins`)" if broken else ""
        raise InvalidRepoRef(f"no hub backend for {scheme!r} (hub {address!r}); installed backends: {known}. "
                             f"Install a plugin that registers {scheme!r} through peftkit_register_hub_backends"
                             f"{hint}")
    backend = factory(url, token=token)
    if not isinstance(backend, HubBackend):
        raise InvalidRepoRef(f"the hub backend for {scheme!r} returned {type(backend).__name__}, not a HubBackend; "
                             f"the plugin that registered it is broken")
    return backend
