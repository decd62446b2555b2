"""One promise on every hub backend: ``push(..., private=True)`` that creates the repo makes a private repo.

Checked from outside the client that pushed, over HTTP from a registry server on 127.0.0.1: anonymous
callers and another user get 404 ``RepoNotFound``, exactly as for a repo that does not exist. The embedded
hub's store is served for that check; the Hugging Face path (``hub="hf"``) runs against a registry behind a
relay that keeps the requests huggingface_hub sends, so the create-repo request itself is checked too.
A public push is checked the same way, so the check can tell the two apart.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest

import peftkit
from peftkit.hub_client import api as hub
from tests.hub_helpers import hub_env, tiny_base  # noqa: F401 - fixture
from tests.registry_conftest_helpers import running_registry

USERS = {"alice": True, "bob": True}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    peftkit.adapt(tiny_base(), "lora[r=2]").save_adapter(str(folder))
    return folder


def _status(url: str, path: str, token: str | None = None) -> tuple[int, str | None]:
    """A GET from outside the pushing client: the status and the X-Error-Code."""
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Error-Code")


def assert_visibility(url: str, repo_id: str, tokens: dict[str, str], *, private: bool) -> None:
    """The owner reads ``repo_id``; anonymous and bob read it only when it is public."""
    paths = (f"/api/models/{repo_id}", f"/{repo_id}/resolve/main/adapter_config.json")
    for path in paths:
        assert _status(url, path, tokens["alice"]) == (200, None)
        for outsider in (None, tokens["bob"]):
            assert _status(url, path, outsider) == ((404, "RepoNotFound") if private else (200, None)), path
    with urllib.request.urlopen(urllib.request.Request(url + f"/api/models/{repo_id}", headers={
            "Authorization": f"Bearer {tokens['alice']}"}), timeout=30) as response:
        assert json.load(response)["private"] is private


class _Relay(BaseHTTPRequestHandler):
    """Passes each request on to the registry unchanged and keeps (method, path, body) of each."""

    upstream: str
    seen: list[tuple[str, str, bytes]]

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._body()
        self.seen.append((self.command, self.path, body))
        target = urlsplit(self.upstream)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length",
                                                                               "connection")}
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            connection.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                               headers=headers)
            answer = connection.getresponse()
            data = answer.read()
        finally:
            connection.close()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                self.send_header(key, value)
        length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _relay

    def log_message(self, *args: object) -> None:  # quiet
        pass


@contextmanager
def relay_to(upstream: str) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A relay on 127.0.0.1 in front of ``upstream``; yields its URL and the requests it passed on."""
    seen: list[tuple[str, str, bytes]] = []
    handler = type("Relay", (_Relay,), {"upstream": upstream, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_embedded_hub_creates_a_private_repo(hub_env: Path, adapter: Path) -> None:  # noqa: F811
    folder = hub_env / "embedded"
    assert hub.push(adapter, "alice/secret", hub=f"local:{folder}", private=True, progress=False).created
    assert hub.push(adapter, "alice/open", hub=f"local:{folder}", progress=False).created
    # Outside the client: the same store, served to other people by a registry.
    with running_registry(folder, users=USERS) as (store, server, tokens):
        assert [r.repo_id for r in store.search(visible_to=())] == ["alice/open"]
        assert_visibility(server.url, "alice/secret", tokens, private=True)
        assert_visibility(server.url, "alice/open", tokens, private=False)


def test_a_registry_server_creates_a_private_repo(hub_env: Path, adapter: Path) -> None:  # noqa: F811
    with running_registry(hub_env / "registry", users=USERS) as (store, server, tokens):
        for repo_id, private in (("alice/secret", True), ("alice/open", None)):
            assert hub.push(adapter, repo_id, hub=server.url, token=tokens["alice"], private=private,
                            progress=False).created
        assert store.repo_info("alice/secret").private and not store.repo_info("alice/open").private
        assert_visibility(server.url, "alice/secret", tokens, private=True)
        assert_visibility(server.url, "alice/open", tokens, private=False)


def test_the_hugging_face_path_asks_for_a_private_repo(hub_env: Path, adapter: Path,  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface.co cannot be reached from the tests; HF_ENDPOINT points the `hf` hub at a registry, through
    a relay that keeps what huggingface_hub sent."""
    with running_registry(hub_env / "registry", users=USERS) as (store, server, tokens), \
            relay_to(server.url) as (relay, seen):
        monkeypatch.setenv("HF_ENDPOINT", relay)
        monkeypatch.setenv("HF_TOKEN", tokens["alice"])
        assert hub.push(adapter, "alice/secret", hub="hf", private=True, progress=False).created
        assert hub.push(adapter, "alice/open", hub="hf", progress=False).created
        creates = [json.loads(body) for method, path, body in seen if (method, path) == ("POST", "/api/repos/create")]
        assert [c["name"] for c in creates] == ["secret", "open"]
        asked_private = [c.get("private") is True or c.get("visibility") == "private" for c in creates]
        assert asked_private == [True, False]
        assert_visibility(server.url, "alice/secret", tokens, private=True)
        assert_visibility(server.url, "alice/open", tokens, private=False)
