"""Bounded load on loopback: 16 clients pulling and 4 pushing to one repo for ~10 seconds.

Every push is one commit writing two files with the same record (its own
``pushers/<i>.json`` and the shared ``latest.json``); every pull reads
``latest.json`` at ``main``, then the pusher's file *at the commit it got*,
which must hold the same record: a torn (non-atomic) commit would show.
Afterwards every commit must be in main's history with exactly its content.
No timing is asserted; the loops stop by themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, start_cli_server, stop_process  # noqa: F401

from peftkit.registry import RegistryStore

pytest.importorskip("huggingface_hub")
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download  # noqa: E402

PULLERS, PUSHERS = 16, 4
DURATION_S = 10.0
MAX_PULLS, MAX_PUSHES = 5_000, 2_000
REPO = "team/busy"


def _record(pusher: int, step: int) -> bytes:
    body = {"pusher": pusher, "step": step, "nonce": os.urandom(8).hex(), "pad": "x" * (step * 37 % 3000)}
    body["sha"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps(body, sort_keys=True).encode()


def _check(raw: bytes) -> dict:
    body = json.loads(raw)
    sha = body.pop("sha")
    assert hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() == sha, "corrupt record"
    return body


def test_concurrent_pulls_and_pushes(tmp_path: Path, hf_online) -> None:  # noqa: F811
    data = tmp_path / "reg"
    with RegistryStore(data) as store:
        store.accounts.add_user("ci")
        store.accounts.add_org("team", ["ci"])
        token = store.accounts.create_token("ci", write=True)[1]
        store.create_repo(REPO)
        seed = {f"pushers/{i}.json": _record(i, -1) for i in range(PUSHERS)}
        store.commit(REPO, {**seed, "latest.json": seed["pushers/0.json"]}, message="seed")

    proc, url, _ = start_cli_server(data)
    errors: list[BaseException] = []
    pushed: list[tuple[str, int, bytes]] = []
    pulls = [0] * PULLERS
    lock = threading.Lock()
    deadline = time.monotonic() + DURATION_S

    def pusher(i: int) -> None:
        api = HfApi(endpoint=url, token=token)
        try:
            for step in range(MAX_PUSHES):
                if time.monotonic() > deadline:
                    break
                rec = _record(i, step)
                info = api.create_commit(
                    REPO,
                    [CommitOperationAdd(f"pushers/{i}.json", rec), CommitOperationAdd("latest.json", rec)],
                    commit_message=f"pusher {i} step {step}",
                )
                with lock:
                    pushed.append((info.oid, i, rec))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def puller(i: int) -> None:
        cache = tmp_path / f"cache{i}"
        try:
            for n in range(MAX_PULLS):
                if time.monotonic() > deadline:
                    break
                latest = Path(hf_hub_download(REPO, "latest.json", endpoint=url, cache_dir=cache, token=False))
                commit = latest.parent.name  # .../snapshots/<commit>/latest.json
                rec = _check(latest.read_bytes())
                own = Path(hf_hub_download(REPO, f"pushers/{rec['pusher']}.json", revision=commit,
                                           endpoint=url, cache_dir=cache, token=False))
                assert own.read_bytes() == latest.read_bytes(), f"torn commit {commit}"
                pulls[i] = n + 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(PUSHERS)]
    threads += [threading.Thread(target=puller, args=(i,)) for i in range(PULLERS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=DURATION_S + 120)
        assert not any(t.is_alive() for t in threads), "a client thread did not stop"
        assert errors == [], errors[:3]
        assert len(pushed) >= PUSHERS and all(p > 0 for p in pulls), (len(pushed), pulls)

        with RegistryStore(data) as store:  # a second process on the live data folder
            history = {c.sha for c in store.list_commits(REPO)}
            assert len(history) == len(pushed) + 2  # + seed + initial commit
            for oid, i, rec in pushed:
                assert oid in history
                assert store.read_file(REPO, f"pushers/{i}.json", oid) == rec
                assert store.read_file(REPO, "latest.json", oid) == rec
            assert store.fsck() == [] and store.orphan_blobs() == []
    finally:
        stop_process(proc)
