"""Prefix tuning: KV-cache injection, the reparametrization MLP, generate(), PEFT's format both ways."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftkit
from peftkit import AdaptedModel, CompositionError, ConfigError
from peftkit.core.plugins import parse_spec
from tests.composition_util import logits
from tests.method_helpers import check_greedy_generate, greedy_without_cache
from tests.tiny_models import build_tiny, sample_inputs

warnings.filterwarnings("ignore", message=".*past_key_values.*")


def _padded_inputs(name: str) -> dict[str, torch.Tensor]:
    inputs = sample_inputs(name)
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0
    return inputs


# -- the method and its config -------------------------------------------------------------


def test_registered_with_honest_capabilities() -> None:
    method = peftkit.get_method("prefix_tuning")
    assert method.peft_type == "PREFIX_TUNING"
    assert method.can_merge is False and method.identity_at_init is False
    assert method.supported_blocks == frozenset({"stack"})


def test_shorthand_round_trip() -> None:
    _, config = parse_spec("prefix_tuning[num_virtual_tokens=10]")
    assert config.num_virtual_tokens == 10 and config.prefix_projection is False
    assert config.to_shorthand() == "prefix_tuning[num_virtual_tokens=10]"
    _, again = parse_spec(config.to_shorthand())
    assert again == config
    _, mlp = parse_spec("prefix_tuning[num_tokens=4,prefix_projection=true,encoder_hidden_size=16]")
    assert (mlp.num_virtual_tokens, mlp.prefix_projection, mlp.encoder_hidden_size) == (4, True, 16)
    assert parse_spec(mlp.to_shorthand())[1] == mlp


@pytest.mark.parametrize("spec, message", [
    ("prefix_tuning[num_virtual_tokens=0]", "num_virtual_tokens"),
    ("prefix_tuning[target_modules=['q_proj']]", "target_modules is not used"),
    ("prefix_tuning[init_weights='ones']", "init_weights"),
])
def test_bad_configs_name_the_setting(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_geometry_that_does_not_fit_the_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="num_layers=5 does not fit"):
        peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=3,num_layers=5]")


def test_model_without_kv_cache_is_refused() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                              intermediate_size=64, image_size=8, patch_size=4))
    with pytest.raises(ConfigError, match="takes no KV cache"):
        peftkit.adapt(vit, "prefix_tuning[num_virtual_tokens=3]")


# -- the prefix in the model ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert", "t5"])
def test_output_differs_from_base_and_keeps_its_shape(name: str) -> None:
    base = build_tiny(name)
    inputs = _padded_inputs(name)
    reference = logits(base, inputs)
    model = peftkit.adapt(base, "prefix_tuning[num_virtual_tokens=3]")
    out = logits(model, inputs)
    assert out.shape == reference.shape
    assert not torch.allclose(out, reference, atol=1e-4)
    with model.disable_adapters():
        assert torch.equal(logits(model, inputs), reference)


def test_gqa_prefix_uses_key_value_heads() -> None:
    model = peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=3]")
    config = model.adapters["default"]
    # tiny llama: hidden 32, 4 query heads, 2 key/value heads -> head_dim 8, token_dim 2 * 8
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 16)
    assert model.model_adapter("default").prompt_embeddings.shape == (3, 2 * 2 * 16)


def test_padding_is_masked_in_an_encoder() -> None:
    """BERT: the extended mask still hides padded tokens (their ids do not matter)."""
    model = peftkit.adapt(build_tiny("bert"), "prefix_tuning[num_virtual_tokens=3]")
    inputs = sample_inputs("bert")
    inputs["attention_mask"][0, -2:] = 0  # right padding: BERT classifies from the first token
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][0, -2:] = 7
    assert torch.allclose(logits(model, inputs), logits(model, other), atol=1e-6)


def test_explicit_position_ids_move_like_the_models_own() -> None:
    model = peftkit.adapt(build_tiny("gpt2"), "prefix_tuning[num_virtual_tokens=3]")
    inputs = sample_inputs("gpt2")
    positions = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0)
    assert torch.equal(logits(model, {**inputs, "position_ids": positions}), logits(model, inputs))


def test_trainable_parameter_count_matches_the_formula() -> None:
    p, layers, token_dim, hidden = 5, 2, 16, 24
    flat = peftkit.adapt(build_tiny("llama"), f"prefix_tuning[num_virtual_tokens={p}]")
    assert flat.trainable_parameters()[0] == p * layers * 2 * token_dim
    mlp = peftkit.adapt(build_tiny("llama"),
                        f"prefix_tuning[num_virtual_tokens={p},prefix_projection=true,encoder_hidden_size={hidden}]")
    width = layers * 2 * token_dim
    expected = p * token_dim + (token_dim * hidden + hidden) + (hidden * width + width)
    assert mlp.trainable_parameters()[0] == expected
    record = mlp.adapter_record("default")
    assert record.method.expected_parameter_count(mlp.base_model, record.config, record.sites) == expected


def test_train_step_changes_only_the_adapter() -> None:
    model = peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=3,prefix_projection=true]")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("_model_adapters.default.") for n in trainable)
    inputs = sample_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_eject_keeps_outputs_and_drops_the_mlp() -> None:
    model = peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=3,prefix_projection=true]")
    adapter = model.model_adapter("default")
    inputs = sample_inputs("llama")
    before = logits(model, inputs)
    adapter.eject()
    assert not adapter.reparametrized and adapter.transform is None
    assert adapter.prompt_embeddings.requires_grad  # still trainable, as the MLP was
    assert torch.allclose(logits(model, inputs), before, atol=1e-6)
    assert model.trainable_parameters()[0] == 3 * 2 * 2 * 16


def test_save_load_round_trip_is_bit_identical(tmp_path) -> None:
    model = peftkit.adapt(build_tiny("gpt2"), "prefix_tuning[num_virtual_tokens=4,prefix_projection=true]")
    inputs = _padded_inputs("gpt2")
    expected = logits(model, inputs)
    model.save_adapter(tmp_path / "a")
    assert model.model_adapter("default").reparametrized  # saving writes the MLP's output, keeps the MLP
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    loaded = peftkit.from_pretrained(build_tiny("gpt2"), str(tmp_path / "a"))
    assert not loaded.model_adapter("default").reparametrized
    assert torch.equal(loaded.model_adapter("default").prompt_embeddings, saved["prompt_embeddings"])
    assert torch.allclose(logits(loaded, inputs), expected, atol=1e-6)
    loaded.save_adapter(tmp_path / "b")
    again = peftkit.from_pretrained(build_tiny("gpt2"), str(tmp_path / "b"))
    assert torch.equal(logits(again, inputs), logits(loaded, inputs))


def test_two_adapters_switch(tmp_path) -> None:
    model = AdaptedModel(build_tiny("llama"))
    model.add_adapter("a", "prefix_tuning[num_virtual_tokens=3]")
    model.add_adapter("b", "prefix_tuning[num_virtual_tokens=5]")
    inputs = sample_inputs("llama")
    with model.disable_adapters():
        base = logits(model, inputs)
    model.set_active("a")
    out_a = logits(model, inputs)
    model.set_active("b")
    out_b = logits(model, inputs)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    model.set_active("a")
    assert torch.equal(logits(model, inputs), out_a)
    model.set_active(None)
    assert torch.equal(logits(model, inputs), base)
    with pytest.raises(CompositionError, match="stack"):
        model.set_active(peftkit.Average("a", "b"))


def test_stacks_with_a_layer_adapter() -> None:
    model = AdaptedModel(build_tiny("llama"))
    model.add_adapter("prefix", "prefix_tuning[num_virtual_tokens=3]")
    model.add_adapter("lora", "lora[r=2,init_weights=false]")
    inputs = sample_inputs("llama")
    model.set_active("prefix")
    prefix_only = logits(model, inputs)
    model.set_active(peftkit.Stack("prefix", "lora"))
    assert not torch.allclose(logits(model, inputs), prefix_only)


# -- generate() and the KV cache ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_greedy_generate_equals_step_by_step_without_cache(name: str) -> None:
    model = peftkit.adapt(build_tiny(name), "prefix_tuning[num_virtual_tokens=4]")
    check_greedy_generate(model, name)


def test_a_carried_cache_is_continued_not_refilled() -> None:
    model = peftkit.adapt(build_tiny("qwen2"), "prefix_tuning[num_virtual_tokens=4]")
    ids = sample_inputs("qwen2")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        assert first.cache.get_seq_length() == 4 + 5
        rest = model(input_ids=ids[:, 5:], cache=first.cache, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(rest, full[:, 5:], atol=1e-5)


def test_static_cache_is_refused_with_a_clear_error() -> None:
    model = peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=4]")
    with pytest.raises(peftkit.PeftkitError, match="no room for the 4 virtual tokens"):
        model.generate(**sample_inputs("llama"), max_new_tokens=2, pad_token_id=0, cache_implementation="static")


# -- PEFT's file format, both ways ------------------------------------------------------------------


def _peft_prefix_model(name: str, projection: bool = True):
    from peft import PrefixTuningConfig, get_peft_model

    task = "SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM"
    torch.manual_seed(3)
    model = get_peft_model(build_tiny(name), PrefixTuningConfig(task_type=task, num_virtual_tokens=5,
                                                                prefix_projection=projection, encoder_hidden_size=12))
    return model.eval()


@pytest.mark.parametrize("name, projection", [("llama", False), ("llama", True), ("gpt2", True), ("t5", True),
                                              ("t5", False)])
def test_loads_what_peft_saves(tmp_path, name: str, projection: bool) -> None:
    peft_model = _peft_prefix_model(name, projection)
    inputs = _padded_inputs(name)
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny(name), str(tmp_path))
    config = ours.adapters["default"]
    assert (config.num_virtual_tokens, config.prefix_projection) == (5, projection)
    assert config.encoder_hidden_size == (12 if projection else None)
    assert torch.allclose(logits(ours, inputs), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_peft_loads_what_peftkit_saves(tmp_path, name: str) -> None:
    from peft import PeftModel

    model = peftkit.adapt(build_tiny(name),
                          "prefix_tuning[num_virtual_tokens=6,prefix_projection=true,encoder_hidden_size=10]")
    inputs = _padded_inputs(name)
    expected = logits(model, inputs)
    model.save_adapter(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    submodules = 2 if name == "t5" else 1
    token_dim = 16 if name == "llama" else 32
    assert {k: data[k] for k in ("peft_type", "num_virtual_tokens", "num_layers", "token_dim",
                                 "num_attention_heads", "num_transformer_submodules", "prefix_projection",
                                 "encoder_hidden_size", "task_type")} == {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": 6, "num_layers": 2, "token_dim": token_dim,
        "num_attention_heads": 2 if name == "llama" else 4, "num_transformer_submodules": submodules,
        "prefix_projection": True, "encoder_hidden_size": 10,
        "task_type": "SEQ_2_SEQ_LM" if name == "t5" else "CAUSAL_LM"}
    peft_model = PeftModel.from_pretrained(build_tiny(name), str(tmp_path)).eval()
    assert torch.allclose(logits(peft_model, inputs), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_the_prefix_gradient_equals_peft(tmp_path, name: str) -> None:
    """The gradient reaching the prefix table equals PEFT's on the same loss: each layer's key and value
    entry gets its own share (T5: PEFT's layout, where decoder layer i reads block 2i mod the layer count)."""
    peft_model = _peft_prefix_model(name, projection=False)
    peft_model.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny(name), str(tmp_path))
    ours.train_adapter("default")
    ours.eval()  # no dropout on either side
    inputs = _padded_inputs(name)
    torch.manual_seed(0)
    seed = torch.randn_like(logits(ours, inputs))
    (peft_model(**inputs).logits * seed).sum().backward()
    (ours(**inputs).logits * seed).sum().backward()
    expected = peft_model.prompt_encoder["default"].embedding.weight.grad
    (got,) = [p.grad for p in ours.adapter_parameters("default")]
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_generate_matches_peft_forward_step_by_step(tmp_path) -> None:
    """Anchors positions and masks during generation to PEFT's forward (PEFT's own generate()
    with transformers 5 does not reproduce its forward, so its forward is the reference)."""
    peft_model = _peft_prefix_model("llama")
    peft_model.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    ids = sample_inputs("llama", seq=5)["input_ids"]
    generated = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(peft_model, "llama", ids, torch.ones_like(ids), 5))
