"""Errors raised by the registry store and server.

Every error carries the HTTP status and the ``X-Error-Code`` the server sends,
so the store, the HTTP layer and the CLI report the same thing in the same
words. The codes ``RepoNotFound``, ``RevisionNotFound`` and ``EntryNotFound``
are the ones ``huggingface_hub`` maps to its own exception types; the others
are ours and surface on the client as ``HfHubHTTPError``/``BadRequestError``
with our message attached.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class: a failure with a status, a machine code and a human message.

    A subclass's ``code`` is its class name unless it sets one, so each error
    class below only says where it sits (its base) and, for a family, its status.
    """

    status: int = 500
    code: str = "InternalError"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            cls.code = cls.__name__

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadRequest(RegistryError):
    """Malformed input: names, paths, payloads. Nothing was written."""

    status = 400


class InvalidRepoId(BadRequest):
    """A repo or account name outside the naming rules."""


class InvalidPath(BadRequest):
    """A file path that is empty, absolute, too long or otherwise unsafe in a repo."""


class InvalidRevision(BadRequest):
    """A branch name or revision that is not valid."""


class MalformedPayload(BadRequest):
    """A request body that is not what the endpoint takes."""


class Unauthorized(RegistryError):
    """No token where one is needed, or one the registry does not know (or has revoked)."""

    status = 401


class Forbidden(RegistryError):
    """A valid token that may not do this (read-only, or another namespace)."""

    status = 403


class NotFound(RegistryError):
    """Something the request names does not exist."""

    status = 404


class RepoNotFound(NotFound):
    """No such repository, or a private one the caller may not read."""


class RevisionNotFound(NotFound):
    """No such branch or commit in the repository."""


class EntryNotFound(NotFound):
    """No such file or folder in the repository at that revision."""

    def __init__(self, message: str, *, commit: str | None = None) -> None:
        super().__init__(message)
        # The client caches "this file does not exist at this commit" when the
        # 404 carries X-Repo-Commit, so keep the commit the lookup ran against.
        self.commit = commit


class Conflict(RegistryError):
    """The request clashes with what exists already."""

    status = 409


class RepoExists(Conflict):
    """A repository of that id exists already."""

    def __init__(self, message: str, *, repo_id: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id


class AccountExists(Conflict):
    """A user or organization of that name exists already."""


class ParentCommitMismatch(RegistryError):
    """``parentCommit`` is not the branch head any more: someone committed first."""

    status = 412


class PayloadTooLarge(RegistryError):
    """A request body larger than the server accepts."""

    status = 413


class QuotaExceeded(RegistryError):
    """A write that would take a namespace over its storage quota (see :mod:`peftkit.registry.quotas`).

    413, not 403: huggingface_hub words a 403 as "make sure your token has the correct permissions",
    which sends the user after the wrong fix; a 413 shows the server's message as it is."""

    status = 413


class RangeNotSatisfiable(RegistryError):
    """A ``Range`` header outside the file."""

    status = 416

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size


class BlobStoreMismatch(RuntimeError):
    """The blob store is not this registry's (it lacks files the database refers to, or its marker names
    another registry): ``gc`` would judge the wrong files unreferenced, so it deletes nothing."""


class ForeignBlobStore(BlobStoreMismatch):
    """The blob store's marker names another registry (or it is unmarked and holds only others' files)."""
