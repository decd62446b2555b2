"""Slow-client protection that uvicorn's HTTP/1.1 protocol lacks: a header deadline and a header size cap.

uvicorn closes idle keep-alive connections, but a connection that has sent
nothing yet, or is trickling a request line and headers byte by byte
(slowloris), is kept forever, and httptools buffers header bytes without a
limit. :func:`guarded_protocol` returns uvicorn's httptools protocol with:

* a deadline from the moment a connection opens (or the next request's first
  byte arrives) until that request's headers are complete: past it the
  connection is closed (with ``408`` when part of a request was received);
* a cap on the bytes of the request line plus headers: past it ``431`` and close;
* the same deadline for the rest of a body the application answered without
  reading (a refusal), which uvicorn otherwise drops for as long as it trickles.

Small replies go out in one packet: TCP_NODELAY on each connection (uvicorn
writes a response's headers and body separately; with Nagle's algorithm and
the client's delayed ACK that costs ~40 ms a reply), and on Linux TCP_CORK
from the end of a request's headers until its response is complete (one send
instead of two: a third less CPU per small request).

Request bodies are bounded by the application (:mod:`asgi_app`), which reads
them with its own per-read timeout and per-request deadline; uvicorn already
stops reading a connection while 64 KiB of its body wait unread.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class HeaderLimits:
    timeout_s: float = 20.0
    max_bytes: int = 64 * 1024


_TCP_CORK = getattr(socket, "TCP_CORK", None)
_TIMEOUT_REPLY = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_LARGE_REPLY = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


def guarded_protocol(limits: HeaderLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class with ``limits`` on each request's headers."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        header_limits = limits

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.header_timer: asyncio.TimerHandle | None = None
            self.header_bytes = 0
            self.reading_headers = True
            self.request_started = False
            self.message_complete = True  # no request body pending
            self.drain_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            # uvicorn writes a response's headers and body separately: without
            # TCP_NODELAY, Nagle's algorithm and the client's delayed ACK add
            # ~40 ms to every small reply. (asyncio sets it only on sockets
            # created with proto=IPPROTO_TCP, which a passed-in socket may lack.)
            sock = transport.get_extra_info("socket")
            self.tcp_socket = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None
            if self.tcp_socket is not None:
                self.tcp_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.corked = False
            self.arm_header_deadline()

        def cork(self, on: bool) -> None:
            """Hold a response's writes (headers, then body) in one packet until it is complete (Linux)."""
            if self.tcp_socket is not None and _TCP_CORK is not None and on != self.corked:
                try:
                    self.tcp_socket.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
                    self.corked = on
                except OSError:
                    pass

        def arm_header_deadline(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(self.header_limits.timeout_s, self.header_deadline_passed)

        def disarm_header_deadline(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def header_deadline_passed(self) -> None:
            self.header_timer = None
            if self.reading_headers and not self.transport.is_closing():
                if self.request_started:
                    self.transport.write(_TIMEOUT_REPLY)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.reading_headers and self.request_started and not self.transport.is_closing():
                self.header_bytes += len(data)
                if self.header_bytes > self.header_limits.max_bytes:
                    self.transport.write(_TOO_LARGE_REPLY)
                    self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.message_complete = False
            self.reading_headers = True
            self.request_started = True
            self.header_bytes = 0
            self.arm_header_deadline()

        def on_headers_complete(self) -> None:
            self.reading_headers = False
            self.disarm_header_deadline()
            if not self.expect_100_continue:  # an interim "100 Continue" must not wait
                self.cork(True)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.message_complete = True
            if self.drain_timer is not None:
                self.drain_timer.cancel()
                self.drain_timer = None
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self.cork(False)
            super().on_response_complete()
            if not self.message_complete and not self.transport.is_closing():
                # Answered before its body was read (a refusal): uvicorn drops
                # the rest as it comes, which must not take forever either.
                self.drain_timer = self.loop.call_later(self.header_limits.timeout_s, self.drain_deadline_passed)

        def drain_deadline_passed(self) -> None:
            self.drain_timer = None
            if not self.message_complete and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_header_deadline()
            if self.drain_timer is not None:
                self.drain_timer.cancel()
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol
