"""Where a registry keeps its blobs: ``--blobs DIR`` (a local or shared folder) or ``--blobs s3://bucket/prefix``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .blob_storage import BlobStorage
from .blobs import BlobStore

S3_SCHEME = "s3://"
# S3's rules for bucket names (3-63 lowercase letters, digits, dots and hyphens; a letter or digit at each end).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_s3_url(location: str | os.PathLike[str] | None) -> bool:
    return isinstance(location, str) and location.lower().startswith(S3_SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as ``(bucket, prefix)``; ValueError saying what is wrong otherwise."""
    bucket, _, prefix = url[len(S3_SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"{url!r} does not name an S3 bucket: write s3://BUCKET/PREFIX, where BUCKET has 3-63 lowercase "
            "letters, digits, dots and hyphens"
        )
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{url!r}: the prefix {prefix!r} has an empty, '.' or '..' part")
    return bucket, prefix


def check_blob_location(location: str) -> str:
    """``location`` if it is a usable ``--blobs`` value (an ``s3://`` URL is parsed), else ValueError."""
    if is_s3_url(location):
        parse_s3_url(location)
    elif "://" in location:
        raise ValueError(f"unsupported blob store {location!r}: pass a folder or s3://BUCKET/PREFIX")
    return location


def open_blob_storage(location: str | os.PathLike[str] | None, data_dir: Path, *, fsync: bool = True) -> BlobStorage:
    """The blob store at ``location`` (a folder, or ``s3://bucket/prefix``, staged through
    ``data_dir/tmp``), or by default the data folder itself.

    Raises ValueError for a malformed location and ``BlobStoreUnavailable`` (a RuntimeError)
    when an S3 bucket cannot be reached: at startup, not on the first request.
    """
    if location is None:
        return BlobStore(data_dir, fsync=fsync)
    if is_s3_url(location):
        from .blobs_s3 import S3BlobStore  # boto3 is imported only for S3

        bucket, prefix = parse_s3_url(os.fspath(location))
        return S3BlobStore(bucket, prefix, Path(data_dir) / "tmp")
    root = Path(os.path.expanduser(check_blob_location(os.fspath(location))))
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return BlobStore(root, fsync=fsync)
