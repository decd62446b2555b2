"""Attacks on the registry's web pages through what an adapter's author writes: a real server on 127.0.0.1,
adapters pushed with huggingface_hub (tests/registry_web_helpers.py), pages read like a browser.

The escaping, CSRF, cookie and redirect checks are in test_registry_web_http.py.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

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


def _push_card(server, token: str, repo_id: str, card: str, *, commits: int = 1) -> list[str]:
    """Push ``card`` as README.md to a new repo, then ``commits - 1`` commits that change another file;
    returns the commit ids, oldest first."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=server.url, token=token)
    api.create_repo(repo_id)
    shas = []
    for i in range(commits):
        files = {"notes.txt": f"commit {i}".encode()} | ({"README.md": card.encode()} if i == 0 else {})
        info = api.create_commit(repo_id, operations=[CommitOperationAdd(p, c) for p, c in files.items()],
                                 commit_message=f"commit {i}")
        shas.append(info.oid)
    return shas


def test_a_heavy_card_is_rendered_once_for_all_its_commits_and_concurrent_readers(site):
    """A card of 64 KiB of '[' costs over a second to render. It used to be cached per commit (so each of a
    repo's commits, and every reader arriving before the first render ended, rendered it again)."""
    from concurrent.futures import ThreadPoolExecutor

    store, server = site
    cards = server.app.api.cards
    token = store.accounts.create_token("bob", write=True)[1]
    card = "[a plot](plots/loss.png)\n\n" + "[" * 64 * 1024
    shas = _push_card(server, token, "bob/heavy-card", card, commits=3)
    before = cards.renders
    pages = [f"/bob/heavy-card/commit/{sha}" for sha in shas] * 2 + ["/bob/heavy-card"] * 2
    with ThreadPoolExecutor(len(pages)) as pool:
        answers = list(pool.map(lambda path: WebClient(server.url).get(path), pages))
    assert [status for status, _, _ in answers] == [200] * len(pages)
    assert cards.renders - before == 1
    for path, (_, _, page) in zip(pages, answers):
        sha = path.rsplit("/", 1)[-1] if "/commit/" in path else shas[-1]
        assert f'<a href="/bob/heavy-card/resolve/{sha}/plots/loss.png" rel="nofollow noopener">' in page


def test_the_card_cache_is_bounded_in_characters():
    from peftkit.registry.web.card_markdown import CardRenderer

    cards = CardRenderer(cache_chars=200_000)
    for i in range(8):  # each card's HTML is ~10x its Markdown: ~70,000 characters
        html = cards.render(f"card {i} " + "[a](b) " * 1000, files_base="/ns/name/resolve/x", cache_key=f"k{i}")
        assert html.count('href="/ns/name/resolve/x/b"') == 1000
        assert cards.cached_chars <= 200_000
    assert cards.renders == 8
    cards.render("card 7", files_base="/other", cache_key="k7")  # the newest is kept, whatever the base
    assert cards.renders == 8


def test_signing_in_again_and_again_keeps_a_bounded_number_of_sessions(site):
    """Every sign-in used to add a database row for 7 days, so one token could fill the database."""
    from peftkit.registry.web.sessions import MAX_SESSIONS_PER_TOKEN

    store, server = site
    token = store.accounts.create_token("alice", write=False, name="many-browsers")[1]
    browsers = [WebClient(server.url) for _ in range(MAX_SESSIONS_PER_TOKEN + 5)]
    for web in browsers:
        assert web.sign_in(token)[0] == 303

    def signed_in(web: WebClient) -> bool:
        return 'action="/logout"' in web.get("/")[2]

    assert [signed_in(web) for web in browsers] == [False] * 5 + [True] * MAX_SESSIONS_PER_TOKEN
    with store.db.connection() as conn:
        assert conn.execute("SELECT COUNT(*) FROM web_sessions").fetchone()[0] <= MAX_SESSIONS_PER_TOKEN


def test_an_image_outside_the_repo_is_shown_as_its_text(site):
    """'![up](../../x.png)' used to become <img src="#">: the browser fetched the page itself as an image."""
    store, server = site
    token = store.accounts.create_token("bob", write=True)[1]
    card = "![up above](../../x.png) ![anchor](#top) ![query](?a=1) ![fine](plot.png)\n"
    _push_card(server, token, "bob/escaping-image", card)
    status, _, page = WebClient(server.url).get("/bob/escaping-image")
    card = page.split('class="card"', 1)[1].split("</section>", 1)[0]
    assert status == 200 and "up above" in card and "anchor" in card and "query" in card
    assert re.findall(r'<img src="([^"]*)"', card) == [re.search(r'/bob/escaping-image/resolve/[0-9a-f]{40}/plot.png',
                                                                  card).group(0)]


def test_the_history_shows_each_commit_messages_first_line_only(site):
    """The history printed whole commit messages: 20 commits of 1 MB each made a 20 MB page. The API now takes
    summaries of at most 1,000 characters and descriptions of 65,536 (older commits may hold more); at those
    bounds the history still shows each summary's first 200 characters and no description."""
    from huggingface_hub import CommitOperationAdd, HfApi

    store, server = site
    api = HfApi(endpoint=server.url, token=store.accounts.create_token("bob", write=True)[1])
    api.create_repo("bob/long-messages")
    for i in range(3):
        api.create_commit("bob/long-messages", operations=[CommitOperationAdd(f"f{i}.txt", b"x")],
                          commit_message=f"Change {i} " + "M" * 990, commit_description="D" * 65_536)
    status, _, page = WebClient(server.url).get("/bob/long-messages")
    history = page.split('id="history-title"', 1)[1].split("</section>", 1)[0]
    assert status == 200 and len(page) < 20_000 and "DDD" not in page
    assert [len(m) for m in re.findall(r"Change \d M+…", history)] == [200] * 3


def test_the_facts_panel_shows_names_not_megabytes(site):
    """adapter_config.json (up to 1 MiB) and the front matter (128 KiB) went whole into the facts panel:
    64 target modules of 10 KB each, thousands of datasets, a 10 KB license, a 100 KB base model (three times
    on the search page too: as a facet and in the results)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    store, server = site
    api = HfApi(endpoint=server.url, token=store.accounts.create_token("bob", write=True)[1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "base_model_name_or_path": "b" * 100_000,
              "target_modules": [f"m{i}" + "q" * 10_000 for i in range(64)]}
    card = "---\n" + json.dumps({"license": "l" * 10_000,
                                 "datasets": [f"d{i}" for i in range(3000)]}) + "\n---\n\nBig facts.\n"
    api.create_repo("bob/big-facts")
    api.create_commit("bob/big-facts", commit_message="big", operations=[
        CommitOperationAdd("adapter_config.json", json.dumps(config).encode()),
        CommitOperationAdd("README.md", card.encode())])
    status, _, page = WebClient(server.url).get("/bob/big-facts")
    facts = page.split('class="facts"', 1)[1]
    assert status == 200 and len(page) < 60_000, len(page)
    assert ">" + "l" * 200 + "<" in facts and "d19<" in facts and "d20<" not in facts
    assert "m63" + "q" * 197 + "," not in facts and "m0" + "q" * 198 + "," in facts
    assert "bbbbbbbbbb" not in page and "BASE_MODEL_ID" in page
    # the search index keeps the 100 KB base model: the search pages (its facets, its results) show a bounded part
    for path in ("/", "/?q=big", "/bob"):
        status, _, page = WebClient(server.url).get(path)
        assert status == 200 and "bob/big-facts" in page and page.count("b" * 100) == 0, path


def test_a_composition_member_in_a_folder_with_url_characters_links_to_that_folder(site):
    """A member folder named 'adapters/n#1 x' was put into the link unencoded: the '#' cut the path short."""
    from huggingface_hub import CommitOperationAdd, HfApi

    store, server = site
    api = HfApi(endpoint=server.url, token=store.accounts.create_token("bob", write=True)[1])
    folder = "adapters/n#1 x?"
    composition = {"composition": {"block": "stack", "children": ["n"]}, "composition_string": "stack(n)",
                   "adapters": {"n": folder}, "fusions": {}, "base_model_name_or_path": LLAMA}
    api.create_repo("bob/odd-member")
    api.create_commit("bob/odd-member", commit_message="odd", operations=[
        CommitOperationAdd("composition.json", json.dumps(composition).encode()),
        CommitOperationAdd(f"{folder}/adapter_config.json", json.dumps({"peft_type": "IA3", "r": 8}).encode())])
    web = WebClient(server.url)
    status, _, page = web.get("/bob/odd-member")
    link = html.unescape(re.search(r'<ul class="members">\s*<li><a href="([^"]+)"', page).group(1))
    status, _, member = web.get(link)
    assert status == 200 and f"folder <code>{html.escape(folder)}/</code>" in member and "?method=ia3" in member


def test_a_card_is_rendered_up_to_a_bounded_amount_of_markup(site):
    """256 KiB of '[' (within the byte limit) took ~6 s of the server's CPU to render, for any anonymous reader
    of a new card; the card is now cut at 40,000 marks (~1 s at worst), with a note."""
    from peftkit.registry.web.card_markdown import MAX_CARD_MARKS

    store, server = site
    token = store.accounts.create_token("bob", write=True)[1]
    _push_card(server, token, "bob/markup-bomb", "Intro.\n\n" + "[" * 200_000)
    status, _, page = WebClient(server.url).get("/bob/markup-bomb")
    card = page.split('class="card"', 1)[1].split("</section>", 1)[0]
    assert status == 200 and "Intro." in card and card.count("[") <= MAX_CARD_MARKS
    assert "The card has more Markdown markup than a page renders" in page
    # real documentation of the same size is rendered whole
    docs = "".join(path.read_text() for path in sorted((Path(__file__).parents[1] / "docs").glob("*.md")))[:200_000]
    _push_card(server, token, "bob/long-docs", docs)
    status, _, page = WebClient(server.url).get("/bob/long-docs")
    assert status == 200 and "more Markdown markup" not in page


def test_a_commits_card_and_files_are_read_once_not_on_every_view(site):
    """Every view of an adapter page read README.md and parsed its front matter (up to 128 KiB of YAML:
    ~0.1 s) and adapter_config.json again; commits never change, so a page's facts are kept by commit."""
    store, server = site
    web = server.app.api
    token = store.accounts.create_token("bob", write=True)[1]
    front = "datasets:\n" + "".join(f"- dataset-{i}\n" for i in range(8000))
    (sha,) = _push_card(server, token, "bob/big-front-matter", f"---\n{front}---\n\nMany datasets.\n")
    before = web.cards_read
    pages = ["/bob/big-front-matter"] * 4 + [f"/bob/big-front-matter/commit/{sha}", "/bob/big-front-matter/tree/main"]
    for path in pages:
        status, _, page = WebClient(server.url).get(path)
        assert status == 200 and "Many datasets." in page and ">dataset-19<" in page
    assert web.cards_read - before == 1
