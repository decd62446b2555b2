"""A registry started with --public-url names its repos at that address; a client that reaches it by
another name (127.0.0.1, an --allowed-host name) gets links huggingface_hub refuses (HfUriError). A push
then failed with that raw error after the server had made the repo, and left it behind, empty; to an
existing repo the commit would land before the error. Now it fails before any change, says which address to
use, and removes a repo it made."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftkit
from peftkit.hub_client import api as hub
from peftkit.hub_client.errors import HubError
from peftkit.registry.hub_api import ApiConfig
from tests.hub_helpers import hub_env, tiny_base  # noqa: F401 - fixture
from tests.registry_conftest_helpers import running_registry

PUBLIC = "http://hub.example.invalid:8080"


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "lora"
    peftkit.adapt(tiny_base(), "lora[r=2]").save_adapter(str(folder))
    return folder


def test_a_push_by_another_address_than_the_public_url_changes_nothing_and_names_it(hub_env, adapter,  # noqa: F811
                                                                                    tmp_path) -> None:
    with running_registry(tmp_path / "reg", users={"alice": True}, config=ApiConfig(public_url=PUBLIC)) as (
            store, server, tokens):
        says = (rf"pushing alice/new to {server.url}: the hub at {server.url} names its repos at {PUBLIC}, another "
                rf"address \(a peftkit registry's --public-url\).*use --hub {PUBLIC}")
        with pytest.raises(HubError, match=says.replace(".invalid", r"\.invalid")):
            hub.push(adapter, "alice/new", hub=server.url, token=tokens["alice"], progress=False)
        assert not store.repo_exists("alice/new")  # the repo the server made for it is gone again

        store.create_repo("alice/old", owner="alice")
        head = store.resolve_revision("alice/old")
        with pytest.raises(HubError, match="names its repos at"):
            hub.push(adapter, "alice/old", hub=server.url, token=tokens["alice"], progress=False)
        assert store.resolve_revision("alice/old") == head  # refused before the commit, not after it
