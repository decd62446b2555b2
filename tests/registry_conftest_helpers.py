"""Shared helpers for the registry tests (imported by tests/test_registry_*.py).

Not a conftest: the lead owns tests/conftest.py. huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_DISABLE_XET once, at import, and other test
modules may import it before ours; so in-process tests never rely on the
environment: every call passes ``endpoint=``, ``cache_dir=`` and ``token=``
explicitly, and the Xet switch is patched per test. Code that only reads the
environment (PEFT's ``from_pretrained``) runs in a child process started with
:func:`subprocess_env`. Nothing here changes this process's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peftkit.registry import ApiConfig, RegistryStore, RunningServer, start_server


@pytest.fixture
def hf_online(monkeypatch: pytest.MonkeyPatch):
    """huggingface_hub allowed to reach our loopback server, whatever HF_HUB_OFFLINE said at its import.

    tests/conftest.py sets HF_HUB_OFFLINE=1 so that no test touches the
    network; our server is on 127.0.0.1, so lift it for the test only.
    Yields the ``huggingface_hub.constants`` module for further patches.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    yield constants


def subprocess_env(*, hf_home: Path | None = None, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a child Python that imports peftkit like this process does.

    With ``hf_home``/``endpoint`` the child's huggingface_hub talks to our
    server and caches under a temporary folder, never the user's real cache.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["HF_HUB_DISABLE_XET"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("HF_TOKEN", None)
    env["HF_HUB_OFFLINE"] = "0"  # the child talks to our loopback server only
    env.pop("TRANSFORMERS_OFFLINE", None)
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    env.update(extra)
    return env


@contextmanager
def running_registry(
    root: Path, *, config: ApiConfig | None = None, users: dict[str, bool] | None = None,
    database: str | None = None,
) -> Iterator[tuple[RegistryStore, RunningServer, dict[str, str]]]:
    """A store in ``root`` (its metadata in ``database`` when given) served on 127.0.0.1:<free port>
    from a thread.

    ``users`` maps user names to whether their token may write; yields
    ``(store, server, {user: token})``.
    """
    store = RegistryStore(root, fsync=False, database=database)
    tokens: dict[str, str] = {}
    for user, write in (users or {}).items():
        store.accounts.add_user(user)
        tokens[user] = store.accounts.create_token(user, write=write, name=f"{user}-test")[1]
    server = start_server(store, config=config)
    try:
        yield store, server, tokens
    finally:
        server.close()
        store.close()


def write_adapter_folder(
    folder: Path,
    *,
    base_model: str = "meta-llama/Llama-3.2-1B",
    method: str = "LORA",
    task_type: str = "CAUSAL_LM",
    tags: tuple[str, ...] = (),
    body: str = "An adapter.",
    weights: bytes = b"\x00" * 64,
    extra_card: str = "",
) -> Path:
    """A PEFT-style adapter folder: card, adapter_config.json and a weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    tag_lines = "".join(f"- {t}\n" for t in tags)
    (folder / "README.md").write_text(
        "---\n"
        "library_name: peft\n"
        f"base_model: {base_model}\n"
        + (f"tags:\n{tag_lines}" if tags else "")
        + extra_card
        + "---\n\n"
        + body
        + "\n"
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": method, "task_type": task_type, "base_model_name_or_path": base_model, "r": 8})
    )
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def start_cli_server(data: Path, *extra: str, timeout: float = 30.0) -> tuple[subprocess.Popen, str, float]:
    """Run ``python -m peftkit.registry serve --port 0`` and wait for its ready line.

    Returns ``(process, url, seconds until the server answered)``.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftkit.registry", "serve", "--port", "0", "--data", str(data), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if " at http" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    url = line.split(" at ", 1)[1].split()[0]
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=5) as resp:
                assert resp.status == 200
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.01)
    return proc, url, time.perf_counter() - start


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def race_on_parent(urls: list[str], token: str, repo_id: str, parent: str, clients: int = 6,
                   folder: str = "race") -> list[object]:
    """``clients`` commits on the same ``parent`` at once, spread over ``urls`` in turn; returns each
    one's outcome: ``"won"`` or the HTTP status it got (412 when another one won).

    Each commit adds ``folder/<i>.txt``; race again on a repo with a new ``folder``: huggingface_hub
    skips a commit whose files are already there, unchanged, and reports it as made."""
    import threading

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    barrier = threading.Barrier(clients)
    outcomes: list[object] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        client = HfApi(endpoint=urls[i % len(urls)], token=token)
        barrier.wait()
        try:
            client.create_commit(repo_id, [CommitOperationAdd(f"{folder}/{i}.txt", f"{i}".encode())],
                                 commit_message=f"race {i}", parent_commit=parent)
            result: object = "won"
        except HfHubHTTPError as exc:
            result = exc.response.status_code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def kill_one_mid_commit(proc_a: subprocess.Popen, url_a: str, url_b: str, token: str,
                        repo_id: str = "alice/shared") -> None:
    """kill -9 of the server ``proc_a`` (at ``url_a``) while a client commits to ``repo_id`` through
    it: the server at ``url_b`` keeps serving, and every commit the killed one acknowledged is there."""
    import signal
    import threading

    from huggingface_hub import HfApi

    acknowledged: list[str] = []
    client = HfApi(endpoint=url_a, token=token)

    def writer() -> None:
        step = 0
        while True:
            try:
                info = client.upload_file(path_or_fileobj=b"k" * 100_000 + str(step).encode(),
                                          path_in_repo=f"kill/{step}.bin", repo_id=repo_id)
            except Exception:  # noqa: BLE001 - the server is gone
                return
            acknowledged.append(info.oid)
            step += 1

    thread = threading.Thread(target=writer)
    thread.start()
    while not acknowledged and thread.is_alive():
        thread.join(0.01)
    os.kill(proc_a.pid, signal.SIGKILL)
    thread.join()
    proc_a.wait()
    api_b = HfApi(endpoint=url_b, token=token)
    assert acknowledged and set(acknowledged) <= {c.commit_id for c in api_b.list_repo_commits(repo_id)}
    after = api_b.upload_file(path_or_fileobj=b"after", path_in_repo="after-kill.txt", repo_id=repo_id).oid
    assert api_b.model_info(repo_id).sha == after
