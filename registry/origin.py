"""Who is asking and where links should point: peer address, trusted proxies, the public base URL.

Links that clients follow with their token (pagination ``Link`` headers, URLs
in JSON) must never point at a host the client chose. So the base URL is, in
this order: the operator's ``--public-url``; the ``Host`` header only when it
names the address the connection actually reached (or ``localhost`` on a
loopback connection); else that address itself.

``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed only from peers the
operator listed as trusted proxies (``--trusted-proxy``); ``X-Forwarded-Host``
never is (set ``--public-url`` behind a proxy).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from urllib.parse import urlsplit


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _host_part(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class ProxyTrust:
    """The peers whose ``X-Forwarded-For``/``-Proto`` headers are believed (addresses or networks)."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())

    @classmethod
    def parse(cls, items: Iterable[str]) -> "ProxyTrust":
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted proxy {item!r} is not an IP address or network (e.g. 127.0.0.1 or 10.0.0.0/8)"
                ) from None
        return cls(tuple(networks))

    def trusts(self, address: str | None) -> bool:
        if not self.networks:
            return False
        ip = _ip(address) if address else None
        return ip is not None and any(ip in net for net in self.networks)

    def client_address(self, peer: str | None, headers: Message) -> str | None:
        """The peer, or behind trusted proxies the right-most untrusted address in ``X-Forwarded-For``."""
        if not self.trusts(peer):
            return peer
        hops = [h.strip() for value in headers.get_all("X-Forwarded-For") or [] for h in value.split(",")]
        for hop in reversed(hops):
            if _ip(hop) is None:
                return peer  # a malformed chain: do not guess
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer

    def scheme(self, peer: str | None, headers: Message, default: str) -> str:
        if self.trusts(peer):
            proto = (headers.get("X-Forwarded-Proto") or "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                return proto
        return default


def base_url(*, public_url: str | None, scheme: str, local: tuple[str, int] | None, host_header: str | None) -> str:
    """The URL prefix for links in responses (see the module docstring)."""
    if public_url:
        return public_url.rstrip("/")
    if local is None:  # not a TCP connection (never the case with this server)
        return f"{scheme}://localhost"
    if host_header is not None and len(host_header) > 300:
        host_header = None  # no real host name is this long
    return _checked_base(scheme, local[0], int(local[1]), host_header)


@functools.lru_cache(maxsize=1024)  # a few distinct (address, Host) pairs in practice; bounded in size
def _checked_base(scheme: str, local_host: str, local_port: int, host_header: str | None) -> str:
    if host_header:
        try:
            parts = urlsplit("//" + host_header.strip())
            name, port = parts.hostname or "", parts.port
            clean = not (parts.path or parts.query or parts.fragment or parts.username or parts.password)
        except ValueError:
            name, port, clean = "", None, False
        if clean and name and (port or (443 if scheme == "https" else 80)) == local_port:
            local_ip, named_ip = _ip(local_host), _ip(name)
            if (named_ip is not None and named_ip == local_ip) or (
                name == "localhost" and local_ip is not None and local_ip.is_loopback
            ):
                return f"{scheme}://{_host_part(name)}" + (f":{port}" if port else "")
    return f"{scheme}://{_host_part(local_host)}:{local_port}"
