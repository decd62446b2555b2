"""Content-addressed blob files on disk.

Layout: ``<root>/blobs/ab/cd/abcd...`` named by the sha256 of the content, plus
``<root>/tmp/`` for files being written. A blob is written in two steps:

1. :meth:`BlobStore.stage_bytes` / :meth:`BlobStore.stage_file` hash the content
   and write it to a temporary file (outside any lock: this is the slow part);
2. :meth:`BlobStore.publish`, called by the store inside its metadata write
   transaction, moves it into place with ``os.replace`` (atomic, cheap).

A blob on disk that no commit references is invisible (every read goes through
the metadata) and :meth:`RegistryStore.gc` removes it; that is what a crash
between the two steps leaves behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .hashing import git_blob_hasher, git_blob_oid
from .secret_file import load_or_create_secret_file

_CHUNK = 1 << 20


@dataclass
class StagedBlob:
    """Content hashed and ready to publish. Pass it as a file value to ``RegistryStore.commit``."""

    sha256: str
    oid: str
    size: int
    tmp_path: Path | None = None
    # Kept only when the blob already existed at staging time and no temp
    # file was written: lets publish() rewrite it if it was collected since.
    source: bytes | Path | None = field(default=None, repr=False)


def sha256_and_oid_of_file(path: Path) -> tuple[str, str, int]:
    """(sha256, git blob oid, size) of a file in one read; OSError if it changes size meanwhile."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        return sha256_and_oid_of_stream(f, size, str(path))


def sha256_and_oid_of_stream(f: BinaryIO, size: int, name: str) -> tuple[str, str, int]:
    """(sha256, git blob oid, size) of the ``size`` bytes ``f`` holds, read once in chunks;
    OSError naming ``name`` if it holds another number of bytes."""
    sha = hashlib.sha256()
    oid = git_blob_hasher(size)
    read = 0
    while chunk := f.read(_CHUNK):
        sha.update(chunk)
        oid.update(chunk)
        read += len(chunk)
    if read != size:
        raise OSError(f"{name} changed size while it was being read ({size} -> {read} bytes)")
    return sha.hexdigest(), oid.hexdigest(), size


def sha256_of_stream(f: BinaryIO) -> str:
    """The sha256 of everything ``f`` holds from where it is, read in chunks."""
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def hashes_to_its_name(open_blob: Callable[[str], BinaryIO], sha256: str) -> bool:
    """Whether the blob ``open_blob(sha256)`` reads is there and its content hashes to ``sha256``."""
    try:
        with open_blob(sha256) as f:
            return sha256_of_stream(f) == sha256
    except FileNotFoundError:
        return False


def remove_stale_entries(folder: Path, older_than_s: float, *, dry_run: bool = False) -> int:
    """Remove the files and folders in ``folder`` not modified for ``older_than_s`` seconds; returns how many
    (``dry_run``: only counts them)."""
    removed = 0
    cutoff = time.time() - older_than_s
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.stat().st_mtime >= cutoff:
                continue
            removed += 1
            if dry_run:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
    return removed


_FSYNC_EACH_UP_TO = 16  # more staged files than this are flushed with one syncfs where available


def _syncfs(folder: str) -> bool:
    """syncfs(2) on the file system holding ``folder``; False where the C library lacks it."""
    import ctypes  # lazily: only bulk commits with fsync on need it

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def write_staging_file(folder: str, data: bytes, *, fsync: bool) -> Path:
    """A new file in ``folder`` holding ``data`` (fsync'd if asked); nothing is left behind on failure."""
    # Raw os calls: a commit of thousands of small files stages each one here.
    name = os.path.join(folder, f"stage-{secrets.token_hex(10)}")
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def write_small_file(path: Path, text: str, *, overwrite: bool) -> None:
    """Write ``text`` to ``path`` (``0o600``, flushed) atomically: a reader sees the old content or the new,
    never part. ``overwrite=False`` keeps a file that exists (another process's, if it raced this one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails when the file exists: it is kept
            except FileExistsError:
                pass
    finally:
        tmp.unlink(missing_ok=True)


def copy_to_staging_file(folder: Path, source: Path, *, fsync: bool) -> tuple[Path, str]:
    """Copy ``source`` into a new file in ``folder`` (fsync'd if asked); returns it and the sha256 of
    what was copied (compare it with the source's to detect a change meanwhile). Removed on failure."""
    sha = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix="stage-", dir=folder)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                out.write(chunk)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, sha.hexdigest()



class BlobStore:
    """Blobs in a folder (local, or a shared filesystem path every server mounts): a :class:`BlobStorage`.

    ``create=False`` opens an existing folder without creating anything (for read-only checks).
    """

    def __init__(self, root: Path, *, fsync: bool = True, create: bool = True) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.fsync = fsync
        if create:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._blob_dir_name = os.fspath(self.blob_dir)
        self._tmp_dir_name = os.fspath(self.tmp_dir)

    # -- addressing -------------------------------------------------------
    def path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256[2:4] / sha256

    def _name(self, sha256: str) -> str:
        """:meth:`path` as a plain string: the per-file hot paths avoid pathlib's overhead."""
        return os.path.join(self._blob_dir_name, sha256[:2], sha256[2:4], sha256)

    def exists(self, sha256: str) -> bool:
        return os.path.isfile(self._name(sha256))

    def describe(self) -> str:
        return str(self.root)

    def shared_secret(self, name: str) -> bytes:
        return load_or_create_secret_file(self.root / name)

    def read_marker(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text()
        except FileNotFoundError:
            return None

    def create_marker(self, name: str, text: str) -> None:
        write_small_file(self.root / name, text, overwrite=False)

    def replace_marker(self, name: str, text: str) -> None:
        write_small_file(self.root / name, text, overwrite=True)

    def size(self, sha256: str) -> int | None:
        try:
            return os.stat(self._name(sha256)).st_size
        except FileNotFoundError:
            return None

    def open(self, sha256: str) -> BinaryIO:
        return open(self._name(sha256), "rb")  # noqa: SIM115 - the caller closes it

    # -- staging (no lock held) --------------------------------------------
    def _write_tmp(self, data: bytes, *, sync: bool | None = None) -> Path:
        return write_staging_file(self._tmp_dir_name, data, fsync=self.fsync if sync is None else sync)

    def _copy_tmp(self, source: Path) -> tuple[Path, str]:
        return copy_to_staging_file(self.tmp_dir, source, fsync=self.fsync)

    def _make_folder(self, sha256: str) -> None:
        """Create the blob's folder now, outside the commit's lock, so publishing is a bare rename.

        Folders are never removed, so it is still there when the blob is published.
        """
        folder = os.path.dirname(self._name(sha256))
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)

    def stage_bytes(self, data: bytes, *, sync: bool | None = None) -> StagedBlob:
        """Hash and stage ``data``. ``sync=False`` defers flushing it to disk to
        :meth:`sync_staged` (one flush for a whole commit's files)."""
        sha = hashlib.sha256(data).hexdigest()
        oid = git_blob_oid(data)
        if self.exists(sha):
            return StagedBlob(sha, oid, len(data), None, bytes(data))
        self._make_folder(sha)
        return StagedBlob(sha, oid, len(data), self._write_tmp(data, sync=sync))

    def sync_staged(self, staged: Iterable[StagedBlob]) -> None:
        """Flush staged files written with ``sync=False`` to disk, before their commit is recorded.

        Many files take one ``syncfs`` of the data folder's file system (Linux)
        instead of one ``fsync`` each: a commit of 10,000 small files would
        otherwise spend most of its time waiting on the disk.
        """
        if not self.fsync:
            return
        paths = [b.tmp_path for b in staged if b.tmp_path is not None]
        if len(paths) > _FSYNC_EACH_UP_TO and _syncfs(self._tmp_dir_name):
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def stage_file(self, source: str | os.PathLike[str]) -> StagedBlob:
        source = Path(source)
        sha, oid, size = sha256_and_oid_of_file(source)
        if self.exists(sha):
            return StagedBlob(sha, oid, size, None, source)
        tmp, copied_sha = self._copy_tmp(source)
        if copied_sha != sha:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{source} changed while it was being staged; try again")
        self._make_folder(sha)
        return StagedBlob(sha, oid, size, tmp)

    def discard(self, staged: StagedBlob) -> None:
        if staged.tmp_path is not None:
            staged.tmp_path.unlink(missing_ok=True)
            staged.tmp_path = None

    # -- publishing (called under the store's write lock) -----------------
    def publish(self, staged: StagedBlob) -> None:
        # Plain os.path on strings: a commit of many small files publishes them
        # all while holding the write lock, so this is the hot path.
        final_name = self._name(staged.sha256)
        if os.path.isfile(final_name):
            self.discard(staged)
            return
        tmp = staged.tmp_path
        if tmp is None:
            # The blob existed at staging time but was garbage-collected since.
            if isinstance(staged.source, bytes):
                tmp = self._write_tmp(staged.source)
            elif isinstance(staged.source, Path):
                tmp, copied = self._copy_tmp(staged.source)
                if copied != staged.sha256:
                    tmp.unlink(missing_ok=True)
                    raise OSError(f"{staged.source} changed since it was staged; try again")
            else:  # pragma: no cover - defensive
                raise RuntimeError(f"blob {staged.sha256} has no content to publish")
        try:
            os.replace(tmp, final_name)
        except FileNotFoundError:  # the blob's folder does not exist yet
            os.makedirs(os.path.dirname(final_name), exist_ok=True)
            os.replace(tmp, final_name)
        staged.tmp_path = None

    # -- maintenance ------------------------------------------------------
    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def _blob_entries(self) -> Iterator[os.DirEntry[str]]:
        if not self.blob_dir.is_dir():
            return
        for first in os.scandir(self.blob_dir):
            if not first.is_dir():
                continue
            for second in os.scandir(first.path):
                if second.is_dir():
                    yield from os.scandir(second.path)

    def iter_all(self) -> Iterator[str]:
        for blob in self._blob_entries():
            yield blob.name

    def iter_ages(self) -> Iterator[tuple[str, float, int]]:
        for blob in self._blob_entries():
            try:
                stat = blob.stat()
                yield blob.name, stat.st_mtime, stat.st_size
            except FileNotFoundError:  # deleted since the folder was read
                continue

    def verify(self, sha256: str) -> bool:
        """Re-hash a blob and compare with its name (detects on-disk corruption)."""
        return hashes_to_its_name(self.open, sha256)

    def cleanup_tmp(self, older_than_s: float = 3600.0, *, dry_run: bool = False) -> int:
        """Remove staging files left by crashed writers. Young files may belong to a live writer."""
        return remove_stale_entries(self.tmp_dir, older_than_s, dry_run=dry_run)
