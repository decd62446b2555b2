"""The blob store contract (``BlobStorage``), the same cases on a local folder and on S3 (moto's real server).

S3 differs from the folder in one documented way: staging uploads the blob under its final key
(S3 has no rename), so a staged blob already exists before it is published; nothing reads it
until a commit references it, and ``gc`` removes it if none ever does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.registry_s3_helpers import moto_endpoint, s3_blobs  # noqa: F401 - fixtures

from peftkit.registry.blob_copy import BlobCopyError, copy_blobs
from peftkit.registry.blob_location import open_blob_storage, parse_s3_url
from peftkit.registry.blob_storage import BlobStorage
from peftkit.registry.blobs import BlobStore
from peftkit.registry.hashing import git_blob_oid


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStorage:
    if request.param == "folder":
        return BlobStore(tmp_path / "blobs-folder", fsync=False)
    url = request.getfixturevalue("s3_blobs")
    return open_blob_storage(url, tmp_path / "data")


def _overwrite(store: BlobStorage) -> Callable[[str, bytes], None]:
    """Replace a published blob's stored bytes behind the store's back (bit rot, a bad copy)."""
    if isinstance(store, BlobStore):
        return lambda sha, data: store.path(sha).write_bytes(data)
    return lambda sha, data: store.client.put_object(Bucket=store.bucket, Key=store.key(sha), Body=data)


def test_published_blob_reads_back_streamed_and_by_range(store: BlobStorage) -> None:
    assert isinstance(store, BlobStorage)  # every method of the interface is there
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: more than one read buffer
    staged = store.stage_bytes(data, sync=False)
    sha = hashlib.sha256(data).hexdigest()
    assert (staged.sha256, staged.oid, staged.size) == (sha, git_blob_oid(data), len(data))
    store.sync_staged([staged])
    store.publish(staged)
    store.discard(staged)  # after publishing: nothing left to drop
    assert store.exists(sha) and store.size(sha) == len(data)
    with store.open(sha) as f:
        assert f.read() == data
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        f.seek(-4, 2)
        assert f.read() == b"tail"
        f.seek(5)
        assert f.read(3) == data[5:8] and f.tell() == 8
    assert store.verify(sha)
    assert list(store.iter_all()) == [sha]
    assert not any(store.tmp_dir.iterdir()), "no staging file is left"


def test_publishing_a_blob_that_exists_is_a_no_op(store: BlobStorage, tmp_path: Path) -> None:
    first = store.stage_bytes(b"same content")
    store.publish(first)
    again = store.stage_bytes(b"same content")
    assert again.tmp_path is None  # nothing to write: it is there
    store.publish(again)
    source = tmp_path / "same.txt"
    source.write_bytes(b"same content")
    from_file = store.stage_file(source)
    store.publish(from_file)
    assert from_file.sha256 == first.sha256
    assert list(store.iter_all()) == [first.sha256]
    with store.open(first.sha256) as f:
        assert f.read() == b"same content"


def test_a_blob_collected_between_staging_and_publishing_is_written_again(store: BlobStorage, tmp_path: Path) -> None:
    # gc may delete a staged (still unreferenced) blob before its commit publishes it.
    staged = store.stage_bytes(b"collected meanwhile")
    source = tmp_path / "f.bin"
    source.write_bytes(b"a file collected meanwhile")
    from_file = store.stage_file(source)
    store.publish(store.stage_bytes(b"already there"))
    existing = store.stage_bytes(b"already there")  # existed at staging time: kept only its source
    for blob in (staged, from_file, existing):
        store.delete(blob.sha256)
    for blob in (staged, from_file, existing):
        store.publish(blob)
        assert store.verify(blob.sha256)
    with store.open(from_file.sha256) as f:
        assert f.read() == b"a file collected meanwhile"


def test_a_source_changed_after_staging_is_refused(store: BlobStorage, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"original")
    store.publish(store.stage_file(source))
    staged = store.stage_file(source)  # exists: publishing would copy the source again if collected
    store.delete(staged.sha256)
    source.write_bytes(b"changed!")
    with pytest.raises(OSError, match="changed since it was staged"):
        store.publish(staged)
    assert not store.exists(staged.sha256) and hashlib.sha256(b"changed!").hexdigest() not in set(store.iter_all())


def test_delete_missing_and_corrupt_blobs(store: BlobStorage) -> None:
    staged = store.stage_bytes(b"to be damaged")
    store.publish(staged)
    sha = staged.sha256
    _overwrite(store)(sha, b"to be DAMAGED")
    assert store.exists(sha) and not store.verify(sha)
    store.delete(sha)
    store.delete(sha)  # deleting a missing blob is not an error
    assert not store.exists(sha) and store.size(sha) is None and not store.verify(sha)
    with pytest.raises(FileNotFoundError):
        store.open(sha)
    assert list(store.iter_all()) == []


def test_cleanup_removes_only_stale_staging(store: BlobStorage) -> None:
    stale = store.tmp_dir / "stage-crashed"
    stale.write_bytes(b"left by a crash")
    assert store.cleanup_tmp(older_than_s=3600) == 0 and stale.exists()  # young: may belong to a live writer
    assert store.cleanup_tmp(older_than_s=-1) >= 1 and not stale.exists()


def test_shared_secret_is_created_once_and_the_same_for_every_opener(store: BlobStorage, tmp_path: Path) -> None:
    secret = store.shared_secret("web_secret")
    assert len(secret) == 32 and store.shared_secret("web_secret") == secret
    other = BlobStore(store.root) if isinstance(store, BlobStore) else open_blob_storage(
        store.describe(), tmp_path / "another-host")
    assert other.shared_secret("web_secret") == secret
    assert store.shared_secret("another") != secret


def test_copying_a_folders_blobs_is_idempotent_and_refuses_corrupt_ones(store: BlobStorage, tmp_path: Path) -> None:
    source = BlobStore(tmp_path / "source", fsync=False)
    shas = []
    for content in (b"one", b"two", b"three" * 1000):
        staged = source.stage_bytes(content)
        source.publish(staged)
        shas.append(staged.sha256)
    store.publish(store.stage_bytes(b"two"))
    report = copy_blobs(source, store)
    assert (report.copied, report.already_there, report.bytes_copied) == (2, 1, 3 + 5000)
    assert sorted(store.iter_all()) == sorted(shas) and all(store.verify(sha) for sha in shas)
    assert copy_blobs(source, store).copied == 0  # run again: nothing left to copy

    rotten = source.stage_bytes(b"four")
    source.publish(rotten)
    source.path(rotten.sha256).write_bytes(b"f0ur")
    with pytest.raises(BlobCopyError, match=f"blob {rotten.sha256} in .* is corrupt"):
        copy_blobs(source, store)
    assert not store.exists(rotten.sha256)


# ------------------------------------------------------------------- S3 only
def test_big_blobs_go_up_in_parts_and_unfinished_uploads_are_aborted(s3_blobs: str, tmp_path: Path) -> None:  # noqa: F811
    from peftkit.registry.blobs_s3 import S3BlobStore

    bucket, prefix = parse_s3_url(s3_blobs)
    store = S3BlobStore(bucket, prefix, tmp_path / "tmp", multipart_threshold=5 << 20)  # S3's smallest part
    big = tmp_path / "big.bin"
    big.write_bytes(hashlib.sha256(b"seed").digest() * (11 << 15))  # 11 MiB: three parts
    staged = store.stage_file(big)
    store.publish(staged)
    head = store.client.head_object(Bucket=bucket, Key=store.key(staged.sha256))
    assert head["ContentLength"] == big.stat().st_size and head["ETag"].endswith('-3"')  # a multipart ETag
    assert store.verify(staged.sha256)

    # A crashed writer's unfinished upload. (moto dates every upload's start in 2010, so whether a
    # young upload is spared cannot be checked against it; the age test is the one staging files pass.)
    store.client.create_multipart_upload(Bucket=bucket, Key=store.key("0" * 64))
    outside = store.client.create_multipart_upload(Bucket=bucket, Key="elsewhere/not-ours")
    assert store.cleanup_tmp(older_than_s=-1) == 1
    assert [u["Key"] for u in store.client.list_multipart_uploads(Bucket=bucket)["Uploads"]] == ["elsewhere/not-ours"]
    store.client.abort_multipart_upload(Bucket=bucket, Key="elsewhere/not-ours", UploadId=outside["UploadId"])


def test_a_commits_files_staged_unsynced_go_up_together(s3_blobs: str, tmp_path: Path) -> None:  # noqa: F811
    store = open_blob_storage(s3_blobs, tmp_path)
    store.publish(store.stage_bytes(b"file 0"))
    staged = [store.stage_bytes(f"file {i}".encode(), sync=False) for i in range(20)]
    assert [store.exists(b.sha256) for b in staged] == [True] + [False] * 19  # not uploaded yet
    store.sync_staged(staged)
    assert all(store.exists(b.sha256) for b in staged)
    for blob in staged:
        store.publish(blob)
    assert sorted(store.iter_all()) == sorted(b.sha256 for b in staged)
    assert not any(store.tmp_dir.iterdir())


def test_keys_are_content_addressed_under_the_prefix(s3_blobs: str, tmp_path: Path) -> None:  # noqa: F811
    store = open_blob_storage(s3_blobs, tmp_path)
    staged = store.stage_bytes(b"addressed")
    store.publish(staged)
    bucket, prefix = parse_s3_url(s3_blobs)
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"{prefix}/blobs/{staged.sha256[:2]}/{staged.sha256}"]
    store.client.put_object(Bucket=bucket, Key=f"{prefix}/blobs/notes.txt", Body=b"not a blob")
    assert list(store.iter_all()) == [staged.sha256]


@pytest.mark.parametrize(
    ("url", "message"),
    [("s3://", "does not name an S3 bucket"), ("s3://Upper_Case/x", "does not name an S3 bucket"),
     ("s3://bucket/a//b", "empty, '.' or '..' part"), ("s3://bucket/../x", "'..' part")],
)
def test_malformed_s3_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_s3_url(url)
