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
from peftkit.testing import randomize
from tests.hub_helpers import HubUnderTest, any_hub, hub_env  # noqa: F401
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

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
