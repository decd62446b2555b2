"""Where a registry keeps its blobs: ``--blobs DIR`` (a local or shared folder) or ``--blobs s3://bucket/prefix``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .blob_storage import BlobStorage
from .blobs import BlobStore

if TYPE_CHECKING:
    from .database_url import AnyDatabase

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
    elif location.lower().startswith("s3:"):  # a mistyped URL would otherwise become a local folder 's3:'
        raise ValueError(f"{location!r} is not an S3 URL: write s3://BUCKET/PREFIX (two slashes)")
    return location


def refuse_blob_folder_without_blobs(
    location: str | os.PathLike[str] | None, data_dir: Path, db: AnyDatabase, *, shared_database: bool
) -> None:
    """Refuse a blob folder that holds no ``blobs/`` when the database already refers to files.

    Opening it would create it empty: a host whose shared filesystem is not mounted (an empty mount
    point, or a mistyped path), or a command given ``--database`` without the servers' ``--blobs``
    (so the data folder), would then see every file as missing, and a server would keep new uploads
    on its own disk, out of the other servers' reach. A new registry's folder is still created.
    """
    if is_s3_url(location) or (location is None and not shared_database):
        return
    folder = Path(os.path.expanduser(os.fspath(location))) if location is not None else data_dir
    if (folder / "blobs").is_dir():
        return
    with db.read() as conn:
        holds_files = conn.execute("SELECT 1 FROM tree_entries LIMIT 1").fetchone() is not None
    if not holds_files:
        return
    if location is None:
        fix = "pass --blobs with the shared folder or s3://BUCKET/PREFIX the servers use"
    else:
        fix = "mount the shared folder (or fix the --blobs path) and start again"
    raise RuntimeError(
        f"the blob folder {folder} holds no blobs/, but this registry's database already refers to files: "
        f"{fix}; an empty blob folder would answer every file as missing"
    )


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
