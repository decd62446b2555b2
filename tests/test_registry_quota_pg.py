"""Storage quotas with the metadata in PostgreSQL: tests/test_registry_quota.py's HTTP tests again, the
concurrent one with two servers sharing the database (PostgreSQL's advisory write lock lets one commit
through), tests/test_registry_quota_metadata.py's (metadata counts: attacks, counters against a recount,
fsck, the upgrade from schema 3), and a registry of the schema before quotas counted when first opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online  # noqa: F401 - fixtures
from tests.registry_pg_helpers import pg_server, pg_url  # noqa: F401 - fixtures
from tests.test_registry_quota import (  # noqa: F401 - collected here too, on PostgreSQL
    reg,
    test_a_commit_the_preupload_let_through_is_refused_by_content_and_leaves_nothing_behind,
    test_a_namespace_override_beats_the_server_default_both_ways,
    test_an_upload_over_the_quota_is_refused_before_its_bytes_are_sent_with_a_message_saying_how_to_fix_it,
    test_deleting_a_repo_or_squashing_away_deleted_files_frees_quota,
    test_moving_a_repo_counts_it_in_its_new_namespace,
    test_two_concurrent_commits_that_together_exceed_the_quota_cannot_both_land,
)

from tests.test_registry_quota import EXPECTED_METADATA
from tests.test_registry_quota_metadata import (  # noqa: F401 - collected here too, on PostgreSQL
    alice,
    test_a_registry_of_schema_3_is_counted_once_when_opened,
    test_empty_files_at_new_paths_are_refused_once_their_rows_fill_the_quota,
    test_fsck_reports_a_tampered_metadata_counter_and_tree_count,
    test_long_commit_descriptions_tags_and_empty_repos_all_count,
    test_the_metadata_counters_equal_a_recount_after_commits_squash_branches_and_deletion,
)

from peftkit.registry import QuotaExceeded, RegistryStore


@pytest.fixture
def database(pg_url: str) -> str:  # noqa: F811
    return pg_url


def test_a_postgresql_registry_made_before_quotas_is_counted_when_opened(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    with RegistryStore(tmp_path / "reg", fsync=False, database=pg_url) as store:
        store.create_repo("alice/r")
        store.commit("alice/r", {"a.bin": b"a" * 700, "b.bin": b"a" * 700, "c.bin": b"c" * 300})
        store.commit("alice/r", deletions=["c.bin"])
        with store.db.write() as conn:  # as schema 1 left it: no counts
            conn.raw.execute("DROP TABLE repo_blobs; DROP TABLE repo_trees; DROP TABLE repo_storage;"
                             " DROP TABLE namespace_quotas; UPDATE registry_schema SET version = 1")
    with RegistryStore(tmp_path / "reg", fsync=False, database=pg_url) as store:
        store.quotas.set("ALICE", 1_000 + EXPECTED_METADATA)
        assert [(u.file_bytes, u.metadata_bytes, u.source) for u in store.quotas.usage(["alice"])] == [
            (1_000, EXPECTED_METADATA, "namespace")]
        with pytest.raises(QuotaExceeded, match=r"namespace 'alice' stores 4.09 KB \(1 KB of files, .* of its 4.09 KB"):
            store.commit("alice/r", {"d.bin": b"d"})
        assert store.fsck() == []


def test_migrate_carries_the_counts_and_limits_to_postgresql(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """`registry migrate` from a data folder of the schema before quotas: counted, then copied, with the limits."""
    import sqlite3

    from click.testing import CliRunner

    from peftkit.registry.cli import registry_group

    data = tmp_path / "reg"
    with RegistryStore(data, fsync=False) as store:
        store.create_repo("alice/r")
        store.commit("alice/r", {"a.bin": b"a" * 700, "b.bin": b"b" * 300})
        store.quotas.set("alice", 1_000)  # below what it stores with its metadata: a commit is refused
    db = sqlite3.connect(data / "registry.db")  # its counts as schema 1 lacked them
    db.executescript("DROP TABLE repo_blobs; DROP TABLE repo_trees; DROP TABLE repo_storage; PRAGMA user_version = 1;")
    db.close()
    result = CliRunner().invoke(registry_group, ["migrate", "--data", str(data), "--to", pg_url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"]["repo_storage"] == 1
    with RegistryStore(tmp_path / "host2", fsync=False, database=pg_url, blobs=data) as store:
        assert [(u.file_bytes, u.quota_bytes) for u in store.quotas.usage(["alice"])] == [(1_000, 1_000)]
        assert store.fsck() == []
        with pytest.raises(QuotaExceeded):
            store.commit("alice/r", {"c.bin": b"c"})
