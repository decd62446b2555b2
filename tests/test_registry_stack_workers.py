"""`peftkit registry serve --workers 2`: two processes on one data folder, driven by huggingface_hub."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, race_on_parent, start_cli_server, stop_process  # noqa: F401

from peftkit.registry import RegistryStore

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("uvicorn")
from huggingface_hub import HfApi  # noqa: E402


def _workers(parent: int) -> set[int]:
    """Child processes of ``parent`` that are multiprocessing spawn workers."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            found.add(int(entry))
    return found


def test_two_workers_lose_no_commit_and_one_parent_race_winner(tmp_path: Path, hf_online) -> None:  # noqa: F811
    data = tmp_path / "reg"
    with RegistryStore(data) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
    proc, url, _ = start_cli_server(data, "--workers", "2")
    try:
        deadline = time.monotonic() + 60
        while len(_workers(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_workers(proc.pid)) == 2
        api = HfApi(endpoint=url, token=token)
        api.create_repo("alice/busy")

        # Concurrent commits from several clients: every acknowledged one is in the history.
        acknowledged: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def push(i: int) -> None:
            client = HfApi(endpoint=url, token=token)
            for step in range(4):
                try:
                    info = client.upload_file(path_or_fileobj=f"{i}.{step}".encode(), path_in_repo=f"f/{i}/{step}.txt",
                                              repo_id="alice/busy", commit_message=f"push {i}.{step}")
                    with lock:
                        acknowledged.append(info.oid)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(exc)

        threads = [threading.Thread(target=push, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        history = {c.commit_id for c in api.list_repo_commits("alice/busy")}
        assert len(acknowledged) == 24 and set(acknowledged) <= history
        files = set(api.list_repo_files("alice/busy"))
        assert {f"f/{i}/{s}.txt" for i in range(6) for s in range(4)} <= files

        # Several commits on the same parent at once: exactly one wins, the others get 412.
        head = api.list_repo_commits("alice/busy")[0].commit_id
        outcomes = race_on_parent([url], token, "alice/busy", head)
        assert sorted(outcomes, key=str) == sorted(["won"] + [412] * 5, key=str)
        assert len([f for f in api.list_repo_files("alice/busy") if f.startswith("race/")]) == 1

        # A worker that dies is replaced; the server keeps answering meanwhile.
        victim = min(_workers(proc.pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        resets = []
        while (victim in _workers(proc.pid) or len(_workers(proc.pid)) < 2) and time.monotonic() < deadline:
            try:
                assert api.model_info("alice/busy").id == "alice/busy"
            except Exception as exc:  # noqa: BLE001 - checked below
                # A kept-alive connection the killed worker held is reset (the kernel closes its socket);
                # the client's next request opens a new one, which a live worker answers.
                resets.append(exc)
                assert len(resets) <= 2 and type(exc).__name__ in {"ReadError", "RemoteProtocolError"}, resets
            time.sleep(0.1)
        assert api.model_info("alice/busy").id == "alice/busy"
        assert victim not in _workers(proc.pid) and len(_workers(proc.pid)) == 2
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    with RegistryStore(data) as store:
        assert store.fsck() == []


def test_one_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc, url, _ = start_cli_server(tmp_path / "reg")
    stop_process(proc)  # SIGTERM, as systemd sends
    assert proc.returncode == 0
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
