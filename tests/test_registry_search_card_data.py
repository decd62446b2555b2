"""Search results with their cards (``/api/models?cardData=1`` or ``full=1``) stay a bounded reply.

Each result's ``cardData`` is its whole front matter, up to 128 KiB; one anonymous page of 100 such
results was ~12 MiB of JSON. A page with cards now ends at the result that takes it past
``ApiConfig.list_details_bytes`` (1 MiB) and links to the rest, so huggingface_hub's
``list_models(cardData=True)`` still yields every result with its whole card, and ``model_info`` is
unchanged. On a real server, read by a real huggingface_hub client and raw HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401

from peftkit.registry import ApiConfig
from peftkit.hub_rules.cards import MAX_FRONT_MATTER_BYTES

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, get_session  # noqa: E402

REPOS = 24
BASE = "meta-llama/Llama-3.2-1B"


def _big_card(index: int) -> str:
    """A legitimate, large front matter: many evaluation results in ``model-index`` (~100 KiB)."""
    results = "".join(
        f"  - task: {{type: text-generation}}\n    dataset: {{name: set-{k}, type: org/set-{k}}}\n"
        f"    metrics:\n    - {{type: accuracy, value: 0.{k:04d}, name: accuracy on split {'x' * 120}}}\n"
        for k in range(400)
    )
    return (
        f"---\nlibrary_name: peft\nbase_model: {BASE}\nlicense: apache-2.0\ntags: [peft, card-{index}]\n"
        f"model-index:\n- name: lora-{index}\n  results:\n{results}---\n\nAdapter {index}.\n"
    )


@pytest.fixture
def registry(tmp_path: Path):
    with running_registry(tmp_path / "reg", users={"alice": True}) as (store, server, _):
        for i in range(REPOS):
            card = _big_card(i)
            assert 90_000 < len(card) < MAX_FRONT_MATTER_BYTES
            store.create_repo(f"alice/lora-{i:02d}", owner="alice")
            store.commit(f"alice/lora-{i:02d}", {
                "README.md": card,
                "adapter_config.json": json.dumps({"peft_type": "LORA", "base_model_name_or_path": BASE}),
            })
        yield store, server.url


def _pages(url: str, query: str) -> list[requests.Response]:
    """Every page of a search, following ``Link: rel=next`` as huggingface_hub does."""
    pages = [requests.get(f"{url}/api/models?{query}", timeout=60)]
    while "next" in pages[-1].links:
        pages.append(requests.get(pages[-1].links["next"]["url"], timeout=60))
    return pages


@pytest.mark.parametrize("query", ["cardData=1", "full=1", "cardData=1&limit=20", "cardData=true&sort=created_at"])
def test_pages_with_cards_stay_within_the_bound_and_lose_nothing(registry, query: str) -> None:
    _, url = registry
    pages = _pages(url, query)
    bound = ApiConfig().list_details_bytes
    ids = []
    for page in pages:
        assert page.status_code == 200, page.text[:200]
        assert len(page.content) <= bound, (query, len(page.content))
        ids += [item["id"] for item in page.json()]
        assert all(item["cardData"]["model-index"][0]["results"] for item in page.json())
    expected = 20 if "limit=20" in query else REPOS
    assert len(ids) == len(set(ids)) == expected and len(pages) > 1
    if "full=1" in query:
        assert all(item["siblings"] for item in pages[0].json())


def test_a_page_without_cards_is_unchanged(registry) -> None:
    _, url = registry
    pages = _pages(url, "")
    assert len(pages) == 1 and len(pages[0].json()) == REPOS
    assert all("cardData" not in item for item in pages[0].json())


def test_huggingface_hub_lists_every_result_with_its_whole_card(registry, hf_online) -> None:  # noqa: F811
    _, url = registry
    api = HfApi(endpoint=url)
    sizes: list[int] = []  # the reply sizes huggingface_hub's own HTTP client received

    def record(response) -> None:
        if response.request.url.path == "/api/models":
            sizes.append(int(response.headers["Content-Length"]))

    hooks = get_session().event_hooks["response"]
    hooks.append(record)
    try:
        models = list(api.list_models(cardData=True, filter=f"base_model:adapter:{BASE}"))
    finally:
        hooks.remove(record)
    assert len(sizes) > 1 and max(sizes) <= ApiConfig().list_details_bytes, sizes
    assert sorted(m.id for m in models) == [f"alice/lora-{i:02d}" for i in range(REPOS)]
    for model in models:
        assert model.card_data is not None and model.card_data.base_model == BASE
        assert model.card_data.license == "apache-2.0"
        assert len(model.card_data.eval_results) == 400  # model-index, parsed by huggingface_hub
    assert len(list(api.list_models(cardData=True, limit=5))) == 5
    info = api.model_info("alice/lora-03")  # one repo: its whole card, as before
    assert len(info.card_data.eval_results) == 400 and info.card_data.tags == ["peft", "card-3"]


def test_one_result_bigger_than_the_bound_is_still_sent(tmp_path: Path) -> None:
    """The page never comes back empty (a client would stop or loop): its first result always fits."""
    config = ApiConfig(list_details_bytes=10_000)
    with running_registry(tmp_path / "reg", config=config, users={"alice": True}) as (store, server, _):
        for i in range(3):
            store.create_repo(f"alice/big-{i}", owner="alice")
            store.commit(f"alice/big-{i}", {"README.md": _big_card(i)})
        pages = _pages(server.url, "cardData=1")
    assert [len(page.json()) for page in pages] == [1, 1, 1]
