"""The registry's web pages over plain HTTP: escaping, CSRF, cookies, private repos, bounded queries.

A real server on 127.0.0.1 filled by huggingface_hub pushes (tests/registry_web_helpers.py);
the browser tests are in test_registry_web_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import running_registry
from tests.registry_web_helpers import LLAMA, WebClient, filled_registry, result_ids

from peftkit.registry import ApiConfig
from peftkit.registry.web import PAGE_CSP

pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with filled_registry(tmp_path_factory.mktemp("web"), {"alice": True, "bob": True, "carol": False}) as filled:
        yield filled


def _client(site) -> WebClient:
    return WebClient(site[1].url)


def test_pages_carry_strict_security_headers(site):
    web = _client(site)
    for path in ("/", "/alice", "/alice/sentiment-lora", "/login", "/nobody-here/x"):
        status, headers, _ = web.get(path)
        assert status in (200, 404), path
        assert headers["Content-Security-Policy"] == PAGE_CSP
        assert "script-src" not in PAGE_CSP and "'unsafe-inline'" not in PAGE_CSP  # default-src 'none': no script
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Type"] == "text/html; charset=utf-8"
    status, headers, css = web.get("/static/style.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css") and "font-family" in css


def test_api_clients_keep_their_json(site):
    web = _client(site)
    status, headers, body = web.get("/", headers={"Accept": "*/*"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert '"peftkit registry"' in body
    status, headers, body = web.get("/api/models?search=sentiment", headers={"Accept": "*/*"})
    assert status == 200 and "alice/sentiment-lora" in body and "acme/secret-lora" not in body


def test_search_filters_facets_sort_and_paging_live_in_the_url(site):
    web = _client(site)
    _, _, page = web.get("/")
    assert set(result_ids(page)) == {"alice/sentiment-lora", "alice/ner-ia3", "bob/qwen-prefix", "bob/evil-card",
                                     "bob/lang-ner-stack"}
    assert "5 adapters" in page
    # facet counts: four public adapters on Llama, one on Qwen
    assert re.search(r'href="/\?base_model=meta-llama%2FLlama-3.2-1B">meta-llama/Llama-3.2-1B</a> '
                     r'<span class="count">4</span>', page), page
    _, _, page = web.get("/?q=movie")
    assert result_ids(page) == ["alice/sentiment-lora"]
    _, _, page = web.get("/?method=ia3")
    assert result_ids(page) == ["alice/ner-ia3"]
    _, _, page = web.get("/?base_model=" + LLAMA + "&license=mit&dataset=sst2&tag=movies")
    assert result_ids(page) == ["alice/sentiment-lora"]
    _, _, page = web.get("/?author=bob&sort=name")
    assert result_ids(page) == ["bob/evil-card", "bob/lang-ner-stack", "bob/qwen-prefix"]
    _, _, page = web.get("/?task=token-classification")
    assert result_ids(page) == ["alice/ner-ia3"]
    _, _, page = web.get("/?q=nothing-matches-this")
    assert result_ids(page) == [] and "No adapter matches" in page


def test_query_text_is_escaped_where_it_is_shown(site):
    web = _client(site)
    status, _, page = web.get("/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E%22%3E")
    assert status == 200
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;" in page


def test_a_hostile_card_renders_inert(site):
    web = _client(site)
    status, _, page = web.get("/bob/evil-card")
    assert status == 200
    card = page.split('class="card"', 1)[1].split("</section>", 1)[0]
    assert "<script" not in card and "<iframe" not in card and "<img src=x" not in card
    assert "&lt;script&gt;" in card  # shown as text
    assert "javascript:" not in re.findall(r'href="([^"]*)"', card).__str__()
    assert not re.search(r"<[^>]+\son\w+=", card)  # no event-handler attributes anywhere
    assert '<a href="https://example.org/docs" rel="nofollow noopener">fine</a>' in card
    sha = re.search(r"/bob/evil-card/resolve/([0-9a-f]{40})/adapter_config.json", card).group(1)
    assert f'href="/bob/evil-card/resolve/{sha}/adapter_config.json" rel="nofollow noopener"' in card


def test_adapter_page_facts_files_history_and_usage(site):
    web = _client(site)
    status, _, page = web.get("/alice/sentiment-lora")
    assert status == 200
    facts = page.split('class="facts"', 1)[1]
    assert "<dt>Method</dt><dd><a href=\"/?method=lora\">lora</a>" in facts
    assert f'<dt>Base model</dt><dd><a href="/?base_model={LLAMA}">{LLAMA}</a>' in facts
    assert "<dt>License</dt>" in facts and ">mit<" in facts and ">sst2<" in facts
    assert "<td>accuracy</td><td>0.91</td><td>sst2</td>" in facts
    assert "<dt>r</dt><dd>8</dd>" in facts  # from adapter_config.json
    assert "alice/ner-ia3" in facts  # another adapter for the same base model
    assert 'download>adapter_model.safetensors</a>' in page and "64 B" in page
    assert "Add alice/sentiment-lora" in page  # the commit message
    assert "peftkit.load(" in page and "peftkit hub pull alice/sentiment-lora --hub " + web.url in page
    assert "PeftModel.from_pretrained(base, &#34;alice/sentiment-lora&#34;)" in page
    assert "HF_ENDPOINT=" + web.url in page and "snapshot_download(" in page
    # the history links to commit pages, which show that commit
    commit = re.search(r'href="(/alice/sentiment-lora/commit/([0-9a-f]{40}))"', page)
    status, _, at_commit = web.get(commit.group(1))
    assert status == 200 and f"<code>{commit.group(2)[:12]}</code>" in at_commit


def test_a_composition_lists_its_members_as_links(site):
    web = _client(site)
    status, _, page = web.get("/bob/lang-ner-stack")
    assert status == 200 and "<dd>composition</dd>" in page and "<code>stack(lang, ner)</code>" in page
    members = dict(re.findall(r'<li><a href="(/bob/lang-ner-stack/tree/[0-9a-f]{40}/adapters/\w+)">(\w+)</a>', page))
    assert sorted(members.values()) == ["lang", "ner"]
    link = next(href for href, name in members.items() if name == "ner")
    status, _, member = web.get(link)
    assert status == 200 and "folder <code>adapters/ner/</code>" in member
    assert '<dt>Method</dt><dd><a href="/?method=ia3">ia3</a>' in member
    assert "download>adapters/ner/adapter_config.json</a>" in member
    assert "adapters/lang/" not in member.split("Files", 1)[1]


def test_sign_in_shows_private_repos_to_members_only_and_sign_out_ends_it(site):
    store, server, tokens = site
    anonymous = _client(site)
    assert "acme/secret-lora" not in anonymous.get("/")[2]
    assert anonymous.get("/acme/secret-lora")[0] == 404
    assert "acme/secret-lora" not in anonymous.get("/acme")[2]

    alice = _client(site)
    status, headers, _ = alice.sign_in(tokens["alice"], "/acme")
    assert status == 303 and headers["Location"] == "/acme"
    session_cookie = [c for c in headers.get_all("Set-Cookie") if c.startswith("peftkit_session=")][0]
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie and "Path=/" in session_cookie
    assert "Secure" not in session_cookie  # plain http here; see the https test
    status, headers, page = alice.get("/")
    assert "acme/secret-lora" in result_ids(page) and headers["Cache-Control"] == "no-store"
    assert alice.get("/acme/secret-lora")[0] == 200
    assert "acme/secret-lora" in alice.get("/acme")[2]
    # the session also downloads the private repo's files in the browser; without it, 404
    assert alice.get("/acme/secret-lora/resolve/main/adapter_config.json")[0] == 200
    assert anonymous.get("/acme/secret-lora/resolve/main/adapter_config.json")[0] == 404

    bob = _client(site)
    assert bob.sign_in(tokens["bob"])[0] == 303
    assert "acme/secret-lora" not in bob.get("/")[2] and bob.get("/acme/secret-lora")[0] == 404

    stolen = dict(alice.cookies)
    _, _, page = alice.get("/")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    status, headers, _ = alice.request("POST", "/logout", form={"csrf": csrf}, headers={"Origin": alice.url})
    assert status == 303 and "peftkit_session" not in alice.cookies
    assert "acme/secret-lora" not in alice.get("/")[2]
    replay = WebClient(alice.url, cookies=stolen)  # the old cookie is dead on the server too
    assert replay.get("/acme/secret-lora")[0] == 404


def test_a_session_ends_when_its_token_is_revoked(site):
    store, server, _ = site
    token_info, secret = store.accounts.create_token("alice", write=False, name="revoke-me")
    alice = _client(site)
    assert alice.sign_in(secret)[0] == 303
    assert alice.get("/acme/secret-lora")[0] == 200
    store.accounts.revoke_token(token_info.id)
    assert alice.get("/acme/secret-lora")[0] == 404


def test_forms_without_a_matching_csrf_token_or_from_another_site_are_refused(site):
    _, _, tokens = site
    web = _client(site)
    # no CSRF cookie at all (a cross-site POST from a browser that never visited)
    status, headers, page = web.request("POST", "/login", form={"token": tokens["alice"], "csrf": "0" * 64})
    assert status == 403 and "peftkit_session" not in web.cookies and "Refused" in page
    # the cookie, but a forged token
    web.csrf()
    status, _, _ = web.request("POST", "/login", form={"token": tokens["alice"], "csrf": "0" * 64})
    assert status == 403 and "peftkit_session" not in web.cookies
    # a right token from another origin
    status, _, _ = web.request("POST", "/login", form={"token": tokens["alice"], "csrf": web.csrf()},
                               headers={"Origin": "https://evil.example"})
    assert status == 403 and "peftkit_session" not in web.cookies
    # sign-out without the token leaves the session alone
    assert web.sign_in(tokens["alice"])[0] == 303
    status, _, _ = web.request("POST", "/logout", form={"csrf": "nope"}, headers={"Origin": web.url})
    assert status == 403 and web.get("/acme/secret-lora")[0] == 200
    # an unknown token is refused with the reason
    other = _client(site)
    status, _, page = other.sign_in("pkr_deadbeef_nope")
    assert status == 401 and "does not know that token" in page and "peftkit_session" not in other.cookies


def test_sign_in_only_returns_to_this_site(site):
    _, _, tokens = site
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "/login?next=/x"):
        status, headers, _ = _client(site).sign_in(tokens["bob"], target)
        assert status == 303 and headers["Location"] == "/"
    # Non-ASCII and DEL used to reach the Location header escaped as "\\xe9", which a browser reads as
    # "//xe9.evil.example/...": another host. Now they are percent-encoded, a path of this site.
    for target, location in (("/\u00e9.evil.example/phish", "/%C3%A9.evil.example/phish"),
                             ("/\x7f/evil.example", "/%7F/evil.example"), ("/alice?sort=name", "/alice?sort=name")):
        status, headers, _ = _client(site).sign_in(tokens["bob"], target)
        assert status == 303 and headers["Location"] == location


def test_queries_are_bounded(site):
    web = _client(site)
    assert web.get("/?q=" + "a" * 201)[0] == 400
    assert web.get("/?q=" + "a" * 200)[0] == 200
    assert web.get("/?" + "&".join(f"tag=t{i}" for i in range(6)))[0] == 400
    assert web.get("/?" + "&".join(f"x{i}=1" for i in range(30)))[0] == 400
    assert web.get("/?page=501")[0] == 400 and web.get("/?page=-1")[0] == 400
    assert web.get("/?sort=bogus")[0] == 400
    big = b"token=" + b"a" * 20000
    status, _, _ = web.request("POST", "/login", body=big,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413


def test_unknown_pages_and_moved_repos(site):
    store, server, tokens = site
    web = _client(site)
    assert web.get("/nobody")[0] == 404
    assert web.get("/alice/no-such-repo")[0] == 404
    assert web.get("/alice/sentiment-lora/tree/no-such-branch")[0] == 404
    assert web.get("/alice/sentiment-lora/commit/notasha")[0] == 400
    store.create_repo("bob/old-name", owner="bob")
    store.move_repo("bob/old-name", "bob/new-name")
    status, headers, _ = web.get("/bob/old-name")
    assert status == 307 and headers["Location"] == "/bob/new-name"


def test_cookies_are_secure_behind_https(tmp_path: Path):
    with running_registry(tmp_path / "reg", users={"alice": False},
                          config=ApiConfig(public_url="https://hub.example.com/hub")) as (_, server, tokens):
        web = WebClient(server.url)
        status, headers, page = web.get("/login")
        assert 'action="/hub/login"' in page and 'href="/hub/static/style.css' in page
        csrf_cookie = headers["Set-Cookie"]
        assert "Secure" in csrf_cookie and "Path=/hub" in csrf_cookie and "HttpOnly" in csrf_cookie
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        form = {"csrf": csrf, "token": tokens["alice"], "next": "/hub/"}
        status, headers, _ = web.request("POST", "/login", form=form,
                                         headers={"Origin": "https://hub.example.com"})
        assert status == 303 and headers["Location"] == "/hub/"
        session = [c for c in headers.get_all("Set-Cookie") if c.startswith("peftkit_session=")][0]
        assert "Secure" in session and "HttpOnly" in session and "SameSite=Lax" in session
        assert re.search(r"Max-Age=\d+", session)


def test_server_secret_is_private(site):
    store = site[0]
    secret = store.root / "web_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(secret.read_text().strip())) == 32


def test_facet_counts_match_the_searches_they_link_to(site, monkeypatch):
    store = site[0]
    summary = store.search_facets(visible_to=())
    public = len(store.search(visible_to=(), limit=100))
    assert summary.total == summary.counted == public >= 5
    filters = {"base_model": "base_model", "method": "method", "task": "task", "author": "author"}
    checked = 0
    for kind, values in summary.counts.items():
        for value, count in values:
            if kind in filters:
                hits = store.search(visible_to=(), limit=100, **{filters[kind]: value})
            elif kind in ("dataset", "license"):
                hits = store.search(visible_to=(), limit=100, tags=[f"{kind}:{value}"])
            else:
                hits = store.search(visible_to=(), limit=100, tags=[value])
            assert len(hits) == count, (kind, value)
            checked += 1
    assert checked >= 12
    # Counting is bounded: in a big registry only the most downloaded matches are counted, and the page says so.
    small = store.search_facets(visible_to=(), sample=2)
    assert small.total == public and small.counted == 2 and sum(n for _, n in small.counts["author"]) == 2
    monkeypatch.setattr("peftkit.registry.web.site.FACET_SAMPLE", 2)
    assert f"Counted in the 2 most downloaded of the {public} matches." in _client(site).get("/")[2]


def test_hub_file_links_lead_to_the_file(site):
    """/{ns}/{name}/blob/{rev}/{path}, the Hugging Face Hub's link to a file, used to answer a JSON 404."""
    web = _client(site)
    status, headers, _ = web.get("/alice/sentiment-lora/blob/main/adapter_config.json")
    assert status == 307 and headers["Location"] == "/alice/sentiment-lora/resolve/main/adapter_config.json"
    status, _, body = web.get(headers["Location"])
    assert status == 200 and '"peft_type"' in body
    # the file's own rules apply: a private repo's file stays hidden from others
    status, headers, _ = web.get("/acme/secret-lora/blob/main/README.md")
    assert status == 307 and web.get(headers["Location"])[0] == 404
    status, headers, _ = web.get("/alice/sentiment-lora/blob/main/%C3%A9%5C/x")
    assert status == 307 and headers["Location"] == "/alice/sentiment-lora/resolve/main/%C3%A9%5C/x"
    assert web.get("/alice/no..such/blob/main/x")[0] == 400


def test_a_page_past_the_last_says_so_and_links_to_the_last(site):
    """Past the last page used to say 'No adapter matches' under '5 adapters', with 'Page 9 of 1' and a
    'Previous' link to page 8, just as empty."""
    web = _client(site)
    for path, last in (("/?q=lora&page=9", "/?q=lora"), ("/alice?sort=name&page=9", "/alice?sort=name")):
        status, _, page = web.get(path)
        assert status == 200 and result_ids(page) == []
        assert "Page 9 is past the last page." in page
        assert f'<a href="{last.replace("&", "&amp;")}">Go to page 1' in page
        assert "No adapter" not in page and "of 1</span>" not in page and 'rel="prev"' not in page


def test_an_adapterhub_folder_shows_its_method_options_and_format(tmp_path: Path):
    """adapters' layout keeps the method's options under "config" and the base model as model_name: the facts
    panel reads them there (not the wrapper's name/version/model_class as options)."""
    import json

    import torch
    from safetensors.torch import save

    config = {"config": {"architecture": "lora", "r": 8, "alpha": 16, "attn_matrices": ["q", "v"],
                         "intermediate_lora": True, "leave_out": [0]},
              "hidden_size": 32, "model_class": "BertForSequenceClassification", "model_name": "org/tiny-bert",
              "model_type": "bert", "name": "task", "version": "adapters.1.3.0"}
    weights = save({"bert.encoder.layer.1.attention.self.query.loras.task.lora_A": torch.zeros(8, 32),
                    "bert.encoder.layer.1.attention.self.query.loras.task.lora_B": torch.zeros(32, 8)})
    with running_registry(tmp_path / "reg") as (store, server, _):
        store.create_repo("alice/ah-lora")
        store.commit("alice/ah-lora", {"adapter_config.json": json.dumps(config).encode(),
                                       "adapter.safetensors": weights})
        status, _, page = WebClient(server.url).get("/alice/ah-lora")
    assert status == 200
    facts = page.split('class="facts"', 1)[1]
    assert '<dt>Method</dt><dd><a href="/?method=lora">lora</a>' in facts
    assert "AdapterHub" in facts and "<dt>r</dt><dd>8</dd>" in facts and "<dt>alpha</dt><dd>16</dd>" in facts
    assert '<a href="/?base_model=org/tiny-bert">org/tiny-bert</a>' in facts
    assert "<dt>version</dt>" not in facts and "<dt>name</dt>" not in facts
    assert "512" in facts  # 8 x 32 + 32 x 8 parameters
