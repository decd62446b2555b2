"""One reachability probe for model loading and the hub client (peftkit.core.reachability), driven against real
sockets on 127.0.0.1: a refused port, a listening one, and a proxy in between."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from peftkit.core.reachability import unreachable
from peftkit.hub_client.errors import HubUnreachable
from peftkit.hub_client.http import HttpBackend

ROOT = Path(__file__).resolve().parents[1]
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def listening():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once closed: connections are refused


def test_a_refused_port_is_unreachable_and_a_listening_one_answers(listening: int) -> None:
    port = _closed_port()
    assert unreachable(f"http://127.0.0.1:{port}") == f"connection to 127.0.0.1:{port} refused"
    assert unreachable(f"http://127.0.0.1:{listening}/some/path") is None


def test_behind_a_proxy_the_proxy_is_probed(monkeypatch: pytest.MonkeyPatch, listening: int) -> None:
    proxy_port = _closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    # The hub itself listens, but the client can only get there through the proxy, which is down.
    assert unreachable(f"http://127.0.0.1:{listening}") == f"connection to 127.0.0.1:{proxy_port} refused"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # exempt: asked directly
    assert unreachable(f"http://127.0.0.1:{listening}") is None


def test_the_hub_client_uses_the_same_probe(monkeypatch: pytest.MonkeyPatch, listening: int) -> None:
    port = _closed_port()
    with pytest.raises(HubUnreachable, match=f"cannot reach hub at http://127.0.0.1:{port}: connection to "
                                             f"127.0.0.1:{port} refused"):
        HttpBackend(f"http://127.0.0.1:{port}").whoami()
    # Behind a proxy it is probed too (it used to be skipped, leaving huggingface_hub to retry).
    proxy_port = _closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
    with pytest.raises(HubUnreachable, match=f"connection to 127.0.0.1:{proxy_port} refused"):
        HttpBackend(f"http://127.0.0.1:{listening}").whoami()


def test_one_module_opens_probe_connections() -> None:
    """Model loading and the hub client share the probe instead of each keeping one."""
    openers = sorted(str(path.relative_to(ROOT)) for folder in ("core", "hub_client", "peftkit", "hub_rules")
                     for path in (ROOT / folder).rglob("*.py") if "create_connection(" in path.read_text())
    assert openers == ["core/reachability.py"]
