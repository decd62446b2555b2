"""The server refuses a write from its headers alone, before reading any of its body
(registry/hub_api.py, ``HubApi.refuse_early``), tested over a real socket.

Each request sends its headers with a ``Content-Length`` past what the route accepts and then no
body (or a little of one). Refused early, it gets its refusal (status, error code and the message
the user reads) at once. Not refused early, the server would either answer 413 for the declared
size or wait for a body that never comes, and the socket's timeout ends the test. Every refused
request leaves the registry as it was. The requests that must not be refused early (reads, the
read-only POSTs, anything outside ``/api/``, an allowed write) send their body and get the
endpoint's own answer.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import running_registry
from tests.test_registry_authz_matrix import UNKNOWN_TOKEN, Client, ndjson_commit, snapshot

NO_BODY_LENGTH = 2**40  # past every route's body limit: an unrefused request gets 413 instead
WAIT_S = 10.0  # a refusal comes without the body; an unrefused request waits for it until this ends the test
HOW_TO_TOKEN = ("create one with `peftkit registry token create USER --write --data DIR` on the server "
                "(DIR: the data folder it serves)")

# Writes under /api/models/<repo>/: (method, path after the repo, action named in the 401).
MODEL_WRITES = [
    ("POST", "commit/main", "committing"),
    ("POST", "preupload/main", "uploading"),
    ("POST", "branch/dev", "changing branches"),
    ("DELETE", "branch/dev", "changing branches"),
    ("PUT", "settings", "changing repo settings"),
    ("POST", "tag/main", "changing tags"),
    ("DELETE", "tag/v0", "changing tags"),
    ("POST", "super-squash/main", "squashing history"),
]
# Writes that name their repo in the body, and writes to no endpoint (still refused without a token):
# (method, path, action named in the 401).
OTHER_WRITES = [
    ("POST", "/api/repos/create", "creating a repo"),
    ("DELETE", "/api/repos/delete", "deleting a repo"),
    ("POST", "/api/repos/move", "moving a repo"),
    ("POST", "/api/models/alice/pub", "this request"),
    ("DELETE", "/api/models", "this request"),
    ("POST", "/api/models/create", "this request"),  # not /api/repos/create: no endpoint
    ("DELETE", "/api/delete", "this request"),
    ("POST", "/api/models/alice/pub/rename", "changing a repo"),  # under a repo, but no endpoint
]
ALL_WRITES = [(m, f"/api/models/alice/pub/{tail}", action) for m, tail, action in MODEL_WRITES] + OTHER_WRITES
REPOS = ["alice/pub", "alice/priv", "alice/new", "team/shared"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """alice (a member of org team) and bob with write tokens, alice's read-only token 'alice-ro';
    alice/pub (public, with a branch dev and a tag v0), alice/priv (private), team/shared, and
    alice/old moved to alice/new."""
    root: Path = tmp_path_factory.mktemp("refuse-early")
    with running_registry(root, users={"alice": True, "bob": True}) as (store, server, tokens):
        store.accounts.add_org("team", members=["alice"])
        tokens = {**tokens, "alice_ro": store.accounts.create_token("alice", write=False, name="alice-ro")[1]}
        store.create_repo("alice/pub", owner="alice")
        store.commit("alice/pub", {"a.txt": b"hello"})
        store.create_branch("alice/pub", "dev")
        store.create_tag("alice/pub", "v0")
        store.create_repo("alice/priv", private=True, owner="alice")
        store.create_repo("team/shared", owner="alice")
        store.create_repo("alice/old", owner="alice")
        store.move_repo("alice/old", "alice/new")
        client = Client(server.url)
        before = snapshot(client, tokens["alice"], REPOS)
        yield store, client, tokens
        assert snapshot(client, tokens["alice"], REPOS) == before  # no refused request wrote anything


def send_headers(client: Client, method: str, path: str, token: str | None = None, *,
                 length: int = NO_BODY_LENGTH, body_part: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """Send a request's headers (and ``body_part``, the start of its body) and read the answer:
    (status, X-Error-* headers, JSON body)."""
    conn = http.client.HTTPConnection(client.host, client.port, timeout=WAIT_S)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        if token is not None:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        if body_part:
            conn.send(body_part)
        resp = conn.getresponse()
        errors = {k.lower(): v for k, v in resp.getheaders() if k.lower().startswith("x-error-")}
        return resp.status, errors, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def assert_refused(reply: tuple[int, dict[str, str], dict], status: int, code: str, message: str) -> None:
    got_status, errors, body = reply
    assert (got_status, errors.get("x-error-code"), body) == (status, code, {"error": message})
    assert errors.get("x-error-message") == message


def no_token_message(action: str) -> str:
    return (f"{action} needs a token with write access: {HOW_TO_TOKEN} and pass it as "
            "'Authorization: Bearer <token>'")


@pytest.mark.parametrize(("method", "path", "action"), ALL_WRITES)
def test_a_write_without_a_token_is_refused_before_its_body_naming_what_it_does(registry, method, path, action):
    _, client, _ = registry
    assert_refused(send_headers(client, method, path), 401, "Unauthorized", no_token_message(action))


@pytest.mark.parametrize(("method", "path", "action"), ALL_WRITES)
def test_an_unknown_token_and_a_read_only_one_are_refused_before_the_body(registry, method, path, action):
    _, client, tokens = registry
    assert_refused(send_headers(client, method, path, UNKNOWN_TOKEN), 401, "Unauthorized",
                   f"Invalid credentials in Authorization header: the token is unknown to this registry or "
                   f"revoked; {HOW_TO_TOKEN}")
    assert_refused(send_headers(client, method, path, tokens["alice_ro"]), 403, "Forbidden",
                   "token 'alice-ro' is read-only; create one with write access: "
                   "`peftkit registry token create alice --write`")


OTHER_USER = ("another user's namespace: push to 'bob/...' or to an organization they are a member of")
ORG = ("an organization's namespace: an administrator adds them with `peftkit registry org add team --member bob`, "
       "or push to 'bob/...'")


@pytest.mark.parametrize(("method", "tail", "action"), MODEL_WRITES)
@pytest.mark.parametrize(("user", "repo_id", "status", "code", "message"), [
    ("bob", "alice/pub", 403, "Forbidden", f"user 'bob' may not write to 'alice', {OTHER_USER}"),
    ("bob", "team/shared", 403, "Forbidden", f"user 'bob' may not write to 'team', {ORG}"),
    ("bob", "alice/priv", 404, "RepoNotFound", "repository 'alice/priv' not found"),
    ("alice", "alice/absent", 404, "RepoNotFound", "repository 'alice/absent' not found"),
    ("alice", "alice/old", 404, "RepoNotFound", "repository 'alice/old' was moved to 'alice/new'; use the new name"),
])
def test_a_write_to_a_repo_the_caller_may_not_change_is_refused_before_its_body(
        registry, method, tail, action, user, repo_id, status, code, message):
    _, client, tokens = registry
    reply = send_headers(client, method, f"/api/models/{repo_id}/{tail}", tokens[user])
    assert_refused(reply, status, code, message)


@pytest.mark.parametrize(("method", "path", "length", "body_part"), [
    ("POST", "/api/models/alice/pub/commit/main", 1000, b'{"key": "header"'),  # within the upload limit
    ("POST", "/api/models/alice/pub/preupload/main", 100, b""),
    ("PUT", "/api/models/alice/pub/settings", 100, b"{"),
    ("POST", "/api/repos/create", 100, b'{"name"'),
])
def test_the_refusal_comes_while_the_server_would_still_wait_for_the_body(registry, method, path, length, body_part):
    """A body within the route's limit, not (fully) sent: unrefused, the server would wait for the rest."""
    _, client, _ = registry
    action = next(a for m, p, a in ALL_WRITES if (m, p) == (method, path))
    assert_refused(send_headers(client, method, path, length=length, body_part=body_part), 401, "Unauthorized",
                   no_token_message(action))


def test_reads_read_only_posts_and_paths_outside_the_api_are_not_refused(registry):
    store, client, tokens = registry
    assert client.call("GET", "/api/models/alice/pub").json()["id"] == "alice/pub"
    head = client.call("HEAD", "/api/models/alice/pub")  # no HEAD route: the dispatcher's 404, not a 401
    assert head.status == 404
    assert client.call("POST", "/").json() == {"name": "peftkit registry", "api": "huggingface-hub-subset"}
    outside = client.call("POST", "/alice/pub/resolve/main/a.txt")
    assert (outside.status, outside.json()) == (404, {"error": "no such endpoint: POST /alice/pub/resolve/main/a.txt"})
    yaml = client.call("POST", "/api/validate-yaml", body=b'{"content": "---\\nlicense: mit\\n---\\n"}')
    assert (yaml.status, yaml.json()) == (200, {"errors": [], "warnings": []})
    for token in (None, tokens["bob"], tokens["alice_ro"]):
        reply = client.call("POST", "/api/models/alice/pub/paths-info/main", token=token,
                            body=json.dumps({"paths": ["a.txt"]}).encode())
        (entry,) = reply.json()
        assert (reply.status, entry["path"], entry["size"]) == (200, "a.txt", 5)


def test_allowed_writes_are_not_refused_early(tmp_path: Path):
    """The owner's and an org member's writes, and another user's create in their own namespace."""
    with running_registry(tmp_path, users={"alice": True, "bob": True}) as (store, server, tokens):
        store.accounts.add_org("team", members=["alice"])
        client = Client(server.url)
        made = client.call("POST", "/api/repos/create", token=tokens["bob"], body=b'{"name": "mine"}')
        assert (made.status, made.json()["id"]) == (200, "bob/mine")
        store.create_repo("team/shared")
        reply = client.call("POST", "/api/models/team/shared/commit/main", token=tokens["alice"],
                            body=ndjson_commit({"b.txt": b"member"}), content_type="application/x-ndjson")
        assert reply.status == 200, reply.body
        assert store.read_file("team/shared", "b.txt") == b"member"
        reply = client.call("PUT", "/api/models/bob/mine/settings", token=tokens["bob"], body=b'{"private": true}')
        assert reply.status == 200 and store.repo_info("bob/mine").private
        moved = client.call("POST", "/api/repos/move", token=tokens["bob"],
                            body=b'{"fromRepo": "bob/mine", "toRepo": "bob/ours"}')
        assert moved.status == 200 and store.repo_exists("bob/ours")
        gone = client.call("DELETE", "/api/repos/delete", token=tokens["bob"], body=b'{"name": "ours"}')
        assert gone.status == 200 and not store.repo_exists("bob/ours")

