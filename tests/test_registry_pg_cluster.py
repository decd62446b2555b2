"""Several registry servers on one PostgreSQL database and one blob folder, and `registry migrate`.

Each server is its own `peftkit registry serve` process (as on separate hosts) with its own data
folder, sharing only `--database postgresql://...` and `--blobs DIR`; huggingface_hub drives them.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import (  # noqa: F401 - hf_online is a fixture
    hf_online,
    kill_one_mid_commit,
    race_on_parent,
    start_cli_server,
    stop_process,
    write_adapter_folder,
)
from tests.registry_pg_helpers import pg_server, pg_url  # noqa: F401 - fixtures
from tests.registry_web_helpers import WebClient

from peftkit.registry import RegistryStore
from peftkit.registry.cli import registry_group

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("uvicorn")
from huggingface_hub import HfApi, snapshot_download  # noqa: E402


# ------------------------------------------------------------------ migrate
def _sqlite_registry(data: Path) -> dict[str, object]:
    """A SQLite registry with some of everything; returns what must survive the move."""
    with RegistryStore(data, fsync=False) as s:
        s.accounts.add_user("alice")
        s.accounts.add_user("bob")
        s.accounts.add_org("acme", ["alice"])
        _, token = s.accounts.create_token("alice", write=True, name="laptop")
        s.create_repo("alice/sentiment-lora")
        s.commit("alice/sentiment-lora", {"README.md": b"---\nbase_model: m/b\ntags:\n- reviews\n---\nMovie reviews\n",
                                          "adapter_config.json": b'{"peft_type": "LORA", "task_type": "SEQ_CLS"}'})
        s.commit("alice/sentiment-lora", {"w/adapter_model.safetensors": b"\x01" * 5000}, message="weights")
        s.create_tag("alice/sentiment-lora", "v1")
        s.create_branch("alice/sentiment-lora", "dev")
        s.record_download("alice/sentiment-lora", 7)
        s.create_repo("acme/old-name", private=True)
        s.commit("acme/old-name", {"a.txt": b"a"})
        s.move_repo("acme/old-name", "acme/new-name")
        return {
            "token": token,
            "history": [c.sha for c in s.list_commits("alice/sentiment-lora")],
            "tags": s.list_tags("alice/sentiment-lora"),
            "branches": s.list_branches("alice/sentiment-lora"),
            "search": [r.repo_id for r in s.search("movie reviews")],
            "all": [(r.repo_id, r.downloads, r.private, r.sha) for r in s.search(sort="name")],
        }


def test_migrate_copies_everything_and_fsck_passes(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    data = tmp_path / "reg"
    before = _sqlite_registry(data)
    runner = CliRunner()
    result = runner.invoke(registry_group, ["migrate", "--data", str(data), "--to", pg_url, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["fsck"]["ok"] and report["fsck"]["repos"] == 2 and report["rows"]["tokens"] == 1
    result = runner.invoke(registry_group, ["fsck", "--data", str(data), "--database", pg_url, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"], result.output

    with RegistryStore(tmp_path / "host2", fsync=False, database=pg_url, blobs=data) as s:
        assert [c.sha for c in s.list_commits("alice/sentiment-lora")] == before["history"]
        assert s.list_tags("alice/sentiment-lora") == before["tags"]
        assert s.list_branches("alice/sentiment-lora") == before["branches"]
        assert [r.repo_id for r in s.search("movie reviews")] == before["search"]
        assert [(r.repo_id, r.downloads, r.private, r.sha) for r in s.search(sort="name")] == before["all"]
        assert s.redirect_of("ACME/old-name") == "acme/new-name"
        assert s.read_file("alice/sentiment-lora", "w/adapter_model.safetensors") == b"\x01" * 5000
        assert s.accounts.authenticate(before["token"]).orgs == frozenset({"acme"})
        s.create_repo("bob/after-move")  # new ids continue after the copied ones
        s.commit("bob/after-move", {"x": b"x"})
        assert s.fsck() == []

    again = runner.invoke(registry_group, ["migrate", "--data", str(data), "--to", pg_url])
    assert again.exit_code != 0 and "already holds registry data" in again.output
    bad = runner.invoke(registry_group, ["migrate", "--data", str(data), "--to", "mysql://x/y"])
    assert bad.exit_code == 2 and "PostgreSQL URL" in bad.output


# ------------------------------------------------------------- two servers
def test_two_servers_share_one_database_and_blob_folder(tmp_path: Path, pg_url: str, hf_online) -> None:  # noqa: F811
    shared = tmp_path / "shared-blobs"
    with RegistryStore(tmp_path / "admin", database=pg_url, blobs=shared) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
    common = ("--database", pg_url, "--blobs", str(shared))
    proc_a, url_a, _ = start_cli_server(tmp_path / "host-a", *common)
    try:
        proc_b, url_b, _ = start_cli_server(tmp_path / "host-b", *common)
        try:
            _push_pull_race_and_load(tmp_path, url_a, url_b, token)
            kill_one_mid_commit(proc_a, url_a, url_b, token)
        finally:
            stop_process(proc_b)
    finally:
        stop_process(proc_a)
    assert proc_a.returncode == -signal.SIGKILL and proc_b.returncode == 0
    with RegistryStore(tmp_path / "admin", database=pg_url, blobs=shared) as store:
        assert store.fsck() == []
    assert not (tmp_path / "host-a" / "registry.db").exists() and not (tmp_path / "host-a" / "blobs").exists()


def _push_pull_race_and_load(tmp_path: Path, url_a: str, url_b: str, token: str) -> None:
    api_a, api_b = HfApi(endpoint=url_a, token=token), HfApi(endpoint=url_b, token=token)

    # Pushed through one server, pulled through the other.
    folder = write_adapter_folder(tmp_path / "adapter", weights=b"\x07" * 4096, body="Shared between hosts.")
    api_a.create_repo("alice/shared")
    pushed = api_a.upload_folder(repo_id="alice/shared", folder_path=folder).oid
    pulled = Path(snapshot_download("alice/shared", endpoint=url_b, token=token, cache_dir=tmp_path / "cache"))
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (folder / name).read_bytes()
    assert api_b.model_info("alice/shared").sha == pushed
    assert [m.id for m in api_b.list_models(search="shared hosts")] == ["alice/shared"]

    # The web pages' form tokens are signed with one secret (in the shared blob folder): a sign-in
    # form served by one server is accepted by the other.
    browser = WebClient(url_a)
    csrf = browser.csrf()
    at_b = WebClient(url_b, cookies=dict(browser.cookies))
    status, _, page = at_b.request("POST", "/login", form={"csrf": csrf, "token": token, "next": "/"},
                                   headers={"Origin": url_b})
    assert status == 303, page

    # Commits on one parent through both servers at once: exactly one wins, the others get 412.
    head = api_b.list_repo_commits("alice/shared")[0].commit_id
    outcomes = race_on_parent([url_a, url_b], token, "alice/shared", head)
    assert sorted(outcomes, key=str) == sorted(["won"] + [412] * 5, key=str)

    # 4 readers and 2 writers spread over both servers for 10 s: no error, no acknowledged commit lost.
    lock = threading.Lock()
    acknowledged: list[str] = []
    errors: list[BaseException] = []
    stop = time.monotonic() + 10

    def writer(i: int) -> None:
        client = HfApi(endpoint=(url_a, url_b)[i % 2], token=token)
        step = 0
        while time.monotonic() < stop:
            try:
                info = client.upload_file(path_or_fileobj=f"{i}.{step}".encode(), path_in_repo=f"load/{i}/{step}.txt",
                                          repo_id="alice/shared", commit_message=f"load {i}.{step}")
                with lock:
                    acknowledged.append(info.oid)
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                return
            step += 1

    def reader(i: int) -> None:
        client = HfApi(endpoint=(url_a, url_b)[i % 2], token=token)
        while time.monotonic() < stop:
            try:
                assert client.model_info("alice/shared").id == "alice/shared"
                assert "README.md" in client.list_repo_files("alice/shared")
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    history = {c.commit_id for c in api_a.list_repo_commits("alice/shared")}
    assert acknowledged and set(acknowledged) <= history
    assert {c.commit_id for c in api_b.list_repo_commits("alice/shared")} == history


def test_account_commands_on_a_database_touch_no_data_or_blob_folder(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """Users and tokens live in the database alone: with --database, `user add/list` and `token
    create/list` work without a data folder and create none (nor blob folders)."""
    runner = CliRunner()
    data = tmp_path / "never-created"
    common = ["--data", str(data), "--database", pg_url]
    assert runner.invoke(registry_group, ["user", "add", "carol", *common]).exit_code == 0
    result = runner.invoke(registry_group, ["token", "create", "carol", "--write", *common])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    listed = runner.invoke(registry_group, ["user", "list", "--json", *common])
    assert {"kind": "user", "name": "carol"}.items() <= next(
        a for a in json.loads(listed.stdout) if a["name"] == "carol").items()
    assert not data.exists()
    with RegistryStore(tmp_path / "host", database=pg_url, blobs=tmp_path / "blobs") as store:
        principal = store.accounts.authenticate(secret)
        assert principal.user == "carol" and principal.write


def test_a_host_whose_shared_blob_folder_is_missing_is_refused(tmp_path: Path, pg_url: str,  # noqa: F811
                                                               hf_online) -> None:  # noqa: F811
    """A server (or gc, reindex, fsck) given a --blobs folder that does not exist, on a database that already
    refers to files, created it empty: a host whose shared filesystem was not mounted served every file as
    missing and kept new uploads on its own disk, out of the other servers' reach. Now refused, nothing made."""
    shared = tmp_path / "shared-blobs"
    with RegistryStore(tmp_path / "admin", database=pg_url, blobs=shared) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
    proc_a, url_a, _ = start_cli_server(tmp_path / "host-a", "--database", pg_url, "--blobs", str(shared))
    try:
        api = HfApi(endpoint=url_a, token=token)
        api.create_repo("alice/shared")
        api.upload_folder(repo_id="alice/shared", folder_path=write_adapter_folder(tmp_path / "adapter"))
    finally:
        stop_process(proc_a)
    unmounted = tmp_path / "mnt" / "shared-blobs"
    empty_mount_point = tmp_path / "empty-mount-point"
    empty_mount_point.mkdir()
    for blobs in (unmounted, empty_mount_point):
        with pytest.raises(AssertionError, match="holds no blobs/.*mount the shared folder"):
            proc_b, _, _ = start_cli_server(tmp_path / "host-b", "--database", pg_url, "--blobs", str(blobs))
            stop_process(proc_b)  # only when the old code served it
    runner = CliRunner()
    for command in ("gc", "reindex", "fsck"):
        result = runner.invoke(registry_group, [command, "--data", str(tmp_path / "host-b"), "--database", pg_url,
                                                "--blobs", str(unmounted)])
        assert result.exit_code == 1 and "mount the shared folder" in result.output, (command, result.output)
        # --database without the servers' --blobs: the data folder holds none of the registry's files.
        result = runner.invoke(registry_group, [command, "--data", str(tmp_path / "admin-2"), "--database", pg_url])
        assert result.exit_code == 1 and "pass --blobs" in result.output, (command, result.output)
    assert not (tmp_path / "mnt").exists() and list(empty_mount_point.iterdir()) == []
    result = runner.invoke(registry_group, ["gc", "--database", pg_url, "--blobs", "s3:/bucket/prefix"])
    assert result.exit_code == 2 and "write s3://BUCKET/PREFIX" in result.output
    assert not Path("s3:").exists()
    # A new registry's folder is still created by its first server.
    fresh = tmp_path / "new-registry-blobs"
    with RegistryStore(tmp_path / "new", blobs=fresh) as store:
        assert fresh.is_dir() and store.fsck() == []
