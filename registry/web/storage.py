"""What a user's or organization's page says of the namespace's storage: usage, the limit that applies, how full.

The figures come from :mod:`peftkit.registry.quotas` (a maintained counter, not a scan). They are private, as
on the Hugging Face Hub, where only the owner's settings show storage: the account page asks for them only
when the visitor is that user or a member of that organization.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quotas import NamespaceUsage, format_size


@dataclass(frozen=True)
class StorageSummary:
    """A namespace's usage as the page shows it."""

    used_bytes: int
    quota_bytes: int | None  # None: no limit applies
    used: str  # "1.37 MB"
    limit: str | None  # "5 MB", None without a limit
    percent: int | None  # of the limit, rounded down (may exceed 100 when a limit was set below the usage)
    full: bool  # at or over the limit: a commit that adds files is refused until space is freed
    server_default: bool  # the limit is the server's --namespace-quota-gb, not the namespace's own


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
