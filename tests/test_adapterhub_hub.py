"""AdapterHub-format adapters on a hub: pushed in that format (converted from peftkit's), pulled and loaded.

Real pushes and pulls against the embedded hub and a registry served on 127.0.0.1 (``any_hub``).
That ``adapters`` reads what ``save_adapter(format="adapters")`` writes is checked against the
real library in tests/test_adapterhub_format.py; here the conversion and the hub's handling are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import run
from peftkit.core.adapterhub_format import is_adapterhub_config
from peftkit.hub_client import api as hub
from peftkit.hub_client.errors import HubError
from peftkit.hub_client.resolve import open_hub
from peftkit.testing import randomize
from tests.hub_helpers import HubUnderTest, any_hub, hub_env  # noqa: F401
from tests.tiny_models import VOCAB, build_tiny, output_tensor, sample_inputs

LABELS = {0: "neg", 1: "neu", 2: "pos"}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """(base model folder, peftkit adapter folder with a head, the adapted model's logits)."""
    from transformers import BertForSequenceClassification

    base = build_tiny("bert")
    base.config.id2label = LABELS
    base.config.label2id = {v: k for k, v in LABELS.items()}
    base.save_pretrained(tmp_path / "base")
    model = peftkit.adapt(BertForSequenceClassification.from_pretrained(tmp_path / "base").eval(),
                          "seq_bn[reduction_factor=4,original_ln_before=true,init_weights=false]")
    randomize(model, "default", seed=4, scale=0.3)
    model.eval()
    model.save_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        logits = output_tensor(model(**sample_inputs("bert")))
    return tmp_path / "base", tmp_path / "adapter", logits


def _loaded_logits(base: Path, folder: Path) -> tuple[torch.Tensor, list[str] | None]:
    from transformers import BertForSequenceClassification

    model = peftkit.from_pretrained(BertForSequenceClassification.from_pretrained(base).eval(), str(folder))
    with torch.no_grad():
        return output_tensor(model(**sample_inputs("bert"))), model.adapter_labels("default")


def test_a_peftkit_folder_is_pushed_in_adapterhub_format_and_pulled(saved, any_hub: HubUnderTest,  # noqa: F811
                                                                    capsys) -> None:
    base, folder, logits = saved
    code = run(["hub", "push", str(folder), "alice/tiny-bert-sentiment", "--hub", any_hub.address, "--format",
                "adapters", "--base-model", "org/tiny-bert", "-q"])
    assert code == 0, capsys.readouterr().err
    pulled = hub.pull("alice/tiny-bert-sentiment", hub=any_hub.address, progress=False)
    names = sorted(p.name for p in pulled.iterdir())
    assert {"adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors",
            "README.md"} <= set(names) and "adapter_model.safetensors" not in names
    config = json.loads((pulled / "adapter_config.json").read_text())
    assert is_adapterhub_config(config) and config["model_name"] == "org/tiny-bert"
    assert config["name"] == "tiny-bert-sentiment" and config["config"]["original_ln_before"] is True
    assert "library_name: adapter-transformers" in (pulled / "README.md").read_text()
    ours, labels = _loaded_logits(base, pulled)
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)
    assert labels == ["neg", "neu", "pos"]


def test_a_live_adapter_is_pushed_in_either_format(saved, hub_env: Path) -> None:  # noqa: F811
    base, folder, logits = saved
    address = f"local:{hub_env / 'local-hub'}"
    model = peftkit.from_pretrained(_model(base), str(folder))
    hub.push(model, "alice/live", hub=address, format="adapters", base_model="org/tiny-bert", progress=False)
    pulled = hub.pull("alice/live", hub=address, progress=False)
    assert is_adapterhub_config(json.loads((pulled / "adapter_config.json").read_text()))
    torch.testing.assert_close(_loaded_logits(base, pulled)[0], logits, atol=1e-5, rtol=0)
    hub.push(model, "alice/live-peftkit", hub=address, format="peftkit", base_model="org/tiny-bert", progress=False)
    mine = hub.pull("alice/live-peftkit", hub=address, progress=False)
    assert (mine / "adapter_model.safetensors").is_file() and not (mine / "adapter.safetensors").exists()
    with pytest.raises(HubError, match="is in AdapterHub's format; to publish it in peftkit's, load it"):
        hub.push(str(pulled), "alice/back", hub=address, format="peftkit", progress=False)


def _model(base: Path) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(base).eval()


def test_push_format_is_checked_before_anything_is_sent(saved, hub_env: Path, capsys) -> None:  # noqa: F811
    _, folder, _ = saved
    address = f"local:{hub_env / 'local-hub'}"
    with pytest.raises(HubError, match="unknown folder format 'adapterhub'; choose one of peftkit, adapters"):
        hub.push(str(folder), "alice/x", hub=address, format="adapterhub", progress=False)
    assert run(["hub", "push", str(folder), "alice/x", "--hub", address, "--format", "hf"]) == 2
    assert "'hf' is not one of 'peftkit', 'adapters'" in capsys.readouterr().err
    assert hub.search(hub=address) == []


#: The card ``adapters``' push_adapter_to_hub writes (its template, filled in as it fills it).
ADAPTERS_CARD = """---
tags:
- adapter-transformers
- bert
- adapterhub:sentiment/sst-2
datasets:
- glue
---

# Adapter `alice/bert-sst2` for org/tiny-bert

An [adapter](https://adapterhub.ml) for the `org/tiny-bert` model that was trained on the glue dataset and \
includes a prediction head for classification.
"""


def test_a_repo_published_as_adapters_publishes_it_is_found_by_its_fields_and_loads(
        saved, any_hub: HubUnderTest) -> None:  # noqa: F811
    """Files and card exactly as ``adapters`` uploads them (no base_model in the card, no method tag):
    the hub indexes the library, base model (config's model_name), method (from the config) and task
    (``adapterhub:`` tag); pull and load give the adapter's logits."""
    base, folder, logits = saved
    model = peftkit.from_pretrained(_model(base), str(folder), adapter_name="bert-sst2")
    out = folder.parent / "as_adapters"
    model.save_adapter(str(out), "bert-sst2", format="adapters")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "model_name": "org/tiny-bert"}))
    (out / "README.md").write_text(ADAPTERS_CARD)
    backend = open_hub(any_hub.address, token=any_hub.token)
    backend.push("alice/bert-sst2", {p.name: p for p in out.iterdir()}, private=None,
                 commit_message="Upload adapter", revision="main", progress=False)
    found = {h.repo_id: h for h in hub.search(hub=any_hub.address, base_model="org/tiny-bert")}
    assert set(found) == {"alice/bert-sst2"}
    hit = found["alice/bert-sst2"]
    assert hit.method == "seq_bn" and hit.task == "sentiment" and hit.library_name == "adapter-transformers"
    for query in ({"method": "seq_bn"}, {"task": "sentiment"}, {"tags": ["adapterhub:sentiment/sst-2"]},
                  {"tags": ["adapter-transformers"]}, {"dataset": "glue"}, {"text": "sst-2"}):
        assert [h.repo_id for h in hub.search(hub=any_hub.address, **query)] == ["alice/bert-sst2"], query
    assert hub.search(hub=any_hub.address, method="lora") == []
    pulled = hub.pull("alice/bert-sst2", hub=any_hub.address, progress=False)
    ours, labels = _loaded_logits(base, pulled)
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)
    assert labels == ["neg", "neu", "pos"]


def test_saving_without_a_head_over_a_folder_with_one_leaves_no_stale_head(saved, tmp_path: Path) -> None:
    base, folder, _ = saved
    model = peftkit.from_pretrained(_model(base), str(folder))
    out = tmp_path / "out"
    model.save_adapter(str(out), format="adapters")
    assert (out / "head_config.json").is_file()
    from transformers import BertModel

    bare = peftkit.adapt(BertModel.from_pretrained(base).eval(), "seq_bn[reduction_factor=4]")
    bare.save_adapter(str(out), format="adapters")  # the same folder, now without a head
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_a_head_config_with_odd_label_ids_loads_the_head_without_names(saved, tmp_path: Path) -> None:
    base, folder, logits = saved
    model = peftkit.from_pretrained(_model(base), str(folder))
    out = tmp_path / "odd"
    model.save_adapter(str(out), format="adapters")
    data = json.loads((out / "head_config.json").read_text())
    data["config"]["label2id"] = {"neg": "zero", "neu": 1, "pos": 2}
    (out / "head_config.json").write_text(json.dumps(data))
    ours, labels = _loaded_logits(base, out)
    torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)
    assert labels == ["neg", "neu", "pos"]  # the base model's names, as the sizes agree


@pytest.fixture
def on_bare_base(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """(a bare BertModel's folder, as a sentence-transformers base is saved; an AdapterHub folder of a 3-label
    classifier trained on it, with its head; that classifier's logits)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, max_position_embeddings=128)).save_pretrained(tmp_path / "base")
    task = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3, id2label=LABELS,
                                                         label2id={v: k for k, v in LABELS.items()})
    model = peftkit.adapt(task.eval(), "seq_bn[reduction_factor=4,init_weights=false]")
    randomize(model, "default", seed=5, scale=0.3)
    model.eval()
    model.save_adapter(str(tmp_path / "adapter"), format="adapters")
    with torch.no_grad():
        logits = output_tensor(model(**sample_inputs("bert")))
    return tmp_path / "base", tmp_path / "adapter", logits


def _check_task_model(model: torch.nn.Module, logits: torch.Tensor) -> None:
    """``model`` (adapted) is the classifier the adapter was trained on: its class, labels and logits."""
    assert type(model.base_model).__name__ == "BertForSequenceClassification"
    name = next(iter(model.adapter_records))
    assert model.adapter_labels(name) == ["neg", "neu", "pos"]
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(**sample_inputs("bert"))), logits, atol=1e-5, rtol=0)


def test_an_adapterhub_head_picks_the_task_class_of_a_base_loaded_by_path(on_bare_base, hub_env: Path,  # noqa: F811
                                                                          recwarn) -> None:
    """A base model given by folder is loaded with the class of the AdapterHub head (head_config.json's
    head_type), not as a bare BertModel without it: peftkit.load from a hub, and the shared base loading of
    the CLI commands (merge, auto-compose) for a local folder."""
    from peftkit.adapter_sources import plain_base_model

    base, folder, logits = on_bare_base
    address = f"local:{hub_env / 'local-hub'}"
    hub.push(str(folder), "alice/bare-head", hub=address, base_model="org/tiny-bert", progress=False)
    _check_task_model(peftkit.load(str(base), "alice/bare-head", hub=address, progress=False), logits)
    plain = plain_base_model(str(base), [str(folder)], progress=False)
    assert type(plain.base_model).__name__ == "BertForSequenceClassification"
    plain.load_adapter(str(folder), "default")
    _check_task_model(plain, logits)
    assert not [w for w in recwarn if "head" in str(w.message) or "random" in str(w.message)]


@pytest.mark.parametrize(("head", "expected"), [
    ({"config": {"head_type": "classification"}, "model_type": "bert"}, "BertForSequenceClassification"),
    ({"config": {"head_type": "tagging"}, "model_type": "roberta"}, "RobertaForTokenClassification"),
    ({"config": {"head_type": "causal_lm"}, "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"config": {"head_type": "masked_lm"}, "model_type": "bert"}, "BertForMaskedLM"),
    ({"config": None, "model_class": "LlamaForCausalLM"}, "LlamaForCausalLM"),
    ({"config": {"head_type": "multiple_choice"}, "model_type": "bert"}, None),
    ({"config": {"head_type": "classification"}, "model_type": "no-such-family"}, None),
    ({"config": None, "model_class": "BertAdapterModel"}, None),
])
def test_the_class_an_adapterhub_head_asks_for(head: dict, expected: str | None) -> None:
    from peftkit.core.adapterhub_heads import HEAD_CONFIG_KEY, head_model_class

    assert head_model_class({"config": {}, "model_type": "bert", HEAD_CONFIG_KEY: head}) == expected
    assert head_model_class({"config": {}, "model_type": "bert"}) is None  # no head: no class


def test_a_reft_folder_as_adapters_publishes_it_is_found_by_method_reft(tmp_path: Path) -> None:
    """AdapterHub's ReFT configs (architecture "reft", any preset) are indexed as peftkit's ``reft``
    (the index named no method for them, so ``hub search --method reft`` missed them)."""
    from peftkit.registry import RegistryStore

    store = RegistryStore(tmp_path / "reg")
    store.create_repo("alice/reft-sst2", owner="alice")
    config = {"version": "1.3.0", "model_class": "BertForSequenceClassification", "model_name": "org/tiny-bert",
              "config": {"architecture": "reft", "orthogonality": True, "r": 1, "prefix_positions": 3,
                         "suffix_positions": 0, "layers": "all", "tied_weights": False}}
    store.commit("alice/reft-sst2", {"adapter_config.json": json.dumps(config), "README.md": ADAPTERS_CARD})
    assert [r.repo_id for r in store.search(method="reft")] == ["alice/reft-sst2"]
    assert list(store.repo_info("alice/reft-sst2").methods) == ["reft"]
