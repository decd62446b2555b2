"""The registry server driven by the real huggingface_hub client (and raw HTTP for bad input)."""

from __future__ import annotations

import base64
import http.client
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.registry_conftest_helpers import hf_online, running_registry, write_adapter_folder  # noqa: F401

from peftkit.registry import ApiConfig, RegistryStore, RunningServer

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

LLAMA = "meta-llama/Llama-3.2-1B"


@dataclass
class Hub:
    store: RegistryStore
    server: RunningServer
    tokens: dict[str, str]
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, user: str | None = None) -> HfApi:
        return HfApi(endpoint=self.url, token=self.tokens[user] if user else False)

    def download(self, repo_id: str, filename: str, user: str | None = None, **kw) -> str:
        kw.setdefault("cache_dir", self.tmp / "cache")
        return hf_hub_download(
            repo_id, filename, endpoint=self.url, token=self.tokens[user] if user else False, **kw
        )

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, user: str | None = None):
        """One raw HTTP request; returns (status, headers, body)."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        hdrs = dict(headers or {})
        if user:
            hdrs["Authorization"] = f"Bearer {self.tokens[user]}"
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()


def _make_hub(tmp_path: Path, config: ApiConfig | None = None):
    users = {"alice": True, "bob": True, "carol": False}
    return running_registry(tmp_path / "reg", config=config, users=users)


@pytest.fixture
def hub(tmp_path: Path, hf_online):  # noqa: F811
    with _make_hub(tmp_path, ApiConfig(list_page_size=3, tree_page_size=2, max_upload_bytes=1024 * 1024)) as (
        store, server, tokens
    ):
        store.accounts.add_org("acme", ["alice"])
        yield Hub(store, server, tokens, tmp_path)


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def _header(summary: str = "c") -> dict:
    return {"key": "header", "value": {"summary": summary, "description": ""}}


def _file(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


# --------------------------------------------------------------- round trip
@pytest.mark.parametrize("xet_installed_path", [False, True], ids=["create_commit", "pipelined_upload"])
def test_upload_download_roundtrip(hub: Hub, hf_online, tmp_path: Path, xet_installed_path: bool) -> None:  # noqa: F811
    # huggingface_hub 2.4 uploads folders through a different pipeline when hf_xet is
    # installed and enabled; both must work against a server that answers "regular".
    if xet_installed_path:
        pytest.importorskip("hf_xet")
    hf_online.HF_HUB_DISABLE_XET = not xet_installed_path
    api = hub.api("alice")
    url = api.create_repo("alice/tiny-lora")
    assert url.repo_id == "alice/tiny-lora" and url.startswith(hub.url)
    folder = write_adapter_folder(tmp_path / "adapter", tags=("sentiment",), weights=b"W" * 4096)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("nested file")
    info = api.upload_folder(folder_path=folder, repo_id="alice/tiny-lora", commit_message="first")
    assert len(info.oid) == 40 and info.oid == hub.store.resolve_revision("alice/tiny-lora")

    files = api.list_repo_files("alice/tiny-lora")
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "extra/notes.txt"]

    path = hub.download("alice/tiny-lora", "adapter_model.safetensors")
    assert Path(path).read_bytes() == b"W" * 4096 and info.oid in path
    gets = hub.server.stats["GET resolve"]
    heads = hub.server.stats["HEAD resolve"]
    again = hub.download("alice/tiny-lora", "adapter_model.safetensors")  # cached: no GET
    assert again == path
    # Only the HEAD of resolve/main and the HEAD of the commit it redirects to.
    assert hub.server.stats["GET resolve"] == gets and hub.server.stats["HEAD resolve"] == heads + 2

    snap = Path(snapshot_download("alice/tiny-lora", endpoint=hub.url, cache_dir=tmp_path / "snap", token=False))
    assert (snap / "extra" / "notes.txt").read_text() == "nested file"
    assert (snap / "README.md").read_bytes() == (folder / "README.md").read_bytes()

    mi = api.model_info("alice/tiny-lora")
    assert mi.id == "alice/tiny-lora" and mi.sha == info.oid and mi.author == "alice" and mi.private is False
    assert mi.library_name == "peft" and mi.pipeline_tag == "text-generation"
    assert {"peft", "lora", "sentiment", f"base_model:adapter:{LLAMA}"} <= set(mi.tags)
    assert mi.card_data.base_model == LLAMA
    assert sorted(s.rfilename for s in mi.siblings) == files
    assert mi.downloads >= 1  # adapter_config.json was fetched by snapshot_download

    # A single file, then an unchanged re-upload: the client skips it thanks to the oid from preupload.
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="extra/notes.txt", repo_id="alice/tiny-lora")
    assert second.oid != info.oid
    same = api.upload_file(path_or_fileobj=b"v2", path_in_repo="extra/notes.txt", repo_id="alice/tiny-lora")
    assert same.oid == second.oid
    assert [c.commit_id for c in api.list_repo_commits("alice/tiny-lora")][:2] == [second.oid, info.oid]
    old = hub.download("alice/tiny-lora", "extra/notes.txt", revision=info.oid)
    assert Path(old).read_text() == "nested file"  # old commits stay as they were

    api.delete_repo("alice/tiny-lora")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/tiny-lora")
    api.delete_repo("alice/tiny-lora", missing_ok=True)


def test_whoami_and_orgs(hub: Hub) -> None:
    me = hub.api("alice").whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["acme"]
    assert me["auth"]["accessToken"]["role"] == "write"
    assert hub.api("carol").whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token="pkr_deadbeef_nope").whoami()


# ------------------------------------------------------------------- listing
def _populate(hub: Hub, tmp_path: Path) -> None:
    specs = [
        ("alice/sentiment-lora", LLAMA, "LORA", "SEQ_CLS", ("sentiment",), "Movie review sentiment."),
        ("alice/ner-ia3", LLAMA, "IA3", "TOKEN_CLS", ("ner",), "Named entity recognition."),
        ("bob/news-summaries", "google/flan-t5-small", "LORA", "SEQ_2_SEQ_LM", ("summarization",), "News."),
        ("bob/chat-lora", LLAMA, "LORA", "CAUSAL_LM", ("chat",), "Chat assistant."),
        ("acme/sql-lora", LLAMA, "LORA", "CAUSAL_LM", ("sql",), "Text to SQL."),
    ]
    for repo_id, base, method, task, tags, body in specs:
        user = "alice" if repo_id.startswith(("alice", "acme")) else "bob"
        api = hub.api(user)
        api.create_repo(repo_id)
        folder = write_adapter_folder(tmp_path / repo_id, base_model=base, method=method, task_type=task,
                                      tags=tags, body=body)
        api.upload_folder(folder_path=folder, repo_id=repo_id)
    for n, repo_id in enumerate(["bob/chat-lora", "acme/sql-lora", "alice/sentiment-lora"]):
        hub.store.record_download(repo_id, 100 - 10 * n)


def test_list_models_search_filter_sort_paginate(hub: Hub, tmp_path: Path) -> None:
    _populate(hub, tmp_path)
    api = hub.api()  # anonymous reads

    def ids(**kw) -> list[str]:
        return [m.id for m in api.list_models(**kw)]

    assert ids(search="sentiment") == ["alice/sentiment-lora"]
    assert ids(search="news") == ["bob/news-summaries"]
    assert ids(search="chat-l") == ["bob/chat-lora"]
    assert set(ids(author="bob")) == {"bob/news-summaries", "bob/chat-lora"}
    assert set(ids(filter=["peft", f"base_model:adapter:{LLAMA}"])) == {
        "alice/sentiment-lora", "alice/ner-ia3", "bob/chat-lora", "acme/sql-lora"
    }
    assert set(ids(filter="ia3")) == {"alice/ner-ia3"}
    assert set(ids(filter=["lora", "text-generation"])) == {"bob/chat-lora", "acme/sql-lora"}
    assert ids(filter=["method:lora", "task:text-classification"]) == ["alice/sentiment-lora"]
    assert ids(pipeline_tag="token-classification") == ["alice/ner-ia3"]
    # sort: downloads (most first), last_modified (newest first), created_at
    assert ids(sort="downloads")[:3] == ["bob/chat-lora", "acme/sql-lora", "alice/sentiment-lora"]
    hub.api("alice").upload_file(path_or_fileobj=b"x", path_in_repo="touch.txt", repo_id="alice/ner-ia3")
    assert ids(sort="last_modified")[0] == "alice/ner-ia3"
    assert ids(sort="created_at")[0] == "acme/sql-lora"
    # limit and Link pagination (the server pages by 3 in this fixture)
    assert len(ids(limit=2)) == 2
    everything = ids()
    assert len(everything) == 5 == len(set(everything))
    assert len(ids(limit=4)) == 4
    status, headers, body = hub.raw("GET", "/api/models?limit=10")
    assert status == 200 and len(json.loads(body)) == 3 and 'rel="next"' in headers["Link"]
    # cardData and full
    (m,) = api.list_models(search="sentiment", cardData=True)
    assert m.card_data.base_model == LLAMA and m.siblings is None
    (m,) = api.list_models(search="sentiment", full=True)
    assert sorted(s.rfilename for s in m.siblings) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_tree_pagination_and_folders(hub: Hub) -> None:
    api = hub.api("alice")
    api.create_repo("alice/tree")
    hub.store.commit("alice/tree", {f"d/f{i}.txt": b"%d" % i for i in range(5)} | {"top.txt": b"t"})
    # The fixture pages trees by 2 entries: the client follows the Link header.
    files = api.list_repo_files("alice/tree")
    assert files == ["d/f0.txt", "d/f1.txt", "d/f2.txt", "d/f3.txt", "d/f4.txt", "top.txt"]
    top = list(api.list_repo_tree("alice/tree"))
    assert [(type(e).__name__, e.path) for e in top] == [("RepoFolder", "d"), ("RepoFile", "top.txt")]
    sub = [e.path for e in api.list_repo_tree("alice/tree", path_in_repo="d")]
    assert sub == [f"d/f{i}.txt" for i in range(5)]
    info = api.get_paths_info("alice/tree", ["top.txt", "d", "missing.txt"])
    assert [(type(e).__name__, e.path) for e in info] == [("RepoFile", "top.txt"), ("RepoFolder", "d")]
    assert info[0].blob_id == hub.store.list_files("alice/tree")[-1].oid


# ---------------------------------------------------------------------- auth
def test_permissions_and_private_repos(hub: Hub, tmp_path: Path) -> None:
    alice, bob, carol, anon = hub.api("alice"), hub.api("bob"), hub.api("carol"), hub.api()
    alice.create_repo("alice/public")
    alice.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="alice/public")

    # Public reads need no token.
    assert Path(hub.download("alice/public", "a.txt")).read_bytes() == b"hello"
    assert anon.model_info("alice/public").id == "alice/public"

    # Writes need a token with write access to the namespace.
    with pytest.raises(HfHubHTTPError) as err:
        anon.create_repo("alice/anon")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        carol.create_repo("carol/mine")  # read-only token
    assert err.value.response.status_code == 403
    assert "read-only" in err.value.response.headers["X-Error-Message"]
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/not-bobs")
    assert err.value.response.status_code == 403
    message = err.value.response.headers["X-Error-Message"]  # the fix that applies to a user's namespace
    assert "another user's namespace" in message and "push to 'bob/...'" in message and "org add" not in message
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="alice/public")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.delete_repo("alice/public")
    assert err.value.response.status_code == 403
    assert hub.store.repo_exists("alice/public")

    # Organizations: members write, others do not.
    alice.create_repo("acme/shared")
    alice.upload_file(path_or_fileobj=b"org", path_in_repo="o.txt", repo_id="acme/shared")
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="acme/shared")
    assert err.value.response.status_code == 403
    assert "`peftkit registry org add acme --member bob`" in err.value.response.headers["X-Error-Message"]

    # Private repos are invisible to everyone but their namespace.
    alice.create_repo("acme/secret", private=True)
    alice.upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id="acme/secret")
    assert alice.model_info("acme/secret").private is True
    assert Path(hub.download("acme/secret", "s.txt", user="alice", cache_dir=tmp_path / "c2")).read_bytes() == b"s3cret"
    for api in (anon, bob):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("acme/secret")
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files("acme/secret")
        assert "acme/secret" not in [m.id for m in api.list_models()]
    with pytest.raises(RepositoryNotFoundError):  # bob has a token: 404, as for a missing repo
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="acme/secret")
    with pytest.raises(HfHubHTTPError) as err:  # no token: 401, as for any write (existing repo or not)
        anon.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="acme/secret")
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hub.download("acme/secret", "s.txt", user="bob", cache_dir=tmp_path / "c3")
    with pytest.raises(RepositoryNotFoundError):
        hub.download("acme/secret", "s.txt", cache_dir=tmp_path / "c4")
    for user in (None, "bob"):
        status, headers, _ = hub.raw("GET", "/acme/secret/resolve/main/s.txt", user=user)
        assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    # Same answer as a repo that does not exist at all.
    status, headers, _ = hub.raw("GET", "/acme/nothing/resolve/main/s.txt")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    assert "acme/secret" in [m.id for m in alice.list_models()]
    # Visibility can be changed by the owner.
    alice.update_repo_settings("acme/secret", private=False)
    assert anon.model_info("acme/secret").private is False


def test_revoked_token(hub: Hub) -> None:
    api = hub.api("bob")
    api.create_repo("bob/r")
    (info,) = hub.store.accounts.list_tokens("bob")
    hub.store.accounts.revoke_token(info.id)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="bob/r")
    assert err.value.response.status_code == 401
    # Reads of public repos still work (an unknown token reads like none).
    assert api.model_info("bob/r").id == "bob/r"


# ----------------------------------------------------------------- bad input
def _assert_error(resp, status: int, code: str) -> None:
    got_status, headers, body = resp
    assert got_status == status, body
    assert headers["X-Error-Code"] == code, headers
    assert headers["X-Error-Message"], headers
    assert json.loads(body)["error"]


def test_bad_input_writes_nothing(hub: Hub) -> None:
    api = hub.api("alice")
    api.create_repo("alice/safe")
    head = api.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id="alice/safe").oid
    blobs_before = sorted(hub.store.blobs.iter_all())
    commit_path = "/api/models/alice/safe/commit/main"
    nd = {"Content-Type": "application/x-ndjson"}

    cases = [
        (_ndjson(_header(), _file("../escape.txt", b"x")), 400, "InvalidPath"),
        (_ndjson(_header(), _file("ok2.txt", b"fine"), _file("a/../../etc/passwd", b"x")), 400, "InvalidPath"),
        (_ndjson(_header(), _file("/abs.txt", b"x")), 400, "InvalidPath"),
        (_ndjson(_header(), {"key": "deletedFile", "value": {"path": "../../registry.db"}}), 400, "InvalidPath"),
        (b'{"key": "header", "value": {"summary": "x"}}\nthis is not json\n', 400, "MalformedPayload"),
        (_ndjson(_header(), {"key": "file", "value": {"path": "b.txt", "content": "!!!notbase64!!!",
                                                        "encoding": "base64"}}), 400, "MalformedPayload"),
        (_ndjson(_file("no-header.txt", b"x")), 400, "MalformedPayload"),
        (_ndjson(_header(), {"key": "lfsFile", "value": {"path": "big.bin", "oid": "0" * 64, "algo": "sha256"}}),
         400, "MalformedPayload"),
        (_ndjson(_header(), {"key": "mystery", "value": {}}), 400, "MalformedPayload"),
        (_ndjson({"key": "header", "value": {"summary": "x", "parentCommit": "0" * 40}}, _file("p.txt", b"x")),
         412, "ParentCommitMismatch"),
        (_ndjson(_header(), {"key": "deletedFile", "value": {"path": "missing.txt"}}), 404, "EntryNotFound"),
    ]
    for body, status, code in cases:
        _assert_error(hub.raw("POST", commit_path, body, nd, user="alice"), status, code)
    # unknown branch, and a commit sha as target
    _assert_error(hub.raw("POST", "/api/models/alice/safe/commit/nope", _ndjson(_header()), nd, user="alice"),
                  404, "RevisionNotFound")
    # repo names with traversal, bad JSON bodies
    _assert_error(hub.raw("POST", "/api/repos/create", json.dumps({"name": "../x"}).encode(), user="alice"),
                  400, "InvalidRepoId")
    _assert_error(hub.raw("POST", "/api/repos/create", json.dumps({"name": "x", "organization": ".."}).encode(),
                          user="alice"), 400, "InvalidRepoId")
    _assert_error(hub.raw("POST", "/api/repos/create", b"{not json", user="alice"), 400, "MalformedPayload")
    _assert_error(hub.raw("POST", "/api/models/alice/safe/preupload/main",
                          json.dumps({"files": [{"path": "../x", "sample": "", "size": 1}]}).encode(), user="alice"),
                  400, "InvalidPath")
    _assert_error(hub.raw("GET", "/alice/safe/resolve/main/..%2F..%2Fregistry.db"), 400, "InvalidPath")
    _assert_error(hub.raw("GET", "/alice/safe/resolve/main/a/../../../registry.db"), 400, "InvalidPath")
    _assert_error(hub.raw("GET", "/%2E%2E/safe/resolve/main/ok.txt"), 400, "InvalidRepoId")
    _assert_error(hub.raw("GET", "/api/models/alice/safe/tree/main/..%2F.."), 400, "InvalidPath")
    _assert_error(hub.raw("GET", "/api/models/alice/safe/revision/..%2F..%2Fx"), 400, "InvalidRevision")
    _assert_error(hub.raw("GET", "/api/models?limit=abc"), 400, "BadRequest")
    # Nothing was written by any of it.
    assert hub.store.resolve_revision("alice/safe") == head
    assert [f.path for f in hub.store.list_files("alice/safe")] == ["ok.txt"]
    assert sorted(hub.store.blobs.iter_all()) == blobs_before
    assert not any(hub.store.blobs.tmp_dir.iterdir())


def test_client_visible_errors(hub: Hub, tmp_path: Path) -> None:
    api = hub.api("alice")
    api.create_repo("alice/err")
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id="alice/err").oid
    # 409 when the repo exists (and exist_ok=True tolerates it).
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/err")
    assert err.value.response.status_code == 409
    assert err.value.response.headers["X-Error-Code"] == "RepoExists"
    assert api.create_repo("alice/err", exist_ok=True).repo_id == "alice/err"
    # Unknown revisions and files map to the client's own exceptions.
    with pytest.raises(RevisionNotFoundError):
        hub.download("alice/err", "one.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/err", revision="f" * 40)
    with pytest.raises(EntryNotFoundError):
        hub.download("alice/err", "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        hub.download("alice/nothing", "one.txt")
    # Too large (the fixture allows 1 MiB per commit): 413, and nothing written.
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"z" * (2 * 1024 * 1024), path_in_repo="big.bin", repo_id="alice/err")
    assert err.value.response.status_code == 413
    assert err.value.response.headers["X-Error-Code"] == "PayloadTooLarge"
    assert "--max-upload-mb" in err.value.response.headers["X-Error-Message"]
    # parent_commit must be the branch head.
    api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id="alice/err")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"3", path_in_repo="three.txt", repo_id="alice/err", parent_commit=first)
    assert err.value.response.status_code == 412
    assert [f.path for f in hub.store.list_files("alice/err")] == ["one.txt", "two.txt"]
    # README front matter is validated before anything is uploaded.
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\ntags: [oops\n---\n", path_in_repo="README.md", repo_id="alice/err")
    # The server is still healthy after all that (keep-alive connections included).
    assert api.model_info("alice/err").sha == hub.store.resolve_revision("alice/err")


def test_range_requests(hub: Hub) -> None:
    hub.api("alice").create_repo("alice/range")
    data = bytes(range(256)) * 4
    sha = hub.store.commit("alice/range", {"blob.bin": data, "empty.txt": b""})
    status, headers, body = hub.raw("GET", "/alice/range/resolve/main/blob.bin", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    status, headers, body = hub.raw("GET", "/alice/range/resolve/main/blob.bin", headers={"Range": "bytes=1000-"})
    assert status == 206 and body == data[1000:]
    status, headers, body = hub.raw("GET", "/alice/range/resolve/main/blob.bin", headers={"Range": "bytes=-5"})
    assert status == 206 and body == data[-5:]
    status, headers, _ = hub.raw("GET", "/alice/range/resolve/main/blob.bin", headers={"Range": "bytes=5000-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    status, headers, body = hub.raw("HEAD", f"/alice/range/resolve/{sha}/blob.bin")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))
    assert headers["X-Repo-Commit"] == sha and headers["ETag"].strip('"') == hub.store.list_files("alice/range")[0].oid
    assert "immutable" in headers["Cache-Control"]
    status, headers, body = hub.raw("GET", "/alice/range/resolve/main/empty.txt")
    assert status == 200 and body == b"" and headers["Content-Length"] == "0"
    status, headers, _ = hub.raw("HEAD", "/alice/range/resolve/main/nope.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == sha
