"""A namespace's storage usage and limit, as the registry reports it and the hub client reads it.

One object for every place that shows it: ``peftkit registry quota show --json``, the registry's
``GET /api/namespaces/{namespace}/storage``, the account pages (to the user or the organization's
members only) and the client's ``peftkit hub storage``. The registry counts the bytes
(:mod:`peftkit.registry.quotas`); this module only holds and words them, so the hub client can read
them without importing the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Where a namespace's limit comes from: its own (``registry quota set``), the server's
#: ``serve --namespace-quota-gb``, or none.
QUOTA_SOURCES = ("namespace", "default", "none")


def format_size(size: int) -> str:
    """``size`` bytes for people: ``1.5 GB``, ``512 KB``, ``12 bytes`` (powers of 1000)."""
    if size < 1000:
        return f"{size} byte{'' if size == 1 else 's'}"
    value = float(size)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            return f"{value:.3g} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class NamespaceUsage:
    """A namespace's stored bytes and its limit. ``used_bytes`` is what counts against the limit: the bytes
    of its files plus those of its metadata (history, file paths, branches and tags), which a registry
    may also report apart (``file_bytes``, ``metadata_bytes``; None where it does not).
    ``quota_bytes`` is the limit that applies (None: no limit), ``source`` where it comes from:
    ``"namespace"`` (an override), ``"default"`` (the server's), ``"none"``."""

    namespace: str
    used_bytes: int
    quota_bytes: int | None
    source: str
    file_bytes: int | None = None
    metadata_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"namespace": self.namespace, "used_bytes": self.used_bytes, "quota_bytes": self.quota_bytes,
               "source": self.source}
        if self.file_bytes is not None and self.metadata_bytes is not None:
            out.update(file_bytes=self.file_bytes, metadata_bytes=self.metadata_bytes)
        return out

    @classmethod
    def from_json(cls, data: Any) -> "NamespaceUsage":
        """The object :meth:`to_json` writes; ValueError naming the field when ``data`` is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        namespace, used, quota, source = (data.get(k) for k in ("namespace", "used_bytes", "quota_bytes", "source"))
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"'namespace' must be a name, got {namespace!r}")
        if not _is_count(used):
            raise ValueError(f"'used_bytes' must be a number of bytes, got {used!r}")
        if quota is not None and not _is_count(quota):
            raise ValueError(f"'quota_bytes' must be a number of bytes or null, got {quota!r}")
        if source not in QUOTA_SOURCES or (quota is None) != (source == "none"):
            raise ValueError(f"'source' must be one of {', '.join(QUOTA_SOURCES)} (none exactly when "
                             f"'quota_bytes' is null), got {source!r}")
        files, metadata = data.get("file_bytes"), data.get("metadata_bytes")
        if files is None or metadata is None:  # a registry that does not report them apart
            return cls(namespace, used, quota, source)
        if not (_is_count(files) and _is_count(metadata)):
            raise ValueError(f"'file_bytes' and 'metadata_bytes' must be numbers of bytes, got {files!r} and "
                             f"{metadata!r}")
        return cls(namespace, used, quota, source, file_bytes=files, metadata_bytes=metadata)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class StorageSummary:
    """A namespace's usage as people read it (the account page, ``peftkit hub storage``)."""

    used_bytes: int
    quota_bytes: int | None  # None: no limit applies
    used: str  # "1.37 MB"
    limit: str | None  # "5 MB", None without a limit
    percent: int | None  # of the limit, rounded down (may exceed 100 when a limit was set below the usage)
    full: bool  # at or over the limit: a commit that adds files is refused until space is freed
    server_default: bool  # the limit is the server's --namespace-quota-gb, not the namespace's own

    @property
    def text(self) -> str:
        """``1.37 MB of 5 MB used (27%)``, or ``1.37 MB used (no limit)``."""
        if self.limit is None:
            return f"{self.used} used (no limit)"
        return f"{self.used} of {self.limit} used ({self.percent}%)"


def storage_summary(usage: NamespaceUsage) -> StorageSummary:
    quota = usage.quota_bytes
    if quota is None:
        return StorageSummary(usage.used_bytes, None, format_size(usage.used_bytes), None, None, False, False)
    if quota > 0:
        percent = usage.used_bytes * 100 // quota
    else:
        percent = 100  # a limit of 0: nothing more fits
    return StorageSummary(
        usage.used_bytes, quota, format_size(usage.used_bytes), format_size(quota), percent,
        full=usage.used_bytes >= quota, server_default=usage.source == "default",
    )
