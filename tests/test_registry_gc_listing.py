"""``registry gc`` lists the blob store without holding the write lock every server shares.

Listing a big bucket takes minutes; gc used to do it inside the write transaction, so every commit
on every host waited that long. The listing here is slowed by a wrapper around the real store's own
listing (a folder, and a bucket on moto's S3 server), which pauses until a concurrent commit lands.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.registry_s3_helpers import moto_endpoint, s3_blobs  # noqa: F401

from peftkit.registry import RegistryStore

_PAUSE_S = 10.0  # how long the paused listing waits for the concurrent commit at most (then it gives up)


def _blobs_of(kind: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("s3_blobs") if kind == "s3" else None


def _unreferenced_blob(store: RegistryStore, content: bytes) -> str:
    """A published blob no commit refers to (what a failed commit leaves)."""
    staged = store.blobs.stage_bytes(content)
    store.blobs.publish(staged)
    store.blobs.discard(staged)
    return staged.sha256


def _pause_listing(monkeypatch: pytest.MonkeyPatch, store: RegistryStore, listing: threading.Event,
                   go_on: threading.Event, gave_up: threading.Event) -> None:
    """Make ``store``'s blob listings set ``listing`` at their first blob, then wait for ``go_on``; a listing
    that waited ``_PAUSE_S`` in vain sets ``gave_up``: what happens when a commit waits for the listing."""
    for name in ("iter_all", "iter_ages"):
        real: Callable[[], Iterator[Any]] = getattr(store.blobs, name)

        def paused(real: Callable[[], Iterator[Any]] = real) -> Iterator[Any]:
            for i, item in enumerate(real()):
                if i == 0:
                    listing.set()
                    if not go_on.wait(timeout=_PAUSE_S):
                        gave_up.set()
                yield item

        monkeypatch.setattr(store.blobs, name, paused)


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_a_commit_lands_while_gc_lists_and_its_blobs_survive(
    tmp_path: Any, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    blobs = _blobs_of(kind, request)
    data = tmp_path / "data"
    with RegistryStore(data, fsync=False, blobs=blobs) as gc_store, \
            RegistryStore(data, fsync=False, blobs=blobs) as other:
        gc_store.create_repo("alice/busy")
        gc_store.create_repo("bob/gone")
        gc_store.commit("alice/busy", {"kept.txt": b"committed before gc"})
        gc_store.commit("bob/gone", {"only.bin": b"bob's only file"})
        stray = _unreferenced_blob(gc_store, b"left by a failed commit")
        reused_content = b"left by a failed commit, then committed while gc lists"
        reused = _unreferenced_blob(gc_store, reused_content)

        listing, go_on, gave_up = threading.Event(), threading.Event(), threading.Event()
        _pause_listing(monkeypatch, gc_store, listing, go_on, gave_up)
        outcome: dict[str, Any] = {}

        def run_gc() -> None:
            try:
                outcome["removed"] = gc_store.gc()
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        gc_thread = threading.Thread(target=run_gc)
        gc_thread.start()
        try:
            assert listing.wait(timeout=30), "gc never listed the blob store"
            # Another server's commits (and a repo deletion) while gc lists: none waits for the listing, which
            # goes on only once they landed (a commit waiting for gc's lock would leave the listing to give up).
            sha = other.commit("alice/busy", {"reused.bin": reused_content, "new.bin": b"new while gc lists"})
            other.delete_repo("bob/gone")
            time.sleep(1.05)  # S3 keeps whole seconds: this upload is then dated after the listing started
            fresh = _unreferenced_blob(other, b"uploaded while gc lists, not committed yet")
        finally:
            go_on.set()
            gc_thread.join(timeout=60)
        assert not gave_up.is_set(), "the commit waited for gc's listing (gc held the write lock while listing)"
        assert "error" not in outcome, outcome.get("error")
        # The failed commit's blob; bob's file too where it was listed before delete_repo removed it.
        assert outcome["removed"] in (1, 2)
        monkeypatch.undo()

        present = set(gc_store.blobs.iter_all())
        assert stray not in present and reused in present and fresh in present
        assert gc_store.read_file("alice/busy", "reused.bin", sha) == reused_content
        assert gc_store.read_file("alice/busy", "new.bin", sha) == b"new while gc lists"
        assert gc_store.read_file("alice/busy", "kept.txt") == b"committed before gc"
        assert gc_store.fsck() == [] and gc_store.orphan_blobs() == [fresh]


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_gc_spares_blobs_younger_than_min_age_and_deletes_old_unreferenced_ones(
    tmp_path: Any, request: pytest.FixtureRequest, kind: str
) -> None:
    with RegistryStore(tmp_path / "data", fsync=False, blobs=_blobs_of(kind, request)) as store:
        store.create_repo("alice/aged")
        store.commit("alice/aged", {"a.txt": b"referenced"})
        stray = _unreferenced_blob(store, b"left by a failed commit")
        assert store.gc(min_age_s=3600) == 0 and store.orphan_blobs() == [stray]
        assert store.gc() == 1 and store.orphan_blobs() == [] and store.fsck() == []
        assert store.read_file("alice/aged", "a.txt") == b"referenced"
