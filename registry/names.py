"""Validation of repo ids, file paths and revision names.

Everything that comes from a client and ends up in a file name, a URL or a SQL
parameter goes through here first. We reject rather than normalise: a path like
``a/../b`` is an error naming the path, never silently rewritten.

The rules for repo ids and revisions are the ones the hub client checks too
(:mod:`peftkit.hub_rules.names`); here they are raised as the registry's
400 errors. File paths and reserved account names are the registry's own.
"""

from __future__ import annotations

import unicodedata

from peftkit.hub_rules.names import (
    CONTROL_CHARACTER_RE,
    HEADS_PREFIX,
    branch_problem,
    is_commit_sha,
    name_problem,
    repo_id_problem,
    revision_problem,
)

from .errors import InvalidPath, InvalidRepoId, InvalidRevision

MAX_PATH_LENGTH = 1024
# Folders a new file may lie in. Listing a folder costs its files times their depth (each folder's oid covers
# every file under it), so a commit of files 500 folders deep made every recursive listing of the repo cost
# minutes; real repos nest a few folders.
MAX_PATH_DEPTH = 32


def validate_name(name: str, what: str = "name") -> str:
    """Check one half of a repo id (or a user/org name) and return it."""
    problem = name_problem(name, what)
    if problem:
        raise InvalidRepoId(problem)
    return name


# Account names that collide with the server's own URLs (``/api/...``) or with
# the Hub's site paths that clients and browsers may use (``/models``,
# ``/settings`` ...): a user or organization with one of these names would have
# repo URLs that route elsewhere. Compared case-insensitively.
RESERVED_ACCOUNT_NAMES = frozenset({
    "api", "models", "datasets", "spaces", "kernels", "buckets", "collections", "docs", "organizations",
    "resolve", "static", "assets", "settings", "login", "logout", "join", "new", "new-dataset", "new-space",
    "search", "health", "admin", "auth", "oauth", "papers", "blog", "pricing", "enterprise", "notifications",
    "huggingface", "hf", "peftkit", "registry", "metrics", "robots.txt", "favicon.ico",
})


def validate_account_name(name: str, what: str = "user name") -> str:
    """A new user or organization name: a valid name that is not reserved."""
    validate_name(name, what)
    if name.lower() in RESERVED_ACCOUNT_NAMES:
        raise InvalidRepoId(
            f"{what} {name!r} is reserved: it collides with the registry's URLs (/{name.lower()}/...); "
            f"pick another name (reserved: {', '.join(sorted(RESERVED_ACCOUNT_NAMES))})"
        )
    return name


def split_repo_id(repo_id: str) -> tuple[str, str]:
    """Split ``namespace/name`` and validate both halves."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise InvalidRepoId(problem)
    namespace, name = repo_id.split("/")
    return namespace, name


def validate_repo_id(repo_id: str) -> str:
    split_repo_id(repo_id)
    return repo_id


def validate_path(path: str) -> str:
    """Check a file path inside a repo: relative, '/'-separated, no '.'/'..' segments."""
    if not isinstance(path, str) or not path:
        raise InvalidPath("file path is empty; give a relative path such as 'adapter_config.json'")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidPath(f"file path is longer than {MAX_PATH_LENGTH} characters: {path[:80]!r}...")
    if CONTROL_CHARACTER_RE.search(path):
        raise InvalidPath(f"file path {path!r} contains control characters")
    if "\\" in path:
        raise InvalidPath(f"file path {path!r} contains a backslash; use '/' to separate folders")
    if path.startswith("/"):
        raise InvalidPath(f"file path {path!r} is absolute; give it relative to the repo root")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidPath(
                f"file path {path!r} has an empty, '.' or '..' segment; paths must stay inside the repo"
            )
        if segment == ".git":
            raise InvalidPath(f"file path {path!r} uses the reserved folder name '.git'")

    return path


def validate_new_path(path: str) -> str:
    """A path a commit adds a file at: a valid path (:func:`validate_path`) at most :data:`MAX_PATH_DEPTH`
    folders deep, with no invisible formatting character and no name of spaces only. Reads take any valid path,
    so files committed before these rules stay readable."""
    validate_path(path)
    invisible = next((c for c in path if unicodedata.category(c) == "Cf"), None)
    if invisible is not None:  # bidi overrides and zero-width characters make a name read as another
        raise InvalidPath(f"file path {path!r} contains the invisible formatting character U+{ord(invisible):04X} "
                          f"(bidi overrides and zero-width characters make a name look like another); remove it")
    if any(not segment.strip() for segment in path.split("/")):
        raise InvalidPath(f"file path {path!r} has a file or folder name of spaces only; give it a visible name")
    depth = path.count("/")
    if depth > MAX_PATH_DEPTH:
        raise InvalidPath(
            f"file path {path[:80]!r}{'...' if len(path) > 80 else ''} lies {depth} folders deep; this registry "
            f"takes files at most {MAX_PATH_DEPTH} folders deep: flatten the folder layout"
        )
    return path


def validate_folder(path: str) -> str:
    """A folder prefix for folder deletions: like a path, with an optional trailing '/'."""
    stripped = path.rstrip("/") if isinstance(path, str) else path
    validate_path(stripped)
    return stripped


def validate_branch(name: str) -> str:
    problem = branch_problem(name)
    if problem:
        raise InvalidRevision(problem)
    return name


def validate_revision(revision: str) -> str:
    """A revision is a branch or tag name, ``refs/heads/<branch>``, ``refs/tags/<tag>`` or a 40-hex commit sha.

    ``refs/heads/`` is dropped (a bare name means a branch first); ``refs/tags/`` is kept.
    """
    problem = revision_problem(revision)
    if problem:
        raise InvalidRevision(problem)
    if not is_commit_sha(revision) and revision.startswith(HEADS_PREFIX):
        return revision[len(HEADS_PREFIX) :]
    return revision


def validate_tag(name: str) -> str:
    """A tag name follows the branch name rules (it shares their namespace of revisions)."""
    problem = branch_problem(name, "tag name")
    if problem:
        raise InvalidRevision(problem)
    return name
