"""UniPELT and gated adapters in AdapterHub's format against the real ``adapters`` 1.3.0, both ways.

tests/adapterhub/make_unipelt_fixtures.py runs in ``.venv-adapters`` (``make adapters-venv``): it saves
``UniPELTConfig`` adapters (its defaults on BERT, smaller ones on RoBERTa and Llama, one with a gate each for
the prefix's keys and values), a gated LoRA and seq_bn alone and a ``MAMConfig`` (another union), every tensor drawn at random, with their
outputs on a padded batch (cached under the venv, keyed by the scripts' hashes); with ``--run`` it loads the
folders peftkit saved. A UniPELT folder loads as a union of gated prefix_tuning, seq_bn and lora.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv, saved_both_ways
from tests.test_adapterhub_reft import base_of, output  # the same case layout and batches

pytestmark = pytest.mark.slow

ATOL = 1e-5
CASES = ["bert_unipelt", "roberta_unipelt_small", "bert_unipelt_two_prefix_gates", "llama_unipelt_small",
         "bert_lora_gated", "bert_seq_bn_gated", "bert_mam"]


@pytest.fixture(scope="module")
def unipelt_fixtures() -> Path:
    return cached_fixtures("unipelt-", "make_unipelt_fixtures.py", "make_fixtures.py", "make_prefix_fixtures.py",
                           "make_reft_fixtures.py")


@pytest.mark.parametrize("name", CASES)
def test_adapters_gated_folder_loads_with_the_same_outputs(unipelt_fixtures: Path, name: str) -> None:
    case = unipelt_fixtures / name
    expected = load_file(str(case / "expected.safetensors"))
    assert not torch.allclose(output(base_of(case), expected), expected["output"], atol=1e-3)  # the adapter acts
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    config = model.adapter_record("default").config
    parts = config.parts if hasattr(config, "parts") else [{"method": config.method, **config.to_dict()}]
    if name == "bert_mam":  # adapters' MAMConfig: a union of prefix tuning and a parallel adapter, no gates
        assert [(p["method"], p["use_gating"]) for p in parts] == [("prefix_tuning", False), ("par_bn", False)]
    else:
        assert all(part["use_gating"] for part in parts)
    if "unipelt" in name:
        assert [p["method"] for p in parts] == ["prefix_tuning", "seq_bn", "lora"]
        assert parts[0]["shared_gating"] is ("two_prefix_gates" not in name)
    torch.testing.assert_close(output(model, expected), expected["output"], atol=ATOL, rtol=0)


def shuffle(model: peftkit.AdaptedModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(0.3 * torch.randn(param.shape, generator=gen))


SMALL = ('unipelt[parts=["prefix_tuning[num_virtual_tokens=2,prefix_projection=true,encoder_hidden_size=8,'
         'token_positions=from_zero,use_gating=true,shared_gating=false]","seq_bn[reduction_factor=4,'
         'original_ln_before=true,use_gating=true]","lora[r=2,use_gating=true]"]]')
#: (case whose base model and batch are used, the spec peftkit saves; None: the case's own adapter reloaded)
SAVED = {
    "bert_unipelt_reloaded": ("bert_unipelt", None),
    "roberta_unipelt_made": ("roberta_unipelt_small", "unipelt"),
    "bert_small_made": ("bert_unipelt_two_prefix_gates", SMALL),
    "llama_unipelt_made": ("llama_unipelt_small", "unipelt"),
    "bert_lora_gated_made": ("bert_lora_gated", 'lora[r=2,use_gating=true,target_modules=["query","value"]]'),
    "bert_seq_bn_gated_made": ("bert_seq_bn_gated", "seq_bn[reduction_factor=4,original_ln_before=true,"
                                                    "use_gating=true]"),
}


def test_peftkit_saves_gated_adapters_in_adapters_format_that_adapters_computes_alike(unipelt_fixtures: Path,
                                                                                      tmp_path: Path) -> None:
    jobs, ours = saved_both_ways(unipelt_fixtures, SAVED, base_of, shuffle, output, tmp_path, ATOL)
    options = json.loads((tmp_path / "roberta_unipelt_made" / "adapter_config.json").read_text())["config"]
    assert options["architecture"] == "union"
    assert [(c.get("architecture"), c["use_gating"]) for c in options["configs"]] == [
        ("prefix_tuning", True), (None, True), ("lora", True)]  # adapters writes no architecture for a bottleneck
    keys = set(load_file(str(tmp_path / "roberta_unipelt_made" / "adapter.safetensors")))
    layer = "encoder.layer.1"  # adapters' key names for the gates, exactly
    assert {f"{layer}.attention.self.prefix_tuning.prefix_gates.default.weight",
            f"{layer}.attention.self.prefix_tuning.prefix_gates.default.bias",
            f"{layer}.attention.self.query.loras.default.gate.weight",
            f"{layer}.attention.self.value.loras.default.gate.bias",
            f"{layer}.output.adapters.default.gate.weight", f"{layer}.output.adapters.default.gate.bias"} <= keys
    run_in_venv(["make_unipelt_fixtures.py", "--run", str(jobs)])
    for label in SAVED:
        theirs = load_file(str(tmp_path / f"{label}.safetensors"))["output"]
        torch.testing.assert_close(theirs, ours[label], atol=ATOL, rtol=0, msg=lambda m, label=label: f"{label}: {m}")


def test_a_gated_lora_on_gpt2s_fused_layer_is_refused_by_name(tmp_path: Path) -> None:
    from tests.tiny_models import build_tiny

    model = peftkit.adapt(build_tiny("gpt2"), "lora[r=3,use_gating=true]")
    with pytest.raises(peftkit.PeftkitError, match="use_gating=true on GPT-2's fused c_attn"):
        model.save_adapter(str(tmp_path / "x"), format="adapters")
    assert not (tmp_path / "x").exists()


def test_a_gated_prefix_folder_without_its_gates_is_refused_by_name(unipelt_fixtures: Path, tmp_path: Path) -> None:
    """use_gating=true names gates the folder must hold: a flat prefix with the option set but no prefix_gates
    keys is refused, and nothing is added."""
    case = unipelt_fixtures / "bert_lora_gated"
    folder = tmp_path / "no_gates"
    shutil.copytree(case / "adapter", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"] = {"architecture": "prefix_tuning", "flat": True, "prefix_length": 2, "use_gating": True}
    (folder / "adapter_config.json").write_text(json.dumps(data))
    torch.save({"prefix_tuning.prefix_tunings.task.self_prefix.control_trans": torch.zeros(2 * 2 * 2 * 32)},
               folder / "pytorch_adapter.bin")
    model = peftkit.AdaptedModel(base_of(case))
    with pytest.raises(peftkit.AdapterLoadError, match="use_gating=true but no gate"):
        model.load_adapter(str(folder), "default")
    assert model.adapters == {}
