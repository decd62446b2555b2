"""The registry indexes a repo's library by what loads its files, not by what its card says.

A folder whose ``peft_type`` PEFT has is ``peft`` even when its card says ``library_name: transformers``
(transformers' ``push_to_hub`` rewrites PEFT's card). A folder whose ``peft_type`` PEFT does not have (peftkit
writes ``BITFIT`` for a method PEFT lacks, ``PROMPT_TUNING_EMBEDDING_OUTPUT`` for a config PEFT cannot express) is
``peftkit`` whatever its card says, ``peft`` included, and with no card: PEFT refuses it, so neither a search by
library nor the repo page's PEFT loading snippet may say otherwise. Folders saved by peftkit for real, pushed with
huggingface_hub's ``upload_folder`` to a registry on 127.0.0.1, read back through its API and web pages.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import hf_online, running_registry  # noqa: F401
from tests.registry_web_helpers import WebClient, result_ids

from peftkit.registry.cards import extract_metadata, library_of
from peftkit.registry.cli import registry_group

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi  # noqa: E402

#: The only repo PEFT loads: a LoRA folder whose card transformers rewrote.
PEFT_REPO = "alice/lora-transformers-card"
#: repo -> (saved folder, what its card's library_name becomes: a name, or None for no card at all)
REPOS = {
    PEFT_REPO: ("lora", "transformers"),
    "alice/bitfit-transformers-card": ("bitfit", "transformers"),
    "alice/bitfit-peft-card": ("bitfit", "peft"),
    "alice/bitfit-no-card": ("bitfit", None),
    "alice/prompt-output-peft-card": ("prompt_output", "peft"),
}
PEFTKIT_REPOS = sorted(set(REPOS) - {PEFT_REPO})
SNIPPET = "PeftModel.from_pretrained"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """peftkit's own folders on a tiny bert: LoRA (PEFT's ``LORA``), BitFit (``BITFIT``, PEFT has none) and
    prompt tuning at the embedding output (``PROMPT_TUNING_EMBEDDING_OUTPUT``, in PEFT's layout with peftkit.json)."""
    import peftkit
    from tests.tiny_models import build_tiny

    root = tmp_path_factory.mktemp("library")
    specs = {"lora": "lora[r=2]", "bitfit": "bitfit",
             "prompt_output": "prompt_tuning[num_virtual_tokens=3,placement=embedding_output]"}
    for name, spec in specs.items():
        peftkit.adapt(build_tiny("bert"), spec).save_adapter(str(root / name))
    return {name: root / name for name in specs}


def _folder_for(saved: dict[str, Path], root: Path, repo: str) -> Path:
    """A copy of the repo's saved folder with the card :data:`REPOS` gives it (a card saying ``peft`` also carries
    the tag ``peft``, as PEFT's own cards do)."""
    source, library = REPOS[repo]
    folder = root / repo.replace("/", "__")
    shutil.copytree(saved[source], folder)
    card = folder / "README.md"
    if library is None:
        card.unlink()
        return folder
    text = re.sub(r"^library_name: .*$", f"library_name: {library}", card.read_text(), count=1, flags=re.M)
    if library == "peft":
        text = text.replace("tags:\n", "tags:\n- peft\n", 1)
    card.write_text(text)
    return folder


@pytest.fixture
def registry(saved: dict[str, Path], tmp_path: Path, hf_online):  # noqa: F811
    """A registry on 127.0.0.1 holding :data:`REPOS`, each pushed by huggingface_hub; yields ``(server, data)``."""
    with running_registry(tmp_path / "reg", users={"alice": True}) as (_, server, tokens):
        api = HfApi(endpoint=server.url, token=tokens["alice"])
        for repo in REPOS:
            api.create_repo(repo)
            api.upload_folder(folder_path=_folder_for(saved, tmp_path, repo), repo_id=repo)
        yield server, tmp_path / "reg"


def _anonymous(server) -> HfApi:
    return HfApi(endpoint=server.url, token=False)


def _found(api: HfApi, **query) -> list[str]:
    return sorted(m.id for m in api.list_models(**query))


def test_the_library_is_what_loads_the_files(registry) -> None:
    server, _ = registry
    api = _anonymous(server)
    libraries = {repo: api.model_info(repo).library_name for repo in REPOS}
    assert libraries == {repo: "peft" if repo == PEFT_REPO else "peftkit" for repo in REPOS}
    for repo in PEFTKIT_REPOS:  # not even the card's tag `peft` stays
        tags = api.model_info(repo).tags
        assert "peftkit" in tags and "peft" not in tags, (repo, tags)
    assert {"peft", "transformers", "lora"} <= set(api.model_info(PEFT_REPO).tags)


def test_a_search_by_library_finds_each_repo_where_it_belongs(registry) -> None:
    server, _ = registry
    api = _anonymous(server)
    assert _found(api, filter="library:peft") == [PEFT_REPO]
    assert _found(api, filter="peft") == [PEFT_REPO]  # the Hub's form: the library as a tag
    assert _found(api, filter="library:peftkit") == PEFTKIT_REPOS
    # the library a card names stays a tag (the Hub shows it too), but is not the library
    assert _found(api, filter="transformers") == ["alice/bitfit-transformers-card", PEFT_REPO]
    assert _found(api, filter="library:transformers") == []
    _, _, page = WebClient(server.url).get("/?tag=peft")
    assert result_ids(page) == [PEFT_REPO]


def test_the_page_shows_peft_loading_only_for_a_folder_peft_loads(registry) -> None:
    server, _ = registry
    web = WebClient(server.url)
    for repo in REPOS:
        status, _, page = web.get(f"/{repo}")
        assert status == 200, (repo, page[:300])
        facts = page.split('class="facts"', 1)[1]
        fmt = re.search(r"<dt>Format</dt><dd>([^<]*)</dd>", facts).group(1)
        assert "peftkit.load(" in page, repo
        if repo == PEFT_REPO:
            assert SNIPPET in page and fmt == "PEFT (loads with PEFT and peftkit)", (repo, fmt)
        else:
            assert SNIPPET not in page and "from peft import" not in page and fmt == "peftkit", (repo, fmt)


def test_reindex_gives_repos_indexed_by_the_old_rule_the_new_library(registry) -> None:
    """A registry upgraded from a peftkit that indexed every ``peft_type`` as ``peft`` keeps that until
    ``peftkit registry reindex`` (or the repo's next commit); reindex applies the new rule while it serves."""
    server, data = registry
    api = _anonymous(server)
    repo = "alice/bitfit-transformers-card"
    from peftkit.registry import RegistryStore

    with RegistryStore(data) as store, store.db.write() as conn:  # as the old rule indexed it
        (rid,) = conn.execute("SELECT id FROM repos WHERE repo_id = ?", (repo,)).fetchone()
        conn.execute("UPDATE repo_meta SET library_name = 'peft', meta_json = json_set(meta_json, "
                     "'$.library_name', 'peft') WHERE repo = ?", (rid,))
        conn.execute("UPDATE facets SET value = 'peft' WHERE kind = 'library' AND repo = ?", (rid,))
    assert api.model_info(repo).library_name == "peft" and repo in _found(api, filter="library:peft")

    result = CliRunner().invoke(registry_group, ["reindex", "--data", str(data)], catch_exceptions=False)
    assert result.exit_code == 0 and f"reindexed {len(REPOS)} repo(s)" in result.output
    assert api.model_info(repo).library_name == "peftkit"
    assert _found(api, filter="library:peft") == [PEFT_REPO]
    assert _found(api, filter="library:peftkit") == PEFTKIT_REPOS


@pytest.mark.parametrize("card_library, config, library", [
    ("transformers", {"peft_type": "LORA"}, "peft"),
    ("peftkit", {"peft_type": "LORA"}, "peftkit"),  # a card saying peftkit for a folder PEFT loads: both load it
    (None, {"peft_type": "LORA"}, "peft"),
    ("peft", {"peft_type": "BITFIT"}, "peftkit"),
    ("adapter-transformers", {"peft_type": "BITFIT"}, "peftkit"),
    (None, {"peft_type": 7}, "peftkit"),
    (None, {"peftkit": {"method": "x"}}, "peftkit"),
    ("diffusers", {}, "diffusers"),
    (None, {}, None),
])
def test_the_library_rule(card_library: str | None, config: dict, library: str | None) -> None:
    assert library_of(card_library, config) == library


def test_adapterhub_repos_keep_their_library() -> None:
    config = b'{"config": {"architecture": "bottleneck"}, "version": "1.0", "model_name": "bert-base-uncased"}'
    assert extract_metadata(None, config).library_name == "adapter-transformers"
    card = b"---\ntags: [adapters, bert]\n---\n"
    assert extract_metadata(card, b'{"peft_type": "LORA"}').library_name == "peft"
    assert extract_metadata(card, None).library_name == "adapter-transformers"
