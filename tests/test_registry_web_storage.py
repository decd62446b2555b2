"""Storage usage on user and organization pages: shown to that user or the organization's members, nobody else.

A real registry on 127.0.0.1, files pushed with huggingface_hub, pages read with the cookie-keeping client
of tests/registry_web_helpers.py (signed in through the real /login form).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401 - hf_online is a fixture
from tests.registry_web_helpers import WebClient

pytest.importorskip("huggingface_hub")

DEFAULT_QUOTA = 5_000_000  # serve --namespace-quota-gb 0.005
ALICE_BYTES = 1_370_000  # "1.37 MB"
ACME_BYTES = 2_500_000  # "2.5 MB"


@pytest.fixture
def reg(tmp_path: Path, hf_online):  # noqa: F811
    """alice and bob (write tokens), organization acme with alice as its member, the server's default limit."""
    with running_registry(tmp_path / "reg", users={"alice": True, "bob": True}) as (store, server, tokens):
        store.quotas.default_bytes = DEFAULT_QUOTA
        store.accounts.add_org("acme", ["alice"])
        yield store, server, tokens


def _push(server, token: str, repo_id: str, size: int, private: bool = False) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=token)
    api.create_repo(repo_id, private=private)
    api.upload_file(path_or_fileobj=b"\x01" * size, path_in_repo="w.bin", repo_id=repo_id)


def _page(server, path: str, token: str | None = None) -> str:
    """``path`` as a browser sees it: anonymous, or signed in with ``token``."""
    web = WebClient(server.url)
    if token is not None:
        assert web.sign_in(token)[0] == 303
    status, _, page = web.get(path)
    assert status == 200, page
    return page


def _shows_no_storage(page: str, *figures: str) -> bool:
    return 'class="storage"' not in page and "<meter" not in page and not any(f in page for f in figures)


def test_the_owner_sees_usage_and_the_servers_default_limit_after_a_push(reg):
    store, server, tokens = reg
    page = _page(server, "/alice", tokens["alice"])
    assert "0 bytes of 5 MB used (0%)" in page  # nothing stored yet
    _push(server, tokens["alice"], "alice/weights", ALICE_BYTES)
    page = _page(server, "/alice", tokens["alice"])
    assert "1.37 MB of 5 MB used (27%)" in page
    used = store.quotas.usage(["alice"])[0].used_bytes  # the files and their history's metadata
    assert f'<meter min="0" max="{DEFAULT_QUOTA}" value="{used}"' in page
    assert "The server&#39;s default limit." in page and "Only you see this." in page
    assert "Full:" not in page


def test_anonymous_visitors_and_other_users_see_no_usage(reg):
    store, server, tokens = reg
    _push(server, tokens["alice"], "alice/weights", ALICE_BYTES)
    assert "1.37 MB of 5 MB used" in _page(server, "/alice", tokens["alice"])  # it is there to hide
    for token in (None, tokens["bob"]):
        page = _page(server, "/alice", token)
        assert "alice/weights" in page  # the same page, the public repo listed
        assert _shows_no_storage(page, "1.37 MB", "5 MB", str(ALICE_BYTES), str(DEFAULT_QUOTA)), page
    # bob's own page shows his usage, never alice's
    page = _page(server, "/bob", tokens["bob"])
    assert "0 bytes of 5 MB used (0%)" in page and "1.37 MB" not in page


def test_org_members_see_the_organizations_usage_and_non_members_do_not(reg):
    store, server, tokens = reg
    store.quotas.set("acme", 10_000_000)  # the organization's own limit, over the default
    _push(server, tokens["alice"], "acme/shared", ACME_BYTES)
    page = _page(server, "/acme", tokens["alice"])
    assert "2.5 MB of 10 MB used (25%)" in page
    assert "A limit set for acme." in page and "Only the members of acme see this." in page
    assert "2.5 MB" not in _page(server, "/alice", tokens["alice"])  # a member's own page is theirs alone
    for token in (None, tokens["bob"]):
        page = _page(server, "/acme", token)
        assert "acme/shared" in page
        assert _shows_no_storage(page, "2.5 MB", "10 MB", str(ACME_BYTES)), page


def test_no_limit_when_none_applies_and_a_full_namespace_says_so(tmp_path: Path, hf_online):  # noqa: F811
    with running_registry(tmp_path / "reg", users={"dana": True}) as (store, server, tokens):
        _push(server, tokens["dana"], "dana/weights", ALICE_BYTES)
        page = _page(server, "/dana", tokens["dana"])
        assert "1.37 MB used · no limit" in page and "<meter" not in page
        assert _shows_no_storage(_page(server, "/dana"), "1.37 MB", "no limit")
        store.quotas.set("dana", 1_000_000)  # a limit below what is stored keeps it all and refuses more
        page = _page(server, "/dana", tokens["dana"])
        assert "1.37 MB of 1 MB used (137%)" in page
        assert "Full: new commits, branches, tags and repos are refused." in page
