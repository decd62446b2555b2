"""The store-level tests of tests/test_registry_store.py, run again on PostgreSQL.

Importing the tests runs them here with this module's ``store`` fixture: the same assertions,
the metadata in PostgreSQL (tests/registry_pg_helpers.py) instead of SQLite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.registry_pg_helpers import pg_server, pg_url  # noqa: F401 - fixtures
from tests.test_registry_store import (  # noqa: F401 - collected here too, on PostgreSQL
    indexed,
    test_accounts_tokens_and_orgs,
    test_branches_and_revisions,
    test_branches_and_tags_together_are_bounded,
    test_broken_card_is_indexed_without_front_matter,
    test_commit_ids_are_deterministic_hashes_of_content,
    test_create_commit_read_and_history,
    test_delete_repo_removes_unshared_blobs_only,
    test_failure_mid_commit_leaves_previous_commit,
    test_file_values_can_be_paths_and_export,
    test_folder_deletion_and_errors,
    test_names_and_paths_are_validated,
    test_parent_commit_is_optimistic_locking,
    test_search_facets,
    test_search_text_sort_and_paging,
)

from peftkit.registry import RegistryStore


@pytest.fixture
def store(tmp_path: Path, pg_url: str):  # noqa: F811 - this module's backend
    s = RegistryStore(tmp_path / "reg", fsync=False, database=pg_url)
    assert s.db.kind == "postgresql" and not (tmp_path / "reg" / "registry.db").exists()
    yield s
    s.close()


def test_statements_keep_sqlite_nocase_semantics_on_postgresql() -> None:
    from peftkit.registry.pg_schema import search_words, translate

    # Comparisons of NOCASE columns are lowered; assignments are not.
    assert translate("UPDATE repos SET repo_id = ?, namespace = ? WHERE repo_id = ?") == (
        "UPDATE repos SET repo_id = %s, namespace = %s WHERE lower(repo_id) = lower(%s)"
    )
    assert translate("SELECT 1 FROM facets WHERE kind = ? AND value IN (?,?)") == (
        "SELECT 1 FROM facets WHERE kind = %s AND lower(value) IN (lower(%s),lower(%s))"
    )
    assert translate("SELECT '100%' || ?") == "SELECT '100%%' || %s"
    # Words split as SQLite FTS5's unicode61 tokenizer with remove_diacritics does.
    assert search_words("Café_au-lait Llama-3.2") == ["cafe", "au", "lait", "llama", "3", "2"]
