"""HTTP-level registry tests on PostgreSQL: tests/test_registry_api_refs.py's tests (tags, renames,
squashing, PEFT indexing through huggingface_hub) run again with the metadata in PostgreSQL, and the
store operations the web pages and downloads use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401 - fixtures
from tests.registry_pg_helpers import pg_server, pg_url  # noqa: F401 - fixtures
from tests.test_registry_api_refs import (  # noqa: F401 - collected here too, on PostgreSQL
    test_move_repo_rename_and_to_an_org,
    test_peft_adapter_indexed_as_peft_whatever_the_card_says,
    test_super_squash_history_frees_old_blobs,
    test_tags_are_revisions_everywhere,
)

from peftkit.registry import RegistryStore, RepoExists


@pytest.fixture
def reg(tmp_path: Path, hf_online, pg_url: str):  # noqa: F811
    with running_registry(tmp_path / "reg", users={"alice": True, "bob": True}, database=pg_url) as (
        store, server, tokens,
    ):
        assert store.db.kind == "postgresql"
        store.accounts.add_org("acme", ["alice"])
        yield store, server, tokens


def test_facets_downloads_accounts_and_sessions(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    from peftkit.registry.web.sessions import WebSessions

    with RegistryStore(tmp_path / "reg", fsync=False, database=pg_url) as s:
        for rid, tags in (("alice/a", ["x", "license:mit"]), ("Bob/b", ["x"])):
            s.create_repo(rid)
            s.commit(rid, {"README.md": "---\nbase_model: m/b\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"})
        with pytest.raises(RepoExists):
            s.create_repo("bob/B")  # case-insensitive, as SQLite's NOCASE
        facets = s.search_facets(visible_to=())
        assert facets.total == 2 and ("x", 2) in facets.counts["tag"] and ("mit", 1) in facets.counts["license"]
        assert s.search(author="bob")[0].repo_id == "Bob/b"
        assert [r.repo_id for r in s.search("BOB/B")] == ["Bob/b"]
        assert s.record_download("alice/a", client="10.0.0.1") and not s.record_download("alice/a", client="10.0.0.1")
        assert s.record_download("ALICE/a", client="10.0.0.2") and s.repo_info("alice/a").downloads == 2
        s.delete_repo("bob/B")
        assert not s.repo_exists("Bob/b") and s.gc() == 0 and s.orphan_blobs() == []
        assert s.reindex() == 1

        s.accounts.add_user("carol")
        s.accounts.add_org("team", ["carol"])
        assert s.accounts.members_of("team") == ["carol"]
        info, _ = s.accounts.create_token("CAROL", write=False)
        assert info.user == "carol" and s.accounts.kind("Team") == "org"
        sessions = WebSessions(s.db, s.accounts, b"k" * 32)
        cookie = sessions.start(s.accounts.principal_of_token(info.id))
        assert sessions.principal(cookie).user == "carol"
        s.accounts.remove_member("team", "carol")
        assert [(a["name"], a.get("members")) for a in s.accounts.list_accounts()] == [("carol", None), ("team", [])]
        s.accounts.revoke_token(info.id)
        assert sessions.principal(cookie) is None
        assert s.fsck() == []


def test_connections_per_process_are_bounded(pg_url: str) -> None:  # noqa: F811
    from peftkit.registry.pg_db import PostgresDatabase

    db = PostgresDatabase(pg_url, max_connections=2, wait_timeout_s=0.2)
    try:
        with db.read() as first, db.connection() as second:
            assert first.execute("SELECT 1").fetchone()[0] == 1 and second is not first
            with pytest.raises(RuntimeError, match="every connection to the registry database was busy"):
                with db.connection():
                    pass
        with db.write() as conn:  # handed back: usable again
            assert conn.execute("SELECT count(*) FROM repos").fetchone()[0] == 0
    finally:
        db.close()
