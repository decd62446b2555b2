"""The registry's write endpoints by value, over plain HTTP (registry/hub_api.py): what each one answers
and writes for its owner, how it reads its options (private / visibility, startingPoint, tag messages,
the commit's body type), and which requests are refused as malformed with nothing written. The
authorisation of every endpoint is tests/test_registry_authz_matrix.py's."""

from __future__ import annotations

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
    assert call("POST", "/api/models/alice/refs/branch/new", token=tokens["alice"], body=b"").status == 200
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
