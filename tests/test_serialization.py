"""Adapter folders: round trips, and loads that refuse bad input and leave the model as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.errors import AdapterLoadError
from peftkit.core.serialization import adapter_tensors
from tests.tiny_models import build_tiny, output_tensor, sample_inputs


def _trained(arch="llama", spec="lora[r=4,target_modules=all-linear,init_weights=false]", name="default"):
    model = peftkit.adapt(build_tiny(arch), spec, adapter_name=name)
    model.eval()
    return model


def _out(model, arch="llama"):
    with torch.no_grad():
        return output_tensor(model(**sample_inputs(arch)))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], list(model.adapters), model.active_adapters)


def _same(model, snap):
    state, types, adapters, active = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m).__name__ for m in model.modules()] == types
    assert list(model.adapters) == adapters and model.active_adapters == active


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_round_trip_is_bit_identical(tmp_path, arch):
    model = _trained(arch)
    model.save_adapter(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                 "peftkit.json"]
    loaded = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "a"))
    original = {k: v for k, v in adapter_tensors(model, "default").items()}
    again = adapter_tensors(loaded, "default")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    torch.testing.assert_close(_out(loaded, arch), _out(model, arch), atol=0, rtol=0)


def test_card_front_matter(tmp_path):
    model = _trained()
    model.save_adapter(tmp_path / "a", task="text-generation", dataset="toy", metrics={"accuracy": 0.9})
    from peftkit.core.card import read_card_metadata

    meta = read_card_metadata((tmp_path / "a" / "README.md").read_text())
    assert meta["library_name"] == "peft"
    assert "lora" in meta["tags"] and "peftkit" in meta["tags"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    own = json.loads((tmp_path / "a" / "peftkit.json").read_text())  # where PEFT does not read it
    assert config["peft_type"] == "LORA" and "peftkit" not in config and own["method"] == "lora"
    assert own["base_model"]["model_type"] == "llama"


def test_card_names_base_model_tag(tmp_path):
    base = build_tiny("llama")
    base.config._name_or_path = "acme/tiny-llama"
    model = peftkit.adapt(base, "lora[r=2]")
    model.save_adapter(tmp_path / "a")
    from peftkit.core.card import read_card_metadata

    meta = read_card_metadata((tmp_path / "a" / "README.md").read_text())
    assert meta["base_model"] == "acme/tiny-llama"
    assert "base_model:adapter:acme/tiny-llama" in meta["tags"]


def test_save_pretrained_layout_and_load_each(tmp_path):
    model = _trained(name="default")
    model.add_adapter("other", "lora[r=2,init_weights=false]")
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").exists()
    assert (tmp_path / "all" / "other" / "adapter_config.json").exists()
    fresh = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "all"))
    fresh.load_adapter(str(tmp_path / "all" / "other"), "other")
    assert list(fresh.adapters) == ["default", "other"]


# -- refusals: each leaves the model exactly as it was --------------------------------


@pytest.fixture
def saved(tmp_path):
    model = _trained()
    path = tmp_path / "saved"
    model.save_adapter(path)
    return path


@pytest.fixture
def target():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]", adapter_name="existing")
    return model


def _refused(target, path, match):
    """The load is refused with ``match`` in a message that names the folder, and changes nothing."""
    snap = _snapshot(target)
    with pytest.raises(AdapterLoadError, match=match) as refused:
        target.load_adapter(str(path), "new")
    assert str(path) in str(refused.value)
    _same(target, snap)


def test_refuses_pickle_weights(target, saved):
    os.remove(saved / "adapter_model.safetensors")
    torch.save({"x": torch.zeros(1)}, saved / "adapter_model.bin")
    _refused(target, saved, "pickle")


def test_refuses_shape_mismatch(target, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(5, tensors[key].shape[1])
    save_file(tensors, saved / "adapter_model.safetensors")
    _refused(target, saved, "shape mismatch")


def test_refuses_missing_and_unexpected_keys(target, saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors.pop(next(iter(tensors)))
    tensors["base_model.model.model.nowhere.lora_A.weight"] = torch.zeros(1)
    save_file(tensors, saved / "adapter_model.safetensors")
    _refused(target, saved, "missing keys.*unexpected keys")


def test_refuses_another_architecture(saved):
    other = peftkit.adapt(build_tiny("gpt2"), "lora[r=2]", adapter_name="existing")
    _refused(other, saved, "model_type='llama'")


def test_refuses_a_file_from_a_newer_major_plugin_version(target, saved):
    own = json.loads((saved / "peftkit.json").read_text())
    assert own["plugin"] == "peftkit"
    own["plugin_version"] = "999.0.0"
    (saved / "peftkit.json").write_text(json.dumps(own))
    _refused(target, saved, "made by peftkit 999.0.0, but .* is installed")


def test_refuses_unknown_method_naming_the_plugin(target, saved):
    own = json.loads((saved / "peftkit.json").read_text())
    own["method"] = "vera_plus"
    own["plugin"] = "peftkit-vera-plus"
    (saved / "peftkit.json").write_text(json.dumps(own))
    _refused(target, saved, "pip install .?peftkit-vera-plus")


def test_refuses_truncated_safetensors(target, saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(target, saved, "truncated or corrupted")


def test_refuses_corrupted_safetensors_header(target, saved):
    data = bytearray((saved / "adapter_model.safetensors").read_bytes())
    data[10:20] = b"\xff" * 10
    (saved / "adapter_model.safetensors").write_bytes(bytes(data))
    _refused(target, saved, "truncated or corrupted")


def test_refuses_malformed_json(target, saved):
    (saved / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    _refused(target, saved, "not valid JSON")


def test_refuses_invalid_config_values(target, saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = "four"
    (saved / "adapter_config.json").write_text(json.dumps(config))
    _refused(target, saved, "valid lora adapter")


def test_refuses_missing_folder_and_names_the_contents(target, tmp_path):
    _refused(target, tmp_path / "nope", "not an adapter folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    _refused(target, tmp_path / "empty", "notes.txt")


# -- atomic saves -------------------------------------------------------------------------


def test_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    model = _trained()
    import peftkit.core.serialization as serialization

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "write_text_atomic", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_save_over_an_existing_folder_keeps_the_old_files(tmp_path, monkeypatch):
    model = _trained()
    model.save_adapter(tmp_path / "out")
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    import peftkit.core.fileio as fileio

    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("power cut")

    with torch.no_grad():
        next(model.adapter_parameters("default")).add_(1.0)
    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        model.save_adapter(tmp_path / "out")
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    assert after == before  # no temp files left, old content intact
