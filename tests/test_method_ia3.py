"""IA3 on tiny llama, gpt2, bert and t5, and two-way file compatibility with the real `peft`."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from tests.method_helpers import (adapter_modules, changed_by_a_train_step, output_of, randomize, switch_outputs,
                                  save_and_reload, two_adapters, unload_keeps_output)
from tests.tiny_models import build_tiny

ARCHS = ["llama", "gpt2", "bert", "t5"]
#: Default targets -> expected ia3_l shape, per architecture (layer 0; t5: encoder block 0).
SHAPES = {
    "llama": {"model.layers.0.self_attn.k_proj": (16, 1), "model.layers.0.self_attn.v_proj": (16, 1),
              "model.layers.0.mlp.down_proj": (1, 64)},
    "gpt2": {"transformer.h.0.attn.c_attn": (96, 1), "transformer.h.0.mlp.c_proj": (1, 128)},
    "bert": {"bert.encoder.layer.0.attention.self.key": (32, 1), "bert.encoder.layer.0.attention.self.value": (32, 1),
             "bert.encoder.layer.0.intermediate.dense": (1, 32)},
    "t5": {"encoder.block.0.layer.0.SelfAttention.k": (32, 1), "encoder.block.0.layer.0.SelfAttention.v": (32, 1),
           "encoder.block.0.layer.1.DenseReluDense.wo": (1, 64)},
}
#: The seq-cls head, trained and saved with the adapter.
HEAD_PARAMS = {"bert": 32 * 3 + 3}


def _vectors(model, name="default") -> dict[str, torch.Tensor]:
    return {n: a.ia3_l for n, a in adapter_modules(model, name).items()}


def _is_ia3_vector(p: torch.Tensor) -> bool:
    return p.dim() == 2 and 1 in p.shape


#: Noise on the ia3 vectors only (not on a task head copy), larger than the default.
_randomize = functools.partial(randomize, std=0.3, where=_is_ia3_vector)


def _formula(arch: str) -> int:
    """Two layers of layer 0's targets; t5 has them in the encoder and the decoder,
    whose blocks also have the cross-attention k and v."""
    layer0 = sum(a * b for a, b in SHAPES[arch].values())
    if arch != "t5":
        return 2 * layer0
    cross = 2 * 32  # decoder cross-attention k and v, (32, 1) each
    return 2 * layer0 + 2 * (layer0 + cross)


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_identity_and_parameter_count(arch):
    base = build_tiny(arch)
    reference = output_of(base, arch)
    model = peftkit.adapt(base, "ia3")
    assert torch.allclose(output_of(model, arch), reference, atol=1e-6)
    vectors = _vectors(model)
    for name, shape in SHAPES[arch].items():
        assert tuple(vectors[name].shape) == shape
        assert torch.equal(vectors[name], torch.ones(shape))
    if arch == "t5":
        assert "decoder.block.1.layer.2.DenseReluDense.wo" in vectors
        assert "decoder.block.1.layer.1.EncDecAttention.k" in vectors
    assert sum(v.numel() for v in vectors.values()) == _formula(arch)
    assert model.trainable_parameters()[0] == _formula(arch) + HEAD_PARAMS.get(arch, 0)
    record = model.adapter_record("default")
    assert record.method.expected_parameter_count(model.base_model, record.config, record.sites) == _formula(arch)


def test_non_identity_init_differs():
    reference = output_of(build_tiny("llama"), "llama")
    model = peftkit.adapt(build_tiny("llama"), "ia3[init_ia3_weights=false]")
    assert not torch.allclose(output_of(model, "llama"), reference, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_unload(arch):
    model = peftkit.adapt(build_tiny(arch), "ia3")
    reference = output_of(model, arch)
    _randomize(model)
    model.eval()
    unmerged = output_of(model, arch)
    assert (unmerged - reference).abs().max() > 1e-3 * reference.abs().max()  # bert's logits are ~0.01
    weights = {n: t.detach().clone() for n, t in model.base_model.state_dict().items()}
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    for name, tensor in model.base_model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], atol=1e-6, rtol=1e-6)
    unload_keeps_output(model, arch, unmerged)


def test_zero_entries_unmerge_exactly():
    model = peftkit.adapt(build_tiny("gpt2"), "ia3")
    _randomize(model)
    with torch.no_grad():
        for vector in _vectors(model).values():
            vector.view(-1)[:3] = 0.0  # a zero scale cannot be divided out
    before = {n: t.detach().clone() for n, t in model.base_model.state_dict().items()}
    model.merge_adapter()
    model.unmerge_adapter()
    for name, tensor in model.base_model.state_dict().items():
        assert torch.isfinite(tensor).all()
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=1e-6)


def test_train_step_changes_only_this_adapter():
    changed = changed_by_a_train_step("gpt2", "ia3")
    assert sum(n.endswith("adapters.a.ia3_l") for n in changed) == 4  # every vector of "a" learned


def test_save_load_round_trip(tmp_path):
    model, loaded, saved = save_and_reload("t5", "ia3", tmp_path / "ia3", noise=_randomize)
    assert set(saved) == {f"base_model.model.{n}.ia3_l" for n in _vectors(model)}
    restored = _vectors(loaded, "restored")
    assert all(torch.equal(v, saved[f"base_model.model.{n}.ia3_l"]) for n, v in restored.items())


def test_two_adapters_switch_and_stack():
    model = two_adapters("llama", "ia3", 'ia3[target_modules=["q_proj","down_proj"],feedforward_modules=["down_proj"]]',
                         noise=_randomize)
    switch_outputs(model, "llama")
    # In a stack, output scalings multiply and input scalings add their deltas.
    layer = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 3, 64)
    la, lb = layer.adapters["a"].ia3_l, layer.adapters["b"].ia3_l
    model.set_active(peftkit.Stack("a", "b"))
    with torch.no_grad():
        weight = layer.base_layer.weight
        expected = x @ weight.t() + (x * (la - 1)) @ weight.t() + (x * (lb - 1)) @ weight.t()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_feedforward_modules_rules():
    model = peftkit.adapt(build_tiny("llama"), 'ia3[target_modules=["k_proj","up_proj"],feedforward_modules=".*up_proj"]')
    shapes = {n: tuple(v.shape) for n, v in _vectors(model).items()}
    assert shapes["model.layers.0.mlp.up_proj"] == (1, 32) and shapes["model.layers.0.self_attn.k_proj"] == (16, 1)
    # Explicit targets with no feed-forward list take the architecture's list (none matches here).
    model = peftkit.adapt(build_tiny("llama"), 'ia3[target_modules=["k_proj"]]')
    assert model.adapters["default"].feedforward_modules == ["down_proj"]
    assert tuple(_vectors(model)["model.layers.0.self_attn.k_proj"].shape) == (16, 1)


@pytest.mark.parametrize("spec", ['ia3[target_modules=["k_proj","down_proj"],feedforward_modules=["down_proj"]]',
                                  "ia3[init_ia3_weights=false]", "ia3[init_weights=false]"])
def test_shorthand_and_json_round_trip(spec):
    method = peftkit.get_method("ia3")
    config = method.make_config(**peftkit.parse_shorthand(spec)[1])
    assert method.make_config(**peftkit.parse_shorthand(config.to_shorthand())[1]) == config
    assert type(config).from_json(config.to_json()) == config
    if "init" in spec:
        assert config.init_ia3_weights is False


@pytest.mark.parametrize("spec,key", [
    ('ia3[target_modules=["k_proj"],feedforward_modules=["down_proj"]]', "feedforward_modules"),
    ("ia3[init_ia3_weights=maybe]", "init_ia3_weights"),
    ("ia3[feedforward_modules=3]", "feedforward_modules"),
    ("ia3[fan_in_fan_out=1]", "fan_in_fan_out"),
    ("ia3[r=4]", "r"),
    ('ia3[target_modules=["embed_tokens"]]', "embed_tokens"),
])
def test_bad_values_raise_config_error_naming_the_key(spec, key):
    with pytest.raises(ConfigError, match=key):
        peftkit.adapt(build_tiny("llama"), spec)


# -- compatibility with Hugging Face PEFT, both ways ----------------------------------------


def _peft_ia3(arch: str):
    from peft import IA3Config, get_peft_model

    config = IA3Config(task_type="SEQ_CLS") if arch == "bert" else IA3Config(fan_in_fan_out=arch == "gpt2")
    model = get_peft_model(build_tiny(arch), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_peft_saved_ia3_loads_with_identical_logits(tmp_path, arch):
    peft_model = _peft_ia3(arch)
    expected = output_of(peft_model, arch)
    peft_model.save_pretrained(str(tmp_path))
    model = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    torch.testing.assert_close(output_of(model, arch), expected, atol=2e-6, rtol=0)
    # Merged, both libraries compute the same weights W * l, to the bit.
    peft_model.merge_adapter()
    model.merge_adapter()
    assert torch.equal(output_of(model, arch), output_of(peft_model, arch))


@pytest.mark.parametrize("arch,spec", [("llama", "ia3"), ("gpt2", "ia3"), ("llama", "ia3[layers_to_transform=[1]]")])
def test_peftkit_saved_ia3_loads_in_peft_with_identical_logits(tmp_path, arch, spec):
    from peft import PeftModel

    model = peftkit.adapt(build_tiny(arch), spec)
    _randomize(model)
    model.eval()
    expected = output_of(model, arch)
    model.save_adapter(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3" and data["fan_in_fan_out"] is (arch == "gpt2")
    assert data["task_type"] == "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the extra "peftkit" key
        peft_model = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(output_of(peft_model, arch), expected, atol=2e-6, rtol=0)
    if "layers_to_transform" in spec:
        return  # PEFT's IA3 has no such field: it adapts every layer, the others starting at one
    peft_state = {k: v for k, v in peft_model.state_dict().items() if "ia3_l" in k}
    assert len(peft_state) == len(_vectors(model))
    assert not any(torch.equal(v, torch.ones_like(v)) for v in peft_state.values()), "every vector was loaded"


def test_a_feedforward_vector_alone_runs_its_layer_once_on_the_scaled_input():
    """Alone at its site the layer computes W (x * l) + b itself (one matrix product, PEFT's exact
    arithmetic); inside a composition it is h + W (x * (l - 1)), equal up to rounding."""
    model = peftkit.adapt(build_tiny("llama"), "ia3")
    randomize(model, std=0.3, seed=4)
    layer = model.base_model.model.layers[0].mlp.down_proj
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out))
    alone = output_of(model, "llama")
    scale = layer.adapters["default"].ia3_l.flatten()
    torch.testing.assert_close(seen["out"], layer.base_layer(seen["x"] * scale), rtol=0, atol=0)
    model.set_active("stack(default)")  # the composition path: base output plus the vector's delta
    composed = output_of(model, "llama")
    handle.remove()
    torch.testing.assert_close(composed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, output_of(peftkit.AdaptedModel(build_tiny("llama")), "llama"), atol=1e-4)
