"""Every registry write endpoint checks authorisation itself, tested over plain HTTP.

huggingface_hub calls several endpoints per operation (preupload before
commit, create before either), so a check missing from one endpoint can hide
behind another's when tests only go through the client. Here each endpoint
is called alone, with raw HTTP, by every kind of caller that must be refused:

* no token, and a token the registry does not know -> 401;
* a read-only token of the namespace's own user -> 403;
* a write token of another user, and of a user outside the owning org -> 403;

and after each refusal the registry holds exactly what it held before
(repos, refs, commits, settings). Each endpoint also has a positive control:
the owner's write token succeeds, so a test cannot pass because the endpoint
itself is broken. Private repos are invisible (404, as if absent) to every
reader but their namespace.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from peftkit.registry.hub_api import HubApi
from tests.registry_conftest_helpers import running_registry

USERS = {"alice": True, "bob": True, "carol": True}
UNKNOWN_TOKEN = "hf_" + "x" * 34


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body.decode("utf-8"))


class Client:
    """Plain HTTP to the registry, one request per connection."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def call(self, method: str, path: str, *, token: str | None = None, body: bytes | None = None,
             content_type: str = "application/json") -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.read())
        finally:
            conn.close()


def ndjson_commit(files: dict[str, bytes], summary: str = "change", parent: str | None = None) -> bytes:
    header: dict[str, object] = {"summary": summary}
    if parent is not None:
        header["parentCommit"] = parent
    lines = [{"key": "header", "value": header}]
    lines += [{"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}
              for path, data in files.items()]
    return b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"


def snapshot(client: Client, token: str, repo_ids: list[str]) -> dict[str, object]:
    """What the owner sees of each repo: existence, visibility, refs, commits and files."""
    state: dict[str, object] = {}
    for repo_id in repo_ids:
        info = client.call("GET", f"/api/models/{repo_id}", token=token)
        if info.status == 404:
            state[repo_id] = None
            continue
        if info.status in (301, 307, 308):  # renamed: the old name redirects
            state[repo_id] = ("moved", info.body)
            continue
        assert info.status == 200, info.body
        data = info.json()
        assert isinstance(data, dict)
        refs = client.call("GET", f"/api/models/{repo_id}/refs", token=token).json()
        commits = client.call("GET", f"/api/models/{repo_id}/commits/main", token=token).json()
        tree = client.call("GET", f"/api/models/{repo_id}/tree/main", token=token).json()
        state[repo_id] = {"private": data.get("private"), "sha": data.get("sha"), "refs": refs,
                          "commits": [c["id"] for c in commits], "tree": sorted(e["path"] for e in tree)}
    return state


@dataclass(frozen=True)
class Endpoint:
    """One write endpoint: how to call it on ``repo_id`` (namespace/name)."""

    name: str
    method: str
    path: Callable[[str], str]
    body: Callable[[str], bytes]
    content_type: str = "application/json"
    writes: bool = True  # False: a successful call changes nothing (preupload only answers)


def _name_body(repo_id: str, **extra: object) -> bytes:
    namespace, name = repo_id.split("/")
    return json.dumps({"name": name, "organization": namespace, **extra}).encode()


ENDPOINTS = [
    # create: the target repo does not exist yet (a fresh name in the namespace)
    Endpoint("create", "POST", lambda r: "/api/repos/create", lambda r: _name_body(r + "-new", type="model")),
    Endpoint("delete", "DELETE", lambda r: "/api/repos/delete", lambda r: _name_body(r, type="model")),
    Endpoint("preupload", "POST", lambda r: f"/api/models/{r}/preupload/main",
             lambda r: json.dumps({"files": [{"path": "x.bin", "size": 3,
                                              "sample": base64.b64encode(b"abc").decode()}]}).encode(),
             writes=False),
    Endpoint("commit", "POST", lambda r: f"/api/models/{r}/commit/main",
             lambda r: ndjson_commit({"evil.txt": b"written"}), "application/x-ndjson"),
    Endpoint("create-branch", "POST", lambda r: f"/api/models/{r}/branch/feature", lambda r: b"{}"),
    Endpoint("delete-branch", "DELETE", lambda r: f"/api/models/{r}/branch/dev", lambda r: b""),
    Endpoint("settings", "PUT", lambda r: f"/api/models/{r}/settings",
             lambda r: json.dumps({"private": True}).encode()),
    Endpoint("create-tag", "POST", lambda r: f"/api/models/{r}/tag/main", lambda r: b'{"tag": "v1"}'),
    Endpoint("delete-tag", "DELETE", lambda r: f"/api/models/{r}/tag/v0", lambda r: b""),
    Endpoint("super-squash", "POST", lambda r: f"/api/models/{r}/super-squash/main", lambda r: b"{}"),
    Endpoint("move", "POST", lambda r: "/api/repos/move",
             lambda r: json.dumps({"fromRepo": r, "toRepo": r + "-new", "type": "model"}).encode()),
]


@pytest.fixture(scope="module", params=["server", "endpoint-only"])
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A served registry; ``endpoint-only`` turns off the server's early, header-only
    refusal so that each endpoint's own check is what is tested (defence in depth:
    neither layer may rely on the other)."""
    root: Path = tmp_path_factory.mktemp("authz-registry")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "endpoint-only":
            patch.setattr(HubApi, "refuse_early", lambda self, req: None)
        with running_registry(root, users=USERS) as (store, server, tokens):
            store.accounts.add_org("team", members=["carol"])
            # alice's second token, read-only: her own namespace, but no writes.
            tokens = {**tokens, "alice_ro": store.accounts.create_token("alice", write=False, name="ro")[1]}
            yield store, Client(server.url), tokens


def _prepare(client: Client, owner_token: str, repo_id: str) -> None:
    """A public repo with two commits on main, a branch 'dev' and a tag 'v0'."""
    namespace, name = repo_id.split("/")
    created = client.call("POST", "/api/repos/create", token=owner_token,
                          body=json.dumps({"name": name, "organization": namespace}).encode())
    assert created.status == 200, created.body
    committed = client.call("POST", f"/api/models/{repo_id}/commit/main", token=owner_token,
                            body=ndjson_commit({"README.md": b"# hello\n"}), content_type="application/x-ndjson")
    assert committed.status == 200, committed.body
    committed = client.call("POST", f"/api/models/{repo_id}/commit/main", token=owner_token,
                            body=ndjson_commit({"notes.md": b"more\n"}), content_type="application/x-ndjson")
    assert committed.status == 200, committed.body
    tagged = client.call("POST", f"/api/models/{repo_id}/tag/main", token=owner_token, body=b'{"tag": "v0"}')
    assert tagged.status == 200, tagged.body
    branched = client.call("POST", f"/api/models/{repo_id}/branch/dev", token=owner_token, body=b"{}")
    assert branched.status == 200, branched.body


def _check_matrix(client: Client, endpoint: Endpoint, repo_id: str, owner_token: str,
                  refusals: list[tuple[str, str | None, int]]) -> None:
    """Each refused caller gets its status and changes nothing; then the owner succeeds."""
    watched = [repo_id, repo_id + "-new"]
    before = snapshot(client, owner_token, watched)
    for who, token, status in refusals:
        reply = client.call(endpoint.method, endpoint.path(repo_id), token=token, body=endpoint.body(repo_id),
                            content_type=endpoint.content_type)
        assert reply.status == status, f"{endpoint.name} with {who}: {reply.status} {reply.body!r}"
        assert snapshot(client, owner_token, watched) == before, f"{endpoint.name} with {who} changed the repo"
    # Positive control: the owner's write token is let through.
    ok = client.call(endpoint.method, endpoint.path(repo_id), token=owner_token, body=endpoint.body(repo_id),
                     content_type=endpoint.content_type)
    assert ok.status == 200, f"{endpoint.name} by the owner: {ok.status} {ok.body!r}"
    assert (snapshot(client, owner_token, watched) != before) == endpoint.writes


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_user_namespace_write_endpoints_refuse_and_write_nothing(registry, endpoint: Endpoint) -> None:
    _, client, tokens = registry
    repo_id = f"alice/authz-{endpoint.name}"
    _prepare(client, tokens["alice"], repo_id)
    _check_matrix(client, endpoint, repo_id, tokens["alice"], [
        ("no token", None, 401),
        ("an unknown token", UNKNOWN_TOKEN, 401),
        ("the owner's read-only token", tokens["alice_ro"], 403),
        ("another user's write token", tokens["bob"], 403),
    ])


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_org_namespace_write_endpoints_need_membership(registry, endpoint: Endpoint) -> None:
    _, client, tokens = registry
    repo_id = f"team/authz-{endpoint.name}"
    _prepare(client, tokens["carol"], repo_id)
    _check_matrix(client, endpoint, repo_id, tokens["carol"], [
        ("non-member alice's write token", tokens["alice"], 403),
        ("non-member bob's write token", tokens["bob"], 403),
    ])


READS = [
    ("model_info", lambda r: f"/api/models/{r}"),
    ("revision info", lambda r: f"/api/models/{r}/revision/main"),
    ("tree", lambda r: f"/api/models/{r}/tree/main"),
    ("refs", lambda r: f"/api/models/{r}/refs"),
    ("commits", lambda r: f"/api/models/{r}/commits/main"),
    ("resolve", lambda r: f"/{r}/resolve/main/README.md"),
]


@pytest.mark.parametrize("read", READS, ids=[name for name, _ in READS])
def test_private_repo_reads_are_invisible_to_others(registry, read) -> None:
    _, client, tokens = registry
    name, path = read
    repo_id = "alice/secret-reads"
    if client.call("GET", f"/api/models/{repo_id}", token=tokens["alice"]).status == 404:
        _prepare(client, tokens["alice"], repo_id)
        made_private = client.call("PUT", f"/api/models/{repo_id}/settings", token=tokens["alice"],
                                   body=json.dumps({"private": True}).encode())
        assert made_private.status == 200
    for who, token in (("anonymous", None), ("unknown token", UNKNOWN_TOKEN), ("bob", tokens["bob"])):
        reply = client.call("GET", path(repo_id), token=token)
        assert reply.status in (401, 404), f"{name} by {who}: {reply.status}"
        assert b"hello" not in reply.body
    for who in ("alice", "alice_ro"):
        reply = client.call("GET", path(repo_id), token=tokens[who])
        assert reply.status == 200, f"{name} by {who}: {reply.status} {reply.body!r}"
    paths_info = client.call("POST", f"/api/models/{repo_id}/paths-info/main", token=tokens["bob"],
                             body=json.dumps({"paths": ["README.md"]}).encode())
    assert paths_info.status in (401, 404)


def test_listing_hides_private_repos_from_others(registry) -> None:
    _, client, tokens = registry
    repo_id = "alice/secret-listed"
    _prepare(client, tokens["alice"], repo_id)
    assert client.call("PUT", f"/api/models/{repo_id}/settings", token=tokens["alice"],
                       body=json.dumps({"private": True}).encode()).status == 200
    def listed(token: str | None) -> set[str]:
        reply = client.call("GET", "/api/models?author=alice&limit=1000", token=token)
        assert reply.status == 200
        return {m["id"] for m in reply.json()}
    assert repo_id in listed(tokens["alice"])
    assert repo_id not in listed(None)
    assert repo_id not in listed(tokens["bob"])


def test_moving_into_a_namespace_needs_write_access_there(registry) -> None:
    _, client, tokens = registry
    repo_id = "alice/authz-move-target"
    _prepare(client, tokens["alice"], repo_id)
    watched = [repo_id, "team/authz-move-target"]
    before = snapshot(client, tokens["carol"], watched)
    reply = client.call("POST", "/api/repos/move", token=tokens["alice"],
                        body=json.dumps({"fromRepo": repo_id, "toRepo": "team/authz-move-target"}).encode())
    assert reply.status == 403, reply.body
    assert snapshot(client, tokens["carol"], watched) == before
