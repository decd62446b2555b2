"""Which prompts peftkit saves in PEFT's format, checked against the real `peft` package.

PEFT's PROMPT_TUNING joins the prompt to the input embeddings and has no placement or combine field; it drops
fields it does not know (with a warning). A prompt at the embedding output (AdapterHub's placement) is therefore
saved under a peft_type PEFT does not have, so PEFT refuses the folder instead of loading another adapter.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterLoadError
from peftkit.plugins.prompt_tuning.method import NOT_PEFT_TYPE
from tests.method_helpers import output_of
from tests.tiny_models import build_tiny

EMBEDDING_OUTPUT = [
    "prompt_tuning[num_virtual_tokens=3,placement=embedding_output]",
    "prompt_tuning[num_virtual_tokens=3,placement=embedding_output,combine=prefix_after_bos]",
]


def _saved(spec: str, folder) -> tuple[peftkit.AdaptedModel, dict]:
    model = peftkit.adapt(build_tiny("bert"), spec).eval()
    model.save_adapter(str(folder))
    return model, json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("spec", EMBEDDING_OUTPUT)
def test_peft_refuses_a_prompt_at_the_embedding_output(spec, tmp_path):
    from peft import PeftConfig, PeftModel, PromptTuningConfig

    model, data = _saved(spec, tmp_path)
    assert data["peft_type"] == NOT_PEFT_TYPE and data["placement"] == "embedding_output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for load in (lambda: PeftConfig.from_pretrained(str(tmp_path)),
                     lambda: PromptTuningConfig.from_pretrained(str(tmp_path)),
                     lambda: PeftModel.from_pretrained(build_tiny("bert"), str(tmp_path))):
            with pytest.raises(KeyError, match=NOT_PEFT_TYPE):
                load()

    again = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path)).eval()
    assert again.adapter_record("default").config == model.adapter_record("default").config
    assert torch.equal(output_of(again, "bert"), output_of(model, "bert"))


def test_a_prompt_at_the_input_embeddings_stays_in_peft_format(tmp_path):
    from peft import PeftModel

    model, data = _saved("prompt_tuning[num_virtual_tokens=3]", tmp_path)
    assert data["peft_type"] == "PROMPT_TUNING" and "placement" not in data and "combine" not in data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(build_tiny("bert"), str(tmp_path)).eval()
    assert torch.equal(output_of(theirs, "bert"), output_of(model, "bert"))


def test_a_folder_of_an_earlier_peftkit_still_loads_with_its_placement(tmp_path):
    """Earlier versions wrote peft_type PROMPT_TUNING with the placement beside it (PEFT misreads those)."""
    model, data = _saved(EMBEDDING_OUTPUT[1], tmp_path)
    data["peft_type"] = "PROMPT_TUNING"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    again = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path)).eval()
    assert again.adapter_record("default").config == model.adapter_record("default").config
    assert torch.equal(output_of(again, "bert"), output_of(model, "bert"))


def test_a_file_whose_type_and_placement_disagree_is_refused_by_name(tmp_path):
    _, data = _saved(EMBEDDING_OUTPUT[0], tmp_path)
    del data["placement"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match=f"{NOT_PEFT_TYPE}.*placement='input_embeddings'"):
        peftkit.from_pretrained(build_tiny("bert"), str(tmp_path))


@pytest.mark.parametrize("spec", EMBEDDING_OUTPUT)
def test_a_folder_copied_without_peftkit_json_loads_by_its_type(spec, tmp_path):
    """Only adapter_config.json and the weights: the type maps to prompt tuning (its extra_file_types), and the
    file's placement and combine give the same prompt."""
    model, _ = _saved(spec, tmp_path)
    (tmp_path / "peftkit.json").unlink()
    again = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path)).eval()
    assert again.adapter_record("default").method.name == "prompt_tuning"
    assert again.adapter_record("default").config == model.adapter_record("default").config
    assert torch.equal(output_of(again, "bert"), output_of(model, "bert"))
