"""The registry's web pages in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A real registry on 127.0.0.1 filled by huggingface_hub pushes: search and
filter, open an adapter and follow its links, sign in and see a private repo,
sign out and lose it, a hostile card stays inert, a form posted from another
site is refused. Screenshots at desktop (1280 px) and phone (390 px) widths
are saved under the test's temporary folder (the path is printed; run pytest
with ``-s`` to see it).

Never ``playwright install`` (it downloads a browser): install Debian's
``chromium`` package instead (``apt-get install chromium``); without it these
tests skip.
"""

from __future__ import annotations

import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest

from tests.registry_web_helpers import LLAMA, filled_registry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium for the browser tests: `apt-get install chromium` "
           "(as root; never `playwright install`, which downloads a browser)",
)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python: pip install playwright")

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web-browser")
    with filled_registry(tmp, {"alice": False, "bob": False}) as (store, server, tokens):
        tokens["bob_push"] = store.accounts.create_token("bob", write=True, name="browser-push")[1]
        yield server.url, tokens, tmp


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots of the registry pages: {folder}")
    return folder


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=DESKTOP)
    tab = context.new_page()
    dialogs: list[str] = []
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    tab.dialogs = dialogs  # type: ignore[attr-defined]
    yield tab
    assert dialogs == [], f"a page opened dialogs: {dialogs}"
    context.close()


def _shoot(tab, shots: Path, name: str) -> None:
    """Screenshots of the current page at desktop and phone widths (full page)."""
    tab.set_viewport_size(DESKTOP)
    tab.screenshot(path=str(shots / f"{name}-desktop.png"), full_page=True)
    tab.set_viewport_size(PHONE)
    tab.screenshot(path=str(shots / f"{name}-phone.png"), full_page=True)
    # Readable on a phone: nothing wider than the screen
    assert tab.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
    tab.set_viewport_size(DESKTOP)


def _results(tab) -> list[str]:
    return tab.locator(".results h3 a").all_inner_texts()


def test_search_filter_open_an_adapter_and_follow_its_links(registry, page, shots):
    url, _, _ = registry
    page.goto(url + "/")
    assert page.title().startswith("Adapters")
    assert set(_results(page)) == {"alice/sentiment-lora", "alice/ner-ia3", "bob/qwen-prefix", "bob/evil-card",
                                   "bob/lang-ner-stack"}
    _shoot(page, shots, "home")

    page.get_by_label("Search by name, description").fill("movie")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url(re.compile(r"/\?q=movie"))
    assert _results(page) == ["alice/sentiment-lora"]

    page.goto(url + "/")
    page.locator(".facet").filter(has_text="Method").get_by_role("link", name="ia3").click()
    page.wait_for_url(re.compile(r"method=ia3"))
    assert _results(page) == ["alice/ner-ia3"]
    page.get_by_role("link", name="Remove filter Method: ia3").click()
    assert len(_results(page)) == 5

    page.get_by_role("link", name="alice/sentiment-lora").click()
    page.wait_for_url("**/alice/sentiment-lora")
    assert page.get_by_role("heading", level=1).first.inner_text() == "sentiment-lora"
    facts = page.locator("aside.facts")
    assert "lora" in facts.inner_text() and "accuracy" in facts.inner_text()
    _shoot(page, shots, "adapter")
    page.locator("aside.facts").get_by_role("link", name=LLAMA).first.click()
    page.wait_for_url(re.compile(r"base_model="))
    assert set(_results(page)) == {"alice/sentiment-lora", "alice/ner-ia3", "bob/evil-card", "bob/lang-ner-stack"}

    page.goto(url + "/alice/sentiment-lora")
    page.locator(".crumbs a").click()
    page.wait_for_url("**/alice")
    assert set(_results(page)) == {"alice/sentiment-lora", "alice/ner-ia3"}
    _shoot(page, shots, "user")

    page.goto(url + "/bob/lang-ner-stack")
    page.locator(".members").get_by_role("link", name="ner").click()
    page.wait_for_url(re.compile(r"/tree/[0-9a-f]{40}/adapters/ner$"))
    assert "ia3" in page.locator("aside.facts").inner_text()
    _shoot(page, shots, "composition-member")


def test_sign_in_to_see_a_private_repo_then_sign_out(registry, page, shots):
    url, tokens, _ = registry
    page.goto(url + "/")
    assert "acme/secret-lora" not in _results(page)
    page.get_by_role("link", name="Sign in").click()
    page.wait_for_url(re.compile(r"/login\?next="))
    _shoot(page, shots, "login")
    page.get_by_label("Token").fill(tokens["alice"])  # a read-only token is enough to look
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/")
    assert "acme/secret-lora" in _results(page)
    _shoot(page, shots, "home-signed-in")
    page.get_by_role("link", name="acme/secret-lora").click()
    page.wait_for_url("**/acme/secret-lora")
    assert "private" in page.locator("h1").inner_text()
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["peftkit_session"]["httpOnly"] and cookies["peftkit_session"]["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(url + "/")
    assert "acme/secret-lora" not in _results(page)
    response = page.goto(url + "/acme/secret-lora")
    assert response.status == 404
    assert page.get_by_role("heading", level=1).inner_text() == "Not found"


def test_a_hostile_card_is_inert(registry, page, shots):
    url, _, _ = registry
    page.goto(url + "/bob/evil-card")
    page.wait_for_load_state("load")
    card = page.locator("section.card")
    assert "alert(\"card-script\")" in card.inner_text()  # shown as text
    assert page.locator("script").count() == 0
    assert page.locator("iframe").count() == 0
    assert card.locator("img").count() == 0
    hrefs = card.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert hrefs and not any(h.lower().startswith(("javascript:", "data:")) for h in hrefs), hrefs
    assert all(rel == "nofollow noopener" for rel in card.locator("a").evaluate_all(
        "links => links.map(a => a.rel)"))
    _shoot(page, shots, "evil-card")
    # the fixture's `page` asserts that no dialog opened


def test_a_form_posted_from_another_site_is_refused(registry, page):
    url, tokens, tmp = registry
    page.goto(url + "/login")
    page.get_by_label("Token").fill(tokens["bob"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/")
    assert page.get_by_role("button", name="Sign out").is_visible()

    # Another origin (another port) serves a page whose form posts to our sign-out.
    attacker = tmp / "attacker"
    attacker.mkdir(exist_ok=True)
    (attacker / "index.html").write_text(
        f'<form method="post" action="{url}/logout"><input type="hidden" name="csrf" value="guess">'
        f'<button type="submit">win a prize</button></form>')
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(attacker), **kw)  # noqa: E731
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
        with page.expect_navigation() as navigation:
            page.get_by_role("button", name="win a prize").click()
        assert navigation.value.status == 403
    finally:
        evil.shutdown()
    page.goto(url + "/")
    assert page.get_by_role("button", name="Sign out").is_visible()  # still signed in


def test_long_facts_and_many_files_fit_a_phone_and_the_facts_panel(registry, page, shots):
    """Long values used to widen the page past a phone's screen (a metric's many digits, the note naming the
    API URL that lists more than 300 files, a long base model in a search result), and the facts panel gave
    each value a sliver of its width."""
    from huggingface_hub import CommitOperationAdd, HfApi

    url, tokens, _ = registry
    card = ("---\nbase_model: org/" + "b" * 140 + "\ndatasets:\n- a-rather-long-dataset-name\n"
            "model-index:\n- name: m\n  results:\n  - dataset: {name: unspecified, type: unspecified}\n"
            "    metrics:\n    - {type: train_loss, value: 0.6893651485443115}\n---\n\nA long-facts adapter.\n")
    files = {f"shards/{i:04d}.bin": b"x" for i in range(305)} | {"README.md": card.encode()}
    api = HfApi(endpoint=url, token=tokens["bob_push"])
    api.create_repo("bob/long-facts", private=True)  # private: the other tests' result lists stay as they are
    api.create_commit("bob/long-facts", operations=[CommitOperationAdd(p, c) for p, c in files.items()],
                      commit_message="many files")
    page.goto(url + "/login?next=/bob/long-facts")
    page.get_by_label("Token").fill(tokens["bob"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/bob/long-facts")
    assert "0.6894" in page.locator("table.metrics").inner_text()  # 4 significant digits, as the card's table
    assert "6 more files" in page.locator("#files-title + table + .note").inner_text()
    panel = page.locator("aside.facts > dl").evaluate("dl => dl.clientWidth")
    values = page.locator("aside.facts > dl > dd").evaluate_all("dds => dds.map(dd => dd.clientWidth)")
    assert values and min(values) >= 0.9 * panel, (panel, values)  # each value has the panel's width
    _shoot(page, shots, "long-facts")  # asserts that nothing is wider than a phone's screen
    page.goto(url + "/?q=long-facts")  # the result line names the long base model
    assert _results(page) == ["bob/long-facts"]
    _shoot(page, shots, "long-facts-result")


def test_pages_load_without_a_failed_request_or_console_error(registry, page):
    """The browser used to ask for /favicon.ico on every page: a 404 (a console error, and an account lookup)."""
    url, _, _ = registry
    failed: list[str] = []
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
    page.on("console", lambda m: m.type == "error" and failed.append(f"console: {m.text}"))
    for path in ("/", "/?q=lora&sort=recent", "/alice", "/alice/sentiment-lora", "/login"):
        page.goto(url + path)
        page.wait_for_load_state("networkidle")
    assert failed == []
    icon = page.locator('link[rel="icon"]').get_attribute("href")
    response = page.request.get(url + icon)
    assert response.status == 200 and response.headers["content-type"] == "image/svg+xml"
