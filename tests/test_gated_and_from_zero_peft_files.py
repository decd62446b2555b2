"""Prefixes and LoRAs PEFT's format cannot express, checked against the real `peft` package (0.21).

PEFT has no gates (UniPELT's ``use_gating``) and no ``token_positions``: it drops fields it does not know with only
a warning. Saved as ``PREFIX_TUNING``/``LORA``, such an adapter loaded in PEFT as another one (a prefix at PEFT's
positions, 0.03 apart; a LoRA without its gates, whose weights PEFT's folder then carries as unexpected keys). They
are saved under types PEFT does not have, so PEFT refuses the folder; peftkit loads it, with or without peftkit.json.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterLoadError
from peftkit.plugins.lora.method import GATED_TYPE as LORA_GATED
from peftkit.plugins.prefix_tuning.method import FROM_ZERO_TYPE, GATED_TYPE
from peftkit.testing import check_method
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny

#: spec -> the peft_type its folder says
NOT_PEFT = {
    "prefix_tuning[num_virtual_tokens=3,token_positions=from_zero]": FROM_ZERO_TYPE,
    "prefix_tuning[num_virtual_tokens=3,use_gating=true]": GATED_TYPE,
    "prefix_tuning[num_virtual_tokens=3,use_gating=true,shared_gating=false,token_positions=from_zero]": GATED_TYPE,
    "lora[r=2,use_gating=true]": LORA_GATED,
}
PEFT = {"prefix_tuning[num_virtual_tokens=3]": "PREFIX_TUNING", "lora[r=2]": "LORA"}


def _saved(spec: str, folder) -> tuple[peftkit.AdaptedModel, dict]:
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, seed=3)  # gates and LoRA's B start at values that hide a lost setting
    model.eval().save_adapter(str(folder))
    return model, json.loads((folder / "adapter_config.json").read_text())


def _quietly(load):
    """Call ``load`` (PEFT's), without PEFT's warnings about the fields it drops."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load()


def _same(loaded: peftkit.AdaptedModel, model: peftkit.AdaptedModel) -> None:
    assert loaded.adapter_record("default").config == model.adapter_record("default").config
    assert torch.equal(output_of(loaded.eval(), "llama"), output_of(model, "llama"))


@pytest.mark.parametrize("spec", NOT_PEFT)
def test_peft_refuses_what_it_cannot_express_and_peftkit_loads_it(spec, tmp_path):
    from peft import PeftConfig, PeftModel

    model, data = _saved(spec, tmp_path)
    assert data["peft_type"] == NOT_PEFT[spec]
    for load in (lambda: PeftConfig.from_pretrained(str(tmp_path)),
                 lambda: PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path))):
        with pytest.raises(KeyError, match=NOT_PEFT[spec]):
            _quietly(load)
    _same(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), model)
    (tmp_path / "peftkit.json").unlink()  # copied without peftkit's record: the type names the method
    _same(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), model)


@pytest.mark.parametrize("spec", NOT_PEFT)
def test_the_peft_config_check_skips_them_with_the_reason(spec):
    report = check_method(spec, architectures=("llama",), checks=["peft_config"])
    assert [(r.check, r.status) for r in report.results] == [("peft_config", "skipped")]
    assert f"its folder says peft_type '{NOT_PEFT[spec]}', a type PEFT does not have" in report.results[0].message


@pytest.mark.parametrize("spec", PEFT)
def test_what_peft_can_express_stays_in_peft_format(spec, tmp_path):
    from peft import PeftModel

    model, data = _saved(spec, tmp_path)
    assert data["peft_type"] == PEFT[spec]
    theirs = _quietly(lambda: PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path))).eval()
    assert torch.allclose(output_of(theirs, "llama"), output_of(model, "llama"), atol=1e-5)


@pytest.mark.parametrize("spec", NOT_PEFT)
def test_a_folder_of_an_earlier_peftkit_still_loads_as_saved(spec, tmp_path):
    """Earlier versions wrote PREFIX_TUNING / LORA with the fields beside it (PEFT misreads those)."""
    model, data = _saved(spec, tmp_path)
    data["peft_type"] = "LORA" if spec.startswith("lora") else "PREFIX_TUNING"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    _same(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), model)


@pytest.mark.parametrize("spec, field", [
    ("prefix_tuning[num_virtual_tokens=3,use_gating=true]", "use_gating"),
    ("prefix_tuning[num_virtual_tokens=3,token_positions=from_zero]", "token_positions"),
    ("lora[r=2,use_gating=true]", "use_gating"),
])
def test_a_file_whose_type_and_fields_disagree_is_refused_by_name(spec, field, tmp_path):
    _, data = _saved(spec, tmp_path)
    del data[field]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match=f"{NOT_PEFT[spec]}.*damaged or was edited"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
