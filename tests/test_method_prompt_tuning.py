"""Prompt tuning: soft prompts in front of the input embeddings, inits, generate(), PEFT's format both ways."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit import AdaptedModel, CompositionError, ConfigError
from peftkit.core.plugins import parse_spec
from tests.composition_util import logits
from tests.method_helpers import check_greedy_generate, greedy_without_cache
from tests.tiny_models import build_tiny, sample_inputs

P = 4


def _prompt(model, name: str = "default") -> torch.Tensor:
    return model.model_adapter(name).prompt_embeddings


# -- the method and its config -------------------------------------------------------------


def test_registered_with_honest_capabilities() -> None:
    method = peftkit.get_method("prompt_tuning")
    assert method.peft_type == "PROMPT_TUNING"
    assert method.can_merge is False and method.identity_at_init is False
    assert method.supported_blocks == frozenset({"stack"})


def test_shorthand_round_trip() -> None:
    _, config = parse_spec("prompt_tuning[num_virtual_tokens=10]")
    assert config.num_virtual_tokens == 10 and config.init == "random"
    assert config.to_shorthand() == "prompt_tuning[num_virtual_tokens=10]"
    assert parse_spec(config.to_shorthand())[1] == config
    _, text = parse_spec('prompt_tuning[num_tokens=3,prompt_tuning_init=TEXT,prompt_tuning_init_text="Classify:",'
                         'tokenizer_name_or_path="/tok"]')
    assert (text.num_virtual_tokens, text.init, text.init_text, text.tokenizer_name_or_path) == \
        (3, "text", "Classify:", "/tok")
    assert parse_spec(text.to_shorthand())[1] == text


@pytest.mark.parametrize("spec, message", [
    ("prompt_tuning[num_virtual_tokens=-1]", "num_virtual_tokens"),
    ("prompt_tuning[init='text']", "needs init_text"),
    ("prompt_tuning[init='text',init_text='hi']", "needs tokenizer_name_or_path"),
    ("prompt_tuning[init='words']", "init"),
    ("prompt_tuning[target_modules=['q_proj']]", "target_modules is not used"),
])
def test_bad_configs_name_the_setting(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


# -- the prompt in the model --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "roberta", "t5"])
def test_output_differs_from_base(name: str) -> None:
    base = build_tiny(name)
    inputs = sample_inputs(name)
    reference = logits(base, inputs)
    model = peftkit.adapt(base, f"prompt_tuning[num_virtual_tokens={P}]")
    out = logits(model, inputs)
    if name in ("llama", "gpt2"):  # a causal LM also scores the prompt positions, as with PEFT
        assert out.shape == (reference.shape[0], P + reference.shape[1], reference.shape[2])
        out = out[:, P:]
    assert out.shape == reference.shape
    assert not torch.allclose(out, reference, atol=1e-4)
    with model.disable_adapters():
        assert torch.allclose(logits(model, inputs), reference, atol=1e-6)


def test_labels_are_padded_so_the_loss_ignores_the_prompt() -> None:
    model = peftkit.adapt(build_tiny("llama"), f"prompt_tuning[num_virtual_tokens={P}]")
    inputs = sample_inputs("llama")
    ids = inputs["input_ids"]
    out = model(**inputs, labels=ids)
    # Every real token is predicted (the first one from the last prompt position); the prompt is not.
    predicted = out.logits[:, P - 1:-1]
    manual = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ids.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_position_and_token_type_ids_are_extended() -> None:
    llama = peftkit.adapt(build_tiny("llama"), f"prompt_tuning[num_virtual_tokens={P}]")
    inputs = sample_inputs("llama")
    positions = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0).expand(2, -1)
    assert torch.equal(logits(llama, {**inputs, "position_ids": positions}), logits(llama, inputs))
    bert = peftkit.adapt(build_tiny("bert"), f"prompt_tuning[num_virtual_tokens={P}]")
    inputs = sample_inputs("bert")
    types = torch.zeros_like(inputs["input_ids"])
    assert torch.equal(logits(bert, {**inputs, "token_type_ids": types}), logits(bert, inputs))


def test_sample_vocab_init_uses_rows_of_the_embedding() -> None:
    model = peftkit.adapt(build_tiny("gpt2"), f"prompt_tuning[num_virtual_tokens={P},init='sample_vocab']")
    vocab = model.get_input_embeddings().weight
    for row in _prompt(model):
        assert (vocab == row).all(dim=1).any()


def test_text_init_matches_peft(minilm_dir: str) -> None:
    """Real tokenizer and model (MiniLM): the prompt starts as the text's token embeddings, cut or
    repeated to P tokens, exactly as PEFT builds it."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    text = "Is this review positive?"
    spec = (f'prompt_tuning[num_virtual_tokens=12,init="text",init_text="{text}",'
            f'tokenizer_name_or_path="{minilm_dir}"]')
    model = peftkit.adapt(AutoModel.from_pretrained(minilm_dir), spec)
    ids = AutoTokenizer.from_pretrained(minilm_dir)(text)["input_ids"]
    expected_ids = (ids * 12)[:12]
    embeddings = model.get_input_embeddings().weight
    assert torch.equal(_prompt(model), embeddings[expected_ids].detach())
    peft_model = get_peft_model(AutoModel.from_pretrained(minilm_dir), PromptTuningConfig(
        task_type="FEATURE_EXTRACTION", num_virtual_tokens=12, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=minilm_dir))
    assert torch.equal(_prompt(model), peft_model.prompt_encoder["default"].embedding.weight.detach())


def test_text_init_with_a_foreign_tokenizer_is_refused(minilm_dir: str) -> None:
    with pytest.raises(ConfigError, match="vocabulary has 128 entries"):
        peftkit.adapt(build_tiny("llama"), f'prompt_tuning[init="text",init_text="a long text to embed",'
                                           f'tokenizer_name_or_path="{minilm_dir}"]')


def test_trainable_parameter_count_matches_the_formula() -> None:
    llama = peftkit.adapt(build_tiny("llama"), f"prompt_tuning[num_virtual_tokens={P}]")
    assert llama.trainable_parameters()[0] == P * 32
    t5 = peftkit.adapt(build_tiny("t5"), f"prompt_tuning[num_virtual_tokens={P}]")
    assert t5.trainable_parameters()[0] == 2 * P * 32  # PEFT's layout: 2P rows for encoder-decoder models
    record = t5.adapter_record("default")
    assert record.method.expected_parameter_count(t5.base_model, record.config, record.sites) == 2 * P * 32


def test_train_step_changes_only_the_prompt_and_the_head() -> None:
    model = peftkit.adapt(build_tiny("bert"), f"prompt_tuning[num_virtual_tokens={P}]")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "_model_adapters.default.prompt_embeddings" in trainable
    assert all(n.startswith(("_model_adapters.default.", "base_model.classifier.copies.default.")) for n in trainable)
    inputs = sample_inputs("bert")
    model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_save_load_round_trip_is_bit_identical(tmp_path) -> None:
    model = peftkit.adapt(build_tiny("qwen2"), f"prompt_tuning[num_virtual_tokens={P}]")
    inputs = sample_inputs("qwen2")
    model.save_adapter(tmp_path / "a")
    loaded = peftkit.from_pretrained(build_tiny("qwen2"), str(tmp_path / "a"))
    assert torch.equal(_prompt(loaded), _prompt(model))
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_two_adapters_switch() -> None:
    model = AdaptedModel(build_tiny("gpt2"))
    model.add_adapter("a", f"prompt_tuning[num_virtual_tokens={P}]")
    model.add_adapter("b", f"prompt_tuning[num_virtual_tokens={P}]")
    inputs = sample_inputs("gpt2")
    model.set_active("a")
    out_a = logits(model, inputs)
    model.set_active("b")
    out_b = logits(model, inputs)
    assert not torch.allclose(out_a, out_b)
    model.set_active("a")
    assert torch.equal(logits(model, inputs), out_a)
    with pytest.raises(CompositionError, match="stack"):
        model.set_active(peftkit.Average("a", "b"))
    with pytest.raises(CompositionError, match="routed per example"):
        model(**inputs, adapter_names=["a", "b"])


def test_stacks_with_a_prefix() -> None:
    """Two input-rewriting adapters together: the soft prompt still goes in on the first step."""
    model = AdaptedModel(build_tiny("llama"))
    model.add_adapter("prompt", f"prompt_tuning[num_virtual_tokens={P}]")
    model.add_adapter("prefix", "prefix_tuning[num_virtual_tokens=3]")
    model.set_active(peftkit.Stack("prefix", "prompt"))
    ids = sample_inputs("llama", seq=5)["input_ids"]
    assert logits(model, {"input_ids": ids}).shape[1] == P + 5
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, "llama", ids, torch.ones_like(ids), 4))


# -- generate() ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_greedy_generate_equals_step_by_step_without_cache(name: str) -> None:
    model = peftkit.adapt(build_tiny(name), f"prompt_tuning[num_virtual_tokens={P}]")
    check_greedy_generate(model, name)


# -- PEFT's file format, both ways ------------------------------------------------------------------

_TASKS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_loads_what_peft_saves(tmp_path, name: str) -> None:
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(build_tiny(name), PromptTuningConfig(task_type=_TASKS[name], num_virtual_tokens=P,
                                                                     prompt_tuning_init="SAMPLE_VOCAB")).eval()
    if name == "bert":  # a trained head, saved with the prompt
        torch.nn.init.normal_(peft_model.base_model.classifier.modules_to_save["default"].weight)
    inputs = sample_inputs(name)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny(name), str(tmp_path))
    assert ours.adapters["default"].num_virtual_tokens == P
    assert torch.equal(logits(ours, inputs), expected)


@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_peft_loads_what_peftkit_saves(tmp_path, name: str) -> None:
    from peft import PeftModel

    model = peftkit.adapt(build_tiny(name), f"prompt_tuning[num_virtual_tokens={P}]")
    if name == "bert":
        torch.nn.init.normal_(model.base_model.classifier.copies["default"].weight)
    inputs = sample_inputs(name)
    expected = logits(model, inputs)
    model.save_adapter(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    submodules = 2 if name == "t5" else 1
    assert {k: data[k] for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                 "prompt_tuning_init", "task_type")} == {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": P, "token_dim": 32,
        "num_transformer_submodules": submodules, "prompt_tuning_init": "RANDOM", "task_type": _TASKS[name]}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (P * submodules, 32)
    peft_model = PeftModel.from_pretrained(build_tiny(name), str(tmp_path)).eval()
    assert torch.equal(logits(peft_model, inputs), expected)
