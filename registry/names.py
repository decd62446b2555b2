"""Validation of repo ids, file paths and revision names.

Everything that comes from a client and ends up in a file name, a URL or a SQL
parameter goes through here first. We reject rather than normalise: a path like
``a/../b`` is an error naming the path, never silently rewritten.
"""

from __future__ import annotations

import re

from .errors import InvalidPath, InvalidRepoId, InvalidRevision

MAX_NAME_LENGTH = 96
MAX_PATH_LENGTH = 1024
MAX_BRANCH_LENGTH = 200

_NAME_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_BRANCH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

NAME_RULES = (
    "letters, digits, '-', '_' and '.', starting and ending with a letter, digit or '_', "
    f"no '--' or '..', at most {MAX_NAME_LENGTH} characters"
)


def validate_name(name: str, what: str = "name") -> str:
    """Check one half of a repo id (or a user/org name) and return it."""
    if not isinstance(name, str) or not name:
        raise InvalidRepoId(f"{what} is empty; use {NAME_RULES}")
    if (
        len(name) > MAX_NAME_LENGTH
        or not _NAME_RE.match(name)
        or "--" in name
        or ".." in name
        or name.endswith(".git")
    ):
        raise InvalidRepoId(f"invalid {what} {name!r}: use {NAME_RULES}")
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
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InvalidRepoId(
            f"invalid repo id {repo_id!r}: expected 'namespace/name' (for example 'alice/lora-sentiment')"
        )
    namespace, name = repo_id.split("/")
    validate_name(namespace, "namespace")
    validate_name(name, "repo name")
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
    if _CONTROL_RE.search(path):
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


def validate_folder(path: str) -> str:
    """A folder prefix for folder deletions: like a path, with an optional trailing '/'."""
    stripped = path.rstrip("/") if isinstance(path, str) else path
    validate_path(stripped)
    return stripped


def is_commit_sha(revision: str) -> bool:
    return bool(_COMMIT_RE.match(revision))


def validate_branch(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_BRANCH_LENGTH
        or not _BRANCH_RE.match(name)
        or ".." in name
        or "//" in name
        or name.endswith(("/", ".", ".lock"))
        or is_commit_sha(name)
    ):
        raise InvalidRevision(
            f"invalid branch name {name!r}: use letters, digits, '-', '_', '.' and '/', "
            "not a 40-hex string, no '..'"
        )
    return name


TAG_PREFIX = "refs/tags/"


def validate_revision(revision: str) -> str:
    """A revision is a branch or tag name, ``refs/heads/<branch>``, ``refs/tags/<tag>`` or a 40-hex commit sha.

    ``refs/heads/`` is dropped (a bare name means a branch first); ``refs/tags/`` is kept.
    """
    if isinstance(revision, str) and is_commit_sha(revision):
        return revision
    if isinstance(revision, str) and revision.startswith("refs/heads/"):
        revision = revision[len("refs/heads/") :]
    try:
        if isinstance(revision, str) and revision.startswith(TAG_PREFIX):
            return TAG_PREFIX + validate_branch(revision[len(TAG_PREFIX) :])
        return validate_branch(revision)
    except InvalidRevision:
        raise InvalidRevision(
            f"invalid revision {revision!r}: give a branch or tag name such as 'main' or 'v1.0', "
            "or a full 40-hex commit sha"
        ) from None


def validate_tag(name: str) -> str:
    """A tag name follows the branch name rules (it shares their namespace of revisions)."""
    try:
        return validate_branch(name)
    except InvalidRevision:
        raise InvalidRevision(
            f"invalid tag name {name!r}: use letters, digits, '-', '_', '.' and '/', not a 40-hex string, no '..'"
        ) from None
