"""Bounded cost per request and small holes, on a real registry server driven by huggingface_hub and raw HTTP.

* YAML front matter cannot expand (aliases refused, size and depth capped);
* a commit of 10,000 files, its tree listing and ``paths-info`` stay near-linear;
* a commit of more files than the cap is refused with a 413 naming the cap;
* reserved account names, ``org add --member`` of an unknown user, and
  download counts that one client cannot inflate.
"""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401

from peftkit.registry import ApiConfig, RegistryStore, start_server
from peftkit.hub_rules.cards import MAX_FRONT_MATTER_BYTES
from peftkit.registry.cli import registry_group
from peftkit.registry.hub_api import HubApi, Request

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "---\nlibrary_name: peft\n" + "\n".join(lines) + "\n---\n\nAn innocent card.\n"


@pytest.fixture
def reg(tmp_path: Path, hf_online):  # noqa: F811
    with running_registry(tmp_path / "reg", users={"alice": True}, config=ApiConfig(max_commit_files=12_000)) as r:
        yield r


def _validate(url: str, content: str) -> tuple[int, dict]:
    status, _, body = _request(
        url, "POST", "/api/validate-yaml", json.dumps({"content": content}).encode(),
        {"Content-Type": "application/json"},
    )
    return status, json.loads(body)


def test_yaml_front_matter_cannot_expand(reg, tmp_path: Path) -> None:
    store, server, tokens = reg
    laughs = _billion_laughs()
    status, answer = _validate(server.url, laughs)
    assert status == 400 and "alias" in answer["errors"][0]["message"]

    too_big = "---\nlibrary_name: peft\nnotes: '" + "x" * MAX_FRONT_MATTER_BYTES + "'\n---\nbody\n"
    status, answer = _validate(server.url, too_big)
    assert status == 400 and str(MAX_FRONT_MATTER_BYTES) in answer["errors"][0]["message"]
    status, answer = _validate(server.url, "---\nx: " + "[" * 200 + "]" * 200 + "\n---\n")
    assert status == 400 and "nests deeper" in answer["errors"][0]["message"]
    status, answer = _validate(server.url, "---\nx: " + "9" * 6000 + "\n---\n")  # int() of 6,000 digits
    assert status == 400 and answer["errors"]
    assert _validate(server.url, "---\nlibrary_name: peft\ntags: [a, b]\n---\nok\n") == (
        200, {"errors": [], "warnings": []}
    )

    # huggingface_hub validates a card before uploading it, so it refuses with our message.
    api = HfApi(endpoint=server.url, token=tokens["alice"])
    api.create_repo("alice/laughs")
    with pytest.raises(ValueError, match="alias"):
        api.upload_file(path_or_fileobj=laughs.encode(), path_in_repo="README.md", repo_id="alice/laughs")
    # A client that skips validation: the card is stored as sent and indexed without expanding.
    status, _, body = _request(
        server.url, "POST", "/api/models/alice/laughs/commit/main", _ndjson_commit({"README.md": laughs.encode()}),
        {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {tokens['alice']}"},
    )
    assert status == 200, body
    assert Path(hf_hub_download("alice/laughs", "README.md", endpoint=server.url, token=False,
                                cache_dir=tmp_path / "c")).read_text() == laughs
    assert api.model_info("alice/laughs").card_data is None
    with store.db.read() as conn:
        row = conn.execute(
            "SELECT m.card_json, m.meta_json, s.body FROM repo_meta m JOIN repos r ON r.id = m.repo"
            " JOIN repo_search s ON s.rowid = r.id WHERE r.repo_id = 'alice/laughs'"
        ).fetchone()
    assert sum(len(v) for v in row) <= 4 * len(laughs)


def _ndjson_commit(files: dict[str, bytes], summary: str = "many files") -> bytes:
    lines = [json.dumps({"key": "header", "value": {"summary": summary, "description": ""}})]
    for path, data in files.items():
        lines.append(json.dumps({"key": "file", "value": {
            "path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}))
    return ("\n".join(lines) + "\n").encode()


def test_commit_of_10000_files_tree_and_paths_info(reg) -> None:
    store, server, tokens = reg
    api = HfApi(endpoint=server.url, token=tokens["alice"])
    api.create_repo("alice/many")
    files = {f"d{i % 40}/sub{i % 7}/f{i}.txt": f"file {i}".encode() for i in range(10_000)}
    status, _, body = _request(
        server.url, "POST", "/api/models/alice/many/commit/main", _ndjson_commit(files),
        {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {tokens['alice']}"},
    )
    assert status == 200, body
    sha = json.loads(body)["commitOid"]

    listed = [e.path for e in api.list_repo_tree("alice/many", recursive=True) if not hasattr(e, "tree_id")]
    assert sorted(listed) == sorted(files)
    top = list(api.list_repo_tree("alice/many"))
    assert sorted(e.path for e in top) == sorted(f"d{i}" for i in range(40))

    wanted = list(files)[:2000] + ["d3", "d3/sub2", "missing/file"]
    info = api.get_paths_info("alice/many", wanted, revision=sha)
    by_path = {e.path: e for e in info}
    assert set(by_path) == set(wanted) - {"missing/file"}
    assert by_path["d3/sub2"].tree_id and by_path["d3"].tree_id != by_path["d3/sub2"].tree_id
    assert by_path[wanted[0]].size == len(files[wanted[0]])

    # A second commit replacing half and deleting one folder is as cheap.
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b"v2") for p in list(files)[:100]]
    api.create_commit("alice/many", ops, commit_message="second")
    assert store.read_file("alice/many", list(files)[0]) == b"v2"
    assert len(store.list_files("alice/many")) == 10_000


def test_commit_over_the_file_cap_is_refused_and_leaves_nothing(tmp_path: Path, hf_online) -> None:  # noqa: F811
    with running_registry(tmp_path / "reg", users={"alice": True}, config=ApiConfig(max_commit_files=5)) as (
        store, server, tokens
    ):
        api = HfApi(endpoint=server.url, token=tokens["alice"])
        api.create_repo("alice/capped")
        head = store.resolve_revision("alice/capped")
        folder = tmp_path / "six"
        folder.mkdir()
        for i in range(6):
            (folder / f"f{i}.txt").write_text(f"{i}")
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_folder(folder_path=folder, repo_id="alice/capped")
        assert err.value.response.status_code == 413
        assert "at most 5 files" in str(err.value) and "split" in str(err.value)
        # The commit itself (past a preupload) is refused while streaming, and staged content is gone.
        body = _ndjson_commit({f"f{i}.txt": b"x%d" % i for i in range(6)})
        status, headers, _ = _request(
            server.url, "POST", "/api/models/alice/capped/commit/main", body,
            {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {tokens['alice']}"},
        )
        assert status == 413 and "at most 5 files" in headers["X-Error-Message"]
        assert store.resolve_revision("alice/capped") == head
        assert list((store.root / "tmp").iterdir()) == [] and store.orphan_blobs() == []
        api.upload_folder(folder_path=folder, repo_id="alice/capped", allow_patterns=["f[0-4].txt"])
        assert len(store.list_files("alice/capped")) == 5


def _cli(*args: str):
    return CliRunner().invoke(registry_group, list(args), catch_exceptions=False)


def test_reserved_names_and_org_members(tmp_path: Path) -> None:
    data = str(tmp_path / "reg")
    for name in ("api", "models", "Resolve", "settings"):
        refused = _cli("user", "add", name, "--data", data)
        assert refused.exit_code != 0 and "reserved" in refused.output, refused.output
    refused = _cli("org", "add", "datasets", "--data", data)
    assert refused.exit_code != 0 and "reserved" in refused.output
    assert _cli("user", "add", "Alice", "--data", data).exit_code == 0
    unknown = _cli("org", "add", "acme", "--member", "ghost", "--data", data)
    assert unknown.exit_code == 1 and "peftkit registry user add ghost" in unknown.output
    # A member named in another case joins as the account is spelled, so it can write there.
    assert _cli("org", "add", "acme", "--member", "alice", "--data", data).exit_code == 0
    users = json.loads(_cli("user", "list", "--json", "--data", data).output)
    assert {u["name"]: u.get("members") for u in users}["acme"] == ["Alice"]


def test_download_counts_once_per_client_per_day(reg, tmp_path: Path) -> None:
    store, server, tokens = reg
    api = HfApi(endpoint=server.url, token=tokens["alice"])
    api.create_repo("alice/counted")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="adapter_config.json", repo_id="alice/counted")
    # Through the server: the first download counts, repeats from this client (127.0.0.1) do not.
    for _ in range(3):
        hf_hub_download("alice/counted", "adapter_config.json", endpoint=server.url, token=False,
                        cache_dir=tmp_path / "c", force_download=True)
    assert api.model_info("alice/counted").downloads == 1
    before = store.repo_info("alice/counted").downloads

    # With the client's address known, repeats from one address do not add up.
    hub = HubApi(store)

    def fetch(address: str | None) -> int:
        req = Request("GET", "/alice/counted/resolve/main/adapter_config.json", {}, http.client.HTTPMessage(),
                      server.url, client_address=address)
        assert hub.dispatch(req).status == 200
        return store.repo_info("alice/counted").downloads - before

    assert [fetch("203.0.113.7") for _ in range(5)] == [1, 1, 1, 1, 1]
    assert fetch("198.51.100.2") == 2
    assert [fetch("2001:db8:1:2::7"), fetch("2001:db8:1:2::8"), fetch("2001:db8:1:3::7")] == [3, 3, 4]  # per /64
    assert fetch(None) == 5 and fetch(None) == 6  # unknown address: every download counts


def test_a_big_commit_in_flight_does_not_hold_other_writers(reg) -> None:
    store, server, tokens = reg
    api = HfApi(endpoint=server.url, token=tokens["alice"])
    api.create_repo("alice/big")
    api.create_repo("alice/small")
    body = _ndjson_commit({f"f{i}.txt": b"%d" % i for i in range(5000)})
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", "/api/models/alice/big/commit/main")
        for name, value in (("Content-Type", "application/x-ndjson"), ("Content-Length", str(len(body))),
                            ("Authorization", f"Bearer {tokens['alice']}")):
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body[: len(body) // 2])  # half of the files sent, the rest still to come
        # Meanwhile other writers commit, to another repo and to the same one.
        api.upload_file(path_or_fileobj=b"quick", path_in_repo="q.txt", repo_id="alice/small")
        api.upload_file(path_or_fileobj=b"first", path_in_repo="first.txt", repo_id="alice/big")
        assert store.read_file("alice/small", "q.txt") == b"quick"
        conn.send(body[len(body) // 2 :])
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()
    assert len(store.list_files("alice/big")) == 5001  # both commits landed, the big one on top


def test_bulk_commit_with_fsync_on(tmp_path: Path) -> None:
    # A durable store (as `registry serve` opens it) flushes a commit's staged files at once.
    store = RegistryStore(tmp_path / "durable")
    store.accounts.add_user("alice")
    token = store.accounts.create_token("alice", write=True)[1]
    store.create_repo("alice/durable")
    files = {f"f{i}.txt": b"durable %d" % i for i in range(40)}
    with start_server(store) as server:
        status, _, body = _request(
            server.url, "POST", "/api/models/alice/durable/commit/main", _ndjson_commit(files),
            {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {token}"},
        )
    assert status == 200, body
    assert {e.path: store.read_file("alice/durable", e.path) for e in store.list_files("alice/durable")} == files
    assert store.fsck() == [] and list((store.root / "tmp").iterdir()) == []
    store.close()
