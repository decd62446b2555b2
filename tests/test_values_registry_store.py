"""The registry store's commit paths by value (registry/store.py): what a commit writes, in which order
deletions and additions apply, which revisions a commit and a read accept, and that a refused commit
leaves the repo and the blob store as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from peftkit.registry.errors import BadRequest
from peftkit.registry.store import (
    EntryNotFound,
    InvalidPath,
    InvalidRevision,
    ParentCommitMismatch,
    RegistryStore,
    RevisionNotFound,
)

REPO = "alice/vals"


@pytest.fixture
def store(tmp_path: Path):
    s = RegistryStore(tmp_path / "reg", fsync=False)
    s.create_repo(REPO)
    yield s
    s.close()


def _files(store: RegistryStore, revision: str = "main") -> dict[str, bytes]:
    return {f.path: store.read_file(REPO, f.path, revision) for f in store.list_files(REPO, revision)}


def _unchanged(store: RegistryStore, before: tuple) -> None:
    assert (store.resolve_revision(REPO), _files(store), [c.sha for c in store.list_commits(REPO)]) == before
    assert store.orphan_blobs() == []


def _state(store: RegistryStore) -> tuple:
    return store.resolve_revision(REPO), _files(store), [c.sha for c in store.list_commits(REPO)]


def test_a_commit_records_its_parent_author_description_and_the_default_message(store):
    first = store.resolve_revision(REPO)
    sha = store.commit(REPO, {"a.txt": "héllo"}, message="", description="why", author="alice")
    info = store.get_commit(REPO, sha)
    assert (info.sha, info.repo_id, info.parent, info.message, info.description, info.author) == (
        sha, REPO, first, "Update files", "why", "alice")
    assert store.read_file(REPO, "a.txt") == "héllo".encode()
    assert info.created_at > store.get_commit(REPO, first).created_at
    again = store.commit(REPO, {"b.txt": b"x"}, message="second")
    assert store.get_commit(REPO, again).created_at > info.created_at  # history stays ordered


def test_every_kind_of_content_is_staged_as_its_bytes(store, tmp_path):
    local = tmp_path / "weights.bin"
    local.write_bytes(b"\x00\x01\x02")
    staged = store.stage(b"staged")
    assert store.stage(staged) is staged
    store.commit(REPO, {"t": "text", "b": b"bytes", "ba": bytearray(b"array"), "mv": memoryview(b"view"),
                        "p": local, "s": staged})
    assert _files(store) == {"b": b"bytes", "ba": b"array", "mv": b"view", "p": b"\x00\x01\x02", "s": b"staged",
                             "t": b"text"}
    entry = {f.path: f for f in store.list_files(REPO)}["p"]
    assert (entry.size, entry.sha256) == (3, hashlib.sha256(b"\x00\x01\x02").hexdigest())
    with pytest.raises(TypeError, match="file content must be bytes, str, a path or a StagedBlob, not int"):
        store.stage(5)


def test_deletions_apply_before_additions_and_folders_go_with_everything_under_them(store):
    store.commit(REPO, {"a": b"1", "f/x": b"2", "f/g/y": b"3", "fz": b"4", "keep/f": b"5"})
    store.commit(REPO, {"a": b"new", "f": b"now a file"}, deletions=["a", "f/"])
    assert _files(store) == {"a": b"new", "f": b"now a file", "fz": b"4", "keep/f": b"5"}
    store.commit(REPO, {"f/back": b"6"}, deletions=["f"])  # the file goes, a folder of that name comes
    assert _files(store) == {"a": b"new", "f/back": b"6", "fz": b"4", "keep/f": b"5"}


@pytest.mark.parametrize("files, deletions, error, message", [
    ({}, ["missing.txt"], EntryNotFound, "A file with this name doesn't exist: 'missing.txt' in 'alice/vals'"),
    ({}, ["f/x/"], EntryNotFound, "folder 'f/x/' not found in 'alice/vals'; nothing to delete"),
    ({"a/b": b"1"}, [], InvalidPath, "cannot add 'a/b': 'a' is a file, not a folder"),
    ({"f": b"1"}, [], InvalidPath, "cannot add file 'f': a folder with that name exists"),
    ({"new": b"1"}, ["a", "missing"], EntryNotFound, "'missing'"),
])
def test_a_refused_commit_writes_nothing(store, files, deletions, error, message):
    store.commit(REPO, {"a": b"1", "f/x": b"2"})
    before = _state(store)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.commit(REPO, {**files, "other": b"staged then dropped"}, deletions)
    _unchanged(store, before)


def test_a_commit_goes_to_a_branch_head_only(store):
    head = store.commit(REPO, {"a": b"1"})
    store.create_tag(REPO, "v1")
    store.create_branch(REPO, "dev")
    before = _state(store)
    with pytest.raises(InvalidRevision, match="'v1' is a tag of 'alice/vals', and tags do not move"):
        store.commit(REPO, {"a": b"2"}, revision="v1")
    with pytest.raises(InvalidRevision, match="'v1' is a tag of 'alice/vals', and tags do not move"):
        store.commit(REPO, {"a": b"2"}, revision="refs/tags/v1")
    with pytest.raises(RevisionNotFound, match="revision 'nope' not found in 'alice/vals'"):
        store.commit(REPO, {"a": b"2"}, revision="nope")
    with pytest.raises(InvalidRevision, match="cannot commit to commit"):
        store.commit(REPO, {"a": b"2"}, revision=head)
    with pytest.raises(BadRequest, match="parent commit 'abc' is not a 40-hex commit sha"):
        store.commit(REPO, {"a": b"2"}, parent="abc")
    with pytest.raises(ParentCommitMismatch, match=f"its head is {head}"):
        store.commit(REPO, {"a": b"2"}, parent="0" * 40)
    _unchanged(store, before)
    dev = store.commit(REPO, {"a": b"dev"}, revision="dev", parent=head)
    assert store.branch_head(REPO, "dev") == dev and store.resolve_revision(REPO) == head
    assert store.get_commit(REPO, dev).parent == head


def test_revisions_resolve_to_commits_of_this_repo_by_sha_tag_and_branch(store, tmp_path):
    first = store.commit(REPO, {"a": b"1"})
    store.create_tag(REPO, "v1")
    second = store.commit(REPO, {"a": b"2"})
    store.create_branch(REPO, "side", revision=first)
    assert store.resolve_revision(REPO, first) == first
    assert store.resolve_revision(REPO, "v1") == first
    assert store.resolve_revision(REPO, "refs/tags/v1") == first
    assert store.resolve_revision(REPO, "side") == first and store.resolve_revision(REPO, "main") == second
    with pytest.raises(RevisionNotFound, match="revision 'refs/tags/side' not found"):
        store.resolve_revision(REPO, "refs/tags/side")  # a branch is not a tag
    with pytest.raises(RevisionNotFound, match="revision 'refs/tags/v2' not found"):
        store.resolve_revision(REPO, "refs/tags/v2")
    store.create_repo("bob/other")
    theirs = store.commit("bob/other", {"b": b"1"})
    with pytest.raises(RevisionNotFound, match=f"revision '{theirs}' not found in 'alice/vals'"):
        store.resolve_revision(REPO, theirs)  # a commit of another repo
    assert store.read_file(REPO, "a", "v1") == b"1"


def test_only_commits_to_main_change_what_search_shows(store):
    card = b"---\nlibrary_name: peft\nbase_model: org/base-a\n---\n"
    store.commit(REPO, {"README.md": card})
    store.create_branch(REPO, "dev")
    store.commit(REPO, {"README.md": card.replace(b"base-a", b"base-b")}, revision="dev")
    assert [r.repo_id for r in store.search(base_model="org/base-a")] == [REPO]
    assert store.search(base_model="org/base-b") == []


def test_a_commit_id_is_the_hash_of_everything_the_commit_records(store):
    from peftkit.registry.hashing import commit_oid

    first = store.commit(REPO, {"a": b"1"})
    for sha in (first, store.commit(REPO, {"b": b"2"}, message="m", description="d", author="alice")):
        info = store.get_commit(REPO, sha)
        assert sha == commit_oid(repo_id=REPO, tree=info.tree, parent=info.parent, author=info.author,
                                 timestamp=info.created_at.timestamp(), message=info.message,
                                 description=info.description)
    info = store.get_commit(REPO, first)
    assert (info.message, info.description, info.author) == ("Update files", "", "")


def test_commit_times_stay_ordered_when_the_clock_stands_still(store, monkeypatch):
    import peftkit.registry.store as store_module

    store.commit(REPO, {"a": b"0"})
    frozen = store.get_commit(REPO, store.resolve_revision(REPO)).created_at.timestamp() + 5.0
    monkeypatch.setattr(store_module.time, "time", lambda: frozen)
    one = store.get_commit(REPO, store.commit(REPO, {"a": b"1"})).created_at.timestamp()
    two = store.get_commit(REPO, store.commit(REPO, {"a": b"2"})).created_at.timestamp()
    assert one == pytest.approx(frozen, abs=2e-6)
    assert 0 < two - one < 1e-5  # a microsecond later, not a second


def test_a_missing_deletion_names_the_head_it_was_looked_up_in_and_folder_names_keep_their_letters(store):
    head = store.commit(REPO, {"dX/a": b"1", "d/b": b"2"})
    with pytest.raises(EntryNotFound) as info:
        store.commit(REPO, deletions=["nope"])
    assert info.value.commit == head
    store.commit(REPO, deletions=["dX/"])
    assert _files(store) == {"d/b": b"2"}
