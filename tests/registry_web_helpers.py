"""Shared by tests/test_registry_web_*.py: a registry filled by real pushes, and a cookie-keeping HTTP client.

The registry holds (all pushed with huggingface_hub's ``HfApi.upload_folder``):

* ``alice/sentiment-lora`` (public, LoRA on Llama, tags movies, dataset sst2, license mit, a metric);
* ``alice/ner-ia3`` (public, IA3 on Llama, task token classification);
* ``bob/qwen-prefix`` (public, prefix tuning on Qwen);
* ``acme/secret-lora`` (private, organization ``acme`` of which alice is a member);
* ``bob/evil-card`` (public, a card full of script, raw HTML and ``javascript:`` links);
* ``bob/lang-ner-stack`` (public, a peftkit composition repo: ``stack(lang, ner)``, each in its folder).
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from tests.registry_conftest_helpers import running_registry, write_adapter_folder

LLAMA = "meta-llama/Llama-3.2-1B"
QWEN = "Qwen/Qwen2.5-0.5B"

EVIL_CARD = """# Evil card

<script>alert("card-script")</script>

<img src=x onerror="alert('card-img')">

<a href="javascript:alert('raw-link')">raw html link</a>

[click me](javascript:alert('md-link')) and [data](data:text/html,<script>alert(1)</script>)
and [fine](https://example.org/docs) and [a file](adapter_config.json).

<iframe src="https://example.org"></iframe>
"""


@contextmanager
def filled_registry(tmp: Path, users: dict[str, bool]) -> Iterator[tuple[object, object, dict[str, str]]]:
    """A registry on 127.0.0.1 with ``users`` (name -> write token?), filled by :func:`fill_registry`
    with write tokens of alice and bob; yields ``(store, server, tokens)`` (``tokens`` of ``users``).

    huggingface_hub may reach the loopback server meanwhile (tests/conftest.py sets it offline)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    try:
        with running_registry(tmp / "reg", users=users) as (store, server, tokens):
            pushers = {u: store.accounts.create_token(u, write=True, name="push")[1] for u in ("alice", "bob")}
            fill_registry(server.url, pushers, tmp, store)
            yield store, server, tokens
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


def fill_registry(url: str, tokens: dict[str, str], tmp: Path, store) -> None:
    """Push the adapters listed in the module docstring through the real huggingface_hub client."""
    from huggingface_hub import HfApi

    store.accounts.add_org("acme", ["alice"])
    alice = HfApi(endpoint=url, token=tokens["alice"])
    bob = HfApi(endpoint=url, token=tokens["bob"])
    pushes = [
        (alice, "alice/sentiment-lora", False, dict(
            tags=("movies",), body="Sentiment of movie reviews. Positive or negative.",
            extra_card="license: mit\ndatasets:\n- sst2\npipeline_tag: text-classification\nmodel-index:\n- name: s\n"
                       "  results:\n  - dataset: {name: sst2, type: sst2}\n"
                       "    metrics:\n    - {type: accuracy, value: 0.91}\n",
            task_type="SEQ_CLS")),
        (alice, "alice/ner-ia3", False, dict(method="IA3", task_type="TOKEN_CLS", body="Named entities.")),
        (bob, "bob/qwen-prefix", False, dict(base_model=QWEN, method="PREFIX_TUNING", body="Prefix for chat.")),
        (alice, "acme/secret-lora", True, dict(body="Top secret sentiment adapter.", tags=("internal",))),
        (bob, "bob/evil-card", False, dict(body=EVIL_CARD)),
    ]
    for api, repo_id, private, options in pushes:
        folder = write_adapter_folder(tmp / "push" / repo_id.replace("/", "__"), **options)
        api.create_repo(repo_id, private=private)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=f"Add {repo_id}")
    stack = write_composition_folder(tmp / "push" / "stack")
    bob.create_repo("bob/lang-ner-stack")
    bob.upload_folder(folder_path=stack, repo_id="bob/lang-ner-stack", commit_message="Add a composition")


def write_composition_folder(folder: Path) -> Path:
    """A composition folder in the layout ``save_composition`` writes: composition.json and adapters/<name>/."""
    for name, method in (("lang", "LORA"), ("ner", "IA3")):
        write_adapter_folder(folder / "adapters" / name, method=method, body=f"The {name} member.")
    (folder / "composition.json").write_text(json.dumps({
        "peftkit_composition": {"format_version": 1, "peftkit_version": "0.1.0"},
        "composition": {"block": "stack", "children": ["lang", "ner"]},
        "composition_string": "stack(lang, ner)",
        "adapters": {"lang": "adapters/lang", "ner": "adapters/ner"},
        "fusions": {},
        "base_model_name_or_path": LLAMA,
    }))
    (folder / "README.md").write_text(f"---\nlibrary_name: peftkit\nbase_model: {LLAMA}\ntags:\n- composition\n---\n\n"
                                      "Language then entities.\n")
    return folder


@dataclass
class WebClient:
    """A browser-like HTTP client: keeps cookies, sends ``Accept: text/html``, never follows redirects."""

    url: str
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, *, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: bytes | None = None):
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        hdrs = {"Accept": "text/html", **(headers or {})}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            body = urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        for line in resp.headers.get_all("Set-Cookie") or []:
            jar = SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return resp.status, resp.headers, data.decode("utf-8", errors="replace")

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def csrf(self, path: str = "/login") -> str:
        status, _, page = self.get(path)
        assert status == 200, page
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert match, "no CSRF field on " + path
        return match.group(1)

    def sign_in(self, token: str, next_path: str = "/") -> tuple[int, object, str]:
        return self.request("POST", "/login", form={"csrf": self.csrf(), "token": token, "next": next_path},
                            headers={"Origin": self.url})


def result_ids(page: str) -> list[str]:
    """Repo ids listed as search results on a page."""
    return re.findall(r'<h3><a href="/([^"]+)">', page)
