"""Two-way compatibility with the real Hugging Face `peft` package, LoRA and DoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

CASES = [
    ("llama", ["q_proj", "v_proj", "down_proj"], False),
    ("llama", ["q_proj", "o_proj"], True),
    ("gpt2", ["c_attn", "c_fc"], False),
    ("gpt2", ["c_attn"], True),
    ("bert", ["query", "value"], False),
    ("t5", ["q", "v", "wo"], False),
]


def _out(model, arch):
    with torch.no_grad():
        return output_tensor(model(**sample_inputs(arch)))


def _peft_config(arch, targets, dora):
    task = {"bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}.get(arch, "CAUSAL_LM")
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, init_lora_weights=False,
                      task_type=task, fan_in_fan_out=arch == "gpt2")


@pytest.mark.parametrize("arch, targets, dora", CASES)
def test_peft_saved_adapter_loads_in_peftkit(tmp_path, arch, targets, dora):
    peft_model = get_peft_model(build_tiny(arch), _peft_config(arch, targets, dora)).eval()
    if arch == "bert":  # give the task head real values, so modules_to_save is checked
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = _out(peft_model, arch)
    peft_model.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    torch.testing.assert_close(_out(ours, arch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, targets, dora", CASES)
def test_peftkit_saved_adapter_loads_in_peft(tmp_path, arch, targets, dora):
    spec = f"lora[r=4,alpha=8,init_weights=false,use_dora={str(dora).lower()},target_modules={targets}]"
    ours = peftkit.adapt(build_tiny(arch), spec.replace("'", '"'))
    ours.eval()
    if arch == "bert":
        with torch.no_grad():
            ours.base_model.classifier.copies["default"].weight.add_(0.5)
    expected = _out(ours, arch)
    ours.save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    torch.testing.assert_close(_out(peft_model, arch), expected, atol=1e-5, rtol=1e-5)


def test_peft_file_without_task_type_loads_on_a_classifier_without_touching_its_head(tmp_path):
    """The file says what was saved: no head in it, so the model's own head stays."""
    base = build_tiny("bert")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["query"], init_lora_weights=False)).eval()
    expected = _out(peft_model, "bert")
    peft_model.save_pretrained(tmp_path)
    fresh = build_tiny("bert")
    ours = peftkit.from_pretrained(fresh, str(tmp_path))
    assert ours.adapters["default"].modules_to_save in (None, [])
    torch.testing.assert_close(_out(ours, "bert"), expected, atol=1e-5, rtol=1e-5)


# -- PEFT reads peftkit's folders without a word; peftkit's own record stays beside them ----------

#: Words of PEFT's warnings about a config it does not fully understand.
_CONFIG_COMPLAINTS = ("unexpected keyword", "higher version", "upgrade the peft", "fan_in_fan_out")


def _peft_load_complaints(folder, arch, caplog):
    """Load ``folder`` with PEFT; what it warned or logged about the config."""
    import logging
    import warnings

    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(build_tiny(arch), str(folder)).eval()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return model, [text for text in said if any(word in text.lower() for word in _CONFIG_COMPLAINTS)]


@pytest.mark.parametrize("arch, spec", [
    ("llama", "lora[r=4,init_weights=false]"),
    ("llama", "lora[r=4,use_dora=true,init_weights=false]"),
    ("gpt2", "lora[r=4,init_weights=false]"),
    ("llama", "lokr[r=4,init_weights=false]"),
    ("gpt2", "adalora[init_r=4,total_step=10,init_weights=false]"),
    ("llama", "ia3[init_ia3_weights=false]"),
    ("gpt2", "ia3[init_ia3_weights=false]"),
    ("llama", "prefix_tuning[num_virtual_tokens=4]"),
    ("llama", "prompt_tuning[num_virtual_tokens=4]"),
])
def test_peft_loads_every_peft_format_folder_without_warnings(tmp_path, caplog, arch, spec):
    import json

    ours = peftkit.adapt(build_tiny(arch), spec).eval()
    expected = _out(ours, arch)
    ours.save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    own = json.loads((tmp_path / "a" / "peftkit.json").read_text())
    assert "peftkit" not in config and own["method"] == spec.split("[")[0] and own["base_model"]["model_type"] == arch
    if "fan_in_fan_out" in config:  # GPT-2's Conv1D stores weights (in, out), as PEFT's flag says
        assert config["fan_in_fan_out"] is (arch == "gpt2")
    theirs, complaints = _peft_load_complaints(tmp_path / "a", arch, caplog)
    assert complaints == []
    torch.testing.assert_close(_out(theirs, arch), expected, atol=1e-5, rtol=1e-5)
    # and back: the record in peftkit.json round-trips everything peftkit needs
    again = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "a"))
    assert again.adapter_record("default").config == ours.adapter_record("default").config
    torch.testing.assert_close(_out(again, arch), expected, atol=1e-6, rtol=1e-6)


def test_gpt2_lora_config_says_fan_in_fan_out_as_peft_writes_it(tmp_path):
    import json

    peft_model = get_peft_model(build_tiny("gpt2"), LoraConfig(r=4, target_modules=["c_attn"]))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = peftkit.adapt(build_tiny("gpt2"), 'lora[r=4,target_modules=["c_attn"]]')
    ours.save_adapter(tmp_path / "ours")
    theirs, mine = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    assert theirs["fan_in_fan_out"] is True and mine["fan_in_fan_out"] is True


def test_folders_with_the_older_in_config_record_still_load(tmp_path):
    import json

    ours = peftkit.adapt(build_tiny("llama"), "lora[r=4,init_weights=false]").eval()
    ours.save_adapter(tmp_path / "a")
    config_path, own_path = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "peftkit.json"
    config = json.loads(config_path.read_text())
    config["peftkit"] = json.loads(own_path.read_text())
    config_path.write_text(json.dumps(config))
    own_path.unlink()
    again = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"))
    assert again.adapter_record("default").method.name == "lora"
    torch.testing.assert_close(_out(again, "llama"), _out(ours, "llama"))


def test_a_damaged_record_is_named(tmp_path):
    ours = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    ours.save_adapter(tmp_path / "a")
    (tmp_path / "a" / "peftkit.json").write_text("{not json")
    with pytest.raises(peftkit.AdapterLoadError, match=r"peftkit\.json is not valid JSON"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"))


# -- the base embedding weights PEFT saves with an adapter on embed_tokens or lm_head ----------------

_EMBEDDING_TARGETS = ["embed_tokens", "q_proj", "lm_head"]
_BASE_KEYS = {"base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight"}


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_peft_default_save_with_embedding_targets_loads_as_peft_loads_it(tmp_path):
    peft_model = get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=_EMBEDDING_TARGETS,
                                                                init_lora_weights=False))
    with torch.no_grad():  # embeddings that differ from any fresh base: the file carries them
        peft_model.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
        peft_model.base_model.model.lm_head.base_layer.weight.add_(0.25)
    peft_model.save_pretrained(tmp_path)  # save_embedding_layers="auto"
    assert _BASE_KEYS <= set(_tensors(tmp_path))
    theirs = PeftModel.from_pretrained(build_tiny("llama", seed=5), str(tmp_path)).eval()
    ours = peftkit.from_pretrained(build_tiny("llama", seed=5), str(tmp_path))
    # the file's base embeddings replace the model's own (the rest of this base differs: seed 5)
    torch.testing.assert_close(ours.base_model.model.embed_tokens.base_layer.weight,
                               peft_model.base_model.model.model.embed_tokens.base_layer.weight)
    torch.testing.assert_close(ours.base_model.lm_head.base_layer.weight,
                               peft_model.base_model.model.lm_head.base_layer.weight)
    torch.testing.assert_close(_out(ours, "llama"), _out(theirs, "llama"), atol=1e-5, rtol=1e-5)


def test_peftkit_saves_the_base_embeddings_when_peft_would_and_peft_loads_them(tmp_path):
    peft_model = get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=_EMBEDDING_TARGETS))
    peft_model.save_pretrained(tmp_path / "peft")
    spec = f"lora[r=4,init_weights=false,target_modules={_EMBEDDING_TARGETS}]".replace("'", '"')
    ours = peftkit.adapt(build_tiny("llama"), spec).eval()
    with torch.no_grad():
        ours.base_model.model.embed_tokens.base_layer.weight.mul_(1.5)
    ours.save_adapter(tmp_path / "ours")
    assert set(_tensors(tmp_path / "ours")) == set(_tensors(tmp_path / "peft"))
    # on the same base, PEFT gives the same output; on another base, both take the file's embeddings
    same = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_out(same, "llama"), _out(ours, "llama"), atol=1e-5, rtol=1e-5)
    theirs = PeftModel.from_pretrained(build_tiny("llama", seed=5), str(tmp_path / "ours")).eval()
    again = peftkit.from_pretrained(build_tiny("llama", seed=5), str(tmp_path / "ours"))
    torch.testing.assert_close(theirs.base_model.model.model.embed_tokens.base_layer.weight,
                               ours.base_model.model.embed_tokens.base_layer.weight)
    torch.testing.assert_close(_out(again, "llama"), _out(theirs, "llama"), atol=1e-5, rtol=1e-5)

    from peftkit.core.inspect_folder import describe_folder  # peftkit info: the adapter's own parameters

    own = sum(t.numel() for k, t in _tensors(tmp_path / "ours").items() if ".base_layer." not in k)
    assert describe_folder(tmp_path / "ours")["parameters"] == own
    assert own == sum(p.numel() for p in ours.adapter_parameters("default"))

    only_attention = peftkit.adapt(build_tiny("llama"), 'lora[r=4,target_modules=["q_proj"]]')
    only_attention.save_adapter(tmp_path / "plain")
    assert not any(".base_layer." in key for key in _tensors(tmp_path / "plain"))


def test_base_embeddings_of_another_vocabulary_size_are_refused_with_the_fix(tmp_path):
    from transformers import LlamaForCausalLM

    peft_model = get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=["embed_tokens"]))
    peft_model.save_pretrained(tmp_path)
    config = build_tiny("llama").config
    config.vocab_size = 140
    bigger = LlamaForCausalLM(config)
    with pytest.raises(peftkit.AdapterLoadError, match=r"resize_token_embeddings\(128\)"):
        peftkit.from_pretrained(bigger, str(tmp_path))
    assert not any(".lora_" in name for name, _ in bigger.named_parameters())


def test_an_adapter_with_base_embeddings_hot_swaps_them_in_as_a_load_does(tmp_path):
    spec = 'lora[r=4,init_weights=false,target_modules=["embed_tokens","q_proj"]]'
    donor = peftkit.adapt(build_tiny("llama"), spec).eval()
    with torch.no_grad():
        donor.base_model.model.embed_tokens.base_layer.weight.mul_(1.5)
    donor.save_adapter(tmp_path / "a")
    served = peftkit.adapt(build_tiny("llama"), spec.replace("init_weights=false", "init_weights=true")).eval()
    served.hotswap_adapter(str(tmp_path / "a"), "default")
    fresh = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"))
    torch.testing.assert_close(served.base_model.model.embed_tokens.base_layer.weight,
                               donor.base_model.model.embed_tokens.base_layer.weight)
    torch.testing.assert_close(_out(served, "llama"), _out(fresh, "llama"))
    torch.testing.assert_close(_out(served, "llama"), _out(donor, "llama"))
