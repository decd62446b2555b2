"""peftkit.hub_rules: the rules the hub client and the registry share, applied the same way on both sides,
and the embedded hub working without any of the registry's server code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peftkit.hub_client.errors import InvalidRepoRef
from peftkit.hub_client.resolve import parse_ref
from peftkit.hub_rules.names import branch_problem, is_commit_sha, name_problem, repo_id_problem, revision_problem
from peftkit.registry import errors as registry_errors
from peftkit.registry import names as registry_names

BAD_REPO_IDS = ["alice", "a/b/c", "alice\n/ner", "alice/n\tr", "alice/--x", "alice/x..y",
                "alice/x.git", "-alice/x", "alice/" + "x" * 97]
BAD_REVISIONS = ["ma\nin", "x..y", "a//b", "main/", "v1.lock", "-x", "refs/tags/", "a b"]


@pytest.mark.parametrize("repo_id", BAD_REPO_IDS)
def test_a_bad_repo_id_is_refused_in_the_same_words_by_client_and_registry(repo_id: str) -> None:
    with pytest.raises(registry_errors.InvalidRepoId) as refused:
        registry_names.split_repo_id(repo_id)
    with pytest.raises(InvalidRepoRef) as client:
        parse_ref(repo_id)
    assert str(client.value) == refused.value.message


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_a_bad_revision_is_refused_by_client_and_registry(revision: str) -> None:
    with pytest.raises(registry_errors.InvalidRevision) as refused:
        registry_names.validate_revision(revision)
    with pytest.raises(InvalidRepoRef) as client:
        parse_ref(f"alice/ner@{revision}")
    assert str(client.value).startswith(refused.value.message)


def test_a_name_ending_in_a_line_break_is_refused_by_the_shared_rules() -> None:
    """Patterns ending in ``$`` also match before a final line break; 'alice/ner\\n' would name a second repo
    that lists exactly like 'alice/ner'. (The client strips what a user types, so it never sends one.)"""
    assert "control character" in repo_id_problem("alice/ner\n")
    assert "control character" in name_problem("ner\n")
    assert "control character" in branch_problem("main\n")
    assert "control character" in revision_problem("main\n")
    assert is_commit_sha("a" * 40) and not is_commit_sha("a" * 40 + "\n")


def test_names_that_would_be_read_as_something_else_say_why() -> None:
    assert "cannot end in '.git'" in name_problem("ok.git") and "call it 'ok'" in name_problem("ok.git")
    assert "cannot begin with 'refs/'" in branch_problem("refs/heads/x")
    assert "call it 'x'" in branch_problem("refs/heads/x")
    assert "cannot begin with 'refs/'" in branch_problem("refs/tags/v1", "tag name")
    assert branch_problem("feature/refs/x") is None


def test_revisions_both_sides_accept() -> None:
    for revision in ("main", "v1.0", "feature/x", "refs/tags/v1", "a" * 40):
        assert parse_ref(f"alice/ner@{revision}").revision == revision
        registry_names.validate_revision(revision)


_EMBEDDED = """
import sys
from peftkit.hub_client.backend import SearchQuery
from peftkit.hub_client.local import LocalBackend
backend = LocalBackend(sys.argv[1])
assert backend.search(SearchQuery()) == []
backend.close()
print(" ".join(sorted(m for m in sys.modules if m.startswith("peftkit.registry"))))
"""


def test_the_embedded_hub_loads_no_registry_server_code(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-c", _EMBEDDED, str(tmp_path / "hub")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "peftkit.registry.store" in loaded
    server_side = {"peftkit.registry.hub_api", "peftkit.registry.server", "peftkit.registry.asgi_app",
                   "peftkit.registry.cli", "peftkit.registry.web"}
    assert loaded & server_side == set()
