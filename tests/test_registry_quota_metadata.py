"""Storage quotas bound the database too: what a namespace makes the database hold (commits and their messages,
the file paths of each tree, repos, branches and tags) counts against its quota with the files, by the cost
model of peftkit.registry.quotas. A real server on 127.0.0.1 driven by huggingface_hub;
tests/test_registry_quota_pg.py runs the tests taking the ``database`` fixture again on PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401 - fixtures

from peftkit.registry import QuotaExceeded, RegistryStore
from peftkit.registry.fsck import fsck
from peftkit.registry.quotas import REF_COST, held_metadata, tree_cost


@pytest.fixture
def database() -> str | None:
    """Where the metadata lives: the data folder's SQLite file (test_registry_quota_pg.py: PostgreSQL)."""
    return None


@pytest.fixture
def alice(tmp_path: Path, hf_online, database: str | None):  # noqa: F811
    """The store, and alice's huggingface_hub client with a write token."""
    from huggingface_hub import HfApi

    with running_registry(tmp_path / "reg", users={"alice": True}, database=database) as (store, server, tokens):
        yield store, HfApi(endpoint=server.url, token=tokens["alice"])


def _history(store: RegistryStore, repo_id: str) -> tuple:
    """What a refused write must leave unchanged."""
    return ([c.sha for c in store.list_commits(repo_id)], store.list_files(repo_id), store.list_branches(repo_id),
            store.list_tags(repo_id), store.quotas.usage(["alice"]))


def _counted(store: RegistryStore) -> dict[int, int]:
    """Each repo's maintained metadata counter."""
    with store.db.read() as conn:
        return {int(r[0]): int(r[1]) for r in conn.execute("SELECT repo, metadata_bytes FROM repo_storage")}


def _recounted(store: RegistryStore) -> dict[int, int]:
    with store.db.read() as conn:
        return held_metadata(conn)


def _refused(call):
    """The HfHubHTTPError ``call`` raises: a 413 QuotaExceeded."""
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as caught:
        call()
    assert caught.value.response.status_code == 413
    assert caught.value.response.headers["X-Error-Code"] == "QuotaExceeded"
    return caught.value


# ------------------------------------------------------------------------------------------------ attacks
def test_empty_files_at_new_paths_are_refused_once_their_rows_fill_the_quota(alice) -> None:
    """Each commit adds 500 empty files (no file bytes: one blob, the empty one) at new paths: each new tree
    costs its rows, so the commits are refused long before the database grows without bound."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    store, api = alice
    store.quotas.set("alice", 900_000)
    api.create_repo("alice/rows")
    landed, refused = 0, None
    while refused is None and landed < 20:
        operations = [CommitOperationAdd(path_in_repo=f"rows/{landed:02d}/{i:04d}.bin", path_or_fileobj=b"")
                      for i in range(500)]
        before = _history(store, "alice/rows")
        try:
            api.create_commit("alice/rows", operations=operations, commit_message=f"batch {landed}")
            landed += 1
        except HfHubHTTPError as exc:
            refused = exc
    assert refused is not None, "20 commits of 500 empty files each were never refused"
    assert refused.response.status_code == 413 and refused.response.headers["X-Error-Code"] == "QuotaExceeded"
    assert landed == 2  # a tree of 500 rows costs 166 KB, then of 1,000 rows 332 KB: one of 1,500 does not fit
    assert "/commit/" in str(refused.response.url)  # no file bytes to announce: the commit counts the rows
    message = str(refused)
    assert "namespace 'alice' stores" in message and "0 bytes of files" in message and "of its 900 KB quota" in message
    assert "this commit adds" in message and "(0 bytes of files," in message
    assert _history(store, "alice/rows") == before  # nothing written: no commit, no branch move, no count
    (usage,) = store.quotas.usage(["alice"])
    assert usage.file_bytes == 0 and usage.used_bytes <= 900_000
    assert _counted(store) == _recounted(store) and store.fsck() == []


def test_long_commit_descriptions_tags_and_empty_repos_all_count(alice) -> None:
    from huggingface_hub import CommitOperationAdd

    store, api = alice
    store.quotas.set("alice", 300_000)
    api.create_repo("alice/notes")
    api.upload_file(path_or_fileobj=b"w", path_in_repo="w.bin", repo_id="alice/notes")
    notes = "é" * 60_000  # 120,000 bytes in UTF-8, under the 65,536-character bound of a description

    def commit_notes(n: int) -> None:  # an empty file (huggingface_hub skips a commit that changes nothing)
        api.create_commit("alice/notes", operations=[CommitOperationAdd(f"{n}.txt", b"")], commit_message="again",
                          commit_description=notes)

    used = store.quotas.usage(["alice"])[0].used_bytes
    commit_notes(0)
    tree = tree_cost(["w.bin", "0.txt"])
    assert store.quotas.usage(["alice"])[0].used_bytes - used == 300 + len("again") + 120_000 + len("alice") + tree
    commit_notes(1)
    before = _history(store, "alice/notes")
    refused = _refused(lambda: commit_notes(2))
    assert "this commit adds 122 KB (0 bytes of files, 122 KB of metadata)" in str(refused)
    assert _history(store, "alice/notes") == before

    refused = _refused(lambda: api.create_tag("alice/notes", tag="v1", tag_message=notes[:40_000]))
    assert "tag 'v1' adds 80.1 KB" in str(refused) and _history(store, "alice/notes") == before
    used = store.quotas.usage(["alice"])[0].used_bytes
    api.create_tag("alice/notes", tag="v1", tag_message="short")
    assert store.quotas.usage(["alice"])[0].used_bytes - used == REF_COST + len("v1") + len("short")
    api.delete_tag("alice/notes", tag="v1")  # a deleted tag frees what it cost
    assert store.quotas.usage(["alice"])[0].used_bytes == used

    created = 0
    while created < 1_000:
        try:
            api.create_repo(f"alice/empty-{created}")
        except Exception:  # noqa: BLE001 - checked below
            break
        created += 1
    refused = _refused(lambda: api.create_repo(f"alice/empty-{created}"))
    assert f"creating 'alice/empty-{created}' adds" in str(refused) and not store.repo_exists(f"alice/empty-{created}")
    assert 0 < created < 100  # an empty repo costs about 920 bytes
    assert _counted(store) == _recounted(store) and store.fsck() == []


# ------------------------------------------------------------------------------------------------ counters
def test_the_metadata_counters_equal_a_recount_after_commits_squash_branches_and_deletion(alice) -> None:
    store, api = alice
    for name in ("one", "two"):
        api.create_repo(f"alice/{name}")
        api.upload_file(path_or_fileobj=b"a" * 100, path_in_repo="a.bin", repo_id=f"alice/{name}")
        api.upload_file(path_or_fileobj=b"b" * 100, path_in_repo="dir/b.bin", repo_id=f"alice/{name}",
                        commit_description="notes ✓")
    api.create_branch("alice/one", branch="dev")
    api.upload_file(path_or_fileobj=b"c", path_in_repo="c.bin", repo_id="alice/one", revision="dev")
    api.create_tag("alice/one", tag="v1", tag_message="first")
    assert _counted(store) == _recounted(store) and store.fsck() == []

    # The same tree again (the file deleted, then put back) costs its commits, not its rows again.
    used = store.quotas.usage(["alice"])[0].metadata_bytes
    api.delete_file("a.bin", repo_id="alice/two")
    after_delete = store.quotas.usage(["alice"])[0].metadata_bytes
    assert after_delete - used == 300 + len("Delete a.bin with huggingface_hub") + 5 + tree_cost(["dir/b.bin"])
    api.upload_file(path_or_fileobj=b"a" * 100, path_in_repo="a.bin", repo_id="alice/two")
    assert store.quotas.usage(["alice"])[0].metadata_bytes - after_delete == 300 + len(
        "Upload a.bin with huggingface_hub") + 5
    assert _counted(store) == _recounted(store)

    before = store.quotas.usage(["alice"])[0].metadata_bytes
    api.super_squash_history("alice/two")
    assert store.quotas.usage(["alice"])[0].metadata_bytes < before
    api.delete_branch("alice/one", branch="dev")
    assert _counted(store) == _recounted(store) and store.fsck() == []
    counted = _counted(store)
    with store.db.read() as conn:
        (two,) = conn.execute("SELECT id FROM repos WHERE repo_id = ?", ("alice/two",)).fetchone()
    api.delete_repo("alice/two")  # frees exactly what it counted
    assert store.quotas.usage(["alice"])[0].metadata_bytes == sum(counted.values()) - counted[two]
    assert _counted(store) == _recounted(store) and two not in _counted(store) and store.fsck() == []


def test_fsck_reports_a_tampered_metadata_counter_and_tree_count(tmp_path: Path, database) -> None:
    with RegistryStore(tmp_path / "reg", fsync=False, database=database) as store:
        store.create_repo("alice/r")
        store.commit("alice/r", {"a.bin": b"a"})
        (held,) = _recounted(store).values()
        with store.db.write() as conn:
            conn.execute("UPDATE repo_storage SET metadata_bytes = 7")
            conn.execute("DELETE FROM repo_trees")
        problems = [
            f"alice/r is counted as holding 7 bytes of metadata; its commits, trees, branches and tags take {held}",
            "alice/r is counted as holding 0 distinct tree(s); its commits hold 2",
        ]
        assert store.fsck() == problems
    if database is None:  # the read-only check of a data folder finds the same
        assert fsck(tmp_path / "reg").problems == problems


# ------------------------------------------------------------------------------------------------ upgrades
def _as_schema_3(store: RegistryStore) -> None:
    """Make the store's database what schema 3 left: no tree counts, no metadata bytes."""
    with store.db.write() as conn:
        conn.execute("DROP TABLE repo_trees")
        conn.execute("ALTER TABLE repo_storage DROP COLUMN metadata_bytes")
        if store.db.kind == "sqlite":
            conn.execute("PRAGMA user_version = 3")
        else:
            conn.execute("UPDATE registry_schema SET version = 3")


def test_a_registry_of_schema_3_is_counted_once_when_opened(tmp_path: Path, database) -> None:
    with RegistryStore(tmp_path / "reg", fsync=False, database=database) as store:
        store.create_repo("alice/r")
        store.commit("alice/r", {"a.bin": b"a" * 700, "b.bin": b"b" * 300})
        store.create_tag("alice/r", "v1", message="release")
        expected = _recounted(store)
        _as_schema_3(store)
    if database is None:  # fsck reads an old data folder without opening it for writing: no metadata to check
        assert fsck(tmp_path / "reg").ok
    with RegistryStore(tmp_path / "reg", fsync=False, database=database) as store:
        assert _counted(store) == expected
        (usage,) = store.quotas.usage(["alice"])
        assert (usage.file_bytes, usage.metadata_bytes) == (1_000, sum(expected.values()))
        store.quotas.set("alice", usage.used_bytes)
        with pytest.raises(QuotaExceeded, match="this commit adds"):
            store.commit("alice/r", message="only metadata")
        assert store.fsck() == []
    if database is None:
        db = sqlite3.connect(tmp_path / "reg" / "registry.db")
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        db.close()
