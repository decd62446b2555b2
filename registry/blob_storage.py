"""What the registry needs from a blob store: the interface the local folder and S3 stores share.

Blobs are file contents addressed by their sha256. Writing one takes two steps: *stage*
(hash it and put it somewhere no reader looks, outside any lock) then *publish* (make it
readable under its address, inside the commit's write transaction, cheaply). Publishing a
blob that is already there is a no-op; a blob is never readable half-written. Readers only
reach blobs through the metadata, so an unreferenced blob is invisible until
``RegistryStore.gc`` removes it.

Implementations: :class:`peftkit.registry.blobs.BlobStore` (a local or shared folder) and
:class:`peftkit.registry.blobs_s3.S3BlobStore` (S3-compatible object storage).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import os

    from .blobs import StagedBlob


@runtime_checkable
class BlobStorage(Protocol):
    #: A local folder for staging files and spooling request bodies (this host's own).
    tmp_dir: Path

    def describe(self) -> str:
        """Where the blobs are, for messages (a folder or an ``s3://`` URL)."""

    def shared_secret(self, name: str) -> bytes:
        """32 random bytes kept as ``name`` beside the blobs: created by the first server to ask,
        then the same for every server and worker sharing this store (the web pages sign with it)."""

    # -- the store's marker (which registry it belongs to: see peftkit.registry.identity) ---------
    def read_marker(self, name: str) -> str | None:
        """The text of the small file (object) ``name`` beside the blobs, or None when there is none."""

    def create_marker(self, name: str, text: str) -> None:
        """Write ``name`` beside the blobs unless it exists (atomically: never overwrites one that does)."""

    def replace_marker(self, name: str, text: str) -> None:
        """Write ``name`` beside the blobs, replacing what it held (atomically: readers see old or new)."""

    # -- reading --------------------------------------------------------
    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int | None:
        """The blob's size in bytes, or None when it is missing."""

    def open(self, sha256: str) -> BinaryIO:
        """The blob for reading (seekable, streamed); FileNotFoundError when it is missing."""

    # -- writing ----------------------------------------------------------
    def stage_bytes(self, data: bytes, *, sync: bool | None = None) -> StagedBlob: ...

    def stage_file(self, source: str | os.PathLike[str]) -> StagedBlob: ...

    def sync_staged(self, staged: Iterable[StagedBlob]) -> None:
        """Make blobs staged with ``sync=False`` durable, before their commit is recorded."""

    def discard(self, staged: StagedBlob) -> None:
        """Drop what staging left that publishing no longer needs (idempotent)."""

    def publish(self, staged: StagedBlob) -> None:
        """Make a staged blob readable at its address (called inside the commit's write transaction)."""

    # -- maintenance ------------------------------------------------------
    def delete(self, sha256: str) -> None: ...

    def iter_all(self) -> Iterator[str]:
        """The sha256 of every published blob, referenced or not."""

    def iter_ages(self) -> Iterator[tuple[str, float, int]]:
        """``(sha256, written, size)`` for every published blob: when it was last written (seconds since
        the epoch, at the store's resolution: S3 keeps whole seconds) and its bytes. ``gc`` lists with it
        outside any lock and judges only blobs written before the listing started."""

    def verify(self, sha256: str) -> bool:
        """Whether the blob is there and its content still hashes to its address."""

    def cleanup_tmp(self, older_than_s: float = 3600.0, *, dry_run: bool = False) -> int:
        """Remove staging left by crashed writers older than ``older_than_s``; returns how many
        (``dry_run``: only counts them)."""
