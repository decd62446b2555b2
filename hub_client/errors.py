"""Errors of the hub client. Each names what went wrong and how to fix it.

They are :class:`peftkit.PeftkitError` subclasses, so the CLI prints their
message and exits with code 1 (no traceback). A token never appears in any
of them: messages built from a server's answer pass through
:func:`peftkit.hub_client.auth.redact` first.
"""

from __future__ import annotations

from peftkit.core.errors import PeftkitError


class HubError(PeftkitError):
    """A hub operation failed; the hub is left as it was."""


class HubUnreachable(HubError, ConnectionError):
    """The hub's server does not answer (refused, timed out, DNS)."""


class HubAuthError(HubError, PermissionError):
    """No token, or the hub refused the token for this operation."""


class RepoNotFound(HubError, LookupError):
    """The repo does not exist on the hub (or is private and hidden from you)."""


class RevisionNotFound(HubError, LookupError):
    """The repo exists but has no such branch or commit."""


class NamespaceNotFound(HubError, LookupError):
    """No such user or organization on the hub, or one whose storage usage is not yours to read."""


class QuotaExceeded(HubError):
    """A push would take the namespace over the storage quota its hub sets; nothing was written."""


class OfflineError(HubError):
    """Offline mode is on and what was asked for is not in the cache."""


class IntegrityError(HubError):
    """A downloaded file does not match the size or hash the hub announced."""


class InvalidRepoRef(HubError, ValueError):
    """A repo reference (``namespace/name[@revision]``) or hub address is malformed."""


class ReadOnlyTokenWarning(UserWarning):
    """A token saved by ``login`` may read (pull, search, private repos) but not push."""


class BaseModelWarning(UserWarning):
    """A pushed adapter records no base model, or only a local folder: nobody finds it by base model."""
