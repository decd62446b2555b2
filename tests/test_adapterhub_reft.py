"""ReFT in AdapterHub's format against the real ``adapters`` 1.3.0, both ways, on padded batches.

tests/adapterhub/make_reft_fixtures.py runs in ``.venv-adapters`` (``make adapters-venv``): it saves
LoReFT, NoReFT and DiReFT adapters on BERT, RoBERTa, Llama and GPT-2 with their outputs (cached under
the venv, keyed by the scripts' hashes), and with ``--run`` loads the folders peftkit saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv
from tests.method_helpers import adapter_modules

pytestmark = pytest.mark.slow

ATOL = 1e-5
CASES = ["bert_loreft", "roberta_noreft_tied_tanh", "llama_loreft_layer1", "llama_direft", "gpt2_loreft_relu"]
FAMILIES = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "gpt2": "GPT2"}



@pytest.fixture(scope="module")
def reft_fixtures() -> Path:
    return cached_fixtures('reft-', 'make_reft_fixtures.py', 'make_fixtures.py')


def base_of(case: Path) -> torch.nn.Module:
    """The case's model (a decoder with its LM head) holding the case's base weights."""
    spec = json.loads((case / "model.json").read_text())
    family = FAMILIES[spec["model_type"]]
    suffix = {None: "Model", "causal_lm": "LMHeadModel" if family == "GPT2" else "ForCausalLM"}[spec.get("task")]
    model = getattr(transformers, f"{family}{suffix}")(getattr(transformers, f"{family}Config")(**spec["config"]))
    result = model.load_state_dict(load_file(str(case / "base.safetensors")), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return model.eval()


def output(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", CASES)
def test_adapters_reft_folder_loads_with_the_same_outputs(reft_fixtures: Path, name: str) -> None:
    case = reft_fixtures / name
    expected = load_file(str(case / "expected.safetensors"))
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    got = output(model, expected)
    torch.testing.assert_close(got, expected["reloaded"], atol=ATOL, rtol=0)  # what adapters computes from it
    if name != "llama_direft":
        torch.testing.assert_close(got, expected["output"], atol=ATOL, rtol=0)  # = the model that saved it
    if "generated" in expected:  # adapters generates without a KV cache only
        generated = model.generate(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"],
                                   max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(generated, expected["generated"])


def test_a_direft_saved_by_adapters_loads_as_adapters_reads_it(reft_fixtures: Path, tmp_path: Path) -> None:
    """adapters 1.3.0 does not save subtract_projection and reads it back as true: so does peftkit, which
    refuses to save a DiReFT adapter in that format."""
    case = reft_fixtures / "llama_direft"
    saved = json.loads((case / "adapter" / "adapter_config.json").read_text())["config"]
    assert "subtract_projection" not in saved and saved["orthogonality"] is False
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    assert model.adapter_record("default").config.subtract_projection is True
    expected = load_file(str(case / "expected.safetensors"))
    assert (expected["output"] - expected["reloaded"]).abs().max() > 0.01
    direft = peftkit.adapt(base_of(case), "direft")
    with pytest.raises(peftkit.PeftkitError, match="subtract_projection=false"):
        direft.save_adapter(str(tmp_path / "direft"), format="adapters")
    assert not (tmp_path / "direft").exists()


def test_loaded_layers_and_units_follow_the_options(reft_fixtures: Path) -> None:
    llama = peftkit.from_pretrained(base_of(reft_fixtures / "llama_loreft_layer1"),
                                    str(reft_fixtures / "llama_loreft_layer1" / "adapter"))
    assert {site: list(m.units) for site, m in adapter_modules(llama).items()} == {"model.layers.1": ["0", "1"]}
    roberta = peftkit.from_pretrained(base_of(reft_fixtures / "roberta_noreft_tied_tanh"),
                                      str(reft_fixtures / "roberta_noreft_tied_tanh" / "adapter"))
    assert all(list(m.units) == ["0"] for m in adapter_modules(roberta).values())
    direft = peftkit.from_pretrained(base_of(reft_fixtures / "llama_direft"),
                                     str(reft_fixtures / "llama_direft" / "adapter"))
    assert all(list(m.units) == ["0"] for m in adapter_modules(direft).values())  # adapters' unit 1 is unused


def shuffle(model: peftkit.AdaptedModel, seed: int) -> None:
    """New random weights; the orthogonal parametrization's diagonal stays -1 (as training leaves it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters.default." in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
                if name.endswith("parametrizations.weight.original"):
                    param.diagonal().fill_(-1.0)


#: (case whose base model and batch are used, the spec peftkit saves; None: the case's own adapter reloaded)
SAVED = {
    "bert_loreft_both": ("bert_loreft", None),
    "bert_loreft_prefix_only": ("bert_loreft", "loreft[prefix_positions=2,r=2]"),
    "roberta_noreft_tied": ("roberta_noreft_tied_tanh", None),
    "llama_noreft": ("llama_direft", "noreft[prefix_positions=1,suffix_positions=2,r=2]"),
    "llama_loreft_layer1": ("llama_loreft_layer1", None),
    "gpt2_loreft_suffix_only": ("gpt2_loreft_relu", "reft[prefix_positions=0,suffix_positions=2,r=2,"
                                                    "non_linearity=gelu_new]"),
}


def test_peftkit_saves_reft_in_adapters_format_that_adapters_computes_alike(reft_fixtures: Path,
                                                                             tmp_path: Path) -> None:
    jobs, ours = [], {}
    for label, (name, spec) in SAVED.items():
        case = reft_fixtures / name
        if spec is None:
            model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
        else:
            model = peftkit.adapt(base_of(case), spec)
        shuffle(model, seed=len(jobs))
        model.eval()
        folder = tmp_path / label
        model.save_adapter(str(folder), format="adapters")
        ours[label] = output(model, load_file(str(case / "expected.safetensors")))
        jobs.append({"case": str(case), "adapter": str(folder), "out": str(tmp_path / f"{label}.safetensors")})
        again = peftkit.from_pretrained(base_of(case), str(folder))  # and peftkit reads its own file back
        torch.testing.assert_close(output(again, load_file(str(case / "expected.safetensors"))), ours[label],
                                   atol=ATOL, rtol=0)
    options = json.loads((tmp_path / "llama_noreft" / "adapter_config.json").read_text())["config"]
    assert options["orthogonality"] is False and options["architecture"] == "reft"
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_in_venv(["make_reft_fixtures.py", "--run", str(tmp_path / "jobs.json")])
    for label in SAVED:
        theirs = load_file(str(tmp_path / f"{label}.safetensors"))["output"]
        torch.testing.assert_close(theirs, ours[label], atol=ATOL, rtol=0, msg=lambda m, label=label: f"{label}: {m}")
