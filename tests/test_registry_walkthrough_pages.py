"""What an operator's walkthrough of the web pages found (session 35): a download count in the singular, and the
footer naming the URL to set as ``HF_ENDPOINT`` (it said "point HF_ENDPOINT here").

A real server on 127.0.0.1 (a thread), filled through the store; pages read with a browser-like client.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import running_registry, write_adapter_folder
from tests.registry_web_helpers import WebClient

from peftkit.registry import ApiConfig

def _push(store, tmp: Path, repo_id: str, **options) -> None:
    folder = write_adapter_folder(tmp / repo_id.replace("/", "__"), **options)
    store.create_repo(repo_id, owner=repo_id.split("/")[0])
    store.commit(repo_id, {p.name: p for p in folder.iterdir()}, message="Add")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("walk")
    config = ApiConfig(public_url="http://hub.lan:8080")
    with running_registry(tmp / "reg", users={"alice": True}, config=config) as (store, server, _tokens):
        _push(store, tmp, "alice/once")
        _push(store, tmp, "alice/twice")
        store.record_download("alice/once")
        store.record_download("alice/twice", 2)
        yield WebClient(server.url)


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_one_download_is_singular(site) -> None:
    _status, _headers, search = site.request("GET", "/")
    assert "1 download " in _text(search) and "2 downloads" in _text(search)
    assert "1 downloads" not in _text(search)
    _status, _headers, page = site.request("GET", "/alice/once")
    assert "1 download " in _text(page) and "1 downloads" not in _text(page)


def test_footer_names_the_url_to_set_as_hf_endpoint(site) -> None:
    for path in ("/", "/alice", "/alice/once", "/login", "/nobody"):
        _status, _headers, page = site.request("GET", path)
        footer = page.split('<footer class="bottom">', 1)[1]
        assert "<code>HF_ENDPOINT</code> at <code>http://hub.lan:8080</code>" in footer, path



def test_metric_values_show_as_the_cards_own_table_shows_them() -> None:
    """The facts panel showed 0.6819996237754822 beside a card whose table said 0.682."""
    from peftkit.registry.web.facts import card_metrics

    card = {"model-index": [{"results": [{"dataset": {"name": "sst2"}, "metrics": [
        {"type": "accuracy", "value": 0.6819996237754822}, {"type": "f1", "value": 91.25125},
        {"type": "steps", "value": 1200}, {"type": "note", "value": "0.68 on dev"}]}]}]}
    assert card_metrics(card) == [("accuracy", "0.682", "sst2"), ("f1", "91.25", "sst2"), ("steps", "1200", "sst2"),
                                  ("note", "0.68 on dev", "sst2")]
