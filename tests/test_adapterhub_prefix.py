"""Prefix tuning in AdapterHub's format against the real ``adapters`` 1.3.0, both ways, on padded batches.

tests/adapterhub/make_prefix_fixtures.py runs in ``.venv-adapters`` (``make adapters-venv``): it saves
prefix-tuning adapters (the MLP form, the flat form, an ejected MLP) on BERT, RoBERTa and Llama with their
outputs (cached under the venv, keyed by the scripts' hashes), and with ``--run`` loads the folders peftkit
saved. peftkit reads them as ``prefix_tuning[token_positions=from_zero]``: the tokens keep positions 0..n-1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv, saved_both_ways, with_changed_options
from peftkit.core.errors import AdapterLoadError, PeftkitError
from tests.test_adapterhub_reft import base_of, output  # the same case layout and batches

pytestmark = pytest.mark.slow

ATOL = 1e-5
CASES = ["bert_prefix_mlp", "bert_prefix_flat", "bert_prefix_ejected", "roberta_prefix_flat", "llama_prefix_flat",
         "llama_prefix_mlp"]


@pytest.fixture(scope="module")
def prefix_fixtures() -> Path:
    return cached_fixtures('prefix-', 'make_prefix_fixtures.py', 'make_fixtures.py', 'make_reft_fixtures.py')


@pytest.mark.parametrize("name", CASES)
def test_adapters_prefix_folder_loads_with_the_same_outputs(prefix_fixtures: Path, name: str) -> None:
    case = prefix_fixtures / name
    expected = load_file(str(case / "expected.safetensors"))
    assert not torch.allclose(output(base_of(case), expected), expected["output"], atol=1e-3)  # the prefix acts
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    config = model.adapter_record("default").config
    assert config.token_positions == "from_zero" and config.prefix_projection is False  # an MLP loads ejected
    torch.testing.assert_close(output(model, expected), expected["output"], atol=ATOL, rtol=0)


def shuffle(model: peftkit.AdaptedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.model_adapter("default").parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))


#: (case whose base model and batch are used, the spec peftkit saves; None: the case's own adapter reloaded)
SAVED = {
    "bert_mlp_reloaded": ("bert_prefix_mlp", None),
    "roberta_made": ("roberta_prefix_flat", "prefix_tuning[num_virtual_tokens=2,token_positions=from_zero]"),
    "llama_made_reparametrized": ("llama_prefix_flat", "prefix_tuning[num_virtual_tokens=3,prefix_projection=true,"
                                                       "encoder_hidden_size=8,token_positions=from_zero]"),
}


def test_peftkit_saves_prefix_tuning_in_adapters_format_that_adapters_computes_alike(prefix_fixtures: Path,
                                                                                      tmp_path: Path) -> None:
    jobs, ours = saved_both_ways(prefix_fixtures, SAVED, base_of, shuffle, output, tmp_path, ATOL)
    options = json.loads((tmp_path / "llama_made_reparametrized" / "adapter_config.json").read_text())["config"]
    assert options["flat"] is True and options["prefix_length"] == 3  # the MLP's output is saved
    run_in_venv(["make_prefix_fixtures.py", "--run", str(jobs)])
    for label in SAVED:
        theirs = load_file(str(tmp_path / f"{label}.safetensors"))["output"]
        torch.testing.assert_close(theirs, ours[label], atol=ATOL, rtol=0, msg=lambda m, label=label: f"{label}: {m}")


def test_peft_placement_is_refused_by_its_option_name(prefix_fixtures: Path, tmp_path: Path) -> None:
    model = peftkit.adapt(base_of(prefix_fixtures / "bert_prefix_flat"), "prefix_tuning[num_virtual_tokens=3]")
    with pytest.raises(PeftkitError, match="token_positions='after_prefix'.*token_positions='from_zero'"):
        model.save_adapter(str(tmp_path / "x"), format="adapters")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("option, value", [("leave_out", [1]), ("dropout", 0.1)])
def test_adapters_prefix_options_peftkit_lacks_are_refused_by_name(prefix_fixtures: Path, tmp_path: Path,
                                                                   option: str, value: object) -> None:
    case = prefix_fixtures / "bert_prefix_flat"
    folder = with_changed_options(case / "adapter", tmp_path, {option: value})
    with pytest.raises(AdapterLoadError, match=f"AdapterHub prefix tuning option {option}="):
        peftkit.from_pretrained(base_of(case), str(folder))


def test_a_from_zero_prefix_survives_peftkit_format_and_generates_alike_with_a_cache(prefix_fixtures: Path,
                                                                                     tmp_path: Path) -> None:
    """Later generation steps number the tokens after the real ones already cached (not after the prefix)."""
    case = prefix_fixtures / "llama_prefix_flat"
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    model.save_adapter(str(tmp_path / "own"))
    again = peftkit.from_pretrained(base_of(case), str(tmp_path / "own"))
    assert again.adapter_record("default").config.token_positions == "from_zero"
    expected = load_file(str(case / "expected.safetensors"))
    torch.testing.assert_close(output(again, expected), expected["output"], atol=ATOL, rtol=0)
    ids, mask = expected["input_ids"][:1], expected["attention_mask"][:1]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = ids
        for _ in range(4):  # no cache: each step computes the whole sequence again
            logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
            full = torch.cat([full, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, full)
