"""The registry's HTTP stack against hostile clients: a real server on 127.0.0.1, raw sockets and huggingface_hub.

Every limit here is set short (ServerOptions) so the tests finish in seconds;
nothing asserts a timing: "at once" means "before a timeout far longer than
the server needs", and waits poll a condition with a generous deadline.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401

from peftkit.registry import ApiConfig, RegistryStore, RunningServer, ServerOptions, start_server
from peftkit.registry.asgi_app import escape_log

pytest.importorskip("uvicorn")

COMMITS_AT_START = 2  # the repo's creation and the fixture's commit
FAST = ServerOptions(header_timeout_s=1.0, body_read_timeout_s=1.0, request_timeout_s=3.0, keep_alive_s=5.0)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[RegistryStore, RunningServer, dict[str, str], list[str]]]:
    """A store with users alice (write), bob (write), carol (read-only) and alice/model; served with FAST limits."""
    store = RegistryStore(tmp_path / "reg", fsync=False)
    tokens = {}
    for user, write in (("alice", True), ("bob", True), ("carol", False)):
        store.accounts.add_user(user)
        tokens[user] = store.accounts.create_token(user, write=write)[1]
    store.create_repo("alice/model")
    store.commit("alice/model", {"README.md": b"hello", "adapter_config.json": b'{"peft_type": "LORA"}'})
    assert len(store.list_commits("alice/model")) == COMMITS_AT_START
    log: list[str] = []
    server = start_server(store, log=log.append, options=FAST)
    try:
        yield store, server, tokens, log
    finally:
        server.close()
        store.close()


def _port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _connect(server: RunningServer, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(server)), timeout=timeout)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from ``sock`` (status, lower-cased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _request(server: RunningServer, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    with _connect(server) as sock:
        sock.sendall(head.encode("latin-1") + body)
        return _read_response(sock)


def _closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes ``sock`` (reads until EOF, ignoring any final error reply)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _spool_files(store: RegistryStore) -> list[str]:
    """Files in the blob tmp folder, and open descriptors of this process on (deleted) files there."""
    tmp = str(store.blobs.tmp_dir)
    found = [p.name for p in store.blobs.tmp_dir.iterdir()]
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tmp):
            found.append(target)
    return found


def _ok(server: RunningServer) -> bool:
    status, _, body = _request(server, "GET /api/models/alice/model HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return status == 200 and json.loads(body)["id"] == "alice/model"


# ------------------------------------------------------------ auth before body
@pytest.mark.parametrize(
    ("user", "method", "path", "status"),
    [
        (None, "POST", "/api/models/alice/model/commit/main", 401),
        ("bob", "POST", "/api/models/alice/model/commit/main", 403),  # not bob's namespace
        ("carol", "POST", "/api/models/carol/x/preupload/main", 404),  # no such repo: same as dispatch
        ("carol", "POST", "/api/repos/create", 403),  # read-only token
        (None, "PUT", "/api/models/alice/model/settings", 401),
        ("bob", "DELETE", "/api/repos/delete", None),  # allowed from the headers: the body names the repo
    ],
)
def test_write_refused_from_headers_before_any_body(hub, user, method, path, status) -> None:
    store, server, tokens, _ = hub
    auth = f"Authorization: Bearer {tokens[user]}\r\n" if user else ""
    length = 10_000_000_000 if status else 100  # (a body this large would be refused for its size)
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {length}\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(head.encode())
        if status is None:  # the server waits for the body (then drops us at the body timeout)
            sock.settimeout(0.3)
            with pytest.raises(socket.timeout):
                sock.recv(1)
            return
        got, headers, _ = _read_response(sock)  # no body was sent: an answer means none was awaited
        assert got == status
        assert headers["connection"] == "close"  # the 10 GB that would follow are not read
        assert _closed_by_server(sock)
    assert _spool_files(store) == []
    assert _ok(server)


def test_refused_small_body_cannot_hold_the_connection(hub) -> None:
    _, server, _, _ = hub
    with _connect(server) as sock:
        sock.sendall(b"POST /api/repos/create HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{\"name\"")
        status, headers, _ = _read_response(sock)
        assert status == 401 and headers.get("connection") != "close"  # the small rest would be dropped...
        closed = False
        for _ in range(30):  # ...but it trickles: the connection is closed at the deadline all the same
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if _closed_by_server(sock, timeout=0.3):
                closed = True
                break
        assert closed
    assert _ok(server)


def test_connection_stays_usable_after_a_refusal(hub) -> None:
    store, server, tokens, _ = hub
    body = json.dumps({"name": "kept"}).encode()
    with _connect(server) as sock:
        sock.sendall("POST /api/repos/create HTTP/1.1\r\n"
                     f"Host: localhost\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        assert _read_response(sock)[0] == 401  # answered before the body...
        sock.sendall(body)  # ...which then arrives and is dropped
        # The next request on the same connection sends its body slowly, past the header deadline.
        sock.sendall(("POST /api/repos/create HTTP/1.1\r\n"
                      f"Host: localhost\r\nAuthorization: Bearer {tokens['alice']}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode())
        for i in range(0, len(body), 4):
            time.sleep(0.3)
            sock.sendall(body[i:i + 4])
        status, _, reply = _read_response(sock)
        assert status == 200 and json.loads(reply)["name"] == "alice/kept"


def test_oversized_body_refused_from_content_length(hub) -> None:
    store, server, tokens, _ = hub
    head = (f"POST /api/models/alice/model/commit/main HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {tokens['alice']}\r\nContent-Length: 10000000000\r\n\r\n")
    status, headers, body = _request(server, head)
    assert status == 413 and "--max-upload-mb" in json.loads(body)["error"]
    assert _spool_files(store) == []


# ------------------------------------------------------------- connections
def test_idle_and_slowloris_connections_do_not_block_others_and_are_dropped(hub) -> None:
    store, server, tokens, _ = hub
    idle = [_connect(server) for _ in range(1000)]
    slow = []
    for _ in range(20):
        s = _connect(server)
        s.sendall(b"GET /api/models/alice/model HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        slow.append(s)
    try:
        for _round in range(3):  # keep trickling header bytes while others are served
            for s in slow:
                s.sendall(b"a")
            assert _ok(server)
        # Every idle and slowloris connection is dropped at the header deadline.
        assert all(_closed_by_server(s) for s in slow)
        assert all(_closed_by_server(s) for s in idle)
        assert _ok(server)
    finally:
        for s in idle + slow:
            s.close()


def test_oversized_headers_get_431(hub) -> None:
    _, server, _, _ = hub
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        try:
            for _ in range(200):
                sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            status, _, _ = _read_response(sock)
            assert status == 431
        except (ConnectionError, ConnectionResetError):
            pass  # reset while we were still sending: the connection was dropped all the same
    assert _ok(server)


def test_stalled_and_trickled_bodies_get_408_and_leave_nothing(hub) -> None:
    store, server, tokens, _ = hub
    head = (f"POST /api/models/alice/model/commit/main HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {tokens['alice']}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: 1000000\r\n\r\n")
    with _connect(server) as sock:  # stalls after a few bytes: the per-read timeout
        sock.sendall(head.encode() + b'{"key": "header", ')
        status, headers, body = _read_response(sock)
        assert status == 408 and headers["connection"] == "close"
    with _connect(server) as sock:  # keeps sending, too slowly: the whole-request deadline
        sock.sendall(head.encode())
        sock.settimeout(0.3)
        status = None
        for _ in range(100):
            try:
                sock.sendall(b"x")
                status, _, _ = _read_response(sock)
                break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert status == 408
    assert _wait_for(lambda: _spool_files(store) == [])
    assert len(store.list_commits("alice/model")) == COMMITS_AT_START


def test_aborted_upload_is_spooled_to_disk_and_removed_at_once(hub) -> None:
    store, server, tokens, _ = hub
    head = (f"POST /api/models/alice/model/commit/main HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {tokens['alice']}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {8 * 1024 * 1024}\r\n\r\n")
    sock = _connect(server)
    sock.sendall(head.encode() + b"x" * (2 * 1024 * 1024))
    # Past a small in-memory buffer the body goes to an anonymous file in the blob tmp folder...
    assert _wait_for(lambda: _spool_files(store) != [])
    sock.close()  # ...and the client goes away mid-body: the spool goes with it.
    assert _wait_for(lambda: _spool_files(store) == [])
    assert len(store.list_commits("alice/model")) == COMMITS_AT_START
    assert _ok(server)


def test_refused_commit_leaves_no_staged_upload(hub) -> None:
    import base64

    store, server, tokens, _ = hub
    head = store.resolve_revision("alice/model")
    content = base64.b64encode(os.urandom(512 * 1024)).decode()
    file_line = {"key": "file", "value": {"path": "big.bin", "content": content, "encoding": "base64"}}
    bodies = [  # each stages big.bin, then is refused
        [{"key": "header", "value": {"summary": "x"}}, file_line, "not json"],
        [{"key": "header", "value": {"summary": "x", "parentCommit": "0" * 40}}, file_line],
    ]
    for lines in bodies:
        body = b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)
        status, _, _ = _request(server, (
            f"POST /api/models/alice/model/commit/main HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {tokens['alice']}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"), body)
        assert status in (400, 412)
        assert _spool_files(store) == []  # at once: the reply comes after the clean-up
    assert store.resolve_revision("alice/model") == head


# ------------------------------------------------------------ content safety
def test_uploaded_active_content_is_served_inert(hub, hf_online) -> None:  # noqa: F811
    from huggingface_hub import HfApi

    store, server, tokens, _ = hub
    api = HfApi(endpoint=server.url, token=tokens["alice"])
    script = b"<script>alert(document.cookie)</script>"
    api.upload_file(path_or_fileobj=b"<html><body>" + script + b"</body></html>", path_in_repo="x.html",
                    repo_id="alice/model")
    api.upload_file(path_or_fileobj=b'<svg xmlns="http://www.w3.org/2000/svg">' + script + b"</svg>",
                    path_in_repo="img/x.svg", repo_id="alice/model")
    for name in ("x.html", "img/x.svg"):
        status, headers, body = _request(server, f"GET /alice/model/resolve/main/{name} HTTP/1.1\r\n"
                                                 "Host: localhost\r\n\r\n")
        assert status == 200 and script in body
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["content-disposition"].startswith("attachment")
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["content-security-policy"] == "default-src 'none'; sandbox"
    status, headers, _ = _request(server, "GET /alice/model/resolve/main/adapter_config.json HTTP/1.1\r\n"
                                          "Host: localhost\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff" and "sandbox" in headers["content-security-policy"]
    for head in ("HEAD /alice/model/resolve/main/x.html", "GET /alice/model/resolve/main/missing.html"):
        status, headers, _ = _request(server, f"{head} HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status in (307, 404) and headers["content-security-policy"] == "default-src 'none'; sandbox"


# ------------------------------------------------------------------ proxies
def test_forged_host_and_forwarded_headers_do_not_steer_links(hub) -> None:
    store, server, tokens, log = hub
    for i in range(3):
        store.create_repo(f"alice/m{i}")
    # An address that is not the one reached (a name that is not this server's gets a 421, see below).
    forged = "Host: 203.0.113.7\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
    status, headers, _ = _request(server, f"GET /api/models?limit=2&author=alice HTTP/1.1\r\n{forged}\r\n")
    assert status == 200 and headers["link"].startswith(f"<{server.url}/api/models?")  # the address we reached
    status, headers, _ = _request(server, f"HEAD /alice/model/resolve/main/README.md HTTP/1.1\r\n{forged}\r\n")
    assert status == 307 and headers["location"].startswith("/alice/model/resolve/")
    auth = f"Authorization: Bearer {tokens['alice']}\r\n"
    body = json.dumps({"name": "made"}).encode()
    status, _, reply = _request(
        server, f"POST /api/repos/create HTTP/1.1\r\n{forged}{auth}Content-Length: {len(body)}\r\n\r\n", body)
    assert status == 200 and json.loads(reply)["url"] == f"{server.url}/alice/made"
    # The address actually reached, or localhost on a loopback connection, is accepted as the Host.
    port = _port(server)
    status, headers, _ = _request(server, "GET /api/models?limit=2&author=alice HTTP/1.1\r\n"
                                          f"Host: localhost:{port}\r\n\r\n")
    assert headers["link"].startswith(f"<http://localhost:{port}/api/models?")
    # X-Forwarded-For is not believed from an untrusted peer.
    _request(server, "GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
    assert _wait_for(lambda: any('"GET /api/health"' in line for line in log))
    assert [line.split()[0] for line in log if '"GET /api/health"' in line] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("LocalHost:8080", "http://localhost:8080"),
        (None, "http://127.0.0.1:8080"),
        ("evil.example:8080", "http://127.0.0.1:8080"),
        ("127.0.0.1:8080/evil", "http://127.0.0.1:8080"),
        ("127.0.0.1:8080@evil.example", "http://127.0.0.1:8080"),
        ("127.0.0.1:9999", "http://127.0.0.1:8080"),
        ("x" * 5000, "http://127.0.0.1:8080"),
    ],
)
def test_links_use_the_host_header_only_when_it_names_the_connection(host, expected) -> None:
    from peftkit.registry.origin import base_url

    assert base_url(public_url=None, scheme="http", local=("127.0.0.1", 8080), host_header=host) == expected


@pytest.mark.parametrize(
    ("public_url", "host", "expected"),
    [
        # The public URL's host (through the proxy: its path prefix is the server's only knowledge of it).
        ("https://hub.example.com/hub", "hub.example.com", "https://hub.example.com/hub"),
        ("https://hub.example.com/hub", "HUB.example.com.:443", "https://hub.example.com/hub"),
        # The server's own address, localhost on loopback and an exact --allowed-host name, at its port.
        ("https://hub.example.com/hub", "127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://hub.example.com/hub", "localhost:8080", "http://localhost:8080"),
        ("https://hub.example.com/hub", "registry.internal:8080", "http://registry.internal:8080"),
        (None, "REGISTRY.internal.:8080", "http://registry.internal:8080"),
        (None, "registry.internal:8080", "http://registry.internal:8080"),
        # Anything else: the public URL, or without one the connection's address.
        ("https://hub.example.com/hub", "registry.internal:9999", "https://hub.example.com/hub"),
        ("https://hub.example.com/hub", "registry.internal", "https://hub.example.com/hub"),
        ("https://hub.example.com/hub", "a.corp.example:8080", "https://hub.example.com/hub"),
        ("https://hub.example.com/hub", "registry.internal:8080@evil.example", "https://hub.example.com/hub"),
        ("https://hub.example.com/hub", None, "https://hub.example.com/hub"),
        (None, "a.corp.example:8080", "http://127.0.0.1:8080"),
        (None, "registry.internal:9999", "http://127.0.0.1:8080"),
        (None, "registry.internal.evil.example:8080", "http://127.0.0.1:8080"),
    ],
)
def test_links_name_the_address_the_client_used_where_the_server_vouches_for_it(public_url, host, expected) -> None:
    from peftkit.registry.origin import base_url

    assert base_url(public_url=public_url, scheme="http", local=("127.0.0.1", 8080), host_header=host,
                    allowed_names=frozenset({"registry.internal"})) == expected


def test_public_url_and_trusted_proxy(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path / "reg", fsync=False)
    store.create_repo("alice/model")
    store.commit("alice/model", {"README.md": b"hi"})
    log: list[str] = []
    options = ServerOptions(trusted_proxies=("127.0.0.1",))
    config = ApiConfig(public_url="https://hub.example.com", list_page_size=1)
    try:
        with start_server(store, config=config, log=log.append, options=options) as server:
            store.create_repo("alice/other")
            head = "Host: hub.example.com\r\nX-Forwarded-For: 198.51.100.1, 203.0.113.9\r\n"
            status, headers, _ = _request(server, f"GET /api/models HTTP/1.1\r\n{head}\r\n")
            assert headers["link"].startswith("<https://hub.example.com/api/models?")
            status, headers, _ = _request(server, f"HEAD /alice/model/resolve/main/README.md HTTP/1.1\r\n{head}\r\n")
            assert headers["location"].startswith("https://hub.example.com/alice/model/resolve/")
            assert _wait_for(lambda: len(log) >= 2)
            assert {line.split()[0] for line in log} == {"203.0.113.9"}  # the right-most untrusted hop
    finally:
        store.close()


# ------------------------------------------------------------ DNS rebinding
def _host_status(server: RunningServer, host: str | None, method: str = "GET", path: str = "/api/models") -> int:
    """The status of a request naming ``host`` (None: an HTTP/1.0 request without Host)."""
    if host is None:
        return _request(server, f"{method} {path} HTTP/1.0\r\n\r\n")[0]
    return _request(server, f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")[0]


def test_requests_naming_another_host_are_refused(hub, hf_online) -> None:  # noqa: F811
    """DNS rebinding: a page on evil.example points its name at the registry's address, and the browser
    sends the page's requests there with Host: evil.example and lets the page read the answers."""
    from huggingface_hub import HfApi, hf_hub_download

    store, server, tokens, _ = hub
    port = _port(server)
    # A server on loopback answers localhost and addresses only (no --public-url needed).
    status, headers, reply = _request(server, f"GET /api/models HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n")
    assert status == 421 and headers["x-error-code"] == "MisdirectedRequest" and headers["connection"] == "close"
    assert "'evil.example:" in json.loads(reply)["error"] and "--allowed-host" in json.loads(reply)["error"]
    for host in (f"rebind.evil.example:{port}", "localhost.evil.example", "evil.example."):
        assert _host_status(server, host) == 421, host
        assert _host_status(server, host, path="/alice/model/resolve/main/README.md") == 421, host
    assert _request(server, "GET / HTTP/1.1\r\nHost: evil.example\r\nAccept: text/html\r\n\r\n")[0] == 421
    body = json.dumps({"name": "rebound"}).encode()
    status, _, _ = _request(server, f"POST /api/repos/create HTTP/1.1\r\nHost: evil.example\r\n"
                                    f"Authorization: Bearer {tokens['alice']}\r\nContent-Length: {len(body)}\r\n\r\n",
                            body)
    assert status == 421 and not store.repo_exists("alice/rebound")
    two = "GET /api/models HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n"
    assert _request(server, two)[0] == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"app.localhost:{port}", "[::1]",
                 "10.0.0.7", None):
        assert _host_status(server, host) == 200, host
    # huggingface_hub (127.0.0.1 and localhost) keeps working: an upload, a HEAD redirect and a download.
    for endpoint in (server.url, f"http://localhost:{port}"):
        api = HfApi(endpoint=endpoint, token=tokens["alice"])
        api.upload_file(path_or_fileobj=endpoint.encode(), path_in_repo="where.txt", repo_id="alice/model")
        hf_download = hf_hub_download("alice/model", "where.txt", endpoint=endpoint, token=tokens["alice"],
                                             cache_dir=str(store.root.parent / "hf-cache"), force_download=True)
        assert Path(hf_download).read_bytes() == endpoint.encode(), endpoint


def test_public_url_and_allowed_hosts_name_the_hosts_answered(tmp_path: Path) -> None:
    store = RegistryStore(tmp_path / "reg", fsync=False)
    store.create_repo("alice/model")
    store.commit("alice/model", {"README.md": b"hi"})
    config = ApiConfig(public_url="https://hub.example.com/hub")
    options = ServerOptions(allowed_hosts=("registry.internal", ".corp.example"))
    try:
        with start_server(store, config=config, options=options) as server:
            port = _port(server)
            for host in ("hub.example.com", "HUB.example.com:443", "hub.example.com.", "registry.internal:8080",
                         "corp.example", "a.b.corp.example", f"127.0.0.1:{port}", f"localhost:{port}", "[::1]:1",
                         "198.51.100.4", None):
                assert _host_status(server, host) == 200, host
            for host in ("evil.example", "hub.example.com.evil.example", "evilcorp.example", "registry.internal.x",
                         "hub.example.co"):
                status, headers, reply = _request(server, f"GET /api/models HTTP/1.1\r\nHost: {host}\r\n\r\n")
                assert status == 421, host
                assert "it answers to hub.example.com, registry.internal, *.corp.example, localhost" in (
                    json.loads(reply)["error"])
    finally:
        store.close()


@pytest.mark.parametrize(
    ("public_url", "allowed", "local", "host", "answered"),
    [
        # On a network interface without --public-url / --allowed-host, the names are unknown: any is answered.
        (None, (), "192.0.2.10", "gpu-box.internal:8080", True),
        (None, (), "192.0.2.10", "evil.example", True),
        (None, ("hub.lan",), "192.0.2.10", "evil.example", False),
        ("http://hub.lan:8080", (), "192.0.2.10", "hub.lan:8080", True),
        ("http://hub.lan:8080", (), "192.0.2.10", "evil.example", False),
        (None, ("*",), "127.0.0.1", "evil.example", True),
        (None, (), "127.0.0.1", "evil.example", False),
        (None, (), "::ffff:127.0.0.1", "evil.example", False),
        (None, (), "::1", "localhost", True),
    ],
)
def test_which_hosts_are_answered_where(public_url, allowed, local, host, answered) -> None:
    from peftkit.registry.host_allowlist import HostAllowlist

    refusal = HostAllowlist.build(public_url, allowed).refusal([host], local)
    assert (refusal is None) == answered and (refusal is None or refusal.status == 421)


def test_allowed_host_values_are_checked() -> None:
    from peftkit.registry.host_allowlist import HostAllowlist

    for value in ("http://hub.lan", "hub.lan:8080", "hub.lan/x", "", ".", "a b"):
        with pytest.raises(ValueError, match="is not a host name"):
            HostAllowlist.build(None, [value])


# ----------------------------------------------------------- strict parsing
def test_ambiguous_framing_is_refused(hub) -> None:
    store, server, tokens, _ = hub
    auth = f"Authorization: Bearer {tokens['alice']}\r\n"
    body = b'{"name": "framed"}'
    for framing in (f"Content-Length: {len(body)}\r\nContent-Length: 3\r\n",
                    f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n",
                    "Content-Length: -5\r\n", "Content-Length: 1e3\r\n"):
        status, _, _ = _request(server, "POST /api/repos/create HTTP/1.1\r\n"
                                        f"Host: localhost\r\n{auth}{framing}\r\n", body)
        assert status == 400, framing
    assert not store.repo_exists("alice/framed")


def test_transfer_codings_other_than_chunked_are_refused(hub) -> None:
    """'gzip, chunked' was read as plain chunked: the compressed bytes would have been taken as the body."""
    store, server, tokens, _ = hub
    auth = f"Authorization: Bearer {tokens['alice']}\r\n"
    body = b'{"name": "coded"}'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    for coding in ("gzip, chunked", "deflate, chunked", "chunked, chunked", "identity"):
        status, _, answer = _request(server, "POST /api/repos/create HTTP/1.1\r\n"
                                             f"Host: localhost\r\n{auth}Transfer-Encoding: {coding}\r\n\r\n", chunked)
        if status != 400:  # the HTTP parser itself refuses some of them
            assert status == 501, coding
            assert f"Transfer-Encoding '{coding}' is not supported" in answer.decode(), coding
    assert not store.repo_exists("alice/coded")
    status, _, _ = _request(server, "POST /api/repos/create HTTP/1.1\r\n"
                                    f"Host: localhost\r\n{auth}Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 200 and store.repo_exists("alice/coded")


def test_malformed_values_get_4xx_and_write_nothing(hub) -> None:
    store, server, tokens, _ = hub
    auth = f"Authorization: Bearer {tokens['alice']}\r\n"

    def post(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        status, _, reply = _request(
            server, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {len(body)}\r\n\r\n", body)
        return status, reply

    deep = b"[" * 100_000 + b"]" * 100_000
    status, reply = post("POST", "/api/repos/create", b'{"name": "deep", "x": ' + deep + b"}")
    assert status == 400 and "JSON" in json.loads(reply)["error"]
    status, reply = post("POST", "/api/models/alice/model/commit/main", b'{"key": "header", "value": ' + deep + b"}\n")
    assert status == 400
    status, _ = post("PUT", "/api/models/alice/model/settings", b'{"private": "false"}')
    assert status == 400 and store.repo_info("alice/model").private is False
    status, _ = post("POST", "/api/repos/create", b'{"name": "strict", "private": "false"}')
    assert status == 400 and not store.repo_exists("alice/strict")
    for query in ("offset=99999999999999999999999", "limit=1" + "0" * 40, "offset=" + "9" * 5000):
        status, _, reply = _request(server, f"GET /api/models?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 400 and "query parameter" in json.loads(reply)["error"], query
    status, _, _ = _request(server, "GET /alice/model/resolve/main/README.md HTTP/1.1\r\nHost: localhost\r\n"
                                    "Range: bytes=99999999999999999999999-\r\n\r\n")
    assert status == 416
    assert len(store.list_commits("alice/model")) == COMMITS_AT_START and _ok(server)


# ------------------------------------------------------------------- logging
def test_access_log_escapes_control_characters(hub) -> None:
    _, server, _, log = hub
    with _connect(server) as sock:
        sock.sendall(b"GET /api/models/alice/\xc3\xa9\x7f\xff HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            _read_response(sock)
        except ConnectionError:
            pass
    _request(server, "GET /api/models/alice/model?q=%1b[2J HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert _wait_for(lambda: any("q=%1b" in line for line in log))
    assert all(ch >= " " and ch <= "~" for line in log for ch in line)
    assert escape_log("a\x1b[2Jb\r\n\x00é") == "a\\x1b[2Jb\\r\\n\\x00\\xe9"


def test_the_access_log_never_keeps_a_token_sent_in_the_query(hub) -> None:
    """The server reads no credential from a query string, but clients put one there by habit: the log line of
    such a request masks it (by the key's name, and anything shaped like a registry or Hugging Face token)."""
    _, server, tokens, log = hub
    secret = tokens["alice"]
    for target in (f"/api/whoami-v2?token={secret}", f"/api/models/alice/model?access_token={secret}&x=1",
                   f"/api/models?search=lora&note={secret}", "/api/models?Token=hf_abcdefghijkl"):
        _request(server, f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert _wait_for(lambda: sum("hf_***" in line or "token=***" in line.lower() for line in log) >= 2)
    assert _wait_for(lambda: any("/api/models?search=lora&note=pkr_***" in line for line in log))
    assert any("access_token=***&x=1" in line for line in log)
    assert not any(secret in line or secret.split("_")[-1] in line or "hf_abcdefghijkl" in line for line in log)


def _send_whole_then_read(server: RunningServer, head: str, size: int) -> tuple[int, bytes]:
    """Send ``head`` and ``size`` bytes of body in full, as urllib does (``Connection: close``), then read the
    answer; a reset before it fails the test."""
    with _connect(server) as sock:
        sock.sendall(head.encode("latin-1"))
        chunk = b"a" * 65536
        for start in range(0, size, len(chunk)):
            sock.sendall(chunk[:size - start])
        status, _, body = _read_response(sock)
    return status, body


def test_a_refused_upload_from_a_client_that_asks_to_close_gets_the_answer_not_a_reset(tmp_path: Path) -> None:
    """Refused from its headers (no token: 401; over --max-upload-mb: 413), a body the client keeps sending is
    read and dropped before the answer when the client said ``Connection: close``: closing with bytes still
    arriving made the kernel reset the connection, so urllib saw 'connection reset' instead of the message."""
    store = RegistryStore(tmp_path / "reg", fsync=False)
    store.accounts.add_user("alice")
    token = store.accounts.create_token("alice", write=True)[1]
    store.create_repo("alice/model")
    try:
        with start_server(store, config=ApiConfig(max_upload_bytes=2 * 2**20), options=FAST) as server:
            size = 5_000_000
            head = (f"POST /api/models/alice/model/commit/main HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                    f"Content-Type: application/x-ndjson\r\nContent-Length: {size}\r\n")
            status, body = _send_whole_then_read(server, head + "\r\n", size)
            assert status == 401 and b"token" in body
            status, body = _send_whole_then_read(server, head + f"Authorization: Bearer {token}\r\n\r\n", size)
            assert status == 413 and b"over this server's limit of 2.0 MiB" in body
            assert _ok(server)
    finally:
        store.close()
