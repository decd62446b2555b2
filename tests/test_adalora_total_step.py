"""AdaLoRA's total_step in PEFT's file, checked against the real `peft` package.

PEFT refuses ``total_step: null``. An adapter whose schedule is not known (never trained, or trained
without rank allocation) is saved with UNKNOWN_TOTAL_STEP, which PEFT accepts and never uses at
inference, and which peftkit reads back as null; a known schedule is written as it is.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.plugins.adalora.callback import AdaloraCallback
from peftkit.plugins.adalora.config import AdaloraConfig, UNKNOWN_TOTAL_STEP
from tests.method_helpers import output_of
from tests.tiny_models import build_tiny

ARCH = "llama"
SPEC = "adalora[init_r=4,init_weights=false,target_modules=['q_proj','v_proj']]"


def _peft_reads(folder):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build_tiny(ARCH), str(folder)).eval()


def test_an_adapter_without_a_schedule_loads_in_peft_with_the_same_logits(tmp_path):
    ours = peftkit.adapt(build_tiny(ARCH), SPEC).eval()
    assert ours.adapter_record("default").config.total_step is None
    expected = output_of(ours, ARCH)
    assert not torch.allclose(expected, output_of(build_tiny(ARCH), ARCH), atol=1e-4)
    ours.save_adapter(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["total_step"] == UNKNOWN_TOTAL_STEP

    theirs = _peft_reads(tmp_path / "ours")
    assert theirs.peft_config["default"].total_step == UNKNOWN_TOTAL_STEP
    torch.testing.assert_close(output_of(theirs, ARCH), expected, atol=2e-6, rtol=1e-5)

    # PEFT writes it back; peftkit reads "not known" again, and the same adapter
    theirs.save_pretrained(str(tmp_path / "theirs"))
    again = peftkit.from_pretrained(build_tiny(ARCH), str(tmp_path / "theirs")).eval()
    assert again.adapter_record("default").config.total_step is None
    assert torch.equal(output_of(again, ARCH), expected)
    mine = peftkit.from_pretrained(build_tiny(ARCH), str(tmp_path / "ours"))
    assert mine.adapter_record("default").config == ours.adapter_record("default").config


def test_a_reloaded_adapter_without_a_schedule_trains_on_the_runs_steps(tmp_path):
    peftkit.adapt(build_tiny(ARCH), SPEC).save_adapter(str(tmp_path))
    loaded = peftkit.from_pretrained(build_tiny(ARCH), str(tmp_path))
    allocator = AdaloraCallback(loaded).start(max_steps=7)
    assert allocator.total_step == loaded.adapter_record("default").config.total_step == 7


def test_a_known_schedule_is_written_as_it_is_and_read_back(tmp_path):
    ours = peftkit.adapt(build_tiny(ARCH), SPEC.replace("init_r=4", "init_r=4,tinit=2,tfinal=3,total_step=40"))
    ours.save_adapter(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["total_step"] == 40
    theirs = _peft_reads(tmp_path)
    assert theirs.peft_config["default"].total_step == 40
    loaded = peftkit.from_pretrained(build_tiny(ARCH), str(tmp_path))
    assert loaded.adapter_record("default").config.total_step == 40


def test_a_peft_file_with_a_real_schedule_reads_the_same():
    method = peftkit.get_method("adalora")
    config = method.config_from_file({"peft_type": "ADALORA", "init_r": 6, "total_step": 1000, "tinit": 10})
    assert (config.total_step, config.tinit) == (1000, 10)
    assert method.config_from_file({"peft_type": "ADALORA", "total_step": UNKNOWN_TOTAL_STEP}).total_step is None


def test_schedules_peftkit_cannot_save_are_refused_by_name():
    with pytest.raises(ConfigError, match="leave total_step null"):
        AdaloraConfig(total_step=UNKNOWN_TOTAL_STEP)
    with pytest.raises(ConfigError, match="tinit=.* and tfinal=.* add up"):
        AdaloraConfig(tinit=UNKNOWN_TOTAL_STEP, tfinal=0)
