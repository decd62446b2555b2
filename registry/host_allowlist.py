"""The host names a request may name in its ``Host`` header: the defence against DNS rebinding.

A page on an attacker's domain can point that domain at the registry's address
(DNS rebinding): the visitor's browser then sends the page's requests to the
registry, with the attacker's name in ``Host``, and lets the page read the
answers. So it could read an internal (or loopback) registry's public repos
and pages from anyone's browser. Such a request is refused with ``421
Misdirected Request`` before any work. Accepted:

* an IP address (a page can name the registry's address only by being served
  from it), ``localhost`` and ``*.localhost`` (browsers resolve these to
  loopback themselves), and a request without ``Host`` (HTTP/1.0; a browser
  always sends one);
* the host of ``--public-url`` and each ``--allowed-host`` (``.example.com``:
  that domain and its subdomains; ``*``: any name, which turns this off).

Any other name is refused when the server knows its names (``--public-url`` or
``--allowed-host`` given), and on a connection that reached a loopback address
(a server on loopback is reached as localhost or by its address). A server on
a network interface without either option answers any name, as it always did:
its names are unknown, and refusing them would break every client using one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import BadRequest, RegistryError


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def host_name(host_header: str) -> str:
    """The name (or address) a ``Host`` header gives, lower-cased, without port, brackets or final dot;
    ``""`` when it is no host."""
    try:
        name = urlsplit("//" + host_header.strip()).hostname or ""
    except ValueError:
        return ""
    return name.rstrip(".")


def allowed_host_problem(value: str) -> str | None:
    """What is wrong with an ``--allowed-host`` value, or None: a host name, ``.domain`` or ``*``."""
    if value == "*":
        return None
    name = value[1:] if value.startswith(".") else value
    if not name or host_name(name) != name.lower().rstrip(".") or any(c in name for c in "/:@?#[] "):
        return (f"allowed host {value!r} is not a host name: give a name such as hub.example.com (no scheme, "
                "port or path), .example.com for a domain and its subdomains, or *")
    return None


@dataclass(frozen=True)
class HostAllowlist:
    """The names this server answers to (see the module docstring)."""

    names: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()  # ".example.com"
    any_name: bool = False

    @classmethod
    def build(cls, public_url: str | None, allowed_hosts: tuple[str, ...] | list[str] = ()) -> "HostAllowlist":
        """From ``--public-url`` and the ``--allowed-host`` values; ValueError naming a bad value."""
        names: set[str] = set()
        domains: list[str] = []
        if public_url:
            names.add(host_name(urlsplit(public_url).netloc))
        for value in allowed_hosts:
            if problem := allowed_host_problem(value):
                raise ValueError(problem)
            if value.startswith("."):
                domains.append(value.lower().rstrip("."))
            elif value != "*":
                names.add(value.lower().rstrip("."))
        names.discard("")
        return cls(frozenset(names), tuple(domains), "*" in allowed_hosts)

    @property
    def configured(self) -> bool:
        return bool(self.names or self.domains or self.any_name)

    def accepts(self, name: str) -> bool:
        """Whether ``name`` (from :func:`host_name`) is always accepted."""
        if self.any_name or name in self.names or _is_ip(name):
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        return any(name == domain[1:] or name.endswith(domain) for domain in self.domains)

    def refusal(self, host_headers: list[str], local_address: str | None) -> RegistryError | None:
        """None when a request with these ``Host`` headers, reaching ``local_address``, is answered;
        else its error (421, or 400 for several ``Host`` headers)."""
        if len(host_headers) > 1:
            return BadRequest("the request has more than one Host header; send one")
        if not host_headers or not host_headers[0].strip():
            return None
        name = host_name(host_headers[0])
        if self.accepts(name) or not (self.configured or _is_loopback(local_address)):
            return None
        known = sorted(self.names) + [f"*{d}" for d in self.domains]
        also = f"{', '.join(known)}, " if known else ""
        return RegistryError(
            f"this registry does not answer to the host name {host_headers[0].strip()[:200]!r}; it answers to "
            f"{also}localhost and its IP addresses. If clients reach it by that name, restart it with "
            "--allowed-host NAME (or --public-url with the URL they use)", status=421, code="MisdirectedRequest")
