"""A namespace's storage usage and limit over the registry's API and from the client.

``GET /api/namespaces/{namespace}/storage`` on a real registry served on 127.0.0.1 (users, tokens and an
organization made through the store's accounts, files pushed with huggingface_hub), read with requests, with
``peftkit.hub.storage`` and with ``peftkit hub storage``; the embedded hub; the Hugging Face Hub's refusal.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
import pytest

import peftkit
from peftkit.cli import run
from peftkit.hub_client import HubAuthError, HubError, HubUnreachable, InvalidRepoRef, NamespaceNotFound
from peftkit.registry import RegistryStore
from tests.hub_helpers import hub_env  # noqa: F401 - a fixture
from tests.registry_conftest_helpers import running_registry, start_cli_server

DEFAULT_QUOTA = 5_000_000  # serve --namespace-quota-gb 0.005
ALICE_BYTES = 1_370_000  # "1.37 MB"
ACME_BYTES = 2_500_000  # "2.5 MB"


@pytest.fixture
def reg(hub_env: Path):  # noqa: F811
    """alice (write token), bob (a read-only token), carol (write token); organization acme with alice as its
    member; the server's default limit of 5 MB. Yields ``(store, server, tokens, root)``."""
    root = hub_env / "reg"
    with running_registry(root, users={"alice": True, "bob": False, "carol": True}) as (store, server, tokens):
        store.quotas.default_bytes = DEFAULT_QUOTA
        store.accounts.add_org("acme", ["alice"])
        yield store, server, tokens, root


def _push(url: str, token: str, repo_id: str, size: int) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=token)
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"\x01" * size, path_in_repo="w.bin", repo_id=repo_id)


def _get(url: str, namespace: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{url}/api/namespaces/{namespace}/storage", headers=headers, timeout=60)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _files_view(usage: dict) -> dict:
    """``usage`` with the bytes of files as ``used_bytes``, after checking that the total is files plus metadata
    (what metadata costs is tested in tests/test_registry_quota_metadata.py)."""
    usage = dict(usage)
    files, metadata = usage.pop("file_bytes"), usage.pop("metadata_bytes")
    assert usage["used_bytes"] == files + metadata
    return {**usage, "used_bytes": files}


def _token_file(folder: Path, token: str, name: str = "token") -> str:
    path = folder / f"{name}.txt"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


# ------------------------------------------------------------------------------------------ the endpoint
def test_the_owner_reads_what_quota_show_reports_after_a_push(reg, capsys) -> None:
    store, server, tokens, root = reg
    assert _files_view(_get(server.url, "alice", tokens["alice"]).json()) == {
        "namespace": "alice", "used_bytes": 0, "quota_bytes": DEFAULT_QUOTA, "source": "default"}
    _push(server.url, tokens["alice"], "alice/weights", ALICE_BYTES)
    response = _get(server.url, "alice", tokens["alice"])
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    code, out, err = _cli(capsys, "registry", "quota", "show", "alice", "--json", "--data", str(root),
                          "--namespace-quota-gb", "0.005")
    assert code == 0, err
    assert [response.json()] == json.loads(out)
    assert _files_view(response.json())["used_bytes"] == ALICE_BYTES
    # the namespace as the registry spells it, whatever the case asked for; a read-only token will do
    assert _get(server.url, "ALICE", tokens["alice"]).json()["namespace"] == "alice"
    assert _files_view(_get(server.url, "bob", tokens["bob"]).json()) == {
        "namespace": "bob", "used_bytes": 0, "quota_bytes": DEFAULT_QUOTA, "source": "default"}


def test_org_members_read_the_organization_and_everyone_else_gets_the_answer_for_no_such_namespace(reg) -> None:
    store, server, tokens, _ = reg
    store.quotas.set("acme", 10_000_000)  # its own limit, over the server's default
    _push(server.url, tokens["alice"], "acme/shared", ACME_BYTES)
    _push(server.url, tokens["alice"], "alice/weights", ALICE_BYTES)
    assert _files_view(_get(server.url, "acme", tokens["alice"]).json()) == {
        "namespace": "acme", "used_bytes": ACME_BYTES, "quota_bytes": 10_000_000, "source": "namespace"}

    def refusal(namespace: str, token: str) -> tuple[int, str | None, str]:
        response = _get(server.url, namespace, token)
        message = response.json()["error"].replace(f"'{namespace}'", "'NS'")
        assert response.headers["X-Error-Message"].replace(f"'{namespace}'", "'NS'") == message
        return response.status_code, response.headers.get("X-Error-Code"), message

    # carol is no member of acme, bob's and carol's tokens are not alice's: each answer is the one for a
    # namespace that does not exist, so nobody learns whether it exists or what it stores
    for namespace, token in [("acme", "carol"), ("alice", "carol"), ("alice", "bob"), ("carol", "alice")]:
        answer = refusal(namespace, tokens[token])
        assert answer == refusal("no-such-namespace", tokens[token])
        assert answer[:2] == (404, "NamespaceNotFound")
        assert str(ACME_BYTES) not in answer[2] and str(ALICE_BYTES) not in answer[2]
    assert "your own namespace ('carol')" in refusal("acme", tokens["carol"])[2]


def test_anonymous_callers_and_unknown_tokens_get_401_saying_to_log_in(reg) -> None:
    store, server, tokens, _ = reg
    for namespace in ("alice", "acme", "no-such-namespace"):
        response = _get(server.url, namespace)
        assert response.status_code == 401
        message = response.headers["X-Error-Message"]
        assert f"log in: run `peftkit hub login --hub {server.url}`" in message, message
        assert namespace not in message
    response = _get(server.url, "alice", "pkr_notatoken_0123456789")
    assert response.status_code == 401 and "unknown to this registry or revoked" in response.headers["X-Error-Message"]
    store.accounts.revoke_token(store.accounts.list_tokens(user="alice")[0].id)
    assert _get(server.url, "alice", tokens["alice"]).status_code == 401


def test_refusals_are_decided_from_the_token_before_any_storage_query(reg) -> None:
    """With the usage counters gone from the database, the caller's own namespace fails (its answer needs
    them) while anonymous callers and other namespaces are still refused as before: no query ran for them."""
    import sqlite3

    store, server, tokens, root = reg
    with sqlite3.connect(root / "registry.db") as conn:
        conn.execute("DROP TABLE repo_storage")
    assert _get(server.url, "alice", tokens["alice"]).status_code == 500
    assert _get(server.url, "alice").status_code == 401
    assert _get(server.url, "acme", tokens["carol"]).status_code == 404


def test_odd_paths_and_names_get_clear_answers(reg) -> None:
    store, server, tokens, _ = reg
    alice = {"Authorization": f"Bearer {tokens['alice']}"}
    for namespace in ("%00", "a%2Fb", "x" * 500, "%E2%9C%93"):
        response = _get(server.url, namespace, tokens["alice"])
        assert (response.status_code, response.headers["X-Error-Code"]) == (404, "NamespaceNotFound")
    response = requests.get(f"{server.url}/api/namespaces/alice/storage/more", headers=alice)
    assert response.status_code == 404 and "no such endpoint" in response.headers["X-Error-Message"]
    response = requests.post(f"{server.url}/api/namespaces/alice/storage", headers=alice)
    assert response.status_code == 404 and "no such endpoint" in response.headers["X-Error-Message"]


def test_the_servers_default_quota_flag_is_reflected_and_a_namespaces_own_limit_beats_it(
        hub_env: Path, capsys) -> None:  # noqa: F811
    data = hub_env / "served"
    with RegistryStore(data, fsync=False) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
    proc, url, _ = start_cli_server(data, "--namespace-quota-gb", "0.005")
    try:
        assert _files_view(_get(url, "alice", token).json()) == {
            "namespace": "alice", "used_bytes": 0, "quota_bytes": DEFAULT_QUOTA, "source": "default"}
        assert _cli(capsys, "registry", "quota", "set", "alice", "2MB", "--data", str(data))[0] == 0
        assert _files_view(_get(url, "alice", token).json()) == {
            "namespace": "alice", "used_bytes": 0, "quota_bytes": 2_000_000, "source": "namespace"}
        assert _cli(capsys, "registry", "quota", "clear", "alice", "--data", str(data))[0] == 0
        assert _get(url, "alice", token).json()["source"] == "default"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_without_any_limit_the_quota_is_null(hub_env: Path) -> None:  # noqa: F811
    with running_registry(hub_env / "reg", users={"dana": True}) as (store, server, tokens):
        _push(server.url, tokens["dana"], "dana/weights", ALICE_BYTES)
        assert _files_view(_get(server.url, "dana", tokens["dana"]).json()) == {
            "namespace": "dana", "used_bytes": ALICE_BYTES, "quota_bytes": None, "source": "none"}


# ---------------------------------------------------------------------------------------- the client
def test_the_client_function_reads_ones_own_and_ones_organizations_usage(reg) -> None:
    store, server, tokens, _ = reg
    _push(server.url, tokens["alice"], "alice/weights", ALICE_BYTES)
    _push(server.url, tokens["alice"], "acme/shared", ACME_BYTES)
    mine = peftkit.hub.storage(hub=server.url, token=tokens["alice"])  # the token's user
    assert mine == store.quotas.usage(["alice"])[0]
    assert (mine.namespace, mine.file_bytes, mine.quota_bytes, mine.source) == (
        "alice", ALICE_BYTES, DEFAULT_QUOTA, "default")
    assert peftkit.hub.storage("acme", server.url, token=tokens["alice"]).file_bytes == ACME_BYTES
    with pytest.raises(NamespaceNotFound, match="namespace 'acme' not found"):
        peftkit.hub.storage("acme", server.url, token=tokens["carol"])
    with pytest.raises(HubAuthError, match="needs a token"):
        peftkit.hub.storage("alice", server.url)
    with pytest.raises(InvalidRepoRef, match="invalid namespace"):
        peftkit.hub.storage("a/b", server.url, token=tokens["alice"])


def test_the_cli_prints_usage_json_and_exit_codes(reg, capsys, tmp_path: Path) -> None:
    store, server, tokens, _ = reg
    _push(server.url, tokens["alice"], "alice/weights", ALICE_BYTES)
    store.quotas.set("acme", 10_000_000)
    _push(server.url, tokens["alice"], "acme/shared", ACME_BYTES)
    alice = _token_file(tmp_path, tokens["alice"])

    code, out, err = _cli(capsys, "hub", "storage", "--hub", server.url, "--token-file", alice)
    assert (code, out, err) == (0, "alice: 1.37 MB of 5 MB used (27%)\n", "")
    code, out, _ = _cli(capsys, "hub", "storage", "acme", "--hub", server.url, "--token-file", alice)
    assert (code, out) == (0, "acme: 2.5 MB of 10 MB used (25%)\n")
    code, out, _ = _cli(capsys, "hub", "storage", "acme", "--hub", server.url, "--token-file", alice, "--json")
    assert code == 0 and json.loads(out) == store.quotas.usage(["acme"])[0].to_json()

    code, out, err = _cli(capsys, "hub", "storage", "acme", "--hub", server.url, "--token-file",
                          _token_file(tmp_path, tokens["carol"], "carol"))
    assert code == 1 and out == "" and "namespace 'acme' not found" in err and "2.5 MB" not in err
    code, out, err = _cli(capsys, "hub", "storage", "--hub", server.url)  # not logged in
    assert code == 1 and out == "" and "peftkit hub login" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "hub", "storage", "a/b", "--hub", server.url, "--token-file", alice)
    assert code == 2 and "invalid namespace" in err
    code, _, _ = _cli(capsys, "hub", "storage", "--hub", server.url, "--no-such-option")
    assert code == 2

    store.quotas.set("alice", 1_000_000)  # below what it stores: full, and said so on stderr
    code, out, err = _cli(capsys, "hub", "storage", "--hub", server.url, "--token-file", alice)
    assert (code, out) == (0, "alice: 1.37 MB of 1 MB used (137%)\n") and "alice is full" in err
    assert f"(`peftkit hub delete alice/REPO --hub {server.url}`)" in err  # a command that runs once REPO is filled


def test_the_cli_uses_a_stored_login_and_says_no_limit(hub_env: Path, capsys) -> None:  # noqa: F811
    with running_registry(hub_env / "reg", users={"dana": True}) as (store, server, tokens):
        _push(server.url, tokens["dana"], "dana/weights", ALICE_BYTES)
        peftkit.hub.login(tokens["dana"], server.url)
        code, out, _ = _cli(capsys, "hub", "storage", "--hub", server.url)
        assert (code, out) == (0, "dana: 1.37 MB used (no limit)\n")


def test_a_registry_without_the_endpoint_is_named_as_the_problem(hub_env: Path) -> None:  # noqa: F811
    """An older registry answers 404 ``NotFound`` "no such endpoint": the client says to upgrade it, and does
    not claim the namespace is missing."""

    class OldRegistry(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b'{"error": "no such endpoint"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "NotFound")
            self.send_header("X-Error-Message", f"no such endpoint: GET {self.path}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OldRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(HubError, match="does not serve storage usage.*upgrade it") as caught:
            peftkit.hub.storage("alice", url, token="pkr_x_y")
        assert not isinstance(caught.value, NamespaceNotFound)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------ the embedded hub, the HF Hub
def test_the_embedded_hub_reads_usage_itself_without_a_limit_unless_one_was_set(
        hub_env: Path, capsys) -> None:  # noqa: F811
    folder = hub_env / "local-hub"
    with RegistryStore(folder, fsync=False) as store:
        store.create_repo("alice/weights", owner="alice")
        store.commit("alice/weights", {"w.bin": b"\x01" * ALICE_BYTES})
    hub = f"local:{folder}"
    assert _files_view(peftkit.hub.storage("alice", hub).to_json()) == {
        "namespace": "alice", "used_bytes": ALICE_BYTES, "quota_bytes": None, "source": "none"}
    assert _cli(capsys, "hub", "storage", "alice", "--hub", hub)[:2] == (0, "alice: 1.37 MB used (no limit)\n")

    assert _cli(capsys, "registry", "quota", "set", "alice", "5MB", "--data", str(folder))[0] == 0
    code, out, _ = _cli(capsys, "hub", "storage", "alice", "--hub", hub, "--json")
    assert code == 0 and _files_view(json.loads(out)) == {
        "namespace": "alice", "used_bytes": ALICE_BYTES, "quota_bytes": DEFAULT_QUOTA, "source": "namespace"}

    with pytest.raises(NamespaceNotFound, match="no namespace 'bob'"):
        peftkit.hub.storage("bob", hub)
    code, _, err = _cli(capsys, "hub", "storage", "bob", "--hub", hub)
    assert code == 1 and "no namespace 'bob'" in err
    code, _, err = _cli(capsys, "hub", "storage", "--hub", hub)  # no accounts: the namespace must be named
    assert code == 2 and "give the NAMESPACE" in err
    with pytest.raises(HubError, match="has no accounts"):
        peftkit.hub.storage(hub=hub)


@dataclass
class Listener:
    url: str
    connections: int = 0


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """A socket on 127.0.0.1 that counts each connection and drops it at once (so a client that does connect
    fails fast instead of waiting), with HF_ENDPOINT pointed at it: any request would show in the count."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    seen = Listener(f"http://127.0.0.1:{sock.getsockname()[1]}")

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed: the test is over
                return
            seen.connections += 1
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", seen.url)
    yield seen
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    thread.join(timeout=10)


def test_the_hugging_face_hub_is_refused_clearly_before_any_request(hub_env: Path, listener, capsys,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    for namespace in ("alice", None):
        with pytest.raises(HubError, match="the Hugging Face Hub .* has no API for a namespace's storage") as caught:
            peftkit.hub.storage(namespace, "hf", token="hf_notarealtoken")
        assert not isinstance(caught.value, (HubUnreachable, HubAuthError))
    code, out, err = _cli(capsys, "hub", "storage", "alice", "--hub", "hf", "--token-file",
                          _token_file(tmp_path, "hf_notarealtoken"))
    assert code == 1 and out == "" and "has no API for a namespace's storage" in err
    assert listener.connections == 0


def test_offline_mode_refuses_a_registry_before_any_request_and_not_the_embedded_hub(
        hub_env: Path, listener, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from peftkit.hub_client import OfflineError

    folder = hub_env / "local-hub"
    with RegistryStore(folder, fsync=False) as store:
        store.create_repo("alice/weights", owner="alice")
    monkeypatch.setenv("PEFTKIT_OFFLINE", "1")
    with pytest.raises(OfflineError, match="reading storage usage on .* needs the network"):
        peftkit.hub.storage("alice", listener.url, token="pkr_x_y")  # a registry's address
    assert listener.connections == 0
    assert peftkit.hub.storage("alice", f"local:{folder}").file_bytes == 0
