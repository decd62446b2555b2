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
