"""The rules for names on a hub: repo ids (``namespace/name``), branches, tags and revisions.

Each check returns what is wrong as one sentence naming the value and the
fix, or ``None`` when the value is fine. The registry raises that sentence
as a 400 error (``peftkit.registry.names``); the hub client raises it as
``InvalidRepoRef`` before any request. So a reference the client accepts is
one the registry accepts, in the same words when it is not.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 96
MAX_BRANCH_LENGTH = 200
TAG_PREFIX = "refs/tags/"
HEADS_PREFIX = "refs/heads/"

NAME_RULES = (
    "letters, digits, '-', '_' and '.', starting and ending with a letter, digit or '_', "
    f"no '--' or '..', at most {MAX_NAME_LENGTH} characters"
)
BRANCH_RULES = "letters, digits, '-', '_', '.' and '/', not a 40-hex string, no '..'"

_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_BRANCH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")
CONTROL_CHARACTER_RE = re.compile(r"[\x00-\x1f\x7f]")


def control_problem(value: object, what: str, rules: str) -> str | None:
    """A control character in a name, said as such: ``'alice/lora\\n'`` would look exactly like
    ``'alice/lora'`` in every listing, so a name with a line break, tab or NUL gets this sentence rather
    than the general rules'."""
    if isinstance(value, str) and CONTROL_CHARACTER_RE.search(value):
        return f"invalid {what} {value!r}: it contains a control character (line break, tab, NUL, ...); use {rules}"
    return None


def name_problem(name: object, what: str = "name") -> str | None:
    """What is wrong with one half of a repo id (or a user/organization name)."""
    if not isinstance(name, str) or not name:
        return f"{what} is empty; use {NAME_RULES}"
    if problem := control_problem(name, what, NAME_RULES):
        return problem
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name) or "--" in name or ".." in name:
        return f"invalid {what} {name!r}: use {NAME_RULES}"
    if name.endswith(".git"):  # git clients read a '.git' suffix as the repository's own folder
        return f"invalid {what} {name!r}: it cannot end in '.git' (git clients read that as the repository's own " \
               f"folder); call it {name[:-4]!r}"
    return None


def repo_id_problem(repo_id: object) -> str | None:
    """What is wrong with ``namespace/name``."""
    if problem := control_problem(repo_id, "repo id", NAME_RULES):
        return problem
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        return f"invalid repo id {repo_id!r}: expected 'namespace/name' (for example 'alice/lora-sentiment')"
    namespace, name = repo_id.split("/")
    return name_problem(namespace, "namespace") or name_problem(name, "repo name")


def is_commit_sha(revision: object) -> bool:
    """A full 40-hex (lower-case) commit id."""
    return isinstance(revision, str) and bool(_COMMIT_RE.fullmatch(revision))


def branch_problem(name: object, what: str = "branch name") -> str | None:
    """What is wrong with a branch or tag name (they share one namespace of revisions)."""
    if problem := control_problem(name, what, BRANCH_RULES):
        return problem
    if (not isinstance(name, str) or not name or len(name) > MAX_BRANCH_LENGTH or not _BRANCH_RE.fullmatch(name)
            or ".." in name or "//" in name or name.endswith(("/", ".", ".lock")) or is_commit_sha(name)):
        return f"invalid {what} {name!r}: use {BRANCH_RULES}"
    if name.startswith("refs/"):  # a revision's spelling: the name would be read as another branch or tag
        bare = name.split("/", 2)[2] if name.startswith((HEADS_PREFIX, TAG_PREFIX)) else name[len("refs/"):]
        return (f"invalid {what} {name!r}: a name cannot begin with 'refs/', which revisions use to say "
                f"'branch' or 'tag' (refs/heads/NAME, refs/tags/NAME); call it {bare!r}")
    return None


def revision_problem(revision: object) -> str | None:
    """What is wrong with a revision: a branch or tag name, ``refs/heads/<branch>``, ``refs/tags/<tag>``
    or a 40-hex commit sha."""
    if is_commit_sha(revision):
        return None
    if problem := control_problem(revision, "revision", BRANCH_RULES):
        return problem
    name = revision
    if isinstance(name, str) and name.startswith((HEADS_PREFIX, TAG_PREFIX)):
        name = name.split("/", 2)[2]
    if branch_problem(name) is None:
        return None
    return (f"invalid revision {revision!r}: give a branch or tag name such as 'main' or 'v1.0', "
            "or a full 40-hex commit sha")
