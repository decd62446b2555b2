"""Whether anything answers at a hub's address: one quick probe before a client that would retry for long.

huggingface_hub retries a refused connection or a failed name lookup for
tens of seconds before it gives up. Model loading (``core.model_source``)
and the hub client (``hub_client.http``) ask :func:`unreachable` first, so
both fail at once, with the reason, when nothing can answer. A hub that is
merely slow is left to the client. Standard library only; torch-free.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

#: What :func:`unreachable` says of a host name that does not resolve (DNS); see :func:`name_not_resolved`.
_DOES_NOT_RESOLVE = "does not resolve"
#: How long the probe may take (name lookup and connect); past it, the address counts as slow, not unreachable.
PROBE_SECONDS = 5.0


def unreachable(endpoint: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why nothing can connect to ``endpoint`` (an ``http(s)://`` URL), or ``None`` when it answers or is only slow.

    The reason is one phrase: a refused connection, a name that does not
    resolve, no route. Behind a proxy (``HTTPS_PROXY``/``HTTP_PROXY``, unless
    ``NO_PROXY`` exempts the host) the proxy is what is probed: only it can
    reach the hub, and a client cannot get past a proxy that is down.
    """
    import urllib.request  # here: it loads the http and email packages, which most commands never need

    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or 80
    found: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            found.append(None)
        except socket.gaierror as exc:
            found.append(f"the name {host!r} {_DOES_NOT_RESOLVE}: {exc.strerror or exc}")
        except (ConnectionRefusedError, ConnectionResetError):
            found.append(f"connection to {host}:{port} refused")
        except OSError as exc:  # no route, network down; a timeout is only slow
            found.append(None if isinstance(exc, TimeoutError) else f"{host}:{port}: {exc.strerror or exc}")

    # A thread, because name lookups ignore socket timeouts.
    thread = threading.Thread(target=probe, name="peftkit-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return found[0] if found else None


def name_not_resolved(reason: str | None) -> bool:
    """Whether a reason :func:`unreachable` gave is a host name that does not resolve (a typo in the
    address, DNS), rather than a server that refuses or a network that is down."""
    return reason is not None and reason.startswith("the name ") and f" {_DOES_NOT_RESOLVE}: " in reason
