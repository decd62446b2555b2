"""AdapterHub's format against the real ``adapters`` 1.3.0, both ways.

``adapters`` pins its own transformers, so it lives in a second virtualenv that
``make adapters-venv`` builds (pip reaches the package index; minutes the first time,
a no-op after). Scripts in tests/adapterhub/ run there: one saves adapters and
reference outputs (cached under the venv, keyed by the script's hash), the other
loads what peftkit saved and computes the outputs peftkit's must match.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv
from peftkit.core.errors import AdapterLoadError, PeftkitError
from peftkit.core.layer import ModulesToSave
from peftkit.testing import randomize
from peftkit.hub_client import api as hub
from tests.hub_helpers import hub_env  # noqa: F401

pytestmark = pytest.mark.slow

ATOL = 1e-5

LOADED = ["bert_double_seq_bn", "bert_double_seq_bn_ln_learned_bin", "bert_seq_bn", "bert_seq_bn_leave_out",
          "bert_par_bn", "bert_lora", "bert_ia3", "roberta_ia3_qv", "roberta_double_seq_bn", "roberta_lora",
          "bert_pfeiffer", "bert_pfeiffer_post_add_ln_before", "bert_pfeiffer_normed_ln_after",
          "bert_seq_bn_ln_after", "roberta_double_seq_bn_original_ln", "bert_par_bn_ln_after",
          "llama_seq_bn", "llama_double_seq_bn", "llama_lora", "gpt2_double_seq_bn", "llama_pfeiffer",
          "gpt2_double_seq_bn_original_ln"]



@pytest.fixture(scope="module")
def fixtures() -> Path:
    """Folder of the cases make_fixtures.py wrote with the real ``adapters``."""
    return cached_fixtures('', 'make_fixtures.py')


def _base(case: Path) -> torch.nn.Module:
    """The case's base model: the bare body, or with ``task`` in model.json transformers' task model
    (two labels, as a user would start) whose body holds the case's weights."""
    import transformers

    spec = json.loads((case / "model.json").read_text())
    family = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "gpt2": "GPT2"}[spec["model_type"]]
    config = getattr(transformers, f"{family}Config")(**spec["config"])
    task = {None: "Model", "seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
            "causal_lm": "LMHeadModel" if family == "GPT2" else "ForCausalLM"}[spec.get("task")]
    model = getattr(transformers, f"{family}{task}")(config)
    body = load_file(str(case / "base.safetensors"))
    if spec.get("task") == "causal_lm":  # the whole model's weights (a tied lm_head follows its embedding)
        result = model.load_state_dict(body, strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
        return model.eval()
    if not hasattr(model.base_model, "pooler") or model.base_model.pooler is None:  # task models without one
        body = {k: v for k, v in body.items() if not k.startswith("pooler.")}
    model.base_model.load_state_dict(body)
    return model.eval()


def _hidden(model: torch.nn.Module, case: Path) -> torch.Tensor:
    """The last hidden state, or a task model's logits."""
    ids = load_file(str(case / "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _expected(case: Path) -> torch.Tensor:
    return load_file(str(case / "expected.safetensors"))["output"]


HEADS = {"bert_head_seq_cls": ["neg", "neu", "pos"], "bert_head_seq_cls_pooler": ["neg", "neu", "pos"],
         "roberta_head_seq_cls": ["neg", "neu", "pos"], "bert_head_tagging": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
         "roberta_head_tagging": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
         "bert_head_static_seq_cls": ["LABEL_0", "LABEL_1", "LABEL_2"], "llama_head_causal_lm": None}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_adapters_folder_with_a_head_loads_with_the_same_logits_and_labels(fixtures: Path, name: str) -> None:
    case = fixtures / name
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    torch.testing.assert_close(_hidden(model, case), _expected(case), atol=ATOL, rtol=0)
    assert model.adapter_labels("default") == HEADS[name]


def test_a_causal_lm_output_layer_saved_as_a_static_head_is_the_adapters_own(fixtures: Path) -> None:
    case = fixtures / "llama_lora"
    base = _base(case)
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    assert model.adapter_record("default").modules_to_save == ["lm_head"]
    copy = model.base_model.lm_head.copies["default"].weight
    assert not torch.allclose(copy, base.lm_head.weight)  # drawn at random in adapters: it matters


def test_add_causal_lm_heads_default_two_layers_are_refused_by_name(fixtures: Path, tmp_path: Path) -> None:
    case = fixtures / "llama_head_causal_lm"
    folder = tmp_path / "two_layers"
    shutil.copytree(case / "adapter", folder)
    data = json.loads((folder / "head_config.json").read_text())
    data["config"].update(layers=2, bias=True, layer_norm=True, activation_function="gelu")
    (folder / "head_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match="'causal_lm' head cannot load into LlamaForCausalLM: layers=2"):
        peftkit.from_pretrained(_base(case), str(folder))


def test_a_head_the_model_cannot_hold_is_left_out_with_a_warning(fixtures: Path) -> None:
    case = fixtures / "bert_head_seq_cls"
    bare = _base(fixtures / "bert_seq_bn")  # a BertModel, no head
    with pytest.warns(UserWarning, match="prediction head is not loaded.*ForSequenceClassification"):
        model = peftkit.from_pretrained(bare, str(case / "adapter"))
    assert model.adapter_labels("default") is None
    import transformers
    tagger = transformers.BertForTokenClassification(bare.config)
    with pytest.raises(AdapterLoadError, match="'classification' head needs .*ForSequenceClassification"):
        peftkit.from_pretrained(tagger, str(case / "adapter"))


@pytest.mark.parametrize("name", LOADED)
def test_adapters_folder_loads_with_the_same_outputs(fixtures: Path, name: str) -> None:
    case = fixtures / name
    base_out = _hidden(_base(case), case)
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    ours = _hidden(model, case)
    assert not torch.allclose(base_out, _expected(case), atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(ours, _expected(case), atol=ATOL, rtol=0)


def test_skipping_the_model_layernorm_after_the_adapter_is_refused_by_name(fixtures: Path, tmp_path: Path) -> None:
    case = fixtures / "bert_pfeiffer"
    folder = tmp_path / "adapter_plus"
    shutil.copytree(case / "adapter", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"]["original_ln_after"] = False  # as AdapterPlusConfig saves it
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match="original_ln_after=false"):
        peftkit.from_pretrained(_base(case), str(folder))


def test_saved_in_adapters_format_loads_in_adapters_with_the_same_outputs(fixtures: Path, tmp_path: Path) -> None:
    """Both kinds of source: folders adapters saved (re-saved by peftkit), and adapters made in peftkit."""
    jobs, ours = [], {}
    for name in LOADED + sorted(HEADS):
        case = fixtures / name
        model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
        model.save_adapter(str(tmp_path / name), format="adapters")
        jobs.append({"case": str(case), "adapter": str(tmp_path / name), "out": str(tmp_path / f"{name}.out")})
        ours[name] = _expected(case)
    made = {"made_double_seq_bn": ("bert_double_seq_bn", "double_seq_bn[reduction_factor=8,init_weights=false,"
                                                          "ln_before=true,non_linearity=gelu_new]"),
            "made_par_bn": ("roberta_double_seq_bn", "par_bn[init_weights=false,scaling=learned]"),
            "made_pfeiffer": ("bert_pfeiffer", "seq_bn[init_weights=false,original_ln_before=true,ln_after=true,"
                                               "original_ln_residual=sum,ln_after_includes_residual=true]"),
            "made_lora": ("bert_lora", "lora[r=4,alpha=16,target_modules=[query,key],init_weights=false]"),
            "made_ia3": ("bert_ia3", "ia3[target_modules=[value,intermediate.dense],feedforward_modules=[],"
                                     "init_ia3_weights=false]")}
    made["made_lora_head"] = ("bert_head_seq_cls", "lora[r=4,init_weights=false]")
    made["made_llama_lora"] = ("llama_lora", "lora[r=2,alpha=4,target_modules=[q_proj,v_proj],init_weights=false]")
    made["made_gpt2_seq_bn"] = ("gpt2_double_seq_bn", "seq_bn[reduction_factor=4,init_weights=false,ln_before=true]")
    made["made_seq_bn_tagger"] = ("roberta_head_tagging", "seq_bn[init_weights=false,original_ln_before=true]")
    for name, (source, spec) in made.items():
        case = fixtures / source
        torch.manual_seed(3)
        base = _base(case)
        base.config.id2label = {0: "bad", 1: "good"}
        model = peftkit.adapt(base, spec, trainable=False)
        randomize(model, "default", seed=5, scale=0.3)
        for module in model.base_model.modules():  # the head copies too
            if isinstance(module, ModulesToSave):
                with torch.no_grad():
                    for param in module.copies["default"].parameters():
                        param.add_(0.3 * torch.randn(param.shape))
        ours[name] = _hidden(model, case)
        model.save_adapter(str(tmp_path / name), format="adapters")
        files = ["adapter.safetensors", "adapter_config.json"]
        if json.loads((case / "model.json").read_text()).get("task") in ("seq_cls", "token_cls"):
            files = sorted(files + ["head_config.json", "model_head.safetensors"])
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == files
        again = peftkit.from_pretrained(_base(case), str(tmp_path / name))  # and back into peftkit
        torch.testing.assert_close(_hidden(again, case), ours[name], atol=ATOL, rtol=0)
        assert again.adapter_labels("default") == model.adapter_labels("default")
        jobs.append({"case": str(case), "adapter": str(tmp_path / name), "out": str(tmp_path / f"{name}.out")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_in_venv(["run_saved.py", str(tmp_path / "jobs.json")])
    for job in jobs:
        name = Path(job["adapter"]).name
        torch.testing.assert_close(load_file(job["out"])["output"], ours[name], atol=ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("source, change, words", [  # par_bn on decoders: tests/test_adapterhub_decoders_more.py
    ("llama_lora", {"attn_matrices": ["q", "o"]}, "attn_matrices=\\['q', 'o'\\] on model_type='llama'"),
])
def test_decoder_placements_peftkit_does_not_compute_are_refused(fixtures: Path, tmp_path: Path, source: str,
                                                                 change: dict, words: str) -> None:
    folder = tmp_path / "changed"
    shutil.copytree(fixtures / source / "adapter", folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"].update(change)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match=words):
        peftkit.from_pretrained(_base(fixtures / source), str(folder))
    model = peftkit.adapt(_base(fixtures / source), "par_bn")
    with pytest.raises(PeftkitError, match=r"parallel adapter on model_type=.*use par_bn\[read_residual=true\]"):
        model.save_adapter(str(tmp_path / "par"), format="adapters")


def test_adapterhub_prompt_tuning_loads_after_the_embedding_block(fixtures: Path) -> None:
    """adapters puts its prompt after BERT's embedding LayerNorm: peftkit's prompt_tuning[placement=embedding_output]
    (more cases, padded batches, heads and saving: tests/test_adapterhub_prompt.py)."""
    case = fixtures / "bert_prompt_tuning"
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    assert model.adapter_record("default").config.placement == "embedding_output"
    torch.testing.assert_close(_hidden(model, case), _expected(case), atol=ATOL, rtol=0)


def test_adapters_format_refuses_what_it_cannot_hold(fixtures: Path, tmp_path: Path) -> None:
    case = fixtures / "bert_lora"
    model = peftkit.adapt(_base(case), "lora[target_modules=[dense]]", trainable=False)
    with pytest.raises(PeftkitError, match="target_modules"):
        model.save_adapter(str(tmp_path / "x"), format="adapters")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PeftkitError, match="unknown adapter folder format"):
        model.save_adapter(str(tmp_path / "y"), format="adapterhub")


class _Payload:
    def __reduce__(self):  # what a hostile pytorch_adapter.bin would run on unrestricted unpickling
        return (os.mkdir, (str(_Payload.target),))


def test_pickled_code_in_pytorch_adapter_bin_is_never_run(fixtures: Path, tmp_path: Path) -> None:
    source = fixtures / "bert_double_seq_bn_ln_learned_bin" / "adapter"
    folder = tmp_path / "hostile"
    shutil.copytree(source, folder)
    _Payload.target = tmp_path / "ran"
    (folder / "pytorch_adapter.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    with pytest.raises(AdapterLoadError, match="damaged or holds more than tensors"):
        peftkit.from_pretrained(_base(fixtures / "bert_double_seq_bn_ln_learned_bin"), str(folder))
    assert not _Payload.target.exists()



def test_adapters_folder_is_pushed_and_pulled_with_an_adapterhub_card(fixtures: Path,
                                                                      hub_env: Path) -> None:  # noqa: F811
    case = fixtures / "bert_lora"
    address = f"local:{hub_env / 'local-hub'}"
    hub.push(str(case / "adapter"), "alice/bert-lora", hub=address, base_model="org/tiny-bert", progress=False)
    folder = hub.pull("alice/bert-lora", hub=address, progress=False)
    card = (folder / "README.md").read_text()
    assert "library_name: adapter-transformers" in card and "- adapters" in card
    assert json.loads((folder / "adapter_config.json").read_text())["model_name"] == "org/tiny-bert"
    model = peftkit.from_pretrained(_base(case), str(folder))
    torch.testing.assert_close(_hidden(model, case), _expected(case), atol=ATOL, rtol=0)


def test_a_subclass_of_lora_does_not_take_lora_folders_from_lora() -> None:
    from peftkit.core.adapterhub_format import claiming_method
    from peftkit.core.plugins import get_registry

    lora = get_registry().methods["lora"]
    variant = type("LoraVariant", (type(lora),), {"name": "lora_variant"})()
    data = {"config": {"architecture": "lora", "attn_matrices": ["q"], "r": 2}, "model_type": "roberta"}
    method, values = claiming_method([variant, lora], data, "here")
    assert method is lora and values["target_modules"] == ["query"] and values["r"] == 2
    with pytest.raises(AdapterLoadError, match="here: no installed peftkit method reads"):
        claiming_method([lora], {"config": {"architecture": "prefix_tuning"}}, "here")
