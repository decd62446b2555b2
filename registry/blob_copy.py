"""Copy a data folder's blobs into another blob store (``registry migrate --blobs s3://...``).

Content-addressed, so the copy is idempotent: a blob the target already holds is skipped, and
an interrupted copy is finished by running it again. Each copied blob is re-hashed on the way
(staging hashes it): a blob whose content no longer matches its name is refused, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blob_storage import BlobStorage
from .blobs import BlobStore


class BlobCopyError(RuntimeError):
    """A source blob cannot be copied (it is corrupt); what was copied before stays, complete."""


@dataclass
class BlobCopyReport:
    copied: int = 0
    already_there: int = 0
    bytes_copied: int = 0


def copy_blobs(source: BlobStore, target: BlobStorage) -> BlobCopyReport:
    """Copy every blob of ``source`` (referenced or not) that ``target`` lacks."""
    report = BlobCopyReport()
    for sha in sorted(source.iter_all()):
        if target.exists(sha):
            report.already_there += 1
            continue
        staged = target.stage_file(source.path(sha))
        if staged.sha256 != sha:
            target.discard(staged)
            raise BlobCopyError(
                f"blob {sha} in {source.describe()} is corrupt (its content hashes to {staged.sha256}); "
                "run `peftkit registry fsck` on the data folder"
            )
        try:
            target.publish(staged)
        finally:
            target.discard(staged)
        report.copied += 1
        report.bytes_copied += staged.size
    return report
