"""Adaption prompts (LLaMA-Adapter, PEFT's ADAPTION_PROMPT) on tiny Llama, Mistral and GPT-2: the same draws,
outputs, gradients, generation and files as the real ``peft``, grouped and multi-query key/value heads, half
precision, and the settings and models peftkit refuses by name.

The conformance suite runs adaption_prompt[adapter_len=4] on llama (bert and t5 are refused model types, as by
PEFT): tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError, PeftkitError
from tests.method_helpers import greedy_without_cache, output_of
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

peft = pytest.importorskip("peft")

ARCHS = ["llama", "mistral", "gpt2"]
GATE = 0.7  # the gates start at zero (the base model's output): moved, so that the prompts matter


def _llama_with_kv_heads(kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                                        max_position_embeddings=128, pad_token_id=0)).eval()


def _base(arch: str) -> torch.nn.Module:
    if arch.startswith("llama_kv"):
        return _llama_with_kv_heads(int(arch.removeprefix("llama_kv")))
    return build_tiny(arch)


def _inputs(arch: str) -> dict[str, torch.Tensor]:
    return sample_inputs("llama" if arch.startswith("llama") else arch)


def _open_gates(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(GATE)


def _peft_model(arch: str, seed: int = 0, **options) -> torch.nn.Module:
    options = {"adapter_len": 3, "adapter_layers": 2, **options}
    model = _base(arch)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(model, peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **options)).eval()
    _open_gates(theirs)
    return theirs


def _ours(arch: str, seed: int = 0, spec: str = "adaption_prompt[adapter_len=3,adapter_layers=2]",
          ) -> peftkit.AdaptedModel:
    model = _base(arch)
    torch.manual_seed(seed)
    ours = peftkit.adapt(model, spec).eval()
    _open_gates(ours)
    return ours


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**_inputs(arch)))


def _trained(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Trained tensors by PEFT's name (without the model prefix and peftkit's adapter level)."""
    return {name.removeprefix(prefix).replace(".adapters.default.", "."): param
            for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("arch", [*ARCHS, "llama_kv1", "llama_kv4"])
def test_same_draws_and_outputs_as_peft(arch):
    """The same seed draws the same prompts; with the gates open the outputs equal PEFT's (one key/value head
    for every query head, grouped, and multi-query); at init (gates zero) the output is the base model's."""
    base = _logits(_base(arch), arch)
    fresh = peftkit.adapt(_base(arch), "adaption_prompt[adapter_len=3]").eval()
    torch.testing.assert_close(_logits(fresh, arch), base, atol=0, rtol=0)

    theirs, ours = _peft_model(arch), _ours(arch)
    expected, got = _trained(theirs, "base_model.model."), _trained(ours, "base_model.")
    assert sorted(got) == sorted(expected) and len(got) == 4
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    result = _logits(ours, arch)
    assert (result - base).abs().max() > 1e-2
    torch.testing.assert_close(result, _logits(theirs, arch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_with_the_same_outputs_and_saves_back(tmp_path, arch):
    from peft import PeftModel

    theirs = _peft_model(arch, seed=3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(_base(arch), str(tmp_path / "peft")).eval()
    assert ours.adapter_record("default").method.name == "adaption_prompt"
    torch.testing.assert_close(_logits(ours, arch), _logits(theirs, arch), atol=1e-5, rtol=0)

    ours.save_pretrained(str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    attention = "attn" if arch == "gpt2" else "self_attn"
    assert {k: config[k] for k in ("peft_type", "target_modules", "adapter_len", "adapter_layers")} == \
        {"peft_type": "ADAPTION_PROMPT", "target_modules": attention, "adapter_len": 3, "adapter_layers": 2}
    saved, peft_saved = (load_file(str(tmp_path / folder / "adapter_model.safetensors")) for folder in ("ours", "peft"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in peft_saved.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the extra "peftkit" key
        again = PeftModel.from_pretrained(_base(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(again, arch), _logits(theirs, arch), atol=1e-5, rtol=0)


def test_default_layers_are_every_layer_and_the_file_says_so(tmp_path):
    """PEFT needs adapter_layers; peftkit's default takes every layer and writes the number PEFT reads."""
    from peft import PeftModel

    ours = peftkit.adapt(build_tiny("llama"), "adaption_prompt").eval()
    sites = [site.name for site in ours.adapter_record("default").sites]
    assert sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    _open_gates(ours)
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["adapter_len"], config["adapter_layers"], config["target_modules"]) == (10, 2, "self_attn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, "llama"), _logits(ours, "llama"), atol=1e-5, rtol=0)


def test_a_peft_config_object_is_taken():
    ours = peftkit.adapt(build_tiny("gpt2"), peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    assert [site.name for site in ours.adapter_record("default").sites] == ["transformer.h.1.attn"]


@pytest.mark.parametrize("arch", [*ARCHS, "llama_kv1"])
def test_gradients_equal_peft(arch):
    """One backward in eval mode (the models' own dropout off): the prompts' and gates' gradients are PEFT's."""
    theirs, ours = _peft_model(arch, seed=5), _ours(arch, seed=5)
    grads = []
    for model, prefix in ((theirs, "base_model.model."), (ours, "base_model.")):
        output_tensor(model(**_inputs(arch))).square().mean().backward()
        grads.append({key: param.grad for key, param in _trained(model, prefix).items()})
    expected, got = grads
    assert sorted(got) == sorted(expected)
    for key, grad in expected.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_a_kv_cache_equals_peft_and_a_full_forward_per_step(arch):
    """Each decoding step's new queries (rotated at their own positions) attend to the same prompt: greedy
    generate() with the cache equals PEFT's and decoding by a whole forward at each step."""
    theirs, ours = _peft_model(arch, seed=1), _ours(arch, seed=1)
    inputs = sample_inputs(arch, seq=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = ours.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(generated, theirs.generate(input_ids=ids, attention_mask=mask, **options))
    assert torch.equal(generated, greedy_without_cache(ours, arch, ids, mask, 6))
    with ours.disable_adapters():
        assert not torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **options), generated)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_matches_peft(dtype):
    """On a half-precision model the prompts are drawn in its dtype and the softmax runs in float32, as PEFT's."""
    torch.manual_seed(2)
    theirs = peft.get_peft_model(_base("llama").to(dtype), peft.AdaptionPromptConfig(
        adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")).eval()
    torch.manual_seed(2)
    ours = peftkit.adapt(_base("llama").to(dtype), "adaption_prompt[adapter_len=3,adapter_layers=2]").eval()
    for model in (theirs, ours):
        _open_gates(model)
    assert all(p.dtype == dtype for p in ours.adapter_parameters("default"))
    assert torch.equal(_logits(ours, "llama"), _logits(theirs, "llama"))


def test_other_model_types_are_refused_by_name():
    for arch, model_type in (("bert", "bert"), ("qwen2", "qwen2"), ("t5", "t5")):
        with pytest.raises(ConfigError, match=f"model type '{model_type}' is not supported.*llama, mistral, gpt2"):
            peftkit.adapt(build_tiny(arch), "adaption_prompt")


def test_a_head_dim_peft_misreads_is_refused():
    """PEFT reads the key/value heads as num_attention_heads / (hidden / k_proj width): wrong when head_dim is
    not hidden / heads (PEFT fails there on a view); peftkit refuses such a model by its layer and the rule."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn.*head_dim = hidden_size / num_attention"):
        peftkit.adapt(model, "adaption_prompt")


@pytest.mark.parametrize("spec, message", [
    ("adaption_prompt[adapter_layers=3]", r"adapter_layers=3 is more than the 2 'self_attn' modules.*at most 2"),
    ("adaption_prompt[target_modules=attention]", r"no module of LlamaForCausalLM is named 'attention'.*'self_attn'"),
    ("adaption_prompt[target_modules=[self_attn]]", r"must be one name.*target_modules=self_attn"),
    ("adaption_prompt[adapter_len=0]", r"adapter_len=0 must be a positive integer"),
    ("adaption_prompt[adapter_layers=0]", r"adapter_layers=0 must be a positive"),
    ("adaption_prompt[exclude_modules=[o_proj]]", r"exclude_modules=\['o_proj'\] is not supported.*no exclude_modules"),
    ("adaption_prompt[layers_to_transform=[1]]", r"layers_to_transform=\[1\] is not supported.*adapter_layers"),
])
def test_settings_are_refused_by_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_a_peft_field_peftkit_lacks_is_refused(tmp_path):
    _peft_model("llama").save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "adapter_dropout": 0.1}))
    with pytest.raises(AdapterLoadError, match="adapter_dropout=0.1 is not supported by peftkit.s adaption_prompt"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


def test_merging_and_compositions_are_refused():
    """PEFT merges no adaption prompt and runs one at a time; the prompt reads its attention's call (the
    position embeddings), which a composition does not hand a layer adapter."""
    model = _ours("llama")
    with pytest.raises(PeftkitError, match="adaption_prompt"):
        model.merge_adapter()
    model.add_adapter("other", "adaption_prompt[adapter_len=2]")
    with pytest.raises(PeftkitError, match="adaption_prompt"):
        model.set_adapter(peftkit.Stack("default", "other"))


def test_switching_between_two_adapters():
    """Two adapters at one attention: the active one runs, as PEFT swaps its modules in."""
    model = _ours("llama", seed=1)
    first = _logits(model, "llama")
    model.add_adapter("other", "adaption_prompt[adapter_len=3,adapter_layers=2]")
    _open_gates(model)
    model.set_adapter("other")
    other = _logits(model, "llama")
    assert (other - first).abs().max() > 1e-3
    model.set_adapter("default")
    assert torch.equal(_logits(model, "llama"), first)
    assert output_of(model, "llama").shape == first.shape


def test_methods_command_says_it_takes_part_in_no_block(capsys):
    """`peftkit methods adaption_prompt` printed an empty "blocks:" line for a method in no composition block."""
    from peftkit.cli import run

    assert run(["methods", "adaption_prompt"]) == 0
    assert "blocks: none (the adapter runs alone)" in capsys.readouterr().out.splitlines()


def _classifier() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128, pad_token_id=0, num_labels=3)).eval()


def test_a_classifier_head_trained_with_it_saves_and_loads_and_peft_refuses_the_folder(tmp_path):
    """peftkit trains a task model's head with the adapter by default; PEFT's adaption prompts have no
    modules_to_save, so the folder saved the head but a config that could not be read back (the head's key was
    'unexpected'), and PEFT would have loaded it with the untrained head. It is now saved as
    ADAPTION_PROMPT_MODULES_TO_SAVE: peftkit loads it back, PEFT refuses it; without the head it is PEFT's."""
    ours = peftkit.adapt(_classifier(), "adaption_prompt[adapter_len=3]").eval()
    _open_gates(ours)
    with torch.no_grad():
        ours.base_model.score.copies["default"].weight.mul_(3)
    ours.save_pretrained(str(tmp_path / "head"))
    config = json.loads((tmp_path / "head" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["modules_to_save"]) == ("ADAPTION_PROMPT_MODULES_TO_SAVE", ["score"])
    again = peftkit.from_pretrained(_classifier(), str(tmp_path / "head")).eval()
    ids = sample_inputs("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours(input_ids=ids).logits, atol=0, rtol=0)
    with pytest.raises(Exception, match="ADAPTION_PROMPT_MODULES_TO_SAVE"):
        peft.PeftModel.from_pretrained(_classifier(), str(tmp_path / "head"))

    plain = peftkit.adapt(_classifier(), "adaption_prompt[adapter_len=3]", adapter_name="other")
    plain.add_adapter("plain", "adaption_prompt[adapter_len=3]", default_head=False)
    plain.delete_adapter("other")
    plain.save_adapter(str(tmp_path / "plain"), "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_forward_without_gradients_runs_under_torchs_flop_counter(arch):
    """The prompt went to k_proj/v_proj (GPT-2: c_attn) as a parameter under inference_mode, which breaks torch's
    ModuleTracker (FlopCounterMode raised AttributeError; bench/perf_table.py crashed on it); the projections get a
    detached prompt there, with the same outputs."""
    from torch.utils.flop_counter import FlopCounterMode

    ours = _ours(arch)
    with torch.inference_mode():
        expected = output_of(ours, arch)
        with FlopCounterMode(display=False) as counter:
            got = output_of(ours, arch)
    assert counter.get_total_flops() > 0
    assert torch.equal(got, expected)
