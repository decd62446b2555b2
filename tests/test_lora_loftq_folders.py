"""Adapters trained from LoftQ's init (PEFT's ``loftq_config``) were refused ("only loftq_config={}"), although
their weights are an ordinary LoRA: PEFT's LoftQ guide saves them with ``init_lora_weights=true`` beside the
LoftQ-quantized base model, and ``loftq_config`` only records how the factors started. Such a folder now loads;
one still saying ``init_lora_weights="loftq"`` (which PEFT would run again while loading, replacing the base
weights on a GPU) is refused with the fix."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterLoadError
from tests.method_helpers import output_of
from tests.tiny_models import build_tiny


def _loftq_trained_folder(tmp_path):
    """A PEFT folder as PEFT's LoftQ guide leaves it: trained from init_lora_weights="loftq" (run on a GPU with
    bitsandbytes; here random factors stand in), then saved after setting init_lora_weights=True, so its
    loftq_config stays in the file."""
    from peft import get_peft_model, LoraConfig, PeftModel

    theirs = get_peft_model(build_tiny("llama"), LoraConfig(r=4, init_lora_weights=False)).eval()
    theirs.peft_config["default"].loftq_config = {"loftq_bits": 4, "loftq_iter": 1}
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(str(tmp_path))
    PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path))  # PEFT itself loads it
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    return theirs, saved


def test_a_folder_trained_from_loftq_loads_with_peft_outputs(tmp_path):
    theirs, _ = _loftq_trained_folder(tmp_path)
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    torch.testing.assert_close(output_of(ours, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)


def test_a_folder_that_would_run_loftq_again_is_refused_with_the_fix(tmp_path):
    _, saved = _loftq_trained_folder(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "init_lora_weights": "loftq"}))
    with pytest.raises(AdapterLoadError, match=r'init_lora_weights="loftq" makes PEFT run LoftQ again .* after setting '
                                          r'"init_lora_weights": true in adapter_config.json'):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
