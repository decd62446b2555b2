"""Content-addressed blobs in S3-compatible object storage (``--blobs s3://bucket/prefix``), through boto3.

Layout: ``<prefix>/blobs/<sha256[:2]>/<sha256>``. S3 has no rename, so the two steps of
:class:`~peftkit.registry.blob_storage.BlobStorage` are:

1. *stage* (no lock held, the slow part): hash the content into a local staging file (this
   host's ``tmp/``), then upload it under its final key: one PUT, or a multipart upload for
   big blobs, streamed from that file. S3 makes an object visible only once its PUT (or
   CompleteMultipartUpload) succeeds, so a key never holds part of a blob, and its name is
   the sha256 of what was uploaded, so whoever writes it writes the same bytes. Staged with
   ``sync=False`` (as the HTTP commit path stages each file), the uploads wait for
   ``sync_staged``, which runs a whole commit's together.
2. *publish* (inside the commit's write transaction, cheap): one HEAD checks the object is
   still there. ``registry gc`` may have removed it since staging (it was unreferenced until
   this commit); then it is uploaded again from the staging file, still under the lock.

A commit that fails after staging leaves its uploaded objects unreferenced: no read reaches
them and ``registry gc`` deletes them, as it deletes what a crashed commit leaves in a local
folder. Multipart uploads a crash leaves unfinished are aborted by :meth:`cleanup_tmp`.

Credentials, region and endpoint come from boto3's standard sources: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE`` and ``~/.aws``), ``AWS_REGION``, and
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO, Ceph, ...).
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .blobs import (
    StagedBlob,
    copy_to_staging_file,
    hashes_to_its_name,
    remove_stale_entries,
    sha256_and_oid_of_file,
    write_staging_file,
)
from .hashing import git_blob_oid
from .secret_file import new_secret_hex

_READ_BUFFER = 1 << 20
_MULTIPART_THRESHOLD = 64 << 20  # bigger blobs go up in parts of this size
_PARALLEL_UPLOADS = 16  # a commit's small files go up this many at a time
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobStoreUnavailable(RuntimeError):
    """The blob store cannot be used (missing client library, bad credentials, unreachable bucket)."""


def _missing(exc: Exception) -> bool:
    """Whether a botocore ClientError says the object or bucket does not exist."""
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("Code")) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class S3BlobReader(io.RawIOBase):
    """A seekable, read-only view of one object: reads stream one GET from the current position
    (``Range: bytes=N-``); a seek elsewhere closes it and the next read starts another."""

    def __init__(self, client: Any, bucket: str, key: str, size: int) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._size = client, bucket, key, size
        self._pos = 0
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if pos != self._pos:
            self._drop_body()
            self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size or len(buffer) == 0:
            return 0
        if self._body is None:
            try:
                reply = self._client.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-")
            except Exception as exc:
                if _missing(exc):
                    raise FileNotFoundError(f"s3://{self._bucket}/{self._key} is gone") from None
                raise
            self._body = reply["Body"]
        data = self._body.read(min(len(buffer), self._size - self._pos))
        if not data:
            raise OSError(f"s3://{self._bucket}/{self._key} ended at byte {self._pos} of {self._size}")
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def make_s3_client() -> Any:
    """A boto3 S3 client configured from the standard AWS environment and config files."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise BlobStoreUnavailable(
            "--blobs s3://... needs boto3: pip install 'peftkit[s3]'"
        ) from None
    config = Config(
        connect_timeout=10, read_timeout=60, retries={"mode": "standard"},
        max_pool_connections=64,  # one per concurrent request of a busy server
    )
    return boto3.session.Session().client("s3", config=config)


class S3BlobStore:
    """Blobs under ``s3://<bucket>/<prefix>``, staged through the local folder ``tmp_dir``: a ``BlobStorage``.

    Checks at once that the bucket is reachable with the configured credentials
    (:class:`BlobStoreUnavailable` saying what is wrong otherwise).
    """

    def __init__(self, bucket: str, prefix: str, tmp_dir: Path, *, client: Any = None,
                 multipart_threshold: int = _MULTIPART_THRESHOLD) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._tmp_dir_name = os.fspath(self.tmp_dir)
        self._blob_prefix = f"{self.prefix}/blobs/" if self.prefix else "blobs/"
        self.client = client if client is not None else make_s3_client()
        from boto3.s3.transfer import TransferConfig

        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold)
        self._check_bucket()

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key_beside_blobs(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def shared_secret(self, name: str) -> bytes:
        """The secret in object ``<prefix>/<name>``; the first server creates it with a conditional PUT
        (``If-None-Match: *``), so racing servers all end up with the one that was stored first."""
        key = self._key_beside_blobs(name)
        text = self._read_text(key)
        if text is None:
            self._put_once(key, (new_secret_hex() + "\n").encode())
            text = self._read_text(key)
        if text is None:  # pragma: no cover - deleted between the write and the read
            raise FileNotFoundError(key)
        return bytes.fromhex(text.strip())

    def _put_once(self, key: str, body: bytes) -> None:
        """Store ``body`` at ``key`` unless an object is there (a conditional PUT: of racing writers, the
        first one's stays)."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("501", "NotImplemented"):
                # A server without conditional writes: a plain PUT (of writers racing at the same
                # instant the last one's stays: servers may keep different secrets until they restart).
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
            elif code not in ("412", "PreconditionFailed", "409", "ConditionalRequestConflict"):
                raise
            # else another server stored it first: keep theirs

    def _read_text(self, key: str) -> str | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            if _missing(exc):
                return None
            raise
        with body:
            return body.read(1 << 16).decode("ascii", "replace")

    def read_marker(self, name: str) -> str | None:
        return self._read_text(self._key_beside_blobs(name))

    def create_marker(self, name: str, text: str) -> None:
        self._put_once(self._key_beside_blobs(name), text.encode())

    def replace_marker(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key_beside_blobs(name), Body=text.encode())

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        endpoint = self.client.meta.endpoint_url
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise BlobStoreUnavailable(
                f"no AWS credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            ) from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if _missing(exc):
                why = f"bucket '{self.bucket}' does not exist at {endpoint}; create it, or fix --blobs"
            elif code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
                why = f"bucket '{self.bucket}' is in another region than {self.client.meta.region_name}; set AWS_REGION"
            elif code in ("403", "AccessDenied", "Forbidden"):
                why = (f"access to bucket '{self.bucket}' at {endpoint} was denied; check AWS_ACCESS_KEY_ID / "
                       "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
            else:
                why = f"bucket '{self.bucket}' at {endpoint} answered {code}: {exc}"
            raise BlobStoreUnavailable(f"cannot use {self.describe()} for blobs: {why}") from None
        except BotoCoreError as exc:  # unreachable endpoint, bad region, ...
            raise BlobStoreUnavailable(
                f"cannot use {self.describe()} for blobs: {exc}; check AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) "
                "and AWS_REGION"
            ) from None

    # -- addressing and reading ----------------------------------------------
    def key(self, sha256: str) -> str:
        return f"{self._blob_prefix}{sha256[:2]}/{sha256}"

    def size(self, sha256: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))["ContentLength"])
        except Exception as exc:
            if _missing(exc):
                return None
            raise

    def exists(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def open(self, sha256: str) -> BinaryIO:
        size = self.size(sha256)
        if size is None:
            raise FileNotFoundError(f"blob {sha256} is not in {self.describe()}")
        return io.BufferedReader(S3BlobReader(self.client, self.bucket, self.key(sha256), size), _READ_BUFFER)

    # -- staging (no lock held) --------------------------------------------
    def _upload(self, tmp: Path, sha256: str) -> None:
        """Upload a staging file under the blob's key (multipart above the threshold; atomic either way)."""
        self.client.upload_file(os.fspath(tmp), self.bucket, self.key(sha256), Config=self._transfer)

    def _upload_staged(self, tmp: Path, sha256: str) -> None:
        try:
            self._upload(tmp, sha256)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def stage_bytes(self, data: bytes, *, sync: bool | None = None) -> StagedBlob:
        """Hash ``data`` and upload it. ``sync=False`` only writes the staging file and leaves the
        upload to :meth:`sync_staged`, which uploads a whole commit's files at once."""
        sha = hashlib.sha256(data).hexdigest()
        oid = git_blob_oid(data)
        if sync is False:
            return StagedBlob(sha, oid, len(data), write_staging_file(self._tmp_dir_name, data, fsync=False))
        if self.exists(sha):
            return StagedBlob(sha, oid, len(data), None, bytes(data))
        tmp = write_staging_file(self._tmp_dir_name, data, fsync=False)
        self._upload_staged(tmp, sha)
        return StagedBlob(sha, oid, len(data), tmp)

    def stage_file(self, source: str | os.PathLike[str]) -> StagedBlob:
        source = Path(source)
        sha, oid, size = sha256_and_oid_of_file(source)
        if self.exists(sha):
            return StagedBlob(sha, oid, size, None, source)
        tmp = self._copy_checked(source, sha)
        self._upload_staged(tmp, sha)
        return StagedBlob(sha, oid, size, tmp)

    def _copy_checked(self, source: Path, sha256: str) -> Path:
        """A staging copy of ``source``, which must still hash to ``sha256`` (the uploaded bytes are the copy's)."""
        tmp, copied = copy_to_staging_file(self.tmp_dir, source, fsync=False)
        if copied != sha256:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{source} changed while it was being staged; try again")
        return tmp

    def sync_staged(self, staged: Iterable[StagedBlob]) -> None:
        """Upload the blobs staged with ``sync=False`` that the bucket lacks, several at once (S3
        acknowledges an upload once it is durable). Blobs staged otherwise are already there."""
        pending = [b for b in staged if b.tmp_path is not None]
        if not pending:
            return

        def upload(blob: StagedBlob) -> None:
            if not self.exists(blob.sha256):
                self._upload(blob.tmp_path, blob.sha256)  # type: ignore[arg-type]

        with ThreadPoolExecutor(max_workers=min(_PARALLEL_UPLOADS, len(pending))) as pool:
            for done in [pool.submit(upload, blob) for blob in pending]:
                done.result()  # the first failure, once all have finished

    def discard(self, staged: StagedBlob) -> None:
        # The uploaded object stays: another commit may have staged the same content and
        # publish it; unreferenced, it is invisible until `registry gc` deletes it.
        if staged.tmp_path is not None:
            staged.tmp_path.unlink(missing_ok=True)
            staged.tmp_path = None

    # -- publishing (called under the store's write lock) -----------------
    def publish(self, staged: StagedBlob) -> None:
        if self.exists(staged.sha256):
            self.discard(staged)
            return
        # Removed by gc since staging (it was unreferenced until now): upload it again.
        tmp = staged.tmp_path
        if tmp is None:
            if isinstance(staged.source, bytes):
                tmp = write_staging_file(self._tmp_dir_name, staged.source, fsync=False)
            elif isinstance(staged.source, Path):
                try:
                    tmp = self._copy_checked(staged.source, staged.sha256)
                except OSError:
                    raise OSError(f"{staged.source} changed since it was staged; try again") from None
            else:  # pragma: no cover - defensive
                raise RuntimeError(f"blob {staged.sha256} has no content to publish")
            staged.tmp_path = tmp
        self._upload(tmp, staged.sha256)
        self.discard(staged)

    # -- maintenance ------------------------------------------------------
    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def _blob_objects(self) -> Iterator[tuple[str, Any]]:
        """``(sha256, listing item)`` of every object under the blob prefix named like a blob."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._blob_prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                name = item["Key"].rsplit("/", 1)[-1]
                if _SHA256.fullmatch(name) and item["Key"] == self.key(name):
                    yield name, item

    def iter_all(self) -> Iterator[str]:
        for name, _ in self._blob_objects():
            yield name

    def iter_ages(self) -> Iterator[tuple[str, float, int]]:
        for name, item in self._blob_objects():
            yield name, item["LastModified"].timestamp(), int(item["Size"])

    def verify(self, sha256: str) -> bool:
        return hashes_to_its_name(self.open, sha256)

    def cleanup_tmp(self, older_than_s: float = 3600.0, *, dry_run: bool = False) -> int:
        """Remove this host's stale staging files and abort multipart uploads under the prefix that
        were started more than ``older_than_s`` ago (a crashed writer's; young ones may be live);
        ``dry_run`` only counts them."""
        removed = remove_stale_entries(self.tmp_dir, older_than_s, dry_run=dry_run)
        cutoff = time.time() - older_than_s
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._blob_prefix
        )
        for page in pages:
            for upload in page.get("Uploads", ()):
                if upload["Initiated"].timestamp() >= cutoff:
                    continue
                if not dry_run:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                removed += 1
        return removed
