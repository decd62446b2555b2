"""Attacks on the registry's web pages through what an adapter's author writes: a real server on 127.0.0.1,
adapters pushed with huggingface_hub (tests/registry_web_helpers.py), pages read like a browser.

The escaping, CSRF, cookie and redirect checks are in test_registry_web_http.py.
"""

from __future__ import annotations

import html
import json
import re

import pytest

from tests.registry_web_helpers import LLAMA, WebClient, filled_registry

pytest.importorskip("huggingface_hub")

# Front-matter base models that would run code when a reader pastes the page's usage snippets.
INJECTED_BASES = {
    "alice/python-injection": 'x"); __import__("os").system("touch pwned"); ("',
    "alice/shell-injection": "x\nEOF\ntouch pwned\n",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web-attacks")
    with filled_registry(tmp, {"alice": True, "bob": True}) as (store, server, tokens):
        from huggingface_hub import HfApi

        alice = HfApi(endpoint=server.url, token=tokens["alice"])
        for repo_id, base in INJECTED_BASES.items():
            folder = tmp / repo_id.replace("/", "__")
            folder.mkdir()
            (folder / "README.md").write_text("---\n" + json.dumps({"library_name": "peft", "base_model": base})
                                              + "\n---\n\nAn adapter.\n")
            (folder / "adapter_config.json").write_text(json.dumps(
                {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": 8}))
            alice.create_repo(repo_id)
            alice.upload_folder(folder_path=folder, repo_id=repo_id)
        yield store, server


def _snippets(page: str) -> list[str]:
    return [html.unescape(code) for code in re.findall(r"<pre><code>(.*?)</code></pre>", page, re.S)]


def test_usage_snippets_never_carry_an_authors_base_model_text_into_code(site):
    web = WebClient(site[1].url)
    for repo_id in INJECTED_BASES:
        status, _, page = web.get(f"/{repo_id}")
        assert status == 200
        snippets = _snippets(page)
        assert len(snippets) == 4, page  # peftkit, the CLI, PEFT, huggingface_hub
        assert not any("pwned" in code for code in snippets), snippets
        assert 'peftkit.load("BASE_MODEL_ID", ' in snippets[0] and "EOF" == snippets[2].splitlines()[-1]
    # a Hub model id is quoted as it is
    status, _, page = web.get("/alice/sentiment-lora")
    assert status == 200 and f'peftkit.load("{LLAMA}", ' in _snippets(page)[0]
