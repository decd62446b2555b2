"""The third-party plugin examples/peftkit-loha, installed for real (see the Makefile):
listed, trained, saved, loaded, merged, composed with LoRA, and file-compatible
with Hugging Face PEFT's LoHa in both directions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import peftkit
from peftkit import AdaptedModel, Average, Stack
from peftkit.cli import run
from peftkit.core.errors import AdapterLoadError
from peftkit.core.layer import TunerLayer
from peftkit.core.plugins import get_registry
from tests.tiny_models import build_tiny, output_tensor, sample_inputs


def _out(model, arch="llama"):
    with torch.no_grad():
        return output_tensor(model(**sample_inputs(arch)))


def test_installed_through_its_entry_point(capsys):
    assert run(["methods", "--json"]) == 0
    loha = {m["name"]: m for m in json.loads(capsys.readouterr().out)}["loha"]
    assert (loha["distribution"], loha["version"], loha["plugin"]) == ("peftkit-loha", "1.0.0", "loha")
    assert loha["can_merge"] and loha["peft_format"]
    record = get_registry().records["loha"]
    assert not record.builtin and record.errors == [] and record.api_version == 1


def test_loading_the_plugin_imports_no_torch():
    code = ("import sys, peftkit; method = peftkit.get_method('loha'); "
            "assert method.distribution == 'peftkit-loha'; "
            "assert 'torch' not in sys.modules, 'loading peftkit-loha imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_trains_and_only_the_adapter_changes():
    """A tiny task: predict token 7 everywhere. (The tiny model's tied 32-dim
    embeddings cap how far the loss can fall, at about 4.24 from 4.89.)"""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "loha[r=4,alpha=32,target_modules='all-linear']")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".hada_w" in n for n in trained)
    batch = sample_inputs("llama", batch=4, seq=12)
    labels = torch.full_like(batch["input_ids"], 7)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), name
    assert all(not torch.equal(params[n], before) for n, before in trained.items())


def test_save_load_merge_round_trip(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "loha[r=4,init_weights=false]", trainable=False).eval()
    expected = _out(model)
    assert not torch.allclose(expected, _out(build_tiny("llama")))
    model.save_adapter(tmp_path / "loha")
    config = json.loads((tmp_path / "loha" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["target_modules"] == ["q_proj", "v_proj"]
    own = json.loads((tmp_path / "loha" / "peftkit.json").read_text())  # PEFT's format: the record apart
    assert "peftkit" not in config and (own["plugin"], own["plugin_version"]) == ("peftkit-loha", "1.0.0")

    loaded = AdaptedModel.from_pretrained(build_tiny("llama"), str(tmp_path / "loha"))
    assert torch.allclose(_out(loaded), expected, atol=1e-6)
    loaded.merge_adapter()
    assert torch.allclose(_out(loaded), expected, atol=1e-5)
    loaded.unmerge_adapter()
    assert torch.allclose(_out(loaded), expected, atol=1e-5)
    bare = loaded.merge_and_unload()
    assert not any(isinstance(m, TunerLayer) for m in bare.modules())
    assert torch.allclose(_out(bare), expected, atol=1e-5)


def test_gpt2_conv1d_layers_merge_exactly():
    model = peftkit.adapt(build_tiny("gpt2"), "loha[r=2,init_weights=false]", trainable=False).eval()
    assert [s.name for s in model.adapter_record("default").sites] == ["transformer.h.0.attn.c_attn",
                                                                        "transformer.h.1.attn.c_attn"]
    expected = _out(model, "gpt2")
    assert torch.allclose(_out(model.merge_and_unload(), "gpt2"), expected, atol=1e-5)


def test_composes_with_lora():
    """stack(loha, lora) and average(loha, lora) equal the base with both weight
    deltas folded in (all, or weighted): both methods are additive at the same sites."""
    model = AdaptedModel(build_tiny("llama"))
    model.add_adapter("loha", "loha[r=2,init_weights=false]")
    model.add_adapter("lora", "lora[r=2,init_weights=false]")
    model.eval()
    outputs = {}
    for label, block in (("stack", Stack("loha", "lora")), ("average", Average("loha", "lora", weights=[3, 1]))):
        model.set_active(block)
        outputs[label] = _out(model)
    model.set_active("loha")
    assert not torch.allclose(_out(model), outputs["stack"])

    for label, weights in (("stack", (1.0, 1.0)), ("average", (0.75, 0.25))):
        reference = build_tiny("llama")
        with torch.no_grad():
            for name, layer in model.base_model.named_modules():
                if isinstance(layer, TunerLayer):
                    weight = reference.get_submodule(name).weight
                    for adapter, w in zip(("loha", "lora"), weights):
                        weight += w * layer.adapters[adapter].delta_weight(layer.base_layer)
        assert torch.allclose(outputs[label], _out(reference), atol=1e-5), label


@pytest.mark.filterwarnings("ignore:Unexpected keyword arguments \\['peftkit'\\]")  # PEFT skips our key
def test_peftkit_file_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = peftkit.adapt(build_tiny("llama"), "loha[r=4,alpha=6,init_weights=false,target_modules=['q_proj',"
                                                "'down_proj'],rank_pattern={'down_proj':2}]", trainable=False)
    expected = _out(model.eval())
    model.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "a")).eval()
    assert type(peft_model.peft_config["default"]).__name__ == "LoHaConfig"
    assert torch.allclose(_out(peft_model), expected, atol=1e-6)


def test_peft_file_loads_in_peftkit(tmp_path):
    from peft import LoHaConfig, get_peft_model

    config = LoHaConfig(r=4, alpha=8, target_modules=["k_proj", "up_proj"], init_weights=False,
                        alpha_pattern={"up_proj": 2}, task_type="CAUSAL_LM")
    peft_model = get_peft_model(build_tiny("llama"), config).eval()
    expected = _out(peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(build_tiny("llama"), str(tmp_path))
    record = loaded.adapter_record("default")
    assert record.method.name == "loha" and record.config.alpha_pattern == {"up_proj": 2}
    assert torch.allclose(_out(loaded), expected, atol=1e-6)


def test_adapter_from_a_newer_major_plugin_version_is_refused(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "loha[r=2]")
    model.save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "peftkit.json"
    data = json.loads(path.read_text())
    data["plugin_version"] = "2.1.0"
    path.write_text(json.dumps(data))
    fresh = AdaptedModel(build_tiny("llama"))
    with pytest.raises(AdapterLoadError) as error:
        fresh.load_adapter(str(tmp_path / "a"))
    assert "made by peftkit-loha 2.1.0, but 1.0.0 is installed" in str(error.value)
    assert "pip install -U 'peftkit-loha>=2'" in str(error.value)
    assert fresh.adapters == {}
    data["plugin_version"] = "1.7.3"  # a newer minor version of the same major loads
    path.write_text(json.dumps(data))
    fresh.load_adapter(str(tmp_path / "a"))
    assert fresh.adapter_record("default").method.name == "loha"
