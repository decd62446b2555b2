"""Publish, find, pull and compose at load time, on the embedded hub and on a registry over loopback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.composition import Fuse, Stack
from peftkit.core.errors import AdapterLoadError, CompositionError
from peftkit.core.layer import TunerLayer
from peftkit.hub_client import api as hub
from peftkit.hub_client.errors import HubError, HubUnreachable, OfflineError, RepoNotFound, RevisionNotFound
from peftkit.registry import RegistryStore
from tests.hub_helpers import (BASE_ID, HubUnderTest, any_hub, hub_env, save_task_adapters,  # noqa: F401
                               tiny_base)
from tests.registry_conftest_helpers import running_registry
from tests.tiny_models import build_tiny, sample_inputs


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_task_adapters(tmp_path_factory.mktemp("adapters"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs("llama")).logits


def _local_composition(folders: dict[str, Path], node, **names: str) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(tiny_base())
    for name, folder in names.items():
        model.load_adapter(str(folders[folder]), name, activate=False)
    model.set_active(node)
    return model.eval()


def test_push_find_pull_and_compose(any_hub: HubUnderTest, folders: dict[str, Path]) -> None:  # noqa: F811
    h = any_hub.address
    lang = hub.push(folders["lang"], "alice/lang", hub=h, task="translation", dataset="wmt19",
                    metrics={"bleu": 21.5}, tags=["german"], progress=False)
    ner = hub.push(folders["ner"], "alice/ner", hub=h, task="token-classification", progress=False)
    ner_v2 = hub.push(folders["ner-v2"], "alice/ner", hub=h, revision="v2", commit_message="retrained",
                      task="token-classification", progress=False)
    assert lang.created and ner.created and not ner_v2.created
    assert len({lang.commit, ner.commit, ner_v2.commit}) == 3

    # find them by base model, task, method, tag and text
    found = {a.repo_id: a for a in hub.search(hub=h, base_model=BASE_ID)}
    assert set(found) == {"alice/lang", "alice/ner"}
    assert (found["alice/lang"].method, found["alice/lang"].base_model) == ("lora", BASE_ID)
    assert (found["alice/ner"].method, found["alice/ner"].task) == ("seq_bn", "token-classification")
    assert [a.repo_id for a in hub.search(hub=h, task="token-classification")] == ["alice/ner"]
    assert [a.repo_id for a in hub.search(hub=h, method="lora", base_model=BASE_ID)] == ["alice/lang"]
    assert [a.repo_id for a in hub.search("german", hub=h)] == ["alice/lang"]
    assert hub.search(hub=h, base_model="meta-llama/Llama-3.2-1B") == []
    assert [a.repo_id for a in hub.search(hub=h, dataset="wmt19")] == ["alice/lang"]
    assert hub.search(hub=h, dataset="conll2003") == []
    assert [a.repo_id for a in hub.search(hub=h, author="alice", sort="recent", limit=1)] == ["alice/ner"]

    # the card the push wrote
    info = hub.info("alice/lang", hub=h)
    assert info.card["library_name"] == "peft" and info.card["base_model"] == BASE_ID
    assert {"base_model:adapter:" + BASE_ID, "lora", "german"} <= set(info.card["tags"])
    assert info.card["datasets"] == ["wmt19"] and info.card["pipeline_tag"] == "translation"
    assert {f.path for f in hub.info("alice/ner@v2", hub=h).files} == {
        "README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert hub.info("alice/ner", hub=h).branches == {"main": ner.commit, "v2": ner_v2.commit}

    # pull by branch and by commit: verified, cached, exactly the pushed bytes
    v2 = hub.pull("alice/ner@v2", hub=h, progress=False)
    assert v2.name == ner_v2.commit
    assert _digest(v2 / "adapter_model.safetensors") == _digest(folders["ner-v2"] / "adapter_model.safetensors")
    v1 = hub.pull("alice/ner", hub=h, revision=ner.commit, progress=False)
    assert _digest(v1 / "adapter_model.safetensors") == _digest(folders["ner"] / "adapter_model.safetensors")
    with pytest.raises(RevisionNotFound, match="v3"):
        hub.pull("alice/ner@v3", hub=h)
    with pytest.raises(RepoNotFound, match="alice/nothing"):
        hub.pull("alice/nothing", hub=h)

    # compose at load time == the same composition built from the local folders
    loaded = peftkit.load(tiny_base(), "stack(alice/lang, alice/ner@v2)", hub=h, progress=False)
    assert list(loaded.adapters) == ["lang", "ner"] and loaded.active_composition == Stack("lang", "ner")
    expected = _local_composition(folders, Stack("lang", "ner"), lang="lang", ner="ner-v2")
    assert torch.allclose(_logits(loaded), _logits(expected), atol=1e-6)
    assert not torch.allclose(_logits(loaded), _logits(tiny_base()), atol=1e-3)
    # the Python forms: a list of ids (a stack), and blocks over names mapped to ids
    as_list = peftkit.load(tiny_base(), ["alice/lang", "alice/ner@v2"], hub=h, progress=False)
    as_blocks = peftkit.load(tiny_base(), Stack("de", "tags"), hub=h, progress=False,
                             adapters={"de": "alice/lang", "tags": f"alice/ner@{ner_v2.commit}"})
    assert list(as_blocks.adapters) == ["de", "tags"]
    for model in (as_list, as_blocks):
        assert torch.allclose(_logits(model), _logits(expected), atol=1e-6)
    main_version = _local_composition(folders, Stack("lang", "ner"), lang="lang", ner="ner")
    assert not torch.allclose(_logits(loaded), _logits(main_version), atol=1e-4)  # @v2 really was used

    hub.delete("alice/ner", hub=h)
    assert [a.repo_id for a in hub.search(hub=h)] == ["alice/lang"]


def test_failed_push_leaves_the_hub_as_it_was(any_hub: HubUnderTest, folders: dict[str, Path],  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    h = any_hub.address
    first = hub.push(folders["summ"], "alice/keep", hub=h, progress=False)
    before = hub.info("alice/keep", hub=h)

    def crash(self: RegistryStore, point: str) -> None:
        if point == "before_commit":
            raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(RegistryStore, "_checkpoint", crash)  # the store, in-process or behind the server
        for repo, revision in [("alice/keep", "main"), ("alice/keep", "exp"), ("alice/new", "main")]:
            with pytest.raises((HubError, RuntimeError)):
                hub.push(folders["lang"], repo, hub=h, revision=revision, progress=False)
    after = hub.info("alice/keep", hub=h)
    assert after.sha == first.commit and after.branches == {"main": first.commit}
    assert [(f.path, f.sha256 or f.oid) for f in after.files] == [(f.path, f.sha256 or f.oid) for f in before.files]
    with pytest.raises(RepoNotFound):
        hub.info("alice/new", hub=h)


def _history(under_test: HubUnderTest, repo_id: str) -> list[str]:
    """Every commit of ``repo_id``'s main branch, read from the store itself (not through the client)."""
    store = under_test.store or RegistryStore(Path(under_test.address.removeprefix("local:")))
    return [c.sha for c in store.list_commits(repo_id)]


def test_pushing_what_the_branch_holds_commits_nothing(any_hub: HubUnderTest, folders: dict[str, Path],  # noqa: F811
                                                       tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = any_hub.address
    first = hub.push(folders["lang"], "alice/same", hub=h, progress=False)
    assert first.changed and first.created and first.to_json()["changed"] is True
    history = _history(any_hub, "alice/same")

    again = hub.push(folders["lang"], "alice/same", hub=h, progress=False)
    assert (again.changed, again.created, again.commit) == (False, False, first.commit)
    assert again.to_json()["changed"] is False
    assert _history(any_hub, "alice/same") == history  # no empty commit either
    assert hub.info("alice/same", hub=h).sha == first.commit
    assert "No files have been modified" not in caplog.text

    # Any difference is a commit: new weights, an extra file, and that file's removal.
    assert hub.push(folders["ner-v2"], "alice/same", hub=h, progress=False).changed
    extra = tmp_path / "extra"
    shutil.copytree(folders["lang"], extra)
    (extra / "labels.json").write_text('["neg", "pos"]')
    with_extra = hub.push(extra, "alice/same", hub=h, progress=False)
    assert with_extra.changed
    without = hub.push(folders["lang"], "alice/same", hub=h, progress=False)
    assert without.changed and without.commit != with_extra.commit
    assert "labels.json" not in {f.path for f in hub.info("alice/same", hub=h).files}
    assert len(_history(any_hub, "alice/same")) == len(history) + 3

    # Visibility still changes without a commit.
    private = hub.push(folders["lang"], "alice/same", hub=h, private=True, progress=False)
    assert not private.changed and private.commit == without.commit
    assert hub.info("alice/same", hub=h).private


def test_offline_mode_refuses_remote_hubs_before_any_request(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: a request would be a connection error
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", "pkr_not_needed_offline")
    for variable in ("PEFTKIT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(variable, "1")
        offline = rf"^offline mode is on \({variable}=1\): .* {url} needs the network; unset {variable} to "
        for call in (lambda: hub.search("x", hub=url), lambda: hub.info("alice/x", hub=url),
                     lambda: hub.push(folders["lang"], "alice/x", hub=url, progress=False),
                     lambda: hub.delete("alice/x", hub=url), lambda: hub.whoami(url),
                     lambda: hub.login("pkr_not_needed_offline", url)):
            with pytest.raises(OfflineError, match=offline):
                call()
        monkeypatch.setenv(variable, "0")
    monkeypatch.setenv("PEFTKIT_OFFLINE", "1")
    local = f"local:{hub_env / 'local-hub'}"  # on this machine: works offline
    assert hub.push(folders["lang"], "alice/x", hub=local, progress=False).changed
    assert [h.repo_id for h in hub.search(hub=local)] == ["alice/x"]
    assert hub.info("alice/x", hub=local).method == "lora"


def test_offline_pull_and_load_come_from_the_cache(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with running_registry(hub_env / "registry", users={"alice": True}) as (store, server, tokens):
        hub.push(folders["ner"], "alice/ner", hub=server.url, token=tokens["alice"], progress=False)
        online = hub.pull("alice/ner", hub=server.url, progress=False)
        url = server.url
    with pytest.raises(HubUnreachable, match=f"cannot reach hub at {url}"):
        hub.pull("alice/ner", hub=url)
    monkeypatch.setenv("PEFTKIT_OFFLINE", "1")  # the server is gone: every answer must come from the cache
    assert hub.pull("alice/ner", hub=url) == online
    assert hub.pull(f"alice/ner@{online.name}", hub=url) == online
    loaded = peftkit.load(tiny_base(), "alice/ner", hub=url)
    expected = _local_composition(folders, "ner", ner="ner")
    assert torch.allclose(_logits(loaded), _logits(expected), atol=1e-6)
    with pytest.raises(OfflineError, match=r"alice/ner@v2 on http.* is not in the download cache .*offline mode"):
        hub.pull("alice/ner@v2", hub=url)
    monkeypatch.setenv("PEFTKIT_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.pull("alice/ner", hub=url) == online


def test_hf_hub_path_against_the_registry(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--hub hf` goes to HF_ENDPOINT (huggingface.co by default); pointed at our registry it runs for real."""
    with running_registry(hub_env / "registry", users={"alice": True}) as (store, server, tokens):
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", tokens["alice"])  # what a Hugging Face user would have set
        pushed = hub.push(folders["lang"], "alice/lang", hub="hf", private=True, progress=False)
        assert [a.repo_id for a in hub.search(hub="hf", base_model=BASE_ID)] == ["alice/lang"]
        assert hub.info("alice/lang", hub="hf").private
        path = hub.pull("alice/lang", hub="hf", progress=False)
        assert path.name == pushed.commit and "huggingface.co" not in str(path)
        monkeypatch.delenv("HF_TOKEN")
        assert hub.search(hub="hf") == []  # private: invisible without the token
        monkeypatch.setenv("HF_TOKEN", tokens["alice"])
        hub.push(folders["lang"], "alice/lang", hub="hf", private=False, progress=False)
        assert not hub.info("alice/lang", hub="hf").private


def test_push_a_live_model_with_its_card(hub_env: Path, tmp_path: Path) -> None:  # noqa: F811
    h = f"local:{hub_env / 'hub'}"
    model = peftkit.adapt(tiny_base(), "lora[r=4]", "sentiment")
    model.add_adapter("other", "ia3")
    with pytest.raises(HubError, match="several adapters.*adapter_name"):
        hub.push(model, "alice/sentiment", hub=h)
    result = hub.push(model, "alice/sentiment", hub=h, adapter_name="sentiment", task="text-classification",
                      dataset=["sst2", "imdb"], metrics={"accuracy": 0.91}, license="apache-2.0",
                      description="Sentiment of movie reviews.")
    folder = hub.pull("alice/sentiment", hub=h)
    card = (folder / "README.md").read_text()
    assert "Sentiment of movie reviews." in card and "| accuracy | 0.91 |" in card
    assert 'peftkit.load("peftkit-tests/tiny-llama", "alice/sentiment")' in card
    info = hub.info("alice/sentiment", hub=h)
    assert info.sha == result.commit and info.task == "text-classification"
    assert info.card["datasets"] == ["sst2", "imdb"] and info.card["license"] == "apache-2.0"

    # a folder that records its base model as a local path: warned about, or replaced by base_model=
    local = tmp_path / "local-base"
    model.save_adapter(str(local), "other")
    config = json.loads((local / "adapter_config.json").read_text())
    (local / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="/models/llama")))
    with pytest.warns(UserWarning, match="local folder '/models/llama'"):
        hub.push(local, "alice/other", hub=h)
    hub.push(local, "alice/other", hub=h, base_model=BASE_ID)
    assert [a.repo_id for a in hub.search(hub=h, base_model=BASE_ID, method="ia3")] == ["alice/other"]
    pulled = json.loads((hub.pull("alice/other", hub=h) / "adapter_config.json").read_text())
    assert pulled["base_model_name_or_path"] == BASE_ID


def test_composition_repo_with_fusion_weights(any_hub: HubUnderTest, folders: dict[str, Path],  # noqa: F811
                                              tmp_path: Path) -> None:
    model = peftkit.AdaptedModel(tiny_base())
    model.load_adapter(str(folders["lang"]), "lang", activate=False)
    model.load_adapter(str(folders["ner"]), "ner", activate=False)
    fuse = Fuse("lang", "ner", name="lang_ner")
    model.add_fusion(fuse)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.fusion_parameters("lang_ner"):
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    model.set_active(fuse)
    model.save_composition(str(tmp_path / "fused"))
    h = any_hub.address
    hub.push(tmp_path / "fused", "alice/lang-ner", hub=h, progress=False)
    hub.push(folders["summ"], "alice/summ", hub=h, progress=False)
    assert hub.info("alice/lang-ner", hub=h).card["library_name"] == "peftkit"

    loaded = peftkit.load(tiny_base(), "alice/lang-ner", hub=h, progress=False)
    assert loaded.active_composition == fuse and list(loaded.fusions) == ["lang_ner"]
    assert torch.allclose(_logits(loaded), _logits(model.eval()), atol=1e-6)

    stacked = peftkit.load(tiny_base(), "stack(alice/summ, alice/lang-ner)", hub=h, progress=False)
    assert stacked.active_composition == Stack("summ", fuse)
    model.load_adapter(str(folders["summ"]), "summ", activate=False)
    model.set_active(Stack("summ", fuse))
    assert torch.allclose(_logits(stacked), _logits(model), atol=1e-6)


def test_checks_run_before_the_model_is_touched(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                tmp_path: Path) -> None:
    h = f"local:{hub_env / 'hub'}"
    hub.push(folders["lang"], "alice/lang", hub=h, progress=False)
    gpt2 = build_tiny("gpt2")
    flags = [p.requires_grad for p in gpt2.parameters()]
    with pytest.raises(AdapterLoadError, match="model_type='llama'"):
        peftkit.load(gpt2, "alice/lang", hub=h)
    assert [p.requires_grad for p in gpt2.parameters()] == flags
    assert not any(isinstance(m, TunerLayer) for m in gpt2.modules())

    # a method whose plugin is not installed: the error names the distribution to install
    fancy = tmp_path / "fancy"
    fancy.mkdir()
    config = json.loads((folders["lang"] / "adapter_config.json").read_text())
    own = json.loads((folders["lang"] / "peftkit.json").read_text())  # written in the older layout, in the config:
    config["peftkit"] = dict(own, method="fancy", plugin="peftkit-fancy", plugin_version="2.1.0")
    (fancy / "adapter_config.json").write_text(json.dumps(config))
    (fancy / "adapter_model.safetensors").write_bytes((folders["lang"] / "adapter_model.safetensors").read_bytes())
    hub.push(fancy, "alice/fancy", hub=h, progress=False)
    base = tiny_base()
    with pytest.raises(AdapterLoadError, match=r"pip install 'peftkit-fancy>=2'"):
        peftkit.load(base, "stack(alice/lang, alice/fancy)", hub=h)
    assert not any(isinstance(m, TunerLayer) for m in base.modules())

    # a leaf that is no hub repo fails before anything is downloaded or loaded
    with pytest.raises(CompositionError, match="'nothing' in the composition is neither a hub repo"):
        peftkit.load(base, "stack(alice/lang, nothing)", hub=h)
    assert not any(isinstance(m, TunerLayer) for m in base.modules())
