"""Storage quotas per namespace: a real server on 127.0.0.1 driven by huggingface_hub, and the
`peftkit registry quota` commands. tests/test_registry_quota_pg.py runs the HTTP tests again with
the metadata in PostgreSQL (the `database` fixture)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401 - fixtures

from peftkit.registry import QuotaExceeded, RegistryStore, start_server
from peftkit.registry.cli import registry_group
from peftkit.registry.quantities import parse_size
from peftkit.registry.quotas import REPO_COST, commit_cost, format_size, ref_cost, tree_cost

QUOTA = 10_000
#: What the cost model charges alice/r of the upgrade tests: the repo, its first commit and main branch, two
#: commits ("Update files", no author) and their two trees.
EXPECTED_METADATA = (
    REPO_COST + commit_cost("initial commit") + ref_cost("main") + 2 * commit_cost("Update files")
    + tree_cost(["a.bin", "b.bin", "c.bin"]) + tree_cost(["a.bin", "b.bin"])
)


@pytest.fixture
def database() -> str | None:
    """Where the metadata lives: the data folder's SQLite file (test_registry_quota_pg.py: PostgreSQL)."""
    return None


@pytest.fixture
def reg(tmp_path: Path, hf_online, database: str | None):  # noqa: F811
    """alice and bob with write tokens; every namespace may store QUOTA bytes by default."""
    with running_registry(tmp_path / "reg", users={"alice": True, "bob": True}, database=database) as (
        store, server, tokens,
    ):
        store.quotas.default_bytes = QUOTA
        yield store, server, tokens


def _api(server, token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url, token=token)


def _refusal(call) -> object:
    """The HfHubHTTPError ``call`` raises."""
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as caught:
        call()
    return caught.value


def _state(store: RegistryStore, repo_id: str) -> tuple:
    """What a refused write must leave unchanged: history, files, branches, the repo's counted bytes."""
    commits = [c.sha for c in store.list_commits(repo_id)]
    return commits, store.list_files(repo_id), store.list_branches(repo_id), store.quotas.usage(["alice"])


def _stores(store: RegistryStore, namespace: str = "alice") -> str:
    """How a refusal words what ``namespace`` stores now: its total, split into files and metadata."""
    (usage,) = store.quotas.usage([namespace])
    return (f"namespace '{namespace}' stores {format_size(usage.used_bytes)} ({format_size(usage.file_bytes)} of "
            f"files, {format_size(usage.metadata_bytes)} of metadata: history, file paths, branches and tags) of its")


def _files(store: RegistryStore, namespace: str = "alice") -> int:
    return store.quotas.usage([namespace])[0].file_bytes


def _alice_repo_holding(reg, repo_id: str, size: int):
    """alice's client, and ``repo_id`` holding one random file ``w.bin`` of ``size`` bytes."""
    store, server, tokens = reg
    api = _api(server, tokens["alice"])
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=os.urandom(size), path_in_repo="w.bin", repo_id=repo_id)
    return store, api


def _refused_upload(api, repo_id: str, path: str, size: int):
    """The HfHubHTTPError an upload of ``size`` random bytes to ``path`` gets."""
    return _refusal(lambda: api.upload_file(path_or_fileobj=os.urandom(size), path_in_repo=path, repo_id=repo_id))


def test_an_upload_over_the_quota_is_refused_before_its_bytes_are_sent_with_a_message_saying_how_to_fix_it(
    reg, tmp_path: Path,
) -> None:
    store, api = _alice_repo_holding(reg, "alice/big", 6_000)
    before = _state(store, "alice/big")
    refused = _refused_upload(api, "alice/big", "b.bin", 5_000)
    assert refused.response.status_code == 413
    assert "/preupload/" in str(refused.response.url)  # refused when sizes were announced: no byte was sent
    message = str(refused)
    assert ("namespace 'alice' stores 7.57 KB (6 KB of files, 1.57 KB of metadata: history, file paths, branches and "
            "tags) of its 10 KB quota (the server's default), and this upload adds 5 KB;") in message
    assert "peftkit registry quota set alice SIZE" in message
    assert "peftkit hub delete" in message and "delete_repo" in message and "super_squash_history" in message
    assert "token has the correct permissions" not in message  # not a 403's misleading hint

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.bin").write_bytes(os.urandom(3_000))
    (folder / "sub" / "two.bin").write_bytes(os.urandom(3_500))
    refused = _refusal(lambda: api.upload_folder(folder_path=folder, repo_id="alice/big"))
    assert refused.response.status_code == 413 and "/preupload/" in str(refused.response.url)
    assert _stores(store) + " 10 KB quota (the server's default), and this upload adds 6.5 KB;" in str(refused)
    assert _state(store, "alice/big") == before
    assert store.orphan_blobs() == [] and store.fsck() == []


def test_a_commit_the_preupload_let_through_is_refused_by_content_and_leaves_nothing_behind(reg) -> None:
    """A file of a size the repo holds may be stored already, so the preupload lets it through; the commit
    counts its content."""
    store, api = _alice_repo_holding(reg, "alice/same-size", 6_000)
    before = _state(store, "alice/same-size")
    refused = _refused_upload(api, "alice/same-size", "w.bin", 6_000)
    assert refused.response.status_code == 413 and "/commit/" in str(refused.response.url)
    assert (_stores(store) + " 10 KB quota (the server's default), and this commit adds 6.65 KB (6 KB of files, "
            "648 bytes of metadata);") in str(refused)
    assert _state(store, "alice/same-size") == before  # no commit, no branch move, nothing counted
    assert store.orphan_blobs() == [] and not any(Path(store.root, "tmp").iterdir())  # staged files discarded
    # Files already stored cost nothing: the same content again, at another path, fits.
    api.upload_file(path_or_fileobj=store.read_file("alice/same-size", "w.bin"), path_in_repo="copy.bin",
                    repo_id="alice/same-size")
    assert _files(store) == 6_000 and store.fsck() == []


def test_deleting_a_repo_or_squashing_away_deleted_files_frees_quota(reg) -> None:
    store, server, tokens = reg
    api = _api(server, tokens["alice"])
    for name in ("one", "two"):
        api.create_repo(f"alice/{name}")
        api.upload_file(path_or_fileobj=os.urandom(3_000), path_in_repo="w.bin", repo_id=f"alice/{name}")
    assert _files(store) == 6_000 and store.fsck() == []  # the counters are a recount's
    assert _refused_upload(api, "alice/one", "x.bin", 3_000).response.status_code == 413

    one = store.quotas.usage(["alice"])[0].used_bytes // 2
    api.delete_repo("alice/two")
    assert store.quotas.usage(["alice"])[0].used_bytes == one and store.fsck() == []
    api.upload_file(path_or_fileobj=os.urandom(3_000), path_in_repo="x.bin", repo_id="alice/one")
    assert _files(store) == 6_000

    api.delete_file("w.bin", repo_id="alice/one")  # the older commits still hold it
    assert _files(store) == 6_000
    history = store.quotas.usage(["alice"])[0].metadata_bytes
    api.super_squash_history("alice/one")
    assert _files(store) == 3_000 and store.quotas.usage(["alice"])[0].metadata_bytes < history
    assert store.fsck() == []
    api.upload_file(path_or_fileobj=os.urandom(4_000), path_in_repo="y.bin", repo_id="alice/one")
    assert store.fsck() == []


def test_a_namespace_override_beats_the_server_default_both_ways(reg) -> None:
    store, server, tokens = reg
    alice, bob = _api(server, tokens["alice"]), _api(server, tokens["bob"])
    alice.create_repo("alice/r")
    bob.create_repo("bob/r")
    store.quotas.set("alice", 30_000)  # above the 10 KB default
    store.quotas.set("BOB", 2_000)  # below it; names are case-insensitive
    alice.upload_file(path_or_fileobj=os.urandom(20_000), path_in_repo="w.bin", repo_id="alice/r")
    refused = _refused_upload(bob, "bob/r", "w.bin", 5_000)
    assert refused.response.status_code == 413
    assert _stores(store, "bob") + " 2 KB quota, and this upload adds 5 KB;" in str(refused)
    assert "stores 921 bytes (0 bytes of files, 921 bytes of metadata" in str(refused)  # an empty repo's
    assert store.quotas.clear("bob")
    bob.upload_file(path_or_fileobj=os.urandom(5_000), path_in_repo="w.bin", repo_id="bob/r")  # the default again
    assert [(u.namespace, u.file_bytes, u.quota_bytes, u.source) for u in store.quotas.usage()] == [
        ("alice", 20_000, 30_000, "namespace"), ("bob", 5_000, QUOTA, "default")]


def test_moving_a_repo_counts_it_in_its_new_namespace(reg) -> None:
    store, server, tokens = reg
    api = _api(server, tokens["alice"])
    store.accounts.add_org("acme", ["alice"])
    store.quotas.set("acme", 5_000)
    api.create_repo("alice/r")
    api.upload_file(path_or_fileobj=os.urandom(6_000), path_in_repo="w.bin", repo_id="alice/r")
    refused = _refusal(lambda: api.move_repo("alice/r", "acme/r"))
    assert refused.response.status_code == 413
    assert "moving 'alice/r' adds 7.57 KB (6 KB of files, 1.57 KB of metadata)" in str(refused)
    assert store.repo_exists("alice/r") and not store.repo_exists("acme/r")
    store.quotas.set("acme", 8_000)
    used = store.quotas.usage(["alice"])[0].used_bytes
    api.move_repo("alice/r", "acme/r")
    assert [(u.namespace, u.used_bytes, u.file_bytes) for u in store.quotas.usage(["alice", "acme"])] == [
        ("acme", used, 6_000), ("alice", 0, 0)]


def test_two_concurrent_commits_that_together_exceed_the_quota_cannot_both_land(reg, database) -> None:
    """Both are staged (their preuploads passed: nothing was stored yet) before either commits, on two
    servers sharing the data (and, on PostgreSQL, the database): the write lock lets one through."""
    store, server, tokens = reg
    api = _api(server, tokens["alice"])
    for name in ("a", "b"):
        api.create_repo(f"alice/{name}")
    with RegistryStore(store.root, fsync=False, database=database, namespace_quota=QUOTA) as other_store, \
            start_server(other_store) as other_server:
        staged = threading.Barrier(2, timeout=30)
        for s in (store, other_store):
            s._checkpoint = lambda point: staged.wait() if point == "staged" else None  # noqa: SLF001 - test hook
        outcomes: dict[str, object] = {}

        def upload(name: str, url_server) -> None:
            from huggingface_hub.errors import HfHubHTTPError

            try:
                _api(url_server, tokens["alice"]).upload_file(path_or_fileobj=os.urandom(6_000),
                                                              path_in_repo="w.bin", repo_id=f"alice/{name}")
                outcomes[name] = "landed"
            except HfHubHTTPError as exc:
                outcomes[name] = exc.response.status_code

        threads = [threading.Thread(target=upload, args=("a", server)),
                   threading.Thread(target=upload, args=("b", other_server))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(map(str, outcomes.values())) == ["413", "landed"], outcomes
    assert _files(store) == 6_000
    assert store.orphan_blobs() == [] and store.fsck() == []


# ---------------------------------------------------------------- in process
def test_sizes_parse_with_decimal_and_binary_units() -> None:
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size(" 10 kib ") == 10_240 and parse_size("0") == 0
    assert parse_size("123") == 123 and parse_size("1TB") == 10**12
    for bad in ("", "lots", "-1GB", "1.5XB", "GB", "1 2 GB", "1e9"):
        with pytest.raises(ValueError, match="such as 500MB, 2GB or 1.5GiB"):
            parse_size(bad)
    assert format_size(999) == "999 bytes" and format_size(1_500_000_000) == "1.5 GB"


def test_a_registry_made_before_quotas_is_counted_when_opened(tmp_path: Path) -> None:
    with RegistryStore(tmp_path / "reg", fsync=False) as store:
        store.create_repo("alice/r")
        store.commit("alice/r", {"a.bin": b"a" * 700, "b.bin": b"a" * 700, "c.bin": b"c" * 300})
        store.commit("alice/r", deletions=["c.bin"])
    db = sqlite3.connect(tmp_path / "reg" / "registry.db")  # as version 1 left it: no counts
    db.executescript("DROP TABLE repo_blobs; DROP TABLE repo_trees; DROP TABLE repo_storage;"
                     " DROP TABLE namespace_quotas; PRAGMA user_version = 1;")
    db.close()
    with RegistryStore(tmp_path / "reg", fsync=False) as store:
        (usage,) = store.quotas.usage(["alice"])
        assert (usage.file_bytes, usage.metadata_bytes) == (1_000, EXPECTED_METADATA)
        store.quotas.set("alice", usage.used_bytes)
        full = r"stores 4.09 KB \(1 KB of files, 3.09 KB of metadata.*\) of its 4.09 KB quota"
        with pytest.raises(QuotaExceeded, match=full):
            store.commit("alice/r", {"d.bin": b"d"})
        assert store.fsck() == []


def test_fsck_reports_a_storage_count_that_differs_from_the_commits(tmp_path: Path) -> None:
    with RegistryStore(tmp_path / "reg", fsync=False) as store:
        store.create_repo("alice/r")
        store.commit("alice/r", {"a.bin": b"a" * 700})
        with store.db.write() as conn:
            conn.execute("UPDATE repo_storage SET bytes = 5")
        assert store.fsck() == ["alice/r is counted as storing 5 bytes in 1 file(s); its commits hold 700 bytes in 1"]


# ---------------------------------------------------------------- the CLI
def _run(*args: str):
    return CliRunner().invoke(registry_group, list(args), catch_exceptions=False)


def test_quota_commands_set_show_clear_with_exit_codes_scripts_can_trust(tmp_path: Path) -> None:
    data = str(tmp_path / "reg")
    with RegistryStore(data, fsync=False) as store:
        store.accounts.add_user("alice")
        store.accounts.add_org("acme", ["alice"])
        store.create_repo("alice/r")
        store.commit("alice/r", {"w.bin": b"w" * 1_500_000})

    done = _run("quota", "set", "ALICE", "2GB", "--data", data)
    assert done.exit_code == 0, done.output
    assert "quota of alice: 2 GB (2000000000 bytes); it stores 1.5 MB" in done.stdout
    assert _run("quota", "set", "acme", "1.5GiB", "--data", data).exit_code == 0
    shown = json.loads(_run("quota", "show", "--json", "--data", data).stdout)
    metadata = shown[1]["metadata_bytes"]
    assert shown == [
        {"namespace": "acme", "used_bytes": 0, "quota_bytes": 3 * 2**29, "source": "namespace", "file_bytes": 0,
         "metadata_bytes": 0},
        {"namespace": "alice", "used_bytes": 1_500_000 + metadata, "quota_bytes": 2 * 10**9, "source": "namespace",
         "file_bytes": 1_500_000, "metadata_bytes": metadata},
    ]
    assert 0 < metadata < 2_000
    text = _run("quota", "show", "alice", "--data", data)
    assert text.exit_code == 0
    assert text.stdout.split() == "alice 1.5 MB of 2 GB (0%; its own); files 1.5 MB, metadata 1.54 KB".split()
    # The share is rounded down, as the account page and `peftkit hub storage` show it (82.8% is 82%, not 83%).
    assert _run("quota", "set", "alice", "1.8125MB", "--data", data).exit_code == 0
    assert "(82%; its own)" in _run("quota", "show", "alice", "--data", data).stdout

    cleared = _run("quota", "clear", "alice", "--data", data)
    assert cleared.exit_code == 0 and "cleared the quota of alice" in cleared.stdout
    again = _run("quota", "clear", "alice", "--data", data)
    assert again.exit_code == 0 and "had no quota of its own" in again.stdout
    default = json.loads(_run("quota", "show", "alice", "--json", "--namespace-quota-gb", "0.001", "--data",
                              data).stdout)
    assert default == [{"namespace": "alice", "used_bytes": 1_500_000 + metadata, "quota_bytes": 1_000_000,
                        "source": "default", "file_bytes": 1_500_000, "metadata_bytes": metadata}]
    over = _run("quota", "show", "alice", "--namespace-quota-gb", "0.001", "--data", data)
    assert "(150%, over quota; the server's default)" in over.stdout
    none = json.loads(_run("quota", "show", "alice", "--json", "--data", data).stdout)
    assert none[0]["quota_bytes"] is None and none[0]["source"] == "none"

    for bad in ("lots", "1,5GB", "1.5XB", "-1GB"):
        refused = _run("quota", "set", "--data", data, "alice", "--", bad)
        assert refused.exit_code == 2 and "such as 500MB, 2GB or 1.5GiB" in refused.output, refused.output
    for args in (("set", "nobody", "1GB"), ("show", "nobody"), ("clear", "nobody")):
        unknown = _run("quota", *args, "--data", data)
        assert unknown.exit_code == 1 and "no user, organization or repo namespace named 'nobody'" in unknown.output
    assert _run("quota", "set", "alice", "--data", data).exit_code == 2  # SIZE missing
    with RegistryStore(data, fsync=False) as store:  # what the commands did is what the server enforces
        assert store.quotas.usage(["acme"])[0].quota_bytes == 3 * 2**29
        assert store.quotas.usage(["alice"])[0].source == "none"


def test_serve_namespace_quota_gb_refuses_a_commit_over_it(tmp_path: Path, hf_online) -> None:  # noqa: F811
    """The flag reaches the server process: a commit over it gets the 413 through huggingface_hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from tests.registry_conftest_helpers import start_cli_server, stop_process

    data = tmp_path / "reg"
    with RegistryStore(data, fsync=False) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
    bad = _run("serve", "--namespace-quota-gb", "-1", "--data", str(data))
    assert bad.exit_code == 2 and "--namespace-quota-gb" in bad.output
    proc, url, _ = start_cli_server(data, "--namespace-quota-gb", "0.000008")  # 8,000 bytes
    try:
        api = HfApi(endpoint=url, token=token)
        api.create_repo("alice/r")
        api.upload_file(path_or_fileobj=os.urandom(4_000), path_in_repo="a.bin", repo_id="alice/r")
        with pytest.raises(HfHubHTTPError, match=r"stores 5.57 KB \(4 KB of files, .*\) of its 8 KB quota") as caught:
            api.upload_file(path_or_fileobj=os.urandom(4_000), path_in_repo="b.bin", repo_id="alice/r")
        assert caught.value.response.status_code == 413
    finally:
        stop_process(proc)
