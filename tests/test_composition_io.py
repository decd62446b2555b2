"""A composition setup saved to one folder loads back into the same behaviour."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit import AdapterLoadError, AdaptedModel, Fuse, Stack
from peftkit.core.fusion import fusion_layers
from tests.composition_util import inputs, logits, lora_model
from tests.tiny_models import build_tiny

ATOL = 1e-6


@pytest.fixture
def saved(tmp_path):
    model = lora_model(("ner", "pos", "other"))
    torch.manual_seed(4)
    model.add_adapter("lang", "seq_bn[init_weights=false,reduction_factor=4]")
    model.add_fusion(Fuse("ner", "pos", name="ner_pos"), temperature=3.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in fusion_layers(model, "ner_pos"):
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    node = Stack("lang", Fuse("ner", "pos", name="ner_pos"))
    batch = inputs()
    expected = logits(model, batch, node)
    model.save_composition(tmp_path / "setup")
    return tmp_path / "setup", node, batch, expected


def test_round_trip(saved):
    path, node, batch, expected = saved
    data = json.loads((path / "composition.json").read_text())
    assert data["composition_string"] == 'stack(lang, fuse(ner, pos, name="ner_pos"))'
    assert data["adapters"] == {"lang": "adapters/lang", "ner": "adapters/ner", "pos": "adapters/pos"}
    assert data["fusions"] == {"ner_pos": "fusions/ner_pos"}
    assert (path / "adapters" / "ner" / "adapter_model.safetensors").is_file()
    assert (path / "fusions" / "ner_pos" / "fusion_config.json").is_file()
    loaded = AdaptedModel.load_composition(build_tiny("llama"), path)
    assert loaded.active_composition == node
    assert sorted(loaded.adapters) == ["lang", "ner", "pos"]
    assert loaded.adapter_state.fusions["ner_pos"].config.temperature == 3.0
    assert torch.allclose(logits(loaded, batch), expected, atol=ATOL)
    also = peftkit.load_composition(build_tiny("llama"), path)
    assert torch.allclose(logits(also, batch), expected, atol=ATOL)


def test_member_folders_are_peft_loadable(saved):
    from peft import PeftModel

    path, *_ = saved
    peft_model = PeftModel.from_pretrained(build_tiny("llama"), str(path / "adapters" / "ner"))
    assert "default" in peft_model.peft_config


def test_failed_load_leaves_the_model_as_it_was(saved):
    path, node, batch, expected = saved
    (path / "fusions" / "ner_pos" / "fusion_model.safetensors").write_bytes(b"not safetensors")
    base = build_tiny("llama")
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(AdapterLoadError, match="truncated or corrupted"):
        AdaptedModel.load_composition(base, path)
    assert [p.requires_grad for p in base.parameters()] == flags
    assert not any(type(m).__name__ == "TunerLayer" for m in base.modules())
    existing = lora_model(("keep",))
    existing.set_active("keep")
    with pytest.raises(AdapterLoadError):
        AdaptedModel.load_composition(existing, path)
    assert list(existing.adapters) == ["keep"] and existing.active_adapters == ["keep"]
    assert existing.fusions == {}


def test_name_clash_and_bad_folders(saved, tmp_path):
    path, *_ = saved
    clash = lora_model(("ner",))
    with pytest.raises(AdapterLoadError, match="already has adapters named 'ner'"):
        AdaptedModel.load_composition(clash, path)
    with pytest.raises(AdapterLoadError, match="no composition.json"):
        AdaptedModel.load_composition(build_tiny("llama"), tmp_path)
    data = json.loads((path / "composition.json").read_text())
    data["adapters"]["ner"] = "../../elsewhere"
    (path / "composition.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match="outside the composition folder"):
        AdaptedModel.load_composition(build_tiny("llama"), path)


def test_save_needs_a_composition(tmp_path):
    model = lora_model(("a",))
    with pytest.raises(peftkit.CompositionError, match="no composition is active"):
        model.save_composition(tmp_path / "x")
    model.save_composition(tmp_path / "x", "a")
    assert json.loads((tmp_path / "x" / "composition.json").read_text())["composition"] == "a"


@pytest.mark.parametrize("call", ["load_composition", "from_pretrained"])
def test_a_model_path_where_a_model_object_belongs_is_a_clear_error(call: str, tmp_path) -> None:
    """Docs write ``peftkit.load_composition(base, folder)``; a user passing the base model's folder
    (as peftkit.load takes it) gets an error naming what to do, not an AttributeError."""
    with pytest.raises(peftkit.ConfigError, match=r"takes a model object.*from_pretrained\('models/minilm'\).*"
                                                  r"peftkit\.load\('models/minilm'"):
        getattr(peftkit, call)("models/minilm", str(tmp_path))
    with pytest.raises(peftkit.ConfigError, match="takes a model object"):
        getattr(peftkit, call)(tmp_path, str(tmp_path))
