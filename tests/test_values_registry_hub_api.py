"""The registry's write endpoints by value, over plain HTTP (registry/hub_api.py): what each one answers
and writes for its owner, how it reads its options (private / visibility, startingPoint, tag messages,
the commit's body type), and which requests are refused as malformed with nothing written. The
authorisation of every endpoint is tests/test_registry_authz_matrix.py's."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import running_registry
from tests.test_registry_authz_matrix import Client, ndjson_commit


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("hub-api-values")
    with running_registry(root, users={"alice": True, "bob": True}) as (store, server, tokens):
        store.accounts.add_org("team", members=["alice"])
        yield store, Client(server.url), tokens, server.url.rstrip("/")


def _create(client: Client, token: str, **body) -> object:
    return client.call("POST", "/api/repos/create", token=token, body=json.dumps(body).encode())


def test_create_reads_the_namespace_and_visibility_and_answers_the_repo_url(registry):
    store, client, tokens, url = registry
    reply = _create(client, tokens["alice"], name="team/made", private=True)
    assert reply.status == 200, reply.body
    assert reply.json() == {"url": f"{url}/team/made", "name": "team/made", "id": "team/made"}
    assert store.repo_info("team/made").private
    assert _create(client, tokens["alice"], name="pub", visibility="public", private=True).status == 200
    assert not store.repo_info("alice/pub").private  # visibility wins over private
    assert _create(client, tokens["alice"], name="vis", visibility="private").status == 200
    assert store.repo_info("alice/vis").private
    for body, status in (({"name": "x1", "type": "dataset"}, 400), ({"name": "x2", "visibility": "secret"}, 400),
                         ({"name": "x3", "private": "yes"}, 400), ({"name": 5}, 400)):
        reply = _create(client, tokens["alice"], **body)
        assert reply.status == status, (body, reply.body)
    assert not any(store.repo_exists(f"alice/x{i}") for i in (1, 2, 3))


def test_settings_change_visibility_and_refuse_gating_and_bad_values(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="set").status == 200

    def put(**body):
        return client.call("PUT", "/api/models/alice/set/settings", token=tokens["alice"],
                           body=json.dumps(body).encode())

    assert put(visibility="private").status == 200 and store.repo_info("alice/set").private
    assert put().status == 200 and store.repo_info("alice/set").private  # nothing given: nothing changes
    assert put(private=False).status == 200 and not store.repo_info("alice/set").private
    for body in ({"gated": "auto"}, {"private": "no"}, {"visibility": "hidden"}):
        assert put(**body).status == 400, body
        assert not store.repo_info("alice/set").private


def test_commit_answers_its_ids_and_refuses_other_bodies_and_pull_requests(registry):
    store, client, tokens, url = registry
    assert _create(client, tokens["alice"], name="com").status == 200
    path = "/api/models/alice/com/commit/main"
    reply = client.call("POST", path, token=tokens["alice"], body=ndjson_commit({"a.txt": b"1"}, summary=""),
                        content_type="application/x-ndjson; charset=utf-8")
    assert reply.status == 200, reply.body
    sha = store.resolve_revision("alice/com")
    assert reply.json() == {"success": True, "commitOid": sha, "commitUrl": f"{url}/alice/com/commit/{sha}",
                            "hookOutput": "", "pullRequestUrl": None}
    info = store.get_commit("alice/com", sha)
    assert (info.author, info.message) == ("alice", "Update files")
    for extra, content_type in (("", "text/plain"), ("?create_pr=1", "application/x-ndjson")):
        reply = client.call("POST", path + extra, token=tokens["alice"], body=ndjson_commit({"b.txt": b"2"}),
                            content_type=content_type)
        assert reply.status == 400, reply.body
    reply = client.call("POST", "/api/models/alice/com/commit/nope", token=tokens["alice"],
                        body=ndjson_commit({"b.txt": b"2"}), content_type="application/x-ndjson")
    assert reply.status == 404
    assert store.resolve_revision("alice/com") == sha and store.orphan_blobs() == []


def test_preupload_gives_the_oid_of_files_that_exist_and_the_head(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="pre").status == 200
    store.commit("alice/pre", {"have.txt": b"x"})
    body = json.dumps({"files": [{"path": "have.txt", "size": 1, "sample": ""},
                                 {"path": "new.txt", "size": 1, "sample": ""}]}).encode()
    reply = client.call("POST", "/api/models/alice/pre/preupload/main", token=tokens["alice"], body=body)
    assert reply.status == 200, reply.body
    (have,) = [f for f in store.list_files("alice/pre") if f.path == "have.txt"]
    assert reply.json() == {"commitOid": store.resolve_revision("alice/pre"), "files": [
        {"path": "have.txt", "uploadMode": "regular", "shouldIgnore": False, "oid": have.oid},
        {"path": "new.txt", "uploadMode": "regular", "shouldIgnore": False}]}
    reply = client.call("POST", "/api/models/alice/pre/preupload/main?create_pr=true", token=tokens["alice"],
                        body=body)
    assert reply.status == 400


def test_tags_branches_squash_and_move_answer_and_write_what_they_say(registry):
    store, client, tokens, url = registry
    assert _create(client, tokens["alice"], name="refs").status == 200
    first = store.commit("alice/refs", {"a": b"1"})
    second = store.commit("alice/refs", {"a": b"2"})
    call = client.call
    reply = call("POST", "/api/models/alice/refs/tag/" + first, token=tokens["alice"],
                 body=b'{"tag": "v1", "message": "first"}')
    assert reply.json() == {"name": "v1", "ref": "refs/tags/v1", "targetCommit": first}
    assert store.list_tags("alice/refs") == {"v1": first}
    assert call("POST", "/api/models/alice/refs/tag/main", token=tokens["alice"], body=b'{"tag": 3}').status == 400
    assert call("DELETE", "/api/models/alice/refs/tag/v1", token=tokens["alice"], body=b"").status == 200
    assert store.list_tags("alice/refs") == {}
    reply = call("POST", "/api/models/alice/refs/branch/old", token=tokens["alice"],
                 body=json.dumps({"startingPoint": first}).encode())
    assert reply.status == 200 and store.branch_head("alice/refs", "old") == first
    reply = call("POST", "/api/models/alice/refs/branch/new", token=tokens["alice"], body=b"")
    assert (reply.status, reply.json()) == (200, {})
    assert store.branch_head("alice/refs", "new") == second  # no starting point: main
    assert call("POST", "/api/models/alice/refs/branch/bad", token=tokens["alice"],
                body=b'{"startingPoint": 1}').status == 400
    assert call("DELETE", "/api/models/alice/refs/branch/old", token=tokens["alice"], body=b"").status == 200
    assert set(store.list_branches("alice/refs")) == {"main", "new"}
    reply = call("POST", "/api/models/alice/refs/super-squash/main", token=tokens["alice"],
                 body=b'{"message": "squashed"}')
    squashed = store.resolve_revision("alice/refs")
    assert reply.json() == {"commitId": squashed}
    info = store.get_commit("alice/refs", squashed)
    assert (info.message, info.author, info.parent) == ("squashed", "alice", None)
    assert store.read_file("alice/refs", "a") == b"2"
    reply = call("POST", "/api/repos/move", token=tokens["alice"],
                 body=json.dumps({"fromRepo": "alice/refs", "toRepo": "team/refs"}).encode())
    assert reply.json() == {"url": f"{url}/team/refs", "name": "team/refs", "id": "team/refs"}
    assert store.read_file("team/refs", "a") == b"2"
    reply = call("POST", "/api/repos/move", token=tokens["alice"],
                 body=json.dumps({"fromRepo": "team/refs", "toRepo": "alice/back", "type": "dataset"}).encode())
    assert reply.status == 400 and store.repo_exists("team/refs")


def test_read_only_posts_need_no_token_and_private_repos_are_visible_to_their_org(registry):
    store, client, tokens, _ = registry
    assert client.call("POST", "/api/validate-yaml", body=b'{"content": "---\\nlicense: mit\\n---\\n"}').status == 200
    assert _create(client, tokens["alice"], name="team/secret", private=True).status == 200
    store.commit("team/secret", {"a": b"1"})
    paths = json.dumps({"paths": ["a"]}).encode()
    assert client.call("POST", "/api/models/team/secret/paths-info/main", token=tokens["alice"],
                       body=paths).status == 200
    assert client.call("POST", "/api/models/team/secret/paths-info/main", body=paths).status in (401, 404)
    assert client.call("GET", "/api/models/team/secret", token=tokens["alice"]).status == 200
    assert client.call("GET", "/api/models/team/secret", token=tokens["bob"]).status == 404


@pytest.fixture(scope="module")
def endpoint_only(tmp_path_factory: pytest.TempPathFactory):
    """A registry without the server's early refusal (each endpoint's own checks answer) and with a limit
    of 2 files per commit or preupload."""
    from peftkit.registry.hub_api import ApiConfig, HubApi

    root: Path = tmp_path_factory.mktemp("hub-api-endpoint-only")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HubApi, "refuse_early", lambda self, req: None)
        with running_registry(root, config=ApiConfig(max_commit_files=2), users={"alice": True}) as (
                store, server, tokens):
            yield store, Client(server.url), tokens


def test_each_endpoint_names_what_needs_a_token_and_what_it_could_not_read(endpoint_only):
    store, client, tokens = endpoint_only
    store.create_repo("alice/own")
    store.commit("alice/own", {"a": b"1"})
    reply = client.call("DELETE", "/api/repos/delete", body=json.dumps({"name": "own"}).encode())
    assert reply.status == 401 and "deleting a repo needs a token with write access" in reply.json()["error"]
    reply = client.call("POST", "/api/models/alice/own/preupload/main", body=b'{"files": []}')
    assert reply.status == 401 and "uploading needs a token with write access" in reply.json()["error"]
    for path, method, what in (("/api/repos/delete", "DELETE", "delete repo"),
                               ("/api/models/alice/own/preupload/main", "POST", "preupload")):
        reply = client.call(method, path, token=tokens["alice"], body=b"{not json")
        assert reply.status == 400 and reply.json()["error"].startswith(f"{what}:"), reply.body
    for body in ({"name": 5, "organization": "alice"}, {"name": "own", "organization": 5}):
        reply = client.call("DELETE", "/api/repos/delete", token=tokens["alice"], body=json.dumps(body).encode())
        assert reply.status == 400, reply.body
    assert store.repo_exists("alice/own")
    files = [{"path": f"f{i}", "size": 1, "sample": ""} for i in range(3)]
    reply = client.call("POST", "/api/models/alice/own/preupload/main", token=tokens["alice"],
                        body=json.dumps({"files": files}).encode())
    assert reply.status == 413, reply.body


def test_preupload_answers_for_the_branch_it_names(endpoint_only):
    store, client, tokens = endpoint_only
    store.create_repo("alice/branchy")
    store.commit("alice/branchy", {"a": b"main"})
    store.create_branch("alice/branchy", "dev")
    dev = store.commit("alice/branchy", {"a": b"dev"}, revision="dev")
    reply = client.call("POST", "/api/models/alice/branchy/preupload/dev", token=tokens["alice"],
                        body=json.dumps({"files": [{"path": "a", "size": 3, "sample": ""}]}).encode())
    (entry,) = [f for f in store.list_files("alice/branchy", "dev") if f.path == "a"]
    assert reply.json() == {"commitOid": dev, "files": [
        {"path": "a", "uploadMode": "regular", "shouldIgnore": False, "oid": entry.oid}]}


def test_settings_and_super_squash_read_their_bodies_and_name_their_action(endpoint_only):
    store, client, tokens = endpoint_only
    store.create_repo("alice/sq", private=True)
    store.commit("alice/sq", {"a": b"1"})
    main = store.commit("alice/sq", {"a": b"2"})
    store.create_branch("alice/sq", "dev")
    store.commit("alice/sq", {"b": b"3"}, revision="dev")
    put = json.dumps({"visibility": "public"}).encode()
    assert client.call("PUT", "/api/models/alice/sq/settings", token=tokens["alice"], body=put).status == 200
    assert not store.repo_info("alice/sq").private
    for method, path, action, what in (("PUT", "settings", "changing repo settings", "repo settings"),
                                       ("POST", "super-squash/dev", "squashing history", "super-squash")):
        reply = client.call(method, f"/api/models/alice/sq/{path}", body=b"{}")
        assert reply.status == 401 and f"{action} needs a token with write access" in reply.json()["error"]
        reply = client.call(method, f"/api/models/alice/sq/{path}", token=tokens["alice"], body=b"[1")
        assert reply.status == 400 and reply.json()["error"].startswith(f"{what}:"), reply.body
    reply = client.call("POST", "/api/models/alice/sq/super-squash/dev", token=tokens["alice"], body=b"")
    squashed = store.branch_head("alice/sq", "dev")
    assert reply.status == 200 and reply.json() == {"commitId": squashed}
    info = store.get_commit("alice/sq", squashed)
    assert (info.message, info.author, info.parent) == ("Super-squash branch 'dev'", "alice", None)
    assert store.resolve_revision("alice/sq") == main  # main is left as it was
    assert store.read_file("alice/sq", "b", "dev") == b"3"


def test_a_commit_over_http_writes_its_files_on_its_branch_after_its_parent(endpoint_only):
    store, client, tokens = endpoint_only
    store.create_repo("alice/http")
    store.create_branch("alice/http", "dev")
    head = store.branch_head("alice/http", "dev")
    body = b"\n".join([json.dumps({"key": "header", "value": {"summary": "s", "description": "d",
                                                              "parentCommit": head}}).encode(),
                       json.dumps({"key": "file", "value": {"path": "a.txt", "content": "aGk=",
                                                            "encoding": "base64"}}).encode()]) + b"\n"
    reply = client.call("POST", "/api/models/alice/http/commit/dev", token=tokens["alice"], body=body,
                        content_type="application/ndjson")
    assert reply.status == 200, reply.body
    sha = store.branch_head("alice/http", "dev")
    info = store.get_commit("alice/http", sha)
    assert (info.parent, info.message, info.description, info.author) == (head, "s", "d", "alice")
    assert store.read_file("alice/http", "a.txt", "dev") == b"hi"
    assert store.list_files("alice/http") == []  # main is untouched
    stale = client.call("POST", "/api/models/alice/http/commit/dev", token=tokens["alice"], body=body,
                        content_type="application/x-ndjson")
    assert stale.status == 412 and store.branch_head("alice/http", "dev") == sha


def _raw_call(client: Client, method: str, path: str, token: str, body: bytes) -> tuple[int, object]:
    """A request with no Content-Type header at all (Client.call always sends one)."""
    conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _tmp_files(store) -> set[str]:
    return {p.name for p in store.blobs.tmp_dir.iterdir()}


def test_create_records_its_caller_as_owner_and_checks_the_namespace_it_names(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="team/owned").status == 200
    info = store.repo_info("team/owned")
    assert info.owner == "alice"
    assert store.get_commit("team/owned", info.sha).author == "alice"
    for name, built in (("team/a/b", "team/a/b"), ("//x", "alice//x")):  # split at the first '/' only
        nested = _create(client, tokens["alice"], name=name)
        assert (nested.status, nested.json()) == (400, {"error": (
            f"invalid repo id '{built}': expected 'namespace/name' (for example 'alice/lora-sentiment')")})
    fix = "push to 'bob/...' or to an organization they are a member of"
    for body, message in (
        ({"name": "alice/x"}, f"user 'bob' may not write to 'alice', another user's namespace: {fix}"),
        ({"name": "x", "organization": "team"},
         "user 'bob' may not write to 'team', an organization's namespace: an administrator adds them with "
         "`peftkit registry org add team --member bob`, or push to 'bob/...'"),
        ({"name": "nobody/x"}, f"user 'bob' may not write to 'nobody': no user or organization of that name "
                               f"exists on this registry; {fix} (an administrator creates an organization with "
                               f"`peftkit registry org add nobody --member bob`)"),
    ):
        reply = _create(client, tokens["bob"], **body)
        assert (reply.status, reply.json()) == (403, {"error": message})
    reply = client.call("POST", "/api/repos/create", token=tokens["alice"], body=b"{x")
    assert reply.status == 400 and reply.json()["error"].startswith("create repo: body is not valid JSON")
    assert not store.repo_exists("alice/x") and not store.repo_exists("team/x")


def test_deletes_and_settings_answer_an_empty_object_and_gated_false_is_accepted(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="gone").status == 200
    store.commit("alice/gone", {"a": b"1"})
    assert store.create_branch("alice/gone", "dev") and store.create_tag("alice/gone", "v1")
    for method, path, body in (("PUT", "settings", b'{"gated": false}'), ("DELETE", "branch/dev", b""),
                               ("DELETE", "tag/v1", b"")):
        reply = client.call(method, f"/api/models/alice/gone/{path}", token=tokens["alice"], body=body)
        assert (reply.status, reply.json()) == (200, {}), path
    assert set(store.list_branches("alice/gone")) == {"main"} and store.list_tags("alice/gone") == {}
    reply = client.call("DELETE", "/api/repos/delete", token=tokens["alice"], body=b'{"name": "gone"}')
    assert (reply.status, reply.json()) == (200, {}) and not store.repo_exists("alice/gone")


def test_a_commit_without_content_type_is_ndjson_and_a_refused_one_leaves_no_staged_file(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="bare").status == 200
    before = _tmp_files(store)
    status, reply = _raw_call(client, "POST", "/api/models/alice/bare/commit/main", tokens["alice"],
                              ndjson_commit({"a.txt": b"plain"}))
    assert status == 200 and reply["commitOid"] == store.resolve_revision("alice/bare")
    assert store.read_file("alice/bare", "a.txt") == b"plain"
    head = store.resolve_revision("alice/bare")
    bad_line = ndjson_commit({"b.txt": b"staged", "c.txt": b"staged too"}) + b"{not json\n"
    for revision, body, expected in (("nope", ndjson_commit({"b.txt": b"x"}), 404), ("main", bad_line, 400)):
        status, reply = _raw_call(client, "POST", f"/api/models/alice/bare/commit/{revision}", tokens["alice"], body)
        assert status == expected, reply
    assert _tmp_files(store) == before  # nothing staged is left behind
    assert store.resolve_revision("alice/bare") == head and store.orphan_blobs() == []


def test_tags_keep_their_message_and_refs_payloads_are_checked(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="tagged").status == 200
    head = store.commit("alice/tagged", {"a": b"1"})
    for tag, body in (("v1", b'{"tag": "v1", "message": "the first"}'), ("v2", b'{"tag": "v2"}')):
        reply = client.call("POST", "/api/models/alice/tagged/tag/main", token=tokens["alice"], body=body)
        assert reply.json() == {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": head}
    with store.db.read() as conn:
        rows = conn.execute("SELECT name, message FROM tags ORDER BY name").fetchall()
    assert [tuple(r) for r in rows if r[0] in ("v1", "v2")] == [("v1", "the first"), ("v2", "")]
    for path, body, message in (
        ("tag/main", b'{"tag": "v3", "message": 5}', "create tag: 'tag' must be the tag name and 'message' a string"),
        ("tag/main", b"[", "create tag: body is not valid JSON"),
        ("branch/b1", b"{x", "create branch: body is not valid JSON"),
    ):
        reply = client.call("POST", f"/api/models/alice/tagged/{path}", token=tokens["alice"], body=body)
        assert reply.status == 400 and reply.json()["error"].startswith(message), reply.body
    assert set(store.list_tags("alice/tagged")) == {"v1", "v2"} and set(store.list_branches("alice/tagged")) == {"main"}


def test_move_checks_its_payload_and_the_target_namespace(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="mover").status == 200
    store.accounts.add_org("others", members=["bob"])
    fix = "push to 'alice/...' or to an organization they are a member of"
    for body, status, message in (
        ({"fromRepo": "alice/mover", "toRepo": 5}, 400,
         "move repo: 'fromRepo' and 'toRepo' must be repo ids ('namespace/name')"),
        ({"fromRepo": 5, "toRepo": "alice/moved"}, 400,
         "move repo: 'fromRepo' and 'toRepo' must be repo ids ('namespace/name')"),
        ({"fromRepo": "alice/mover", "toRepo": "bob/mover"}, 403,
         f"user 'alice' may not write to 'bob', another user's namespace: {fix}"),
        ({"fromRepo": "alice/mover", "toRepo": "others/mover"}, 403,
         "user 'alice' may not write to 'others', an organization's namespace: an administrator adds them with "
         "`peftkit registry org add others --member alice`, or push to 'alice/...'"),
    ):
        reply = client.call("POST", "/api/repos/move", token=tokens["alice"], body=json.dumps(body).encode())
        assert (reply.status, reply.json()) == (status, {"error": message})
    reply = client.call("POST", "/api/repos/move", token=tokens["alice"], body=b"{x")
    assert reply.status == 400 and reply.json()["error"].startswith("move repo: body is not valid JSON")
    assert store.repo_exists("alice/mover") and not store.repo_exists("bob/mover")


def test_model_info_at_a_revision_describes_that_commit(registry):
    store, client, tokens, _ = registry
    assert _create(client, tokens["alice"], name="history").status == 200
    first = store.commit("alice/history", {"a": b"1"})
    second = store.commit("alice/history", {"b": b"2"})
    at_first = client.call("GET", f"/api/models/alice/history/revision/{first}").json()
    assert at_first["sha"] == first and [s["rfilename"] for s in at_first["siblings"]] == ["a"]
    assert client.call("GET", "/api/models/alice/history/revision/main").json()["sha"] == second


@pytest.mark.parametrize(("method", "path", "action"), [
    ("POST", "/api/repos/create", "creating a repo"),
    ("POST", "/api/models/alice/own/commit/main", "committing"),
    ("POST", "/api/models/alice/own/tag/main", "changing tags"),
    ("POST", "/api/models/alice/own/branch/b2", "changing branches"),
    ("POST", "/api/repos/move", "moving a repo"),
    ("DELETE", "/api/repos/delete", "deleting a repo"),
    ("POST", "/api/models/alice/own/preupload/main", "uploading"),
    ("PUT", "/api/models/alice/own/settings", "changing repo settings"),
    ("DELETE", "/api/models/alice/own/tag/v0", "changing tags"),
    ("DELETE", "/api/models/alice/own/branch/b2", "changing branches"),
    ("POST", "/api/models/alice/own/super-squash/main", "squashing history"),
])
def test_each_endpoint_without_the_early_refusal_names_its_action_in_the_401(endpoint_only, method, path, action):
    store, client, _ = endpoint_only
    if not store.repo_exists("alice/own"):
        store.create_repo("alice/own")
    reply = client.call(method, path, body=b"{}")
    assert (reply.status, reply.json()) == (401, {"error": (
        f"{action} needs a token with write access: create one with `peftkit registry token create USER --write "
        "--data DIR` on the server (DIR: the data folder it serves) and pass it as 'Authorization: Bearer <token>'")})


def test_a_commit_past_the_file_limit_is_refused_and_leaves_no_staged_file(endpoint_only):
    store, client, tokens = endpoint_only
    store.create_repo("alice/many")
    head = store.resolve_revision("alice/many")
    before = _tmp_files(store)
    reply = client.call("POST", "/api/models/alice/many/commit/main", token=tokens["alice"],
                        body=ndjson_commit({f"f{i}": bytes([i]) for i in range(3)}), content_type="application/x-ndjson")
    assert reply.status == 413 and "at most 2 files" in reply.json()["error"], reply.body
    assert _tmp_files(store) == before and store.resolve_revision("alice/many") == head


def test_a_commit_on_a_syncing_store_flushes_its_staged_files_and_a_failed_flush_discards_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """In process, on a store that syncs to disk (the served test stores do not)."""
    from email.message import Message
    from io import BytesIO

    from peftkit.registry import RegistryStore
    from peftkit.registry.hub_api import HubApi, Request

    store = RegistryStore(tmp_path, fsync=True)
    try:
        store.accounts.add_user("alice")
        principal = store.accounts.authenticate(store.accounts.create_token("alice", write=True, name="t")[1])
        store.create_repo("alice/sync")
        api = HubApi(store)

        def commit(files: dict[str, bytes]):
            return api.dispatch(Request("POST", "/api/models/alice/sync/commit/main", {}, Message(), "http://h",
                                        principal=principal, body=BytesIO(ndjson_commit(files))))

        flushed: list[int] = []
        real_sync = store.blobs.sync_staged
        monkeypatch.setattr(store.blobs, "sync_staged",
                            lambda staged: real_sync(flushed.extend(b.size for b in staged) or list(staged)))
        assert commit({"a.txt": b"abc", "b.txt": b"defgh"}).status == 200
        assert sorted(flushed) == [3, 5] and store.read_file("alice/sync", "b.txt") == b"defgh"
        head = store.resolve_revision("alice/sync")

        def disk_full(staged):
            raise OSError("disk full")

        monkeypatch.setattr(store.blobs, "sync_staged", disk_full)
        with pytest.raises(OSError, match="disk full"):
            commit({"c.txt": b"never"})
        assert _tmp_files(store) == set() and store.resolve_revision("alice/sync") == head
    finally:
        store.close()
