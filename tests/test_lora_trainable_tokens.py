"""PEFT's ``LoraConfig(trainable_token_indices=...)``: chosen embedding rows trained with the LoRA, in one adapter.
Before, peftkit refused such a config and folder ("only trainable_token_indices=None"). Now LoRA trains the rows
through the trainable_tokens method's modules (plugins/lora/tokens.py), under PEFT's keys
``<embedding>.token_adapter.trainable_tokens_delta``, with the tied output layer reading the same rows: the same
outputs and gradients as PEFT, folders both ways, merging, and refusals by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError
from tests.method_helpers import draw_peft_parameters, merge_cycle_keeps_outputs, output_of, randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

#: Llama (output layer not tied) and GPT-2 (lm_head tied to wte: it reads the same rows, PEFT saves them once).
ARCHS = ["llama", "gpt2"]


def _peft_model(arch: str, indices):
    from peft import get_peft_model, LoraConfig

    model = get_peft_model(build_tiny(arch), LoraConfig(r=2, trainable_token_indices=indices,
                                                        init_lora_weights=False))
    draw_peft_parameters(model, "trainable_tokens_delta", seed=5)  # the rows start as the embedding's: move them
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_with_the_same_outputs_and_saves_back(tmp_path, arch):
    from peft import PeftModel

    theirs = _peft_model(arch, [3, 5, 9])
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"))
    assert ours.adapter_record("default").config.trainable_token_indices == [3, 5, 9]
    torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), atol=1e-5, rtol=0)

    ours.save_pretrained(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["trainable_token_indices"] == [3, 5, 9]
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert sum("token_adapter.trainable_tokens_delta" in key for key in keys) == 1  # tied: saved once
    again = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, arch), output_of(theirs, arch), atol=1e-5, rtol=0)


def _gradients(model, arch: str, prefix: str) -> dict[str, torch.Tensor]:
    """The rows' gradient ("rows") and each LoRA factor's, keyed by its module (its name after ``prefix``), after
    one backward."""
    model.zero_grad()
    output_tensor(model(**sample_inputs(arch))).square().mean().backward()
    out = {}
    for name, param in model.named_parameters():
        if "trainable_tokens_delta" in name or name.endswith("rows_0"):
            out["rows"] = param.grad.clone()
        elif "lora_A" in name:
            module = name.split(".lora_A")[0].removeprefix(prefix)
            out[module.removesuffix(".adapters.default")] = param.grad.clone()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal_peft(tmp_path, arch):
    seen = sorted(set(sample_inputs(arch)["input_ids"].flatten().tolist()))  # rows the inputs read
    theirs = _peft_model(arch, [seen[0], seen[-1], 2])
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"), is_trainable=True).eval()
    expected, got = _gradients(theirs, arch, "base_model.model."), _gradients(ours, arch, "base_model.")
    assert sorted(got) == sorted(expected) and "rows" in got
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-4)
    assert expected["rows"].abs().max() > 1e-4


def test_a_table_of_modules_on_an_untied_model_equals_peft(tmp_path):
    from peft import PeftModel

    theirs = _peft_model("llama", {"embed_tokens": [3, 5], "lm_head": [7]})
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "peft"))
    torch.testing.assert_close(output_of(ours, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)
    ours.save_pretrained(str(tmp_path / "ours"))
    again = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_trains_lora_and_rows_and_merges(arch):
    model = peftkit.adapt(build_tiny(arch), "lora[r=2,trainable_token_indices=[3,5]]")
    plain = peftkit.adapt(build_tiny(arch), "lora[r=2]")
    count = lambda m: sum(p.numel() for p in m.adapter_parameters("default"))  # noqa: E731
    assert count(model) - count(plain) == 2 * build_tiny(arch).config.hidden_size  # tied: the rows once
    randomize(model, std=0.3)
    merge_cycle_keeps_outputs(model, arch)


@pytest.mark.parametrize("spec, message", [
    ("lora[trainable_token_indices=[-1]]", "lora config: trainable_token_indices: trainable_tokens: token_indices "
                                           r"\[-1\] holds a negative id"),
    ("lora[trainable_token_indices=[]]", "lora config: trainable_token_indices: trainable_tokens: token_indices is "
                                         "empty"),
    ("lora[trainable_token_indices=[100000]]",
     r"trainable_token_indices \[100000\] are past the input embedding's 128 rows"),
    ("lora[target_modules=[q_proj,embed_tokens],trainable_token_indices=[3]]",
     "model.embed_tokens is both a LoRA target and a module whose rows trainable_token_indices trains"),
    ("lora[modules_to_save=[embed_tokens],trainable_token_indices=[3]]",
     r"model.embed_tokens is in modules_to_save \(trained whole\) and in trainable_token_indices"),
])
def test_wrong_settings_are_refused_by_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)
