"""Folder arithmetic over a flat tree (a set of '/'-separated file paths).

A repo's tree is stored flat: folders exist only as prefixes of file paths.
These helpers answer folder questions for N paths in O(N x depth) with sets
and dicts, never by scanning every path once per path (a commit or a
``paths-info`` request of 10,000 files must not cost 10,000² string tests).
"""

from __future__ import annotations

from collections.abc import Iterable


def ancestors(path: str) -> list[str]:
    """The folders that hold ``path``, outermost first: 'a/b/c' -> ['a', 'a/b']."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def folder_set(paths: Iterable[str]) -> set[str]:
    """Every folder that some path lies in."""
    out: set[str] = set()
    for path in paths:
        out.update(ancestors(path))
    return out


def clash(existing: Iterable[str], added: Iterable[str]) -> tuple[str, str | None] | None:
    """A file that would also be a folder once ``added`` joins ``existing``.

    Returns ``(path, file_folder)`` for the first clash, or None:
    ``file_folder`` is the ancestor of ``path`` that is a file, or None when
    ``path`` itself is the folder of some other file.
    """
    added = list(added)
    files = set(existing) | set(added)
    folders = folder_set(files)
    for path in added:
        for folder in ancestors(path):
            if folder in files:
                return path, folder
        if path in folders:
            return path, None
    return None


def under_any(paths: Iterable[str], folders: Iterable[str]) -> list[str]:
    """The paths that lie inside one of ``folders`` (given without a trailing '/')."""
    wanted = set(folders)
    return [p for p in paths if any(a in wanted for a in ancestors(p))]
