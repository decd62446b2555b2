"""A PEFT folder saved without ``task_type`` for a classification model (no head in it) loaded in peftkit and saved
again said ``"task_type": "SEQ_CLS"`` with no head: PEFT's class for that task adds ``classifier``/``score`` to
modules_to_save and then failed to load the folder (``KeyError: 'base_model.model.classifier.weight'``). The
task type is now written only when PEFT would find the head it adds."""

from __future__ import annotations

import json

import torch

import peftkit
from tests.method_helpers import output_of
from tests.tiny_models import build_tiny


def test_a_headless_classifier_adapter_goes_back_to_peft(tmp_path):
    from peft import get_peft_model, LoraConfig, PeftModel

    theirs = get_peft_model(build_tiny("bert"), LoraConfig(r=4, target_modules=["query", "value"],
                                                           init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path / "peft"))
    ours.save_pretrained(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["task_type"] is None
    again = PeftModel.from_pretrained(build_tiny("bert"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, "bert"), output_of(theirs, "bert"), atol=1e-5, rtol=0)


def test_an_adapter_saving_its_head_keeps_the_task_type(tmp_path):
    from peft import PeftModel

    ours = peftkit.adapt(build_tiny("bert"), "lora[target_modules=[query,value],init_weights=false]")
    ours.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]
    again = PeftModel.from_pretrained(build_tiny("bert"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, "bert"), output_of(ours, "bert"), atol=1e-5, rtol=0)
