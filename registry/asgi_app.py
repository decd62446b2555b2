"""The registry as an ASGI application: HTTP framing, auth before the body, spooling, streaming files.

Plain ASGI (no web framework): routing and the API live in the sans-IO
:class:`~peftkit.registry.hub_api.HubApi`; this layer only turns an ASGI
request into a :class:`Request` and a :class:`Response` back into ASGI
messages, with the protections a public listener needs:

1. framing is checked from the headers (one ``Content-Length``, not with
   ``Transfer-Encoding``) and the caller is authenticated and authorized for a
   write from the method, path and token alone (:meth:`HubApi.refuse_early`),
   so a refused request costs no body bytes;
2. the body is spooled (to memory up to a small size, then to an anonymous
   file in the blob store's tmp folder), bounded by the route's size limit, a
   per-read timeout and a whole-request deadline; a client that goes away
   mid-body leaves nothing behind;
3. ``HubApi.dispatch`` runs in a worker thread (it blocks on SQLite and disk),
   at most ``threads`` at once;
4. files stream out in chunks (with ``Range``), never whole in memory, each
   write bounded by the same stall timeout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import sys
import tempfile
import threading
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from email.message import Message
from typing import IO, Any
from urllib.parse import parse_qs

import anyio

from .accounts import not_bearer_reason, parse_bearer
from .content_safety import hardening_headers
from .errors import BadRequest, PayloadTooLarge, RegistryError, Unauthorized
from .host_allowlist import HostAllowlist
from .http_headers import escape_log, header_value, redact_query
from .hub_api import HubApi, Request, Response, error_response
from .origin import ProxyTrust, base_url

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
LogFn = Callable[[str], None]

_CHUNK = 256 * 1024
# A refused body this small is read and dropped by the server so the client,
# still sending, sees the answer; a larger one closes the connection instead.
_DRAIN_LIMIT = 64 * 1024 * 1024
_SMALL_FILE = 256 * 1024  # read in the dispatch thread and sent in one message


@dataclass(frozen=True)
class BodyLimits:
    """How long a client may take to send its request body."""

    read_timeout_s: float = 30.0  # longest wait for the next piece of a body (or for a response write)
    request_timeout_s: float = 900.0  # whole body of one request
    spool_in_memory: int = 256 * 1024  # larger bodies go to an anonymous file in the blob tmp folder


class ClientGone(Exception):
    """The client disconnected, or stalled past a timeout: nothing to answer."""


class BodyTimeout(ClientGone):
    """The client stopped sending its body (or took longer than the request deadline): answer 408 and close."""


def _headers_message(raw: list[tuple[bytes, bytes]]) -> Message:
    msg = Message()
    for name, value in raw:
        msg[name.decode("latin-1")] = value.decode("latin-1")
    return msg


def _framing_error(raw: list[tuple[bytes, bytes]]) -> RegistryError | None:
    """Request smuggling guards: the body's length must be stated once, one way; of the transfer codings
    only ``chunked`` is taken (a compressed coding the server would not undo would be read as the body)."""
    lengths = {v.strip() for k, v in raw if k == b"content-length"}
    codings = [c.strip().lower() for k, v in raw if k == b"transfer-encoding" for c in v.split(b",")]
    if codings and lengths:
        return BadRequest("a request may not carry both Transfer-Encoding and Content-Length")
    if codings and codings != [b"chunked"]:
        shown = ", ".join(c.decode("latin-1") for c in codings)[:100]
        return RegistryError(f"Transfer-Encoding {shown!r} is not supported: send the body with "
                             f"'Transfer-Encoding: chunked' or a Content-Length", status=501, code="NotImplemented")
    if len(lengths) > 1:
        return BadRequest("conflicting Content-Length headers")
    for value in lengths:
        if not value.isdigit() or len(value) > 18:
            return BadRequest(f"Content-Length {value.decode('latin-1')!r} is not a byte count")
    return None


def _internal_error() -> Response:
    """Log the exception being handled (a bug) and answer 500; the server keeps serving."""
    sys.stderr.write(traceback.format_exc())
    return error_response(RegistryError("internal server error; see the registry server's log"))


def _too_large(length: int | None, limit: int, method: str, path: str) -> PayloadTooLarge:
    if limit == 0:
        return PayloadTooLarge(f"{method} {path[:200]} takes no request body; send it without one")
    got = f"{length / 2**20:.1f} MiB" if length is not None else "larger"
    if "/commit/" in path:
        fix = "split the upload into several commits or restart the server with a larger --max-upload-mb"
    else:  # small JSON requests (paths-info, validate-yaml, settings, ...): the fix is a smaller request
        fix = "send less in one request (for paths-info, fewer paths per request)"
    return PayloadTooLarge(f"request body is {got}, over this server's limit of {limit / 2**20:.1f} MiB for "
                           f"this request; {fix}")


class RegistryApp:
    """ASGI callable serving a :class:`HubApi`."""

    def __init__(
        self,
        api: HubApi,
        *,
        body_limits: BodyLimits | None = None,
        proxies: ProxyTrust | None = None,
        hosts: HostAllowlist | None = None,
        log: LogFn | None = None,
        threads: int = 40,
    ) -> None:
        self.api = api
        self.body_limits = body_limits or BodyLimits()
        self.proxies = proxies or ProxyTrust()
        self.hosts = hosts if hosts is not None else HostAllowlist.build(api.config.public_url)
        self.log = log
        self.threads = threads
        self.stats: collections.Counter[str] = collections.Counter()
        self._stats_lock = threading.Lock()
        # The blocking work (SQLite, disk) runs here; a plain executor costs
        # less per request than anyio's worker threads.
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="peftkit-registry")

    def close(self) -> None:
        """Let the worker threads go once their current requests end."""
        self.executor.shutdown(wait=False)

    async def _in_thread(self, func: Callable[[Request], Any], req: Request) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, req)

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except ClientGone:
            pass

    # ------------------------------------------------------------ requests
    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1")
        raw_headers = list(scope.get("headers") or [])
        headers = _headers_message(raw_headers)
        peer = (scope.get("client") or (None,))[0]
        route = "resolve" if "/resolve/" in path and not path.startswith("/api/") else "api"
        local = scope.get("server")
        query = scope.get("query_string", b"").decode("latin-1")
        # DNS rebinding: a request naming a host this server is not known by is refused before any work.
        misdirected = self.hosts.refusal(headers.get_all("Host") or [], local[0] if local else None)
        if misdirected is not None:
            req = Request(method=method, path=path, query={}, headers=headers, base_url="",
                          client_address=self.proxies.client_address(peer, headers))
            resp = error_response(misdirected)
            resp.close = True
            await self._send(send, req, resp, route, query)
            return
        self.count(f"{method} {route}")
        req = Request(
            method=method,
            path=path,
            query=parse_qs(query, keep_blank_values=True),
            headers=headers,
            base_url=base_url(
                public_url=self.api.config.public_url,
                scheme=self.proxies.scheme(peer, headers, scope.get("scheme", "http")),
                local=(local[0], local[1]) if local and local[1] is not None else None,
                host_header=headers.get("Host"),
                allowed_names=self.hosts.names,
            ),
            client_address=self.proxies.client_address(peer, headers),
        )
        declared = headers.get("Content-Length")
        has_body = "Transfer-Encoding" in headers or (declared is not None and declared.strip() not in ("", "0"))
        try:
            framing = _framing_error(raw_headers)
            if framing is not None:
                raise framing
            if not has_body:  # one trip to a worker thread: authenticate, check, answer
                resp = await self._in_thread(self._answer, req)
            else:
                resp = await self._answer_with_body(send, receive, req, declared, route, query)
                if resp is None:
                    return
        except RegistryError as exc:
            resp = error_response(exc)
            resp.close = True  # the body was not (fully) read
        except BodyTimeout:
            resp = error_response(RegistryError(
                f"the request body did not arrive in time (each part within {self.body_limits.read_timeout_s:g} s, "
                f"all of it within {self.body_limits.request_timeout_s:g} s)", status=408, code="RequestTimeout"))
            resp.close = True
        await self._send(send, req, resp, route, query)

    async def _answer_with_body(
        self, send: Send, receive: Receive, req: Request, declared: str | None, route: str, query: str
    ) -> Response | None:
        """Check from the headers, then spool the body and dispatch; None when a refusal was already sent."""
        if "Authorization" in req.headers:
            early = await self._in_thread(self._authenticate_and_check, req)
        else:  # no token: refuse_early decides without the database
            early = self._authenticate_and_check(req)
        limit = self.api.body_limit(req.method, req.path)
        if early is None and declared is not None and int(declared) > limit:
            early = error_response(_too_large(int(declared), limit, req.method, req.path))
        if early is not None:
            # Refused from the headers alone: nothing of the body is read. A
            # small rest is dropped by the server as it comes (the client,
            # still sending, then sees the answer); a large one closes.
            small = declared is not None and int(declared) <= _DRAIN_LIMIT
            if not small or "100-continue" in (req.headers.get("Expect") or "").lower():
                early.close = True
            elif "close" in (req.headers.get("Connection") or "").lower():
                # The server closes after answering such a client: read the rest first, or the bytes still
                # arriving make the kernel reset the connection and the client never sees the answer.
                await self._drain(receive)
            await self._send(send, req, early, route, query)
            return None
        body = await self._spool(receive, limit, req.method, req.path)
        try:
            req.body = body
            return await self._in_thread(self._dispatch, req)
        finally:
            body.close()

    def _answer(self, req: Request) -> Response:
        return self._authenticate_and_check(req) or self._dispatch(req)

    def _authenticate_and_check(self, req: Request) -> Response | None:
        """Who the caller is, and whether a write is refused before its body is read."""
        try:
            return self._check_headers(req)
        except Exception:  # a bug: log it, answer 500, keep serving
            return _internal_error()

    def _check_headers(self, req: Request) -> Response | None:
        header = req.headers.get("Authorization")
        try:
            secret = parse_bearer(header)
        except BadRequest:
            # Not a bearer token: Basic credentials that a proxy with basic auth in front passes on, an empty
            # 'Bearer'. Read like no token, as an unknown one is; anything needing auth names the form.
            req.auth_error = not_bearer_reason(header or "")
            secret = None
        if secret is not None:
            try:
                req.principal = self.api.store.accounts.authenticate(secret)
            except Unauthorized as exc:
                # An unknown token (revoked, or a huggingface.co token the
                # client sends by habit) reads like no token: public repos
                # stay readable; anything needing auth reports this.
                req.auth_error = f"{exc.message}: the token is unknown to this registry or revoked"
        try:
            self.api.refuse_early(req)
        except RegistryError as exc:
            return error_response(exc)
        return None

    def _dispatch(self, req: Request) -> Response:
        try:
            resp = self.api.dispatch(req)
        except RegistryError as exc:
            return error_response(exc)
        except Exception:  # a bug: log it, answer 500, keep serving
            return _internal_error()
        if resp.file is not None and resp.file_range is not None and req.method != "HEAD":
            start, end = resp.file_range
            if end - start + 1 <= _SMALL_FILE:
                with resp.file() as f:
                    f.seek(start)
                    resp.body = f.read(end - start + 1)
                resp.file = None
                resp.file_range = None
        return resp

    async def _receive(self, receive: Receive, timeout: float) -> MutableMapping[str, Any]:
        with anyio.move_on_after(timeout) as scope:
            message = await receive()
        if scope.cancelled_caught:
            raise BodyTimeout
        if message["type"] == "http.disconnect":
            raise ClientGone
        return message

    async def _drain(self, receive: Receive) -> None:
        """Read and drop a refused request's body (at most ``_DRAIN_LIMIT`` bytes, within the request's
        deadline and each read's timeout); a client that stops sending or leaves ends it."""
        limits = self.body_limits
        deadline = anyio.current_time() + limits.request_timeout_s
        total = 0
        try:
            while total <= _DRAIN_LIMIT and (left := deadline - anyio.current_time()) > 0:
                message = await self._receive(receive, min(limits.read_timeout_s, left))
                total += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except (BodyTimeout, ClientGone):
            return

    async def _spool(self, receive: Receive, limit: int, method: str, path: str) -> IO[bytes]:
        limits = self.body_limits
        spool = tempfile.SpooledTemporaryFile(max_size=limits.spool_in_memory, dir=self.api.store.blobs.tmp_dir)
        deadline = anyio.current_time() + limits.request_timeout_s
        total = 0
        try:
            while True:
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise BodyTimeout
                message = await self._receive(receive, min(limits.read_timeout_s, left))
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    raise _too_large(None, limit, method, path)
                if chunk:
                    spool.write(chunk)
                if not message.get("more_body", False):
                    break
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    # ----------------------------------------------------------- responses
    async def _send(self, send: Send, req: Request, resp: Response, route: str, query: str) -> None:
        out = [(b"server", b"peftkit-registry/1")]
        for name, value in [*resp.headers, *hardening_headers(route == "resolve")]:
            out.append((name.lower().encode("ascii"), header_value(name, value)))
        if resp.file is None and resp.header("Content-Length") is None:
            out.append((b"content-length", str(len(resp.body)).encode("ascii")))
        if resp.close:
            out.append((b"connection", b"close"))
        if self.log is not None:
            size = len(resp.body) if resp.file is None else (
                resp.file_range[1] - resp.file_range[0] + 1 if resp.file_range else 0)
            target = f"{req.path}?{redact_query(query)}" if query else req.path
            self.log(escape_log(f'{req.client_address or "-"} - "{req.method} {target}" {resp.status} {size}'))
        # A client that stops reading makes send() wait: each wait is bounded.
        timeout = self.body_limits.read_timeout_s
        whole = resp.file is None or req.method == "HEAD" or resp.file_range is None
        with anyio.move_on_after(timeout) as stalled:
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            if whole:
                await send({"type": "http.response.body", "body": b"" if req.method == "HEAD" else resp.body})
        if stalled.cancelled_caught:
            raise ClientGone
        if whole:
            return
        start, end = resp.file_range
        async with anyio.wrap_file(await anyio.to_thread.run_sync(resp.file)) as f:
            await f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = await f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ClientGone  # the blob shrank under us: cut the response short
                remaining -= len(chunk)
                with anyio.move_on_after(timeout) as stalled:
                    await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
                if stalled.cancelled_caught:
                    raise ClientGone

