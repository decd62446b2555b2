"""A registry names its repos at the address the client used wherever it vouches for that address: the
server's own address beside a --public-url, and each exact --allowed-host name. Pushes through those
addresses work (huggingface_hub refuses a repo URL naming another host than its endpoint; before, a registry
with --public-url named every repo at the public URL, so a push from the server machine or through a short
--allowed-host name failed, and --allowed-host gave read access only).

Where a client still gets a link to another address (a name the server answers only through a ``.domain``
entry), the push fails before any change, says which address to use, and removes a repo it made.

A client reaching the server by a host name gets that name resolved to 127.0.0.1 (as a hosts-file entry would):
real huggingface_hub and peftkit clients, a real server; only the name lookup is the test's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest

import peftkit
from peftkit.hub_client import api as hub
from peftkit.hub_client.errors import HubError
from peftkit.registry.hub_api import ApiConfig
from peftkit.registry.server import ServerOptions, start_server
from peftkit.registry.store import RegistryStore
from tests.hub_helpers import hub_env, tiny_base  # noqa: F401 - fixture
from tests.registry_conftest_helpers import running_registry

PUBLIC = "http://hub.example.invalid:8080"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "lora"
    peftkit.adapt(tiny_base(), "lora[r=2]").save_adapter(str(folder))
    return folder


@pytest.fixture
def names_on_loopback(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``names_on_loopback(*names)``: those names resolve to 127.0.0.1 in this process, as a hosts-file entry
    would make them (every client connects through ``socket.getaddrinfo``)."""
    import socket

    real = socket.getaddrinfo

    def resolve(*names: str) -> None:
        def getaddrinfo(host, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - socket's own signature
            return real("127.0.0.1" if host in names else host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return resolve


@contextlib.contextmanager
def served(tmp_path: Path, public_url: str | None, allowed_hosts: tuple[str, ...]
           ) -> Iterator[tuple[RegistryStore, int, str]]:
    """A registry with alice (write token) on 127.0.0.1, started with these options: (store, port, token)."""
    store = RegistryStore(tmp_path / "reg", fsync=False)
    store.accounts.add_user("alice")
    token = store.accounts.create_token("alice", write=True, name="alice-test")[1]
    server = start_server(store, config=ApiConfig(public_url=public_url),
                          options=ServerOptions(allowed_hosts=allowed_hosts))
    try:
        yield store, urlsplit(server.url).port, token
    finally:
        server.close()
        store.close()


def test_a_push_through_the_servers_own_address_works_beside_a_public_url(hub_env, adapter,  # noqa: F811
                                                                          tmp_path) -> None:
    with running_registry(tmp_path / "reg", users={"alice": True}, config=ApiConfig(public_url=PUBLIC)) as (
            store, server, tokens):
        pushed = hub.push(adapter, "alice/new", hub=server.url, token=tokens["alice"], progress=False)
        assert pushed.created and pushed.url.startswith(f"{server.url}/alice/new")
        assert "adapter_model.safetensors" in {entry.path for entry in store.list_files("alice/new")}
        pulled = hub.pull("alice/new", hub=server.url, token=tokens["alice"])
        assert (Path(pulled) / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("public_url", [None, PUBLIC])
def test_a_push_through_an_allowed_host_name_works_and_links_name_it(hub_env, adapter, tmp_path,  # noqa: F811
                                                                     names_on_loopback, public_url) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    names_on_loopback("hub-box")
    with served(tmp_path, public_url, ("hub-box",)) as (store, port, token):
        endpoint = f"http://hub-box:{port}"
        api = HfApi(endpoint=endpoint, token=token)
        made = api.create_repo("alice/made")
        assert made.endpoint == endpoint and str(made) == f"{endpoint}/alice/made"
        pushed = hub.push(adapter, "alice/pushed", hub=endpoint, token=token, progress=False)
        assert pushed.created and pushed.url.startswith(f"{endpoint}/alice/pushed")
        got = hf_hub_download("alice/pushed", "adapter_config.json", endpoint=endpoint, token=token,
                              cache_dir=str(tmp_path / "hf-cache"))
        assert Path(got).read_bytes() == (adapter / "adapter_config.json").read_bytes()
        assert store.repo_exists("alice/made") and store.repo_exists("alice/pushed")


def test_a_push_through_a_name_the_server_vouches_for_only_by_domain_changes_nothing_and_names_the_public_url(
        hub_env, adapter, tmp_path, names_on_loopback) -> None:  # noqa: F811
    """A ``.domain`` entry answers any subdomain, so a link never names one: the client gets the public URL,
    which huggingface_hub refuses; peftkit's push then stops before any change and says which address to use."""
    names_on_loopback("x.corp.example")
    with served(tmp_path, PUBLIC, (".corp.example",)) as (store, port, token):
        endpoint = f"http://x.corp.example:{port}"
        says = (rf"pushing alice/new to {endpoint}: the hub at {endpoint} names its repos at {PUBLIC}, another "
                rf"address \(a peftkit registry's --public-url\).*use --hub {PUBLIC}")
        with pytest.raises(HubError, match=says.replace(".invalid", r"\.invalid").replace(".example", r"\.example")):
            hub.push(adapter, "alice/new", hub=endpoint, token=token, progress=False)
        assert not store.repo_exists("alice/new")  # the repo the server made for it is gone again

        store.create_repo("alice/old", owner="alice")
        head = store.resolve_revision("alice/old")
        with pytest.raises(HubError, match="names its repos at"):
            hub.push(adapter, "alice/old", hub=endpoint, token=token, progress=False)
        assert store.resolve_revision("alice/old") == head  # refused before the commit, not after it
