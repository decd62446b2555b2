"""``registry gc``: delete the blobs no commit references, and stale staging files.

A crashed or refused commit leaves blobs no commit references (invisible to every read); staging
files of crashed writers stay in ``tmp/``. :func:`collect_garbage` deletes both, safely while servers
run:

* it refuses (:class:`~peftkit.registry.identity.BlobStoreMismatch`, deleting nothing) a store that is
  not this registry's: its marker names another registry, or it lacks files the database refers to;
* it lists the store (minutes for a big bucket) without holding the write lock every server shares,
  and judges only blobs written ``min_age_s`` before the listing started;
* it deletes inside one write transaction, which excludes every writer in any process: none can
  publish (and so start using) a blob while gc judges it. A blob committed since the listing is
  referenced there; a commit that publishes a blob deleted here finds it gone and writes it again.

A dry run lists the same candidates and reads the references in a read snapshot: it takes no write
lock and deletes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .blob_storage import BlobStorage
from .identity import BlobStoreMismatch, confirm_own_store


@dataclass
class GcReport:
    """What gc deleted (or, in a dry run, would delete)."""

    #: ``(sha256, bytes)`` of each unreferenced blob, sorted by sha256.
    blobs: list[tuple[str, int]] = field(default_factory=list)
    #: Stale staging files removed (on S3 also unfinished multipart uploads aborted).
    staging_files: int = 0
    dry_run: bool = False

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.blobs)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "blobs": len(self.blobs),
            "bytes": self.bytes,
            "staging_files": self.staging_files,
            "deleted" if not self.dry_run else "to_delete": [
                {"sha256": sha, "bytes": size} for sha, size in self.blobs
            ],
        }


def referenced_blobs(conn: Any) -> set[str]:
    """Every blob a tree of the database refers to."""
    return {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM tree_entries")}


def refuse_missing_blobs(db: Any, blobs: BlobStorage, referenced_before: set[str], listed: set[str]) -> None:
    """BlobStoreMismatch when blobs committed before the listing started are not in the store.

    Every one of them was published before the listing, so it is listed unless it was deleted
    meanwhile, which happens only once nothing refers to it: those still referenced now, and
    still absent (a later commit may have written one again), are missing.
    """
    unlisted = referenced_before.difference(listed)
    if not unlisted:
        return
    with db.read() as conn:
        referenced = referenced_blobs(conn)
    missing = [sha for sha in sorted(unlisted & referenced) if not blobs.exists(sha)]
    if missing:
        raise BlobStoreMismatch(
            f"gc deleted nothing: {len(missing)} of the {len(referenced)} files this registry's database "
            f"refers to are not in {blobs.describe()} (e.g. blob {missing[0]}). If --blobs (or "
            "--database) names another registry's store, gc would delete that registry's files: pass the "
            "pair the servers use. If files were lost (`peftkit registry fsck` lists them), restore them "
            "from a backup or delete the repos that hold them, then run gc again"
        )


def collect_garbage(
    db: Any, blobs: BlobStorage, *, tmp_older_than_s: float = 3600.0, min_age_s: float = 0.0,
    allow_missing: bool = False, dry_run: bool = False,
) -> GcReport:
    """Delete (``dry_run``: only list) the unreferenced blobs written ``min_age_s`` seconds before the
    listing started, and staging files older than ``tmp_older_than_s``. See the module docstring."""
    confirm_own_store(blobs, db)
    with db.read() as conn:
        referenced_before = referenced_blobs(conn)
    started = time.time()
    listed: set[str] = set()
    candidates: dict[str, int] = {}
    for sha, written, size in blobs.iter_ages():  # no lock held: commits go on meanwhile
        listed.add(sha)
        if written < started - min_age_s:
            candidates[sha] = size
    if not allow_missing:
        refuse_missing_blobs(db, blobs, referenced_before, listed)
    report = GcReport(dry_run=dry_run)
    if dry_run:
        with db.read() as conn:
            referenced = referenced_blobs(conn)
        report.blobs = sorted((sha, size) for sha, size in candidates.items() if sha not in referenced)
    else:
        with db.write() as conn:
            confirm_own_store(blobs, db)  # again, under the lock: the marker may have changed while it listed
            referenced = referenced_blobs(conn)
            for sha in sorted(candidates):
                if sha not in referenced:
                    blobs.delete(sha)
                    report.blobs.append((sha, candidates[sha]))
    report.staging_files = blobs.cleanup_tmp(tmp_older_than_s, dry_run=dry_run)
    return report
