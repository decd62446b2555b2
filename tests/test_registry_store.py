"""The in-process store API: commits, revisions, atomicity, search, accounts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import subprocess_env

from peftkit.registry import (
    EntryNotFound,
    Forbidden,
    InvalidPath,
    InvalidRepoId,
    InvalidRevision,
    ParentCommitMismatch,
    RegistryStore,
    RepoExists,
    RepoNotFound,
    RevisionNotFound,
)
from peftkit.registry.errors import AccountExists, NotFound, Unauthorized
from peftkit.registry.hashing import git_blob_oid


@pytest.fixture
def store(tmp_path: Path):
    s = RegistryStore(tmp_path / "reg", fsync=False)
    yield s
    s.close()


def _card(base: str, tags: list[str] = (), extra: str = "", body: str = "") -> bytes:
    tag_block = "tags:\n" + "".join(f"- {t}\n" for t in tags) if tags else ""
    return f"---\nlibrary_name: peft\nbase_model: {base}\n{tag_block}{extra}---\n{body}\n".encode()


def _config(peft_type: str = "LORA", task: str = "CAUSAL_LM", **extra) -> bytes:
    return json.dumps({"peft_type": peft_type, "task_type": task, **extra}).encode()


def test_create_commit_read_and_history(store: RegistryStore) -> None:
    info = store.create_repo("alice/first")
    assert info.repo_id == "alice/first" and not info.private
    initial = store.resolve_revision("alice/first")
    assert len(initial) == 40 and store.list_files("alice/first") == []

    sha1 = store.commit("alice/first", {"a.txt": b"one", "dir/b.bin": b"\x00\x01"}, message="add")
    sha2 = store.commit("alice/first", {"a.txt": b"two"}, deletions=["dir/b.bin"], message="change")
    assert store.resolve_revision("alice/first", "main") == sha2
    # Old commits stay readable and unchanged: commits are immutable.
    assert store.read_file("alice/first", "a.txt", sha1) == b"one"
    assert store.read_file("alice/first", "dir/b.bin", sha1) == b"\x00\x01"
    assert store.read_file("alice/first", "a.txt") == b"two"
    assert [f.path for f in store.list_files("alice/first")] == ["a.txt"]
    history = store.list_commits("alice/first")
    assert [c.sha for c in history] == [sha2, sha1, initial]
    assert history[0].parent == sha1 and history[0].message == "change"
    # oid is git's blob sha1 (the client compares it to skip unchanged files); sha256 addresses the blob.
    (entry,) = store.list_files("alice/first")
    assert entry.oid == git_blob_oid(b"two") == "64c5e5885a4b06010b3a0c20edb7900dd0311025"  # `git hash-object`
    assert entry.sha256 == hashlib.sha256(b"two").hexdigest()
    assert git_blob_oid(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_commit_ids_are_deterministic_hashes_of_content(store: RegistryStore) -> None:
    store.create_repo("alice/det")
    a = store.commit("alice/det", {"x": b"1"}, message="m")
    b = store.commit("alice/det", {"x": b"1"}, message="m")  # same tree, different parent/time
    assert a != b and all(len(s) == 40 and int(s, 16) >= 0 for s in (a, b))
    assert store.get_commit("alice/det", b).parent == a


def test_folder_deletion_and_errors(store: RegistryStore) -> None:
    store.create_repo("alice/del")
    store.commit("alice/del", {"keep.txt": b"k", "f/a": b"a", "f/g/b": b"b"})
    head = store.resolve_revision("alice/del")
    store.commit("alice/del", deletions=["f/"])
    assert [f.path for f in store.list_files("alice/del")] == ["keep.txt"]
    with pytest.raises(EntryNotFound):
        store.commit("alice/del", deletions=["missing.txt"])
    with pytest.raises(EntryNotFound):
        store.commit("alice/del", deletions=["nofolder/"])
    with pytest.raises(InvalidPath):  # a file where a folder is needed
        store.commit("alice/del", {"keep.txt/x": b"1"})
    assert store.read_file("alice/del", "f/a", head) == b"a"


def test_parent_commit_is_optimistic_locking(store: RegistryStore) -> None:
    store.create_repo("alice/lock")
    head = store.resolve_revision("alice/lock")
    store.commit("alice/lock", {"a": b"1"}, parent=head)
    with pytest.raises(ParentCommitMismatch):
        store.commit("alice/lock", {"a": b"2"}, parent=head)
    assert store.read_file("alice/lock", "a") == b"1"


def test_branches_and_revisions(store: RegistryStore) -> None:
    store.create_repo("alice/br")
    base = store.commit("alice/br", {"a": b"main"})
    store.create_branch("alice/br", "dev")
    dev = store.commit("alice/br", {"a": b"dev"}, revision="dev")
    assert store.read_file("alice/br", "a", "dev") == b"dev"
    assert store.read_file("alice/br", "a") == b"main"
    assert store.list_branches("alice/br") == {"dev": dev, "main": base}
    with pytest.raises(RevisionNotFound):
        store.resolve_revision("alice/br", "nope")
    with pytest.raises(RevisionNotFound):
        store.resolve_revision("alice/br", "0" * 40)
    with pytest.raises(InvalidRevision):
        store.resolve_revision("alice/br", "../main")
    with pytest.raises(InvalidRevision):
        store.commit("alice/br", {"a": b"x"}, revision=base)  # commits go to branches
    with pytest.raises(RevisionNotFound):
        store.commit("alice/br", {"a": b"x"}, revision="missing-branch")
    store.delete_branch("alice/br", "dev")
    assert "dev" not in store.list_branches("alice/br")
    # The repo_info of an old revision describes that revision.
    assert store.repo_info("alice/br", base).sha == base


def test_names_and_paths_are_validated(store: RegistryStore) -> None:
    for bad in ["noslash", "a/b/c", "../etc", "alice/..", "alice/a--b", "alice/.hidden", "al ice/x", "alice/x.git"]:
        with pytest.raises(InvalidRepoId):
            store.create_repo(bad)
    store.create_repo("alice/ok")
    for bad in ["../x", "a/../../x", "/abs", "a//b", "a\\b", "./a", "a/./b", ".git/config", "a\x00b", ""]:
        with pytest.raises(InvalidPath):
            store.commit("alice/ok", {bad: b"x"})
    assert store.list_files("alice/ok") == []
    with pytest.raises(RepoExists):
        store.create_repo("alice/ok")
    with pytest.raises(RepoExists):
        store.create_repo("ALICE/OK")  # ids are case-insensitive, like the Hub's
    assert store.create_repo("alice/ok", exist_ok=True).repo_id == "alice/ok"
    with pytest.raises(RepoNotFound):
        store.commit("alice/missing", {"a": b"1"})


def test_file_values_can_be_paths_and_export(store: RegistryStore, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(b"w" * 100_000)
    store.create_repo("alice/files")
    store.commit("alice/files", {"weights/w.bin": src, "notes.md": "héllo"})
    assert store.read_file("alice/files", "weights/w.bin") == src.read_bytes()
    assert store.read_file("alice/files", "notes.md") == "héllo".encode()
    out = tmp_path / "export"
    sha = store.export_snapshot("alice/files", out)
    assert sha == store.resolve_revision("alice/files")
    assert (out / "weights" / "w.bin").read_bytes() == src.read_bytes()


def test_delete_repo_removes_unshared_blobs_only(store: RegistryStore) -> None:
    store.create_repo("alice/one")
    store.create_repo("alice/two")
    store.commit("alice/one", {"shared": b"same", "own": b"only-one"})
    store.commit("alice/two", {"shared": b"same"})
    own_blob = store.blob_path("alice/one", "own")
    store.delete_repo("alice/one")
    assert not store.repo_exists("alice/one")
    assert not own_blob.exists()
    assert store.read_file("alice/two", "shared") == b"same"
    assert store.fsck() == []
    with pytest.raises(RepoNotFound):
        store.delete_repo("alice/one")
    store.delete_repo("alice/one", missing_ok=True)


# ------------------------------------------------------------------ atomicity
class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("point", ["staged", "published", "before_commit"])
def test_failure_mid_commit_leaves_previous_commit(store: RegistryStore, monkeypatch, point: str) -> None:
    store.create_repo("alice/atomic")
    before = store.commit("alice/atomic", {"a": b"old"}, message="before")

    def fail(p: str) -> None:
        if p == point:
            raise _Boom(p)

    monkeypatch.setattr(store, "_checkpoint", fail)
    with pytest.raises(_Boom):
        store.commit("alice/atomic", {"a": b"new", "b": b"added"}, message="crash")
    monkeypatch.undo()
    assert store.resolve_revision("alice/atomic") == before
    assert [c.message for c in store.list_commits("alice/atomic")][:1] == ["before"]
    assert store.read_file("alice/atomic", "a") == b"old"
    assert [f.path for f in store.list_files("alice/atomic")] == ["a"]
    assert not any(store.blobs.tmp_dir.iterdir()), "staging files are cleaned up"
    # Blobs published before the failure are unreachable and collected by gc.
    store.gc()
    assert store.orphan_blobs() == []
    assert store.fsck() == []
    # And the store still works.
    after = store.commit("alice/atomic", {"a": b"new"})
    assert store.list_commits("alice/atomic")[1].sha == before and after != before


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from peftkit.registry import RegistryStore
    store = RegistryStore(sys.argv[1])
    point = sys.argv[2]
    def die(p):
        if p == point:
            os.kill(os.getpid(), signal.SIGKILL)
    store._checkpoint = die
    store.commit("alice/killed", {"a": b"new" * 1000, "b": b"fresh"}, message="never lands")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("point", ["published", "before_commit"])
def test_killed_process_mid_commit_leaves_previous_commit(tmp_path: Path, point: str) -> None:
    root = tmp_path / "reg"
    with RegistryStore(root) as s:
        s.create_repo("alice/killed")
        before = s.commit("alice/killed", {"a": b"old"})
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(root), point], env=subprocess_env(), capture_output=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr.decode()
    with RegistryStore(root) as s:
        assert s.resolve_revision("alice/killed") == before
        assert s.read_file("alice/killed", "a") == b"old"
        assert [f.path for f in s.list_files("alice/killed")] == ["a"]
        assert s.fsck() == []
        orphans = s.orphan_blobs()  # the published blobs of the lost commit, invisible
        assert len(orphans) == 2
        assert s.gc() == 2 and s.orphan_blobs() == []
        assert s.read_file("alice/killed", "a") == b"old"


# --------------------------------------------------------------------- search
@pytest.fixture
def indexed(store: RegistryStore) -> RegistryStore:
    specs = [
        ("alice/sentiment-lora", "meta-llama/Llama-3.2-1B", "LORA", "SEQ_CLS", ["sentiment"], "Sentiment of movie reviews"),
        ("alice/ner-ia3", "meta-llama/Llama-3.2-1B", "IA3", "TOKEN_CLS", ["ner"], "Named entities"),
        ("bob/summarize", "google/flan-t5-small", "LORA", "SEQ_2_SEQ_LM", ["summarization"], "Summaries of news"),
        ("acme/chat-prefix", "meta-llama/Llama-3.2-1B", "PREFIX_TUNING", "CAUSAL_LM", [], "A chat adapter"),
    ]
    for i, (rid, base, method, task, tags, body) in enumerate(specs):
        store.create_repo(rid)
        store.commit(rid, {"README.md": _card(base, tags, body=body), "adapter_config.json": _config(method, task)})
        store.record_download(rid, 10 * (i + 1))
    store.create_repo("bob/private-lora", private=True)
    store.commit(
        "bob/private-lora",
        {"README.md": _card("meta-llama/Llama-3.2-1B", ["secret"]), "adapter_config.json": _config()},
    )
    # peftkit's own key wins for method/task.
    store.create_repo("alice/bottleneck")
    store.commit(
        "alice/bottleneck",
        {"adapter_config.json": _config("LORA", peftkit={"method": "seq_bn", "task": "sentiment"},
                                        base_model_name_or_path="roberta-base")},
    )
    return store


def _ids(results) -> list[str]:
    return [r.repo_id for r in results]


def test_search_facets(indexed: RegistryStore) -> None:
    s = indexed
    llama = "meta-llama/Llama-3.2-1B"
    assert set(_ids(s.search(base_model=llama, visible_to=()))) == {
        "alice/sentiment-lora", "alice/ner-ia3", "acme/chat-prefix"
    }
    assert set(_ids(s.search(base_model=llama))) >= {"bob/private-lora"}  # trusted: sees private
    assert set(_ids(s.search(method="lora", visible_to=()))) == {"alice/sentiment-lora", "bob/summarize"}
    assert _ids(s.search(method="ia3")) == ["alice/ner-ia3"]
    assert _ids(s.search(method="seq_bn")) == ["alice/bottleneck"]
    assert _ids(s.search(task="text-classification")) == ["alice/sentiment-lora"]
    assert _ids(s.search(task="SEQ_CLS")) == ["alice/sentiment-lora"]  # PEFT's task type maps too
    assert _ids(s.search(task="sentiment")) == ["alice/bottleneck"]
    assert _ids(s.search(tags=["peft", f"base_model:adapter:{llama}", "ner"])) == ["alice/ner-ia3"]
    assert _ids(s.search(base_model="roberta-base")) == ["alice/bottleneck"]
    assert set(_ids(s.search(author="alice"))) == {"alice/sentiment-lora", "alice/ner-ia3", "alice/bottleneck"}
    assert _ids(s.search(tags=["secret"], visible_to=())) == []
    assert _ids(s.search(tags=["secret"], visible_to=["bob"])) == ["bob/private-lora"]
    info = s.repo_info("alice/sentiment-lora")
    assert info.library_name == "peft" and info.methods == ("lora",) and info.pipeline_tag == "text-classification"
    assert "base_model:adapter:meta-llama/Llama-3.2-1B" in info.tags and "lora" in info.tags


def test_search_text_sort_and_paging(indexed: RegistryStore) -> None:
    s = indexed
    assert _ids(s.search("movie")) == ["alice/sentiment-lora"]  # card body
    assert _ids(s.search("summ")) == ["bob/summarize"]  # word prefix
    assert _ids(s.search("chat-pre")) == ["acme/chat-prefix"]  # substring of the id
    assert _ids(s.search("news summaries")) == ["bob/summarize"]  # all words, any order
    assert _ids(s.search("sentiment lora", method="lora")) == ["alice/sentiment-lora"]
    assert s.search("zzzz-nothing") == []
    by_downloads = _ids(s.search(visible_to=()))
    assert by_downloads[:4] == ["acme/chat-prefix", "bob/summarize", "alice/ner-ia3", "alice/sentiment-lora"]
    s.commit("alice/ner-ia3", {"extra.txt": b"touch"})
    assert _ids(s.search(sort="recent", visible_to=()))[0] == "alice/ner-ia3"
    assert _ids(s.search(sort="created", visible_to=()))[0] == "alice/bottleneck"
    page1 = _ids(s.search(visible_to=(), limit=2))
    page2 = _ids(s.search(visible_to=(), limit=2, offset=2))
    assert len(page1) == 2 and not set(page1) & set(page2)
    assert _ids(s.search("sentiment", sort="relevance"))[0] in ("alice/sentiment-lora", "alice/bottleneck")
    with pytest.raises(Exception, match="unknown sort"):
        s.search(sort="stars")


def test_search_without_fts5(tmp_path: Path, monkeypatch) -> None:
    # Some sqlite3 builds lack FTS5: free text then falls back to LIKE, with the same answers.
    monkeypatch.setattr("peftkit.registry.db._fts5_available", lambda: False)
    with RegistryStore(tmp_path / "nofts", fsync=False) as s:
        assert not s.fts5
        s.create_repo("alice/movie-sentiment")
        s.commit("alice/movie-sentiment", {"README.md": _card("m/b", ["reviews"], body="Positive or negative?")})
        s.create_repo("bob/other")
        assert _ids(s.search("negative")) == ["alice/movie-sentiment"]
        assert _ids(s.search("sentiment reviews")) == ["alice/movie-sentiment"]
        assert _ids(s.search("other")) == ["bob/other"]
        assert s.search("100%_") == []


def test_broken_card_is_indexed_without_front_matter(store: RegistryStore) -> None:
    store.create_repo("alice/broken")
    store.commit("alice/broken", {"README.md": b"---\ntags: [unclosed\n---\nbody words", "adapter_config.json": _config()})
    info = store.repo_info("alice/broken")
    assert info.methods == ("lora",) and info.card == {}
    assert _ids(store.search("words")) == ["alice/broken"]


# ------------------------------------------------------------------- accounts
def test_accounts_tokens_and_orgs(store: RegistryStore) -> None:
    acc = store.accounts
    acc.add_user("alice")
    acc.add_user("bob")
    with pytest.raises(AccountExists):
        acc.add_user("Alice")
    acc.add_org("acme", ["alice"])
    with pytest.raises(AccountExists):
        acc.add_org("bob")
    with pytest.raises(NotFound):
        acc.add_org("acme", ["nobody"])
    with pytest.raises(NotFound):
        acc.create_token("nobody", write=True)
    info, secret = acc.create_token("alice", write=True, name="laptop")
    p = acc.authenticate(secret)
    assert p.user == "alice" and p.write and p.orgs == frozenset({"acme"})
    p.check_write("alice")
    p.check_write("ACME")
    with pytest.raises(Forbidden):
        p.check_write("bob")
    _, read_secret = acc.create_token("bob", write=False)
    with pytest.raises(Forbidden, match="read-only"):
        acc.authenticate(read_secret).check_write("bob")
    # Only a hash is stored.
    with store.db.read() as conn:
        stored = [r[0] for r in conn.execute("SELECT secret_hash FROM tokens")]
    assert secret not in stored and hashlib.sha256(secret.encode()).hexdigest() in stored
    acc.revoke_token(info.id)
    with pytest.raises(Unauthorized):
        acc.authenticate(secret)
    with pytest.raises(Unauthorized):
        acc.authenticate("pkr_00000000_guess")
    assert [t.id for t in acc.list_tokens("alice")] == []
    assert [t.revoked for t in acc.list_tokens("alice", include_revoked=True)] == [True]


def test_search_skips_what_a_card_does_not_show(store: RegistryStore) -> None:
    """A link reference definition renders as nothing (peftkit's cards end with one, the same words in every
    card), so search does not match its words; the text around it is searched as before."""
    body = ("Sentiment of hotel reviews, see [the data][d].\n\n[d]: https://example.org/data \"hotel data\"\n"
            "[peftkit-card]: # \"written by peftkit (sha256 0123456789abcdef); a hub push rewrites this card\"\n")
    store.create_repo("alice/hotels")
    store.commit("alice/hotels", {"README.md": _card("m/b", ["reviews"], body=body)})
    assert _ids(store.search("hotel reviews")) == ["alice/hotels"]
    for hidden in ("rewrites", "sha256", "example.org", "0123456789abcdef"):
        assert store.search(hidden) == [], hidden


def test_branches_and_tags_together_are_bounded(store: RegistryStore) -> None:
    from peftkit.registry.errors import PayloadTooLarge

    store.max_repo_refs = 3
    store.create_repo("alice/refs")
    store.commit("alice/refs", {"a.txt": b"a"})
    store.create_branch("alice/refs", "dev")
    store.create_tag("alice/refs", "v1")
    for create in (lambda: store.create_branch("alice/refs", "more"), lambda: store.create_tag("alice/refs", "v2")):
        with pytest.raises(PayloadTooLarge, match="'alice/refs' holds 3 branches and tags, the most a repo may hold"):
            create()
    assert store.list_tags("alice/refs") == {"v1": store.resolve_revision("alice/refs")}
    store.create_branch("alice/refs", "dev", exist_ok=True)  # an existing one is no new ref
    store.delete_tag("alice/refs", "v1")
    store.create_branch("alice/refs", "more")
