"""Folder arithmetic over a flat tree (a set of '/'-separated file paths).

A repo's tree is stored flat: folders exist only as prefixes of file paths.
These helpers answer folder questions for N paths in O(N x depth) with sets
and dicts, never by scanning every path once per path (a commit or a
``paths-info`` request of 10,000 files must not cost 10,000² string tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def ancestors(path: str) -> list[str]:
    """The folders that hold ``path``, outermost first: 'a/b/c' -> ['a', 'a/b']."""
    out = []
    cut = path.find("/")
    while cut != -1:
        out.append(path[:cut])
        cut = path.find("/", cut + 1)
    return out


def _parents(path: str) -> Iterator[str]:
    """The folders that hold ``path``, innermost first, made one at a time (a caller may stop early)."""
    cut = path.rfind("/")
    while cut > 0:
        yield path[:cut]
        cut = path.rfind("/", 0, cut)


def folder_set(paths: Iterable[str]) -> set[str]:
    """Every folder that some path lies in.

    Each path's folders are walked from the innermost out, stopping at the first one already known (its
    outer folders are then known too): a path costs its own length plus the folders it adds, not
    depth x length (10,000 files 500 folders deep would otherwise hash gigabytes).
    """
    out: set[str] = set()
    for path in paths:
        for folder in _parents(path):
            if folder in out:
                break
            out.add(folder)
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
    if folders.isdisjoint(files):
        return None  # the usual case, decided in one pass
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
    inside: dict[str, bool] = {}  # folder -> whether it lies in (or is) a wanted folder, as learnt
    out = []
    for path in paths:
        walked = []
        found = False
        for folder in _parents(path):
            if folder in inside:
                found = inside[folder]
                break
            walked.append(folder)
            if folder in wanted:
                found = True
                break
        for folder in walked:
            inside[folder] = found
        if found:
            out.append(path)
    return out
