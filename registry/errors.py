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
    """Base class: a failure with a status, a machine code and a human message."""

    status: int = 500
    code: str = "InternalError"

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
    code = "BadRequest"


class InvalidRepoId(BadRequest):
    code = "InvalidRepoId"


class InvalidPath(BadRequest):
    code = "InvalidPath"


class InvalidRevision(BadRequest):
    code = "InvalidRevision"


class MalformedPayload(BadRequest):
    code = "MalformedPayload"


class Unauthorized(RegistryError):
    status = 401
    code = "Unauthorized"


class Forbidden(RegistryError):
    status = 403
    code = "Forbidden"


class NotFound(RegistryError):
    status = 404
    code = "NotFound"


class RepoNotFound(NotFound):
    code = "RepoNotFound"


class RevisionNotFound(NotFound):
    code = "RevisionNotFound"


class EntryNotFound(NotFound):
    code = "EntryNotFound"

    def __init__(self, message: str, *, commit: str | None = None) -> None:
        super().__init__(message)
        # The client caches "this file does not exist at this commit" when the
        # 404 carries X-Repo-Commit, so keep the commit the lookup ran against.
        self.commit = commit


class Conflict(RegistryError):
    status = 409
    code = "Conflict"


class RepoExists(Conflict):
    code = "RepoExists"

    def __init__(self, message: str, *, repo_id: str) -> None:
        super().__init__(message)
        self.repo_id = repo_id


class AccountExists(Conflict):
    code = "AccountExists"


class ParentCommitMismatch(RegistryError):
    """``parentCommit`` is not the branch head any more: someone committed first."""

    status = 412
    code = "ParentCommitMismatch"


class PayloadTooLarge(RegistryError):
    status = 413
    code = "PayloadTooLarge"


class RangeNotSatisfiable(RegistryError):
    status = 416
    code = "RangeNotSatisfiable"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size
