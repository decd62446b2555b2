"""Repos whose names are close to one that was not found, for the not-found message.

``alice/sentimnt`` not found: the hub is searched for the namespace's repos
(and for repos of the same name in other namespaces, for a misspelt
namespace), and the closest names are suggested. Only what a search shows
the caller is suggested, so a private repo of someone else never appears.
"""

from __future__ import annotations

import difflib

from .backend import HubBackend, SearchQuery
from .errors import HubError, RepoNotFound

#: How many repos of a namespace are compared (a search of at most this many).
SCANNED = 200
#: How many names a message suggests.
SUGGESTED = 3


def near_repo_ids(backend: HubBackend, repo_id: str) -> list[str]:
    """Up to :data:`SUGGESTED` repo ids on ``backend`` close to ``repo_id``, closest first ([] when the
    searches find none or fail: this only adds to an error message)."""
    namespace, _, name = repo_id.partition("/")
    seen: set[str] = set()
    for query in (SearchQuery(author=namespace, sort="recent", limit=SCANNED),
                  SearchQuery(text=name, sort="recent", limit=SCANNED)):
        try:
            seen.update(info.repo_id for info in backend.search(query))
        except HubError:
            continue
    seen.discard(repo_id)

    def closeness(candidate: str) -> float:
        other_namespace, _, other_name = candidate.partition("/")
        name_ratio = difflib.SequenceMatcher(None, name.lower(), other_name.lower()).ratio()
        if other_namespace.lower() == namespace.lower():
            return name_ratio if name_ratio >= 0.6 else 0.0
        namespace_ratio = difflib.SequenceMatcher(None, namespace.lower(), other_namespace.lower()).ratio()
        # another namespace: the same name (a misspelt or other owner), or a close one under a close namespace
        return name_ratio * namespace_ratio if name_ratio == 1.0 or min(name_ratio, namespace_ratio) >= 0.75 else 0.0

    scored = sorted(((closeness(c), c) for c in seen), key=lambda pair: (-pair[0], pair[1]))
    return [candidate for score, candidate in scored if score > 0][:SUGGESTED]


def with_near_names(error: HubError, backend: HubBackend, repo_id: str | None) -> HubError:
    """``error``, with the near repo names added when it says ``repo_id`` was not found."""
    if not isinstance(error, RepoNotFound) or not repo_id or "/" not in repo_id:
        return error
    near = near_repo_ids(backend, repo_id)
    if not near:
        return error
    return RepoNotFound(f"{error}; did you mean {', '.join(near)}?")
