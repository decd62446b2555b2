"""The HTTP server: sockets, request bodies, auth headers, streaming files.

Standard library only (``http.server.ThreadingHTTPServer``), one thread per
connection, HTTP/1.1 keep-alive. Routing and the API itself are in
:mod:`hub_api`. Start one with :func:`start_server` (a background thread,
for tests and embedding) or :func:`serve` (blocking, for the CLI).
"""

from __future__ import annotations

import collections
import os
import socket
import socketserver
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlsplit

from .accounts import parse_bearer
from .errors import BadRequest, PayloadTooLarge, RegistryError, Unauthorized
from .hub_api import ApiConfig, HubApi, Request, Response, error_response
from .store import RegistryStore

_SPOOL_IN_MEMORY = 8 * 1024 * 1024
_CHUNK = 1 << 20
# A body over the limit is read and discarded (so the client sees the 413
# instead of a reset connection) unless it is this much larger still.
_DRAIN_SLACK = 64 * 1024 * 1024

LogFn = Callable[[str], None]


def _header_value(value: str) -> str:
    """Headers are latin-1 and one line; file names may be neither."""
    return " ".join(str(value).split()).encode("ascii", "backslashreplace").decode("ascii")


class RegistryHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], api: HubApi, *, log: LogFn | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api = api
        self.log = log
        self.stats: collections.Counter[str] = collections.Counter()
        self._stats_lock = threading.Lock()
        super().__init__(address, RegistryRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() resolves the host name (getfqdn), which can
        # take seconds on a machine with slow DNS. We never need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1


class RegistryRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "peftkit-registry/1"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are closed after this
    server: RegistryHTTPServer

    # ------------------------------------------------------------ plumbing
    def setup(self) -> None:
        super().setup()
        # Responses go out as headers then body: without TCP_NODELAY, Nagle's
        # algorithm and the client's delayed ACK add ~40 ms to small replies.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} - {format % args}")

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _base_url(self) -> str:
        proto = self.headers.get("X-Forwarded-Proto", "http").split(",")[0].strip() or "http"
        host = self.headers.get("X-Forwarded-Host") or self.headers.get("Host")
        if not host:
            host = f"{self.server.server_name}:{self.server.server_port}"
        return f"{proto}://{host.split(',')[0].strip()}"

    def _read_body(self, limit: int) -> IO[bytes]:
        api = self.server.api
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, dir=api.store.blobs.tmp_dir)
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._read_chunked(spool, limit)
            else:
                raw_length = self.headers.get("Content-Length")
                if raw_length:
                    try:
                        length = int(raw_length)
                        if length < 0:
                            raise ValueError
                    except ValueError:
                        self.close_connection = True
                        raise BadRequest(f"Content-Length {raw_length!r} is not a byte count") from None
                    if length > limit:
                        self._discard(length, limit)
                        raise PayloadTooLarge(self._too_large(length, limit))
                    self._copy(spool, length)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    def _too_large(self, length: int | None, limit: int) -> str:
        got = f"{length / 2**20:.1f} MiB" if length is not None else "more"
        return (
            f"request body is {got}, over this server's limit of {limit / 2**20:.1f} MiB; "
            "split the upload into several commits or restart the server with a larger --max-upload-mb"
        )

    def _discard(self, length: int, limit: int) -> None:
        if length > limit + _DRAIN_SLACK:
            self.close_connection = True
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)

    def _copy(self, out: IO[bytes], length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                self.close_connection = True
                raise BadRequest(f"request body ended after {length - remaining} of {length} bytes")
            out.write(chunk)
            remaining -= len(chunk)

    def _read_chunked(self, out: IO[bytes], limit: int) -> None:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest("malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            total += size
            if total > limit:
                self.close_connection = True
                raise PayloadTooLarge(self._too_large(None, limit))
            self._copy(out, size)
            self.rfile.readline(1024)  # CRLF after the chunk

    # ------------------------------------------------------------ requests
    def _handle(self) -> None:
        api = self.server.api
        body: IO[bytes] | None = None
        split = urlsplit(self.path)
        route = "resolve" if "/resolve/" in split.path and not split.path.startswith("/api/") else "api"
        self.server.count(f"{self.command} {route}")
        try:
            req = Request(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query, keep_blank_values=True),
                headers=self.headers,
                base_url=self._base_url(),
            )
            body = self._read_body(api.body_limit(self.command, split.path))
            req.body = body
            secret = parse_bearer(self.headers.get("Authorization"))
            if secret is not None:
                try:
                    req.principal = api.store.accounts.authenticate(secret)
                except Unauthorized as exc:
                    # An unknown token (revoked, or a huggingface.co token the
                    # client sends by habit) reads like no token: public repos
                    # stay readable; anything needing auth reports this.
                    req.auth_error = exc.message
            resp = api.dispatch(req)
        except RegistryError as exc:
            resp = error_response(exc)
        except Exception:  # a bug: log it, answer 500, keep serving
            sys.stderr.write(traceback.format_exc())
            resp = error_response(RegistryError("internal server error; see the registry server's log"))
        finally:
            if body is not None:
                body.close()
        if resp.status >= 400 and self.command not in ("GET", "HEAD") and body is None:
            resp.close = True
        try:
            self._send(resp)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, resp: Response) -> None:
        self.send_response(resp.status)
        for name, value in resp.headers:
            self.send_header(name, _header_value(value))
        if resp.file is None:
            self.send_header("Content-Length", str(len(resp.body)))
        if resp.close or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        if resp.file is None and self.command != "HEAD" and resp.body:
            # One write for headers and body: one packet for small JSON replies.
            self._headers_buffer.append(b"\r\n" + resp.body)
            self.flush_headers()
            return
        self.end_headers()
        if self.command == "HEAD" or resp.file is None:
            return
        if resp.file_range is None:
            return  # empty file
        start, end = resp.file_range
        with open(resp.file, "rb") as f:
            try:
                self.connection.sendfile(f, offset=start, count=end - start + 1)
            except (AttributeError, OSError, ValueError):
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = f.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


@dataclass
class RunningServer:
    """A server running in a background thread (see :func:`start_server`)."""

    httpd: RegistryHTTPServer
    thread: threading.Thread
    url: str

    @property
    def stats(self) -> collections.Counter[str]:
        return self.httpd.stats

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _url(httpd: RegistryHTTPServer) -> str:
    host, port = httpd.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in str(shown):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def start_server(
    store: RegistryStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ApiConfig | None = None,
    log: LogFn | None = None,
) -> RunningServer:
    """Serve ``store`` on ``host:port`` (0 = a free port) from a daemon thread."""
    httpd = RegistryHTTPServer((host, port), HubApi(store, config), log=log)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="peftkit-registry", daemon=True
    )
    thread.start()
    return RunningServer(httpd, thread, _url(httpd))


def serve(
    data_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ApiConfig | None = None,
    log: LogFn | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the registry in ``data_dir`` until interrupted (Ctrl-C)."""
    store = RegistryStore(Path(data_dir))
    try:
        httpd = RegistryHTTPServer((host, port), HubApi(store, config), log=log)
    except OSError as exc:
        store.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        if ready is not None:
            ready(_url(httpd))
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        store.close()
