"""Compacter and MAD-X's invertible adapters in AdapterHub's format, against the real ``adapters`` 1.3.0, both ways.

tests/adapterhub/make_bottleneck_fixtures.py runs in ``.venv-adapters`` (``make adapters-venv``): it saves
Compacter, Compacter++ and invertible (seq_bn_inv, double_seq_bn_inv) adapters with their outputs, a MAD-X
stack (language adapter under a task adapter) among them, cached under the venv keyed by the scripts' hash.
Its ``run`` mode loads what peftkit saved and computes the outputs peftkit's must match.
tests/adapterhub/make_madx_decoder_fixtures.py does the same for invertible adapters on Llama and GPT-2
(``adapters``' flex models with a causal-LM head that is the LM's own ``lm_head``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv
from peftkit.core.errors import AdapterLoadError
from peftkit.hub_client import api as hub
from peftkit.testing import randomize
from tests.hub_helpers import hub_env  # noqa: F401

pytestmark = pytest.mark.slow

ATOL = 1e-5
#: cases of one adapter; all but the decoder's are also saved by peftkit and loaded by adapters
SAVED = ["bert_compacter", "bert_compacterpp_factorized", "roberta_compacter_own_rules", "bert_compacter_shared_w",
         "bert_seq_bn_inv_mlm", "roberta_double_seq_bn_inv_mlm", "roberta_seq_bn_trained_mlm_head"]
SINGLE = SAVED + ["llama_compacter"]



@pytest.fixture(scope="module")
def cases() -> Path:
    """Folder of the cases make_bottleneck_fixtures.py wrote with the real ``adapters``."""
    return cached_fixtures('bottleneck-', 'make_bottleneck_fixtures.py', 'make_fixtures.py')


@pytest.fixture(scope="module")
def decoder_cases() -> Path:
    """Folder of the Llama and GPT-2 invertible-adapter cases make_madx_decoder_fixtures.py wrote."""
    return cached_fixtures('madx-decoder-', 'make_madx_decoder_fixtures.py', 'make_bottleneck_fixtures.py',
                           'make_fixtures.py')


def _base(case: Path) -> torch.nn.Module:
    """The case's transformers task model with the weights both libraries start from."""
    import transformers

    spec = json.loads((case / "model.json").read_text())
    family = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "gpt2": "GPT2"}[spec["model_type"]]
    model = getattr(transformers, spec["class"])(getattr(transformers, f"{family}Config")(**spec["config"]))
    model.load_state_dict(load_file(str(case / "base.safetensors")))
    return model.eval()


def _logits(model: torch.nn.Module, case: Path) -> torch.Tensor:
    ids = load_file(str(case / "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _expected(case: Path) -> torch.Tensor:
    return load_file(str(case / "expected.safetensors"))["output"]


def _madx(case: Path) -> peftkit.AdaptedModel:
    model = peftkit.from_pretrained(_base(case), str(case / "lang"), adapter_name="lang")
    model.load_adapter(str(case / "task"), "task")
    model.set_active("stack(lang, task)")
    return model


@pytest.mark.parametrize("name", SINGLE)
def test_adapters_folder_loads_with_the_same_logits(cases: Path, name: str) -> None:
    case = cases / name
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    torch.testing.assert_close(_logits(model, case), _expected(case), atol=ATOL, rtol=0)
    with model.disable_adapters():  # the adapter matters
        assert not torch.allclose(_logits(model, case), _expected(case), atol=1e-3)
    if name == "roberta_seq_bn_trained_mlm_head":  # a masked-LM head of its own is the adapter's copy
        assert model.adapter_record("default").modules_to_save == ["lm_head.decoder", "lm_head.dense",
                                                                   "lm_head.layer_norm"]
    config = model.adapter_record("default").config
    assert config.phm_layer == ("compacter" in name) and (config.inv_adapter == "nice") == ("inv" in name)


def test_the_madx_stack_of_language_and_task_adapter_computes_as_adapters(cases: Path) -> None:
    case = cases / "bert_madx_stack"
    model = _madx(case)
    assert model.adapter_record("lang").method.name == "seq_bn_inv"
    torch.testing.assert_close(_logits(model, case), _expected(case), atol=ATOL, rtol=0)
    # the inverse before the LM head is the language adapter's (the first of the stack), not left out
    decoder = model.base_model.cls.predictions.decoder
    assert list(decoder.adapters) == ["lang"]


def test_madx_adapters_pushed_to_a_hub_compose_at_load_time_and_swap_the_language(
        cases: Path, hub_env: Path) -> None:  # noqa: F811
    """AdapterHub folders of a language and a task adapter, pushed as they are, load as
    ``stack(alice/lang-en, alice/task)``; pulling another language's adapter under the task swaps it."""
    case = cases / "bert_madx_stack"
    address = f"local:{hub_env / 'local-hub'}"
    for repo, folder in (("alice/lang-en", "lang"), ("alice/task", "task")):
        hub.push(str(case / folder), repo, hub=address, base_model="org/tiny-bert", progress=False)
    model = peftkit.load(_base(case), "stack(alice/lang-en, alice/task)", hub=address, progress=False)
    torch.testing.assert_close(_logits(model, case), _expected(case), atol=ATOL, rtol=0)
    other = peftkit.adapt(_base(case), "seq_bn_inv[reduction_factor=4,init_weights=false]", adapter_name="x")
    randomize(other, "x", seed=7, scale=0.3)
    other.save_adapter(str(hub_env / "lang_de"), "x", format="adapters")  # a second language adapter
    hub.push(str(hub_env / "lang_de"), "alice/lang-de", hub=address, base_model="org/tiny-bert", progress=False)
    swapped = peftkit.load(_base(case), "stack(alice/lang-de, alice/task)", hub=address, progress=False)
    assert not torch.allclose(_logits(swapped, case), _expected(case), atol=1e-3)
    names = list(swapped.adapter_records)
    assert len(names) == 2 and swapped.adapter_record(names[0]).method.name == "seq_bn_inv"


def test_a_trained_masked_lm_head_with_an_invertible_adapter_is_refused_by_name(cases: Path, tmp_path: Path) -> None:
    case = cases / "bert_seq_bn_inv_mlm"
    folder = tmp_path / "trained_head"
    shutil.copytree(case / "adapter", folder)
    from safetensors.torch import save_file
    head = load_file(str(folder / "model_head.safetensors"))
    save_file({k: v + 0.5 for k, v in head.items()}, str(folder / "model_head.safetensors"))
    with pytest.raises(AdapterLoadError, match="inverse goes on the input of 'cls.predictions.decoder'"):
        peftkit.from_pretrained(_base(case), str(folder))


def test_a_bare_models_compacter_folder_without_its_shared_rules_is_refused_by_name(cases: Path) -> None:
    case = cases / "bert_compacter_bare"
    with pytest.raises(AdapterLoadError, match="lacks the adapter-wide tensor 'shared_parameters.task.phm_rule'"):
        peftkit.from_pretrained(_base(case), str(case / "adapter"))


def test_glow_invertible_adapters_are_refused_by_name(cases: Path, tmp_path: Path) -> None:
    case = cases / "bert_seq_bn_inv_mlm"
    folder = tmp_path / "glow"
    shutil.copytree(case / "adapter", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"]["inv_adapter"] = "glow"
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match="inv_adapter='glow' is not supported.*GLOW"):
        peftkit.from_pretrained(_base(case), str(folder))


#: peftkit-made adapters: name -> (case whose model and inputs it uses, spec)
MADE = {
    "compacter": ("bert_compacter", "compacter[reduction_factor=4,init_weights=false]"),
    "compacterpp_own_rules": ("roberta_compacter_own_rules",
                              "compacterpp[reduction_factor=4,shared_phm_rule=false,factorized_phm_rule=true,"
                              "init_weights=false,original_ln_before=true]"),
    "seq_bn_phm_shared_w": ("bert_compacter_shared_w", "seq_bn[phm_layer=true,reduction_factor=4,shared_W_phm=true,"
                                                       "phm_rank=2,init_weights=false]"),
    "seq_bn_inv": ("bert_seq_bn_inv_mlm", "seq_bn_inv[reduction_factor=4,init_weights=false,non_linearity=gelu]"),
}


def test_saved_in_adapters_format_loads_in_adapters_with_the_same_logits(cases: Path, tmp_path: Path) -> None:
    """Folders adapters saved (re-saved by peftkit), adapters made in peftkit, and the MAD-X stack."""
    _adapters_computes_alike(cases, SAVED, "bert_madx_stack", MADE, "make_bottleneck_fixtures.py", tmp_path)


def _adapters_computes_alike(cases: Path, singles: list[str], madx_case: str, made: dict[str, tuple[str, str]],
                             script: str, tmp_path: Path) -> None:
    """Save in adapters' format the ``singles`` cases' folders as peftkit loads them, the two adapters of the
    MAD-X stack ``madx_case`` and adapters made in peftkit (``made``: name -> (case, spec), which also load back
    into peftkit alike); ``script``'s run mode loads them in ``adapters``, which must compute the same logits."""
    jobs, ours = [], {}
    for name in singles:
        case = cases / name
        model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
        model.save_adapter(str(tmp_path / name / "default"), format="adapters")
        jobs.append({"case": str(case), "adapters": [str(tmp_path / name / "default")], "out": str(tmp_path / name)
                     + ".out"})
        ours[name] = _expected(case)
    madx = _madx(cases / madx_case)
    for adapter in ("lang", "task"):
        madx.save_adapter(str(tmp_path / "madx" / adapter), adapter, format="adapters")
    jobs.append({"case": str(cases / madx_case), "adapters": [str(tmp_path / "madx" / a) for a in ("lang", "task")],
                 "out": str(tmp_path / "madx.out")})
    ours["madx"] = _expected(cases / madx_case)
    for name, (source, spec) in made.items():
        case = cases / source
        torch.manual_seed(3)
        model = peftkit.adapt(_base(case), spec, trainable=False)
        randomize(model, "default", seed=5, scale=0.3)
        ours[name] = _logits(model, case)
        folder = tmp_path / name / "default"
        model.save_adapter(str(folder), format="adapters")
        again = peftkit.from_pretrained(_base(case), str(folder))  # and back into peftkit
        torch.testing.assert_close(_logits(again, case), ours[name], atol=ATOL, rtol=0)
        jobs.append({"case": str(case), "adapters": [str(folder)], "out": str(tmp_path / name) + ".out"})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_in_venv([script, "run", str(tmp_path / "jobs.json")])
    for job in jobs:
        name = Path(job["out"]).stem
        torch.testing.assert_close(load_file(job["out"])["output"], ours[name], atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


#: Llama and GPT-2 cases of one adapter (make_madx_decoder_fixtures.py)
DECODER_SINGLE = ["llama_seq_bn_inv", "llama_double_seq_bn_inv", "gpt2_seq_bn_inv", "gpt2_double_seq_bn_inv"]
#: peftkit-made invertible adapters on decoders: name -> (case whose model and inputs it uses, spec)
DECODER_MADE = {
    "llama_made": ("llama_seq_bn_inv", "seq_bn_inv[reduction_factor=4,init_weights=false,non_linearity=gelu]"),
    "gpt2_made": ("gpt2_double_seq_bn_inv", "double_seq_bn_inv[reduction_factor=4,init_weights=false,"
                                            "inv_adapter_reduction_factor=4]"),
}


@pytest.mark.parametrize("name", DECODER_SINGLE)
def test_decoder_invertible_adapters_from_adapters_load_with_the_same_logits(decoder_cases: Path, name: str) -> None:
    """The block on the embedding output (Llama's embed_tokens, GPT-2's transformer.drop) and its inverse on
    lm_head's input; the folder's causal-LM head is the model's own, so it is not loaded as a copy."""
    case = decoder_cases / name
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    torch.testing.assert_close(_logits(model, case), _expected(case), atol=ATOL, rtol=0)
    record = model.adapter_record("default")
    assert record.config.inv_adapter == "nice" and record.modules_to_save == []
    assert list(model.base_model.lm_head.adapters) == ["default"]
    embedding = "model.embed_tokens" if name.startswith("llama") else "transformer.drop"
    assert list(model.base_model.get_submodule(embedding).adapters) == ["default"]
    with model.disable_adapters():  # the adapter matters
        assert not torch.allclose(_logits(model, case), _expected(case), atol=1e-3)


def test_a_decoder_madx_stack_computes_as_adapters(decoder_cases: Path) -> None:
    model = _madx(decoder_cases / "llama_madx_stack")
    torch.testing.assert_close(_logits(model, decoder_cases / "llama_madx_stack"),
                               _expected(decoder_cases / "llama_madx_stack"), atol=ATOL, rtol=0)
    assert list(model.base_model.lm_head.adapters) == ["lang"]


def test_decoder_invertible_adapters_saved_in_adapters_format_load_in_adapters_alike(decoder_cases: Path,
                                                                                       tmp_path: Path) -> None:
    """adapters' folders re-saved by peftkit, peftkit-made ones, and the MAD-X stack, loaded by adapters into
    LlamaAdapterModel / GPT2AdapterModel with the LM's own head: the same logits."""
    _adapters_computes_alike(decoder_cases, DECODER_SINGLE, "llama_madx_stack", DECODER_MADE,
                             "make_madx_decoder_fixtures.py", tmp_path)
