"""Content and commit identifiers.

* ``sha256``: the blob's address on disk and its integrity check.
* ``git_blob_oid``: sha1 over ``b"blob <size>\\0" + content``, exactly what git
  and the Hub call a file's oid. ``huggingface_hub`` computes it locally to skip
  uploading files that did not change, so it must match bit for bit.
* tree and commit ids: sha1 over a canonical text of the entries / header, so a
  commit id is deterministic in its content, parent, message and time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def git_blob_oid(data: bytes) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def git_blob_hasher(size: int) -> "hashlib._Hash":
    """A sha1 already fed with the git blob header, for streaming content of a known size."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % size)
    return h


def tree_oid(entries: Iterable[tuple[str, str]]) -> str:
    """Id of a flat tree given ``(path, git_oid)`` pairs (order does not matter)."""
    h = hashlib.sha1(usedforsecurity=False)
    for path, oid in sorted(entries):
        h.update(path.encode("utf-8"))
        h.update(b"\0")
        h.update(oid.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def folder_oid(path: str, entries: Iterable[tuple[str, str]]) -> str:
    """Id for a folder listing in the tree API (deterministic in its contents)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"folder " + path.encode("utf-8") + b"\n")
    h.update(tree_oid(entries).encode("ascii"))
    return h.hexdigest()


def commit_oid(
    *, repo_id: str, tree: str, parent: str | None, author: str, timestamp: float, message: str, description: str
) -> str:
    text = (
        f"repo {repo_id}\n"
        f"tree {tree}\n"
        f"parent {parent or ''}\n"
        f"author {author}\n"
        f"time {timestamp:.6f}\n"
        f"\n{message}\n\n{description}"
    )
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()
