"""Who is asking and where links should point: peer address, trusted proxies, the public base URL.

Links that clients follow with their token (pagination ``Link`` headers, URLs
in JSON) must never point at a host the client chose, and must point at the
address the client used where the operator allows that address:
huggingface_hub refuses a repo URL naming another host than its endpoint, so a
push through any other address fails. So the base URL is, in this order:

1. the operator's ``--public-url`` for a request naming its host (the proxy
   case: the URL may carry a path prefix the server never sees);
2. the ``Host`` header, at the port the connection actually reached, when it
   names that connection's address, ``localhost`` on a loopback connection, or
   a host name the operator listed exactly (``--allowed-host NAME``; not a
   ``.domain`` entry, nor ``*``). A client on the server machine pushing to
   ``http://127.0.0.1:8080``, or a team member using the short name ``hub``,
   gets links to the address it used;
3. ``--public-url`` for anything else it answers (another port, a domain
   entry, no ``Host``);
4. else the connection's address itself.

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

from .host_allowlist import host_name


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


def base_url(*, public_url: str | None, scheme: str, local: tuple[str, int] | None, host_header: str | None,
             allowed_names: frozenset[str] = frozenset()) -> str:
    """The URL prefix for links in responses (see the module docstring); ``allowed_names``: the exact host
    names the operator listed (``--allowed-host``), lower-cased."""
    if host_header is not None and (len(host_header) > 300 or not host_header.strip()):
        host_header = None  # no real host name is this long, and an empty one names nothing
    if local is None:  # not a TCP connection (never the case with this server)
        return public_url.rstrip("/") if public_url else f"{scheme}://localhost"
    return _chosen_base(public_url, scheme, local[0], int(local[1]), host_header, allowed_names)


@functools.lru_cache(maxsize=1024)  # a few distinct (address, Host) pairs in practice; bounded in size
def _chosen_base(public_url: str | None, scheme: str, local_host: str, local_port: int, host_header: str | None,
                 allowed_names: frozenset[str]) -> str:
    """:func:`base_url` for a TCP connection, once per distinct request shape (the order of the module
    docstring)."""
    if host_header is not None:
        if public_url and host_name(host_header) == host_name(urlsplit(public_url).netloc):
            return public_url.rstrip("/")
        named = _named_base(scheme, local_host, local_port, host_header, allowed_names)
        if named is not None:
            return named
    if public_url:
        return public_url.rstrip("/")
    return f"{scheme}://{_host_part(local_host)}:{local_port}"


def _named_base(scheme: str, local_host: str, local_port: int, host_header: str,
                allowed_names: frozenset[str]) -> str | None:
    """``scheme://host[:port]`` from ``host_header`` when it is a clean host at the connection's port naming
    the connection's address, localhost on a loopback connection, or one of ``allowed_names``; else None."""
    try:
        parts = urlsplit("//" + host_header.strip())
        name, port = parts.hostname or "", parts.port
        clean = not (parts.path or parts.query or parts.fragment or parts.username or parts.password)
    except ValueError:
        return None
    if not (clean and name and (port or (443 if scheme == "https" else 80)) == local_port):
        return None
    local_ip, named_ip = _ip(local_host), _ip(name)
    if (named_ip is not None and named_ip == local_ip) or (
        name == "localhost" and local_ip is not None and local_ip.is_loopback
    ) or (named_ip is None and name.rstrip(".") in allowed_names):
        return f"{scheme}://{_host_part(name.rstrip('.'))}" + (f":{port}" if port else "")
    return None
