"""Attacks on the registry's HTTP API found in an audit, each on a real server driven by raw HTTP.

* names that end in a line break (``'alice/lora\\n'``, branch ``'main\\n'``): the shared name patterns end in
  ``$``, which matches before a final ``\\n``, so they made a second repo, branch or tag that looks exactly
  like the first.
* the POSTs anyone may send without a token (``paths-info``, ``validate-yaml``) took 16 MiB bodies, and a
  parsed JSON body takes ~30 times its size (a 15 MiB list of ``{}`` held ~400 MiB per request); and
  ``paths-info`` took any number of paths (a million cost 8 s of a worker).
* ``/api/models`` with 500 ``filter`` values or a 60,000-character ``search`` was a 500 (SQLite refuses
  expressions over 1,000 deep and LIKE patterns over 50,000 bytes): now a 400 naming the bound.
* an ``adapter_config.json`` that is not a JSON object was stored, and its card listed it in search as a
  loadable adapter: now a 400 naming the file.
* file names with a bidi override or a zero-width character (``U+202E gnp.exe`` shows as ``exe.png``) or of
  spaces only were committed and shown raw on the repo page: now a 400 naming the character.
* files 500 folders deep: one commit of 20,000 of them held the registry's write lock for a minute
  (folder checks cost depth x length per file), and each recursive listing of the repo took 80 s and
  each ``paths-info`` of its nested folders 3 minutes and 10 GiB; a commit now takes files at most
  32 folders deep, and the folder checks and ``paths-info`` cost the length of the paths.
* header values built from request or stored data: a raw backslash in a moved repo's path went into its
  ``Location`` as it was (browsers read ``\\`` in a URL as ``/``), and a file name with non-ASCII letters went
  into ``Content-Disposition``'s quoted ``filename`` as a ``\\xNN`` escape. URL headers are now
  percent-encoded and file names written as RFC 6266 says.
* commit summaries and descriptions, tag and squash messages of any length (1 MB was accepted, and every
  history listing sent it again): now at most 1,000 characters for a summary or squash message and 65,536
  for a description or tag message, else a 400 naming the bound and nothing written.
* a preupload announcing a file of 2**70 bytes was a 500 (the storage quota's size lookup overflowed the
  database's 64-bit integer): now a 400 naming the range.
* the search index kept any card or config value: a 100 KB base model, a pipeline tag with a line break and
  HTML, 1,000 datasets, a 1,000-character method went into the facets, tags and every search result. The
  commit still lands and the card keeps them, but only values that can be names are indexed.
"""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401


def _request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON reply) of one request from a real HTTP client."""
    reply = requests.request(method, url + path, data=body, headers=headers, timeout=120, allow_redirects=False)
    return reply.status_code, reply.json()


@pytest.fixture
def registry(tmp_path: Path):
    with running_registry(tmp_path / "reg", users={"alice": True}) as (store, server, tokens):
        store.create_repo("alice/lora", owner="alice")
        store.commit("alice/lora", {"adapter_config.json": b"{}"})
        yield store, server.url, {"Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/json"}


def test_names_ending_in_a_line_break_are_refused(registry) -> None:
    store, url, auth = registry
    status, body = _request(url, "POST", "/api/repos/create", json.dumps({"name": "lora\n"}).encode(), auth)
    assert status == 400 and "control character" in body["error"]
    status, body = _request(url, "GET", "/api/models/alice/lora%0A")
    assert status == 400 and "control character" in body["error"]
    for what, path, data in [
        ("branch", "/api/models/alice/lora/branch/" + quote("main\n", safe=""), {}),
        ("tag", "/api/models/alice/lora/tag/main", {"tag": "v1\n"}),
    ]:
        status, body = _request(url, "POST", path, json.dumps(data).encode(), auth)
        assert status == 400 and "control character" in body["error"], what
    assert [info.repo_id for info in store.search()] == ["alice/lora"]
    assert list(store.list_branches("alice/lora")) == ["main"] and store.list_tags("alice/lora") == {}


def test_anonymous_posts_are_small_and_paths_info_is_bounded(registry) -> None:
    store, url, _ = registry
    body = json.dumps({"paths": [{}] * (3 * 1024 * 1024 // 3)}).encode()  # 3 MiB of empty objects
    for path in ["/api/models/alice/lora/paths-info/main", "/api/validate-yaml"]:
        status, reply = _request(url, "POST", path, body, {"Content-Type": "application/json"})
        assert status == 413 and "send less in one request" in reply["error"], path
    paths = "&".join(f"paths=p{i}" for i in range(20_001)).encode()
    status, reply = _request(url, "POST", "/api/models/alice/lora/paths-info/main", paths,
                                {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413 and "at most 20000 per request" in reply["error"]
    status, reply = _request(url, "POST", "/api/models/alice/lora/paths-info/main", paths[:-1000],
                                {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and reply == []


def test_searches_with_unbounded_filters_or_text_get_a_400(registry) -> None:
    _, url, _ = registry
    many = "&".join(f"filter=tag{i}" for i in range(500))
    status, body = _request(url, "GET", f"/api/models?{many}")
    assert status == 400 and "at most 32 can be combined" in body["error"]
    status, body = _request(url, "GET", "/api/models?search=" + "a" * 60_000)
    assert status == 400 and "at most 1000 are searched" in body["error"]
    status, body = _request(url, "GET", "/api/models?search=lora&" + "&".join(f"filter=t{i}" for i in range(32)))
    assert status == 200 and body == []


def _commit(url: str, auth: dict, files: dict[str, bytes]):
    lines = [{"key": "header", "value": {"summary": "deep"}}]
    lines += [{"key": "file", "value": {"path": p, "content": base64.b64encode(c).decode()}} for p, c in files.items()]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    return _request(url, "POST", "/api/models/alice/lora/commit/main", body,
                    {**auth, "Content-Type": "application/x-ndjson"})


def test_an_adapter_config_that_no_library_can_read_is_refused(registry) -> None:
    """A broken adapter_config.json was stored and its card indexed it as a loadable adapter (search listed it,
    every load failed); the commit is now refused whole, naming the file."""
    store, url, auth = registry
    head = store.resolve_revision("alice/lora")
    for content, words in ((b'{"peft_type": "LORA", "r": ', "is not valid JSON"), (b"[1, 2]", "holds a JSON list"),
                           (b"\xff\xfe", "is not valid JSON"), (b"[" * 100_000, "is not valid JSON"),
                           (b" " * (16 * 2**20 + 1), "at most 16 MiB")):
        for path in ("adapter_config.json", "members/a/adapter_config.json"):
            status, body = _commit(url, auth, {path: content, "README.md": b"---\ntags: [lora]\n---\n"})
            assert status == 400 and words in body["error"] and path in body["error"], (path, body)
    assert store.resolve_revision("alice/lora") == head  # nothing committed
    status, body = _commit(url, auth, {"notes/adapter_config.json.txt": b"not json", "x.json": b"{"})  # other names
    assert status == 200, body


def test_file_names_that_read_as_other_names_are_refused(registry) -> None:
    """A bidi override or a zero-width character makes 'U+202E gnp.exe' show as 'exe.png' on the repo page; a
    name of spaces only shows as nothing. A commit adding one is refused whole, naming the character."""
    store, url, auth = registry
    head = store.resolve_revision("alice/lora")
    for path, words in (("\u202egnp.exe", "U+202E"), ("docs/\u200bREADME.md", "U+200B"), ("a/ /b.txt", "spaces only"),
                        ("  ", "spaces only")):
        status, body = _commit(url, auth, {path: b"x", "fine.txt": b"y"})
        assert status == 400 and words in body["error"], (path, body)
    assert store.resolve_revision("alice/lora") == head  # nothing committed
    status, body = _commit(url, auth, {"caf\u00e9/\u65e5\u672c.txt": b"x"})  # letters of any script are names
    assert status == 200, body


def test_files_too_deep_are_refused_and_nested_folders_are_listed_once(registry) -> None:
    store, url, auth = registry
    head = store.resolve_revision("alice/lora")
    status, body = _commit(url, auth, {"/".join(["d"] * 33) + "/f": b"x"})
    assert status == 400 and "at most 32 folders deep" in body["error"]
    assert store.resolve_revision("alice/lora") == head  # nothing committed
    folders = ["/".join([f"d{k}" for k in range(depth)]) for depth in range(1, 33)]
    files = {f"{folders[-1]}/f{i}": b"%d" % i for i in range(300)} | {f"{folders[3]}/g": b"g"}
    status, body = _commit(url, auth, files)
    assert status == 200, body
    asked = "&".join(f"paths={quote(p)}" for p in [*folders, "nothing/here", f"{folders[3]}/g"]).encode()
    status, body = _request(url, "POST", "/api/models/alice/lora/paths-info/main", asked,
                               {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    listed = body
    assert [e["path"] for e in listed] == [f"{folders[3]}/g", *folders]
    assert all(e["type"] == "directory" for e in listed[1:]) and len({e["oid"] for e in listed}) == 33
    status, body = _request(url, "GET", "/api/models/alice/lora/tree/main?recursive=true")
    tree = {e["path"]: e for e in body}
    assert set(tree) == {"adapter_config.json", *files, *folders}
    assert all(tree[f]["oid"] == e["oid"] for f, e in zip(folders, listed[1:]))  # paths-info and tree agree


def _raw_get(url: str, target: str) -> tuple[int, http.client.HTTPMessage]:
    """(status, headers) of a GET of ``target`` sent as it is: http.client, unlike requests, does not
    percent-encode a backslash in the path."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", target)
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.headers
    finally:
        conn.close()


def _no_backslash_or_control(value: str) -> bool:
    return "\\" not in value and value.isascii() and value.isprintable()


def test_header_values_from_request_and_stored_data_are_escaped_for_their_header(tmp_path: Path) -> None:
    from peftkit.registry import ApiConfig

    svg, odd, other = "café.svg", "dé/x y\u0085.txt", "dé/z.txt"
    with running_registry(tmp_path / "reg", config=ApiConfig(tree_page_size=1)) as (store, server, _):
        store.create_repo("alice/old", owner="alice")
        store.commit("alice/old", {svg: b"<svg/>", odd: b"1", other: b"2"})
        store.move_repo("alice/old", "alice/new")
        url = server.url
        # Redirects of a moved repo (API, /resolve/ and web page) keep the path, percent-encoded.
        for target, expected in [
            ("/alice/old/resolve/main/\\evil.example/x", "/alice/new/resolve/main/%5Cevil.example/x"),
            ("/api/models/alice/old/tree/main/\\x?q=%C3%A9%0D%0A%5C", "/api/models/alice/new/tree/main/%5Cx?q="),
            ('/alice/old/tree/main/x"<y>', "/alice/new/tree/main/x%22%3Cy%3E"),
        ]:
            status, headers = _raw_get(url, target)
            assert status == 307 and headers["Location"].startswith(expected), (target, headers["Location"])
            assert _no_backslash_or_control(headers["Location"]), headers["Location"]
        assert _raw_get(url, "/api/models/alice/old?q=%C3%A9%0D%0A%5C")[1]["Location"] == (
            "/api/models/alice/new?q=%C3%A9%0D%0A%5C")
        # HEAD of a branch redirects to its commit: a name with a non-ASCII letter, a space and a C1 control.
        reply = requests.head(f"{url}/alice/new/resolve/main/{quote(odd)}", timeout=60)
        assert reply.status_code == 307 and reply.headers["Location"].endswith("/d%C3%A9/x%20y%C2%85.txt")
        # An active file is an attachment: an ASCII name, and the exact one as RFC 5987's filename*.
        reply = requests.get(f"{url}/alice/new/resolve/main/{quote(svg)}", timeout=60)
        assert reply.status_code == 200
        assert reply.headers["Content-Disposition"] == (
            "attachment; filename=\"caf_.svg\"; filename*=UTF-8''caf%C3%A9.svg")
        # The pagination Link of a listing under a non-ASCII folder, asked with a non-ASCII query.
        asked = quote("é\\")  # a non-ASCII letter and a backslash
        reply = requests.get(f"{url}/api/models/alice/new/tree/main/{quote('dé')}?x={asked}", timeout=60)
        assert reply.status_code == 200 and len(reply.json()) == 1
        link = reply.headers["Link"]
        assert _no_backslash_or_control(link) and "/tree/main/d%C3%A9?" in link and "x=%C3%A9%5C" in link
        assert requests.get(reply.links["next"]["url"], timeout=60).json()[0]["path"] == other


def test_commit_and_tag_messages_are_bounded(registry, hf_online) -> None:  # noqa: F811
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    store, url, auth = registry
    api = HfApi(endpoint=url, token=auth["Authorization"].split()[1])
    head, tags = store.resolve_revision("alice/lora"), store.list_tags("alice/lora")

    def commit(summary: str, description: str = "") -> None:
        api.create_commit("alice/lora", operations=[CommitOperationAdd("f.txt", summary[:9].encode())],
                          commit_message=summary, commit_description=description)

    for summary, description, bound in [("s" * 1_001, "", "at most 1,000"), ("s", "d" * 65_537, "at most 65,536"),
                                        ("s" * 1_000_000, "d" * 1_000_000, "at most 1,000")]:
        with pytest.raises(HfHubHTTPError, match=bound) as refused:
            commit(summary, description)
        assert refused.value.response.status_code == 400
    with pytest.raises(HfHubHTTPError, match="the tag message is 65,537 characters long; .* at most 65,536"):
        api.create_tag("alice/lora", tag="v1", tag_message="t" * 65_537)
    with pytest.raises(HfHubHTTPError, match="the super-squash message is 1,001 characters long; .* at most 1,000"):
        api.super_squash_history("alice/lora", commit_message="q" * 1_001)
    assert store.resolve_revision("alice/lora") == head and store.list_tags("alice/lora") == tags  # nothing written
    commit("s" * 1_000, "d" * 65_536)  # the bounds themselves are accepted
    api.create_tag("alice/lora", tag="v1", tag_message="t" * 65_536)
    api.super_squash_history("alice/lora", commit_message="q" * 1_000)
    history = store.list_commits("alice/lora")
    assert len(history) == 1 and history[0].message == "q" * 1_000


def test_the_search_index_keeps_only_values_that_can_be_names(registry, hf_online) -> None:  # noqa: F811
    from huggingface_hub import CommitOperationAdd, HfApi

    store, url, auth = registry
    api = HfApi(endpoint=url, token=auth["Authorization"].split()[1])
    real = "meta-llama/Llama-3.2-1B"
    front = {"base_model": ["b" * 100_000, real, "two\nlines"], "pipeline_tag": "text-generation\n<b>bold</b>",
             "library_name": "l" * 201, "tags": ["fine-tag", "t" * 201, "tab\there", "nel\u0085", "c++", "日本語"],
             "datasets": [f"d{i}" for i in range(1000)], "license": "x" * 1_000, "language": ["en", "fr\r"]}
    config = {"peft_type": "L" * 1000, "task_type": "CAUSAL_LM", "base_model_name_or_path": "c" * 300, "r": 8}
    api.create_repo("alice/odd-card")
    card = "---\n" + json.dumps(front) + "\n---\n\nAn odd card.\n"
    api.create_commit("alice/odd-card", commit_message="odd", operations=[  # the commit lands
        CommitOperationAdd("README.md", card.encode()), CommitOperationAdd("adapter_config.json",
                                                                           json.dumps(config).encode())])
    info = api.model_info("alice/odd-card")
    assert info.card_data["base_model"][0] == "b" * 100_000  # the card is the author's, kept whole
    # the config's task; a peft_type PEFT does not have is indexed as peftkit's, whatever the card says
    assert info.pipeline_tag == "text-generation" and info.library_name == "peftkit"
    assert all(len(tag) <= 250 and tag.isprintable() for tag in info.tags), [t[:40] for t in info.tags]
    assert {"fine-tag", "c++", "日本語", "en", f"base_model:adapter:{real}", "dataset:d0"} <= set(info.tags)
    assert not any(t.startswith(("license:", "text-generation\n")) or t.startswith("l" * 50) for t in info.tags)
    indexed = store.repo_info("alice/odd-card")
    assert indexed.base_models == (real,) and indexed.methods == () and len(indexed.datasets) == 256
    # Search by a real base model still finds it; the long values find nothing.
    for query in [{"base_model": real}, {"filter": f"base_model:adapter:{real}"}, {"filter": "fine-tag"}]:
        reply = requests.get(f"{url}/api/models", params=query, timeout=60)
        assert [m["id"] for m in reply.json()] == ["alice/odd-card"], query
    assert [m.id for m in api.list_models(filter=f"base_model:adapter:{real}")] == ["alice/odd-card"]
    for query in [{"base_model": "b" * 200}, {"filter": "t" * 201}, {"filter": "license:" + "x" * 100}]:
        assert requests.get(f"{url}/api/models", params=query, timeout=60).json() == [], query


def test_a_preupload_announcing_an_impossible_size_gets_a_400(registry) -> None:
    _, url, auth = registry
    for size in (2**70, 2**63, -1, True, 1.5):
        data = {"files": [{"path": "big.bin", "size": size, "sample": ""}]}
        status, body = _request(url, "POST", "/api/models/alice/lora/preupload/main", json.dumps(data).encode(), auth)
        assert status == 400 and "must be an integer from 0 to 9223372036854775807" in body["error"], size
    data = {"files": [{"path": "big.bin", "size": 2**63 - 1, "sample": ""}]}
    status, body = _request(url, "POST", "/api/models/alice/lora/preupload/main", json.dumps(data).encode(), auth)
    assert status == 200 and body["files"][0]["path"] == "big.bin"


def test_a_repo_holds_a_bounded_number_of_branches_and_tags(registry, hf_online, monkeypatch) -> None:  # noqa: F811
    """The refs listing and the adapter page read all of a repo's branches and tags: a writer creating them
    without end made every such read slower. Past ``max_repo_refs`` (branches and tags together) a new one
    is refused with 413 and nothing is written; deleting one makes room."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    store, url, auth = registry
    monkeypatch.setattr(store, "max_repo_refs", 3)  # the server's own store: 1,000 unless changed
    api = HfApi(endpoint=url, token=auth["Authorization"].split()[1])
    api.create_branch("alice/lora", branch="dev")
    api.create_tag("alice/lora", tag="v1")  # main, dev, v1: full
    for create in (lambda: api.create_branch("alice/lora", branch="more"),
                   lambda: api.create_tag("alice/lora", tag="v2")):
        with pytest.raises(HfHubHTTPError, match=r"'alice/lora' holds 3 branches and tags, the most a repo may hold"
                                                 r" .*delete branches or tags you no longer need first") as refused:
            create()
        assert refused.value.response.status_code == 413
    refs = api.list_repo_refs("alice/lora")
    assert sorted(b.name for b in refs.branches) == ["dev", "main"] and [t.name for t in refs.tags] == ["v1"]
    api.delete_branch("alice/lora", branch="dev")
    api.create_tag("alice/lora", tag="v2")  # room again
