"""Hostile requests to the registry's HTTP API, each on a real server on 127.0.0.1 driven by raw HTTP.

* an ``Authorization`` header that is not ``Bearer <token>`` (``Basic`` credentials, which an nginx or Caddy
  with basic auth in front passes on; an empty ``Bearer``) was a 500 with a traceback in the server's log for
  every request, reads of public repos included: it now reads as no token, as an unknown token does, and a
  write names the header's form in its 401.
* a body sent to a request that takes none (``POST /``, any method of a page or a ``/resolve/`` path, a GET
  of the API) was read, up to 16 MiB, and spooled to the blob store's tmp folder before the 404 or 200:
  anonymous, from any number of connections at once. It is now refused (413) from its ``Content-Length``
  before a byte of it is read.
* a history page at a deep ``offset`` (``/api/models/{repo}/commits/main?offset=N``) read every commit
  before it, each with its description (up to 65,536 characters): an author's 3,000 commits made each
  anonymous request hold ~200 MiB. Only the page's commits are read now.
* a repo held any number of files (commits of 20,000 each, without end), and every model info, tree listing
  and adapter page reads them all: a branch now holds at most 100,000 files (``RegistryStore.max_repo_files``).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from peftkit.registry.store import RegistryStore
from tests.registry_conftest_helpers import running_registry

WAIT_S = 10  # a refusal comes at once; unrefused, the server waits for the body and this runs out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryStore, str, dict[str, str]]]:
    root: Path = tmp_path_factory.mktemp("attack-requests")
    with running_registry(root, users={"alice": True}) as (store, server, tokens):
        store.create_repo("alice/pub", owner="alice")
        store.commit("alice/pub", {"a.txt": b"hello"})
        yield store, server.url, tokens


def call(url: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         length: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one request; with ``length``, the headers announce that many
    body bytes and only ``body`` (or nothing) is sent: the answer must come without the rest."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT_S)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if length is not None or body:
            conn.putheader("Content-Length", str(length if length is not None else len(body or b"")))
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("authorization", "reason"), [
    ("Basic YWxpY2U6c2VjcmV0", "the Authorization header is 'Basic ...', not 'Bearer <token>'"),
    ("Bearer", "the Authorization header is 'Bearer' without a token"),
    ("Bearer ", "the Authorization header is 'Bearer' without a token"),
    ("Token pkr_x", "the Authorization header is 'Token ...', not 'Bearer <token>'"),
    ("pkr_1234_secret", "the Authorization header is not 'Bearer <token>'"),  # the credentials never come back
])
def test_an_authorization_header_that_is_not_a_bearer_token_reads_as_no_token(registry, authorization,
                                                                               reason) -> None:
    _, url, _ = registry
    auth = {"Authorization": authorization}
    status, _, body = call(url, "GET", "/api/models/alice/pub", auth)
    assert (status, json.loads(body)["id"]) == (200, "alice/pub")
    status, _, body = call(url, "GET", "/alice/pub/resolve/main/a.txt", auth)
    assert (status, body) == (200, b"hello")
    status, _, body = call(url, "GET", "/api/whoami-v2", auth)
    assert (status, json.loads(body)) == (401, {"error": "Invalid credentials in Authorization header"})
    status, headers, body = call(url, "POST", "/api/repos/create", auth, length=100)
    assert status == 401 and json.loads(body)["error"] == headers["x-error-message"] == (
        f"{reason}; create one with `peftkit registry token create USER --write --data DIR` on the server (DIR: "
        "the data folder it serves)"
    )


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/"),
    ("PUT", "/"),
    ("POST", "/alice/pub"),
    ("POST", "/alice/pub/resolve/main/a.txt"),
    ("PUT", "/alice/pub/resolve/main/a.txt"),
    ("DELETE", "/alice"),
    ("GET", "/api/models/alice/pub"),
    ("GET", "/api/models"),
    ("HEAD", "/alice/pub/resolve/main/a.txt"),
])
def test_a_body_sent_where_none_is_taken_is_refused_before_it_is_read(registry, method, path) -> None:
    _, url, _ = registry
    status, headers, _ = call(url, method, path, length=15 * 2**20)  # headers only: unrefused, the server waits
    assert (status, headers["x-error-code"]) == (413, "PayloadTooLarge")
    assert headers["x-error-message"] == f"{method} {path} takes no request body; send it without one"


def test_requests_that_take_a_body_still_get_it(registry) -> None:
    _, url, tokens = registry
    status, _, body = call(url, "POST", "/api/validate-yaml", {"Content-Type": "application/json"},
                           body=b'{"content": "---\\nlicense: mit\\n---\\n"}')
    assert (status, json.loads(body)) == (200, {"errors": [], "warnings": []})
    status, _, body = call(url, "POST", "/api/models/alice/pub/paths-info/main", {"Content-Type": "application/json"},
                           body=b'{"paths": ["a.txt"]}')
    assert (status, [e["path"] for e in json.loads(body)]) == (200, ["a.txt"])
    auth = {"Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/json"}
    status, _, body = call(url, "POST", "/api/repos/create", auth, body=b'{"name": "made"}')
    assert (status, json.loads(body)["id"]) == (200, "alice/made")
    status, _, _ = call(url, "POST", "/api/models/alice/made/branch/dev", auth, body=b"{}")
    assert status == 200
    status, _, _ = call(url, "GET", "/api/models/alice/pub", {"Content-Length": "0"})
    assert status == 200


def test_a_deep_history_page_reads_only_its_own_commits(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    store, url, _ = registry
    store.create_repo("alice/long", owner="alice")
    for i in range(150):
        store.commit("alice/long", {"n.txt": str(i).encode()}, message=f"commit {i}", description="d" * 1000)
    read: list[str] = []
    commit_info = RegistryStore._commit_info

    def counted(repo_id, row):
        read.append(row["sha"])
        return commit_info(repo_id, row)

    monkeypatch.setattr(RegistryStore, "_commit_info", staticmethod(counted))
    status, headers, body = call(url, "GET", "/api/models/alice/long/commits/main?offset=140")
    page = json.loads(body)
    assert status == 200 and [c["title"] for c in page] == [f"commit {i}" for i in range(9, -1, -1)] + [
        "initial commit"]
    assert "link" not in headers
    assert len(read) <= len(page) + 1  # the page (and one to know whether more follow), not the 140 before it
    read.clear()
    status, headers, body = call(url, "GET", "/api/models/alice/long/commits/main?offset=100")
    assert [c["title"] for c in json.loads(body)] == [f"commit {i}" for i in range(49, -1, -1)] + ["initial commit"]
    read.clear()
    status, headers, body = call(url, "GET", "/api/models/alice/long/commits/main?offset=50")
    assert [c["title"] for c in json.loads(body)] == [f"commit {i}" for i in range(99, -1, -1)]
    assert "offset=150" in headers["link"] and len(read) <= 101


def test_a_repo_holds_a_bounded_number_of_files(registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits of 20,000 files each grew a repo without end, and every anonymous model info, tree listing
    and adapter page reads all of a repo's files (100,000: ~0.5 s and a 9 MB model info each), as does
    every commit to it (1.2 s of the registry's write lock and ~30 MB of database each)."""
    store, url, tokens = registry
    monkeypatch.setattr(store, "max_repo_files", 5)  # the server's own store: 100,000 unless changed
    store.create_repo("alice/many", owner="alice")
    auth = {"Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/x-ndjson"}

    def commit(files: list[str], deleted: tuple[str, ...] = ()) -> tuple[int, dict]:
        lines = [{"key": "header", "value": {"summary": "files"}}]
        lines += [{"key": "file", "value": {"path": p, "content": "eA==", "encoding": "base64"}} for p in files]
        lines += [{"key": "deletedFile", "value": {"path": p}} for p in deleted]
        status, _, body = call(url, "POST", "/api/models/alice/many/commit/main", auth,
                               body="\n".join(json.dumps(line) for line in lines).encode())
        return status, json.loads(body)

    assert commit([f"{i}.txt" for i in range(4)])[0] == 200
    head = store.resolve_revision("alice/many")
    status, body = commit(["4.txt", "5.txt"])
    assert (status, body["error"]) == (413, (
        "after this commit 'alice/many' would hold 6 files on branch 'main'; a repo holds at most 5 (each "
        "listing of it sends them all): delete files in the same commit, or put the rest in another repo"))
    assert store.resolve_revision("alice/many") == head and not list(store.blobs.tmp_dir.iterdir())
    assert commit(["4.txt", "5.txt"], deleted=("0.txt",))[0] == 200
    assert len(store.snapshot("alice/many")[1]) == 5
