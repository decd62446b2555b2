"""Bottleneck adapters (seq_bn, double_seq_bn, par_bn) on tiny llama, gpt2, bert and t5."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.errors import ConfigError, MergeError, TargetError
from peftkit.core.layer import TunerLayer
from tests.method_helpers import (adapter_modules, changed_by_a_train_step, output_of, randomize, switch_outputs,
                                  save_and_reload, two_adapters)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

ARCHS = ["llama", "gpt2", "bert", "t5"]
HIDDEN = 32  # every tiny model's hidden size
LAYERS = 2  # per stack (t5 has an encoder and a decoder stack)

#: Where each method inserts, per architecture (module names; t5's encoder and decoder both).
FFN_OUT = {"llama": "model.layers.{i}.mlp.down_proj", "gpt2": "transformer.h.{i}.mlp.c_proj",
           "bert": "bert.encoder.layer.{i}.output.dense",
           "t5": ["encoder.block.{i}.layer.1.DenseReluDense.wo", "decoder.block.{i}.layer.2.DenseReluDense.wo"]}
ATTN_OUT = {"llama": "model.layers.{i}.self_attn.o_proj", "gpt2": "transformer.h.{i}.attn.c_proj",
            "bert": "bert.encoder.layer.{i}.attention.output.dense",
            "t5": ["encoder.block.{i}.layer.0.SelfAttention.o", "decoder.block.{i}.layer.0.SelfAttention.o"]}
FFN_IN = {"llama": "model.layers.{i}.mlp", "gpt2": "transformer.h.{i}.mlp", "bert": "bert.encoder.layer.{i}.intermediate",
          "t5": ["encoder.block.{i}.layer.1.DenseReluDense", "decoder.block.{i}.layer.2.DenseReluDense"]}
HEAD_PARAMS = {"bert": HIDDEN * 3 + 3}  # the seq-cls head, trained and saved with the adapter


def _names(table: dict, arch: str) -> list[str]:
    patterns = table[arch] if isinstance(table[arch], list) else [table[arch]]
    return [p.format(i=i) for p in patterns for i in range(LAYERS)]


def _bn_params(d_in: int, d_out: int, b: int) -> int:
    return d_in * b + b + b * d_out + d_out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["seq_bn", "double_seq_bn", "par_bn"])
def test_sites_identity_and_parameter_count(arch, method):
    base = build_tiny(arch)
    reference = output_of(base, arch)
    model = peftkit.adapt(base, method)
    assert torch.allclose(output_of(model, arch), reference, atol=1e-6), \
        "the adapted model must start equal to the base"
    adapters = adapter_modules(model)
    expected_sites = _names(FFN_OUT, arch) + (_names(ATTN_OUT, arch) if method == "double_seq_bn" else [])
    assert sorted(adapters) == sorted(expected_sites)
    if method == "par_bn":
        for name in _names(FFN_OUT, arch):
            layer = model.base_model.get_submodule(name)
            assert layer.input_from in _names(FFN_IN, arch)
            assert layer.input_from.split(".")[:3] == name.split(".")[:3]  # the same block's input
    bottleneck = HIDDEN // (2 if method == "par_bn" else 16)
    per_site = _bn_params(HIDDEN, HIDDEN, bottleneck)
    formula = per_site * len(expected_sites)
    record = model.adapter_record("default")
    assert record.method.expected_parameter_count(model.base_model, record.config, record.sites) == formula
    assert model.trainable_parameters()[0] == formula + HEAD_PARAMS.get(arch, 0)
    randomize(model)
    assert not torch.allclose(output_of(model, arch), reference, atol=1e-4)
    with model.disable_adapters():
        assert torch.allclose(output_of(model, arch), reference, atol=1e-6)


def test_non_identity_init_differs_and_options_change_the_module():
    reference = output_of(build_tiny("llama"), "llama")
    model = peftkit.adapt(build_tiny("llama"), "seq_bn[init_weights=false]")
    assert not torch.allclose(output_of(model, "llama"), reference, atol=1e-4)
    model = peftkit.adapt(build_tiny("llama"),
                          "par_bn[scaling=learned,ln_before=true,non_linearity=gelu,reduction_factor=4]")
    adapter = next(iter(adapter_modules(model).values()))
    assert adapter.adapter_scaling is not None and adapter.adapter_norm is not None
    assert adapter.bottleneck == HIDDEN // 4 and adapter.non_linearity == "gelu"
    assert torch.allclose(output_of(model, "llama"), reference, atol=1e-6)
    # per site: bottleneck params + LayerNorm (2 * hidden) + one learned scalar
    assert model.trainable_parameters()[0] == LAYERS * (_bn_params(HIDDEN, HIDDEN, 8) + 2 * HIDDEN + 1)


def test_residual_options():
    reference = output_of(build_tiny("gpt2"), "gpt2")
    # Without its skip connection the adapter replaces the projection's output.
    model = peftkit.adapt(build_tiny("gpt2"), "seq_bn[residual=false]")
    assert not torch.allclose(output_of(model, "gpt2"), reference, atol=1e-4)
    # With its own LayerNorm and the residual taken after it, the start is not the base either.
    model = peftkit.adapt(build_tiny("gpt2"), "seq_bn[ln_before=true,residual_before_ln=false]")
    adapter = next(iter(adapter_modules(model).values()))
    assert adapter.additive is False
    assert not torch.allclose(output_of(model, "gpt2"), reference, atol=1e-4)
    # With the residual before the LayerNorm (the default) it is identity at init.
    model = peftkit.adapt(build_tiny("gpt2"), "seq_bn[ln_before=true]")
    assert torch.allclose(output_of(model, "gpt2"), reference, atol=1e-6)


@pytest.mark.parametrize("arch,method", [("llama", "seq_bn"), ("gpt2", "double_seq_bn"), ("t5", "par_bn"),
                                         ("bert", "seq_bn")])
def test_train_step_changes_only_this_adapter(arch, method):
    changed = changed_by_a_train_step(arch, method)
    assert any("adapters.a.adapter_up.weight" in n for n in changed)


@pytest.mark.parametrize("arch,spec", [("llama", "par_bn[scaling=learned,ln_before=true]"),
                                       ("t5", "double_seq_bn[cross_attention=true]"),
                                       ("gpt2", "seq_bn[reduction_factor={\"0\":4,\"default\":8}]")])
def test_save_load_round_trip(tmp_path, arch, spec):
    model, loaded, saved = save_and_reload(arch, spec, tmp_path / "bn")
    data = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert data["peft_type"] == "BOTTLENECK"
    assert data["peftkit"]["method"] == spec.split("[")[0]
    live = {f"base_model.model.{site}.{key}": t for site, a in adapter_modules(model).items()
            for key, t in a.tensors().items()}
    assert set(saved) == set(live)
    for key in saved:
        assert key.rsplit(".", 2)[-2] in ("adapter_down", "adapter_up", "adapter_norm") or \
            key.endswith(".adapter_scaling")
    reloaded = {f"base_model.model.{site}.{key}": t for site, a in adapter_modules(loaded, "restored").items()
                for key, t in a.tensors().items()}
    assert set(reloaded) == set(saved)
    assert all(torch.equal(reloaded[k], saved[k]) for k in saved)


def test_file_shapes():
    model = peftkit.adapt(build_tiny("llama"), "seq_bn[reduction_factor=4]")
    tensors = adapter_modules(model)["model.layers.0.mlp.down_proj"].tensors()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "adapter_down.weight": (8, HIDDEN), "adapter_down.bias": (8,),
        "adapter_up.weight": (HIDDEN, 8), "adapter_up.bias": (HIDDEN,)}


def test_two_adapters_switch_and_each_matches_its_own_file(tmp_path):
    model = two_adapters("bert", "seq_bn", "seq_bn[reduction_factor=4,non_linearity=gelu]")
    _, out_b = switch_outputs(model, "bert")
    model.save_adapter(str(tmp_path / "b"), adapter_name="b")
    alone = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path / "b"))
    torch.testing.assert_close(output_of(alone, "bert"), out_b, atol=1e-6, rtol=0)


def test_not_mergeable():
    model = peftkit.adapt(build_tiny("llama"), "seq_bn")
    with pytest.raises(MergeError, match="seq_bn"):
        model.merge_adapter()


@pytest.mark.parametrize("spec", ["par_bn", "seq_bn[ln_before=true,residual_before_ln=false]"])
def test_mixed_batch_rows_match_separate_runs(spec):
    model = two_adapters("llama", spec)
    inputs = sample_inputs("llama", batch=3)
    with torch.no_grad():
        separate = {}
        for name in ("a", "b"):
            model.set_active(name)
            separate[name] = output_tensor(model(**inputs))
        with model.disable_adapters():
            separate["__base__"] = output_tensor(model(**inputs))
        routed = output_tensor(model(**inputs, adapter_names=["b", "__base__", "a"]))
        model.set_active(peftkit.BatchSplit("a", "b", sizes=[1, 2]))
        split = output_tensor(model(**inputs))
    for row, name in enumerate(["b", "__base__", "a"]):
        torch.testing.assert_close(routed[row], separate[name][row], atol=1e-5, rtol=0)
    torch.testing.assert_close(split[0], separate["a"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(split[1:], separate["b"][1:], atol=1e-5, rtol=0)


def test_stack_and_average_at_a_site():
    model = peftkit.adapt(build_tiny("gpt2"), "seq_bn", adapter_name="a")
    model.add_adapter("b", "seq_bn")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    layer = model.base_model.get_submodule("transformer.h.0.mlp.c_proj")
    x = torch.randn(2, 3, 4 * HIDDEN)
    a, b, base = layer.adapters["a"], layer.adapters["b"], layer.base_layer
    with torch.no_grad():
        h = base(x)
        model.set_active(peftkit.Stack("a", "b"))
        torch.testing.assert_close(layer(x), b(x, a(x, h, base), base))
        model.set_active(peftkit.Average("a", "b", weights=[3, 1]))
        torch.testing.assert_close(layer(x), 0.75 * a(x, h, base) + 0.25 * b(x, h, base))


def test_leave_out_and_per_layer_reduction():
    model = peftkit.adapt(build_tiny("llama"), "seq_bn[leave_out=[0]]")
    assert list(adapter_modules(model)) == ["model.layers.1.mlp.down_proj"]
    # t5: layer indices are block indices, in the encoder and the decoder alike
    model = peftkit.adapt(build_tiny("t5"), "double_seq_bn[leave_out=[1]]")
    assert sorted(adapter_modules(model)) == sorted(n for n in _names(FFN_OUT, "t5") + _names(ATTN_OUT, "t5")
                                              if ".block.0." in n)
    model = peftkit.adapt(build_tiny("llama"), 'seq_bn[reduction_factor={"0":4,"default":8}]')
    sizes = {n: a.bottleneck for n, a in adapter_modules(model).items()}
    assert sizes == {"model.layers.0.mlp.down_proj": 8, "model.layers.1.mlp.down_proj": 4}
    with pytest.raises(ConfigError, match="reduction_factor"):
        peftkit.adapt(build_tiny("llama"), 'seq_bn[reduction_factor={"0":4}]')


def test_t5_cross_attention_is_opt_in():
    model = peftkit.adapt(build_tiny("t5"), "double_seq_bn")
    assert not any("EncDecAttention" in n for n in adapter_modules(model))
    reference = output_of(build_tiny("t5"), "t5")
    model = peftkit.adapt(build_tiny("t5"), "double_seq_bn[cross_attention=true]")
    cross = sorted(n for n in adapter_modules(model) if "EncDecAttention" in n)
    assert cross == [f"decoder.block.{i}.layer.1.EncDecAttention.o" for i in range(LAYERS)]
    assert torch.allclose(output_of(model, "t5"), reference, atol=1e-6)
    with pytest.raises(ConfigError, match="cross_attention"):
        peftkit.adapt(build_tiny("bert"), "double_seq_bn[cross_attention=true]")


class _Toy(nn.Module):
    """A model family peftkit has no table for."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["down"](torch.relu(block["up"](x)))
        return x


def test_unknown_architecture_needs_points_or_targets():
    with pytest.raises(TargetError) as err:
        peftkit.adapt(_Toy(), "seq_bn")
    assert "peftkit_register_architectures" in str(err.value) and "target_modules" in str(err.value)
    torch.manual_seed(0)
    toy = _Toy()
    x = torch.randn(3, 8)
    reference = toy(x)
    model = peftkit.adapt(toy, 'par_bn[target_modules=["down"],reduction_factor=4]')
    adapters = adapter_modules(model)
    assert sorted(adapters) == ["blocks.0.down", "blocks.1.down"]
    # Beside one Linear layer, a parallel adapter reads that layer's input (16) and adds to its output (8).
    assert {(a.in_features, a.bottleneck, a.out_features) for a in adapters.values()} == {(16, 4, 8)}
    torch.testing.assert_close(model(x), reference)
    with pytest.raises(ConfigError, match="ReLU|Linear or Conv1D"):
        peftkit.adapt(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 'seq_bn[target_modules=["1"]]')


def test_delete_removes_the_input_hook():
    model = peftkit.adapt(build_tiny("llama"), "par_bn")
    mlp = model.base_model.model.layers[0].mlp
    hooks = len(mlp._forward_pre_hooks)
    model.delete_adapter("default")
    assert len(mlp._forward_pre_hooks) == hooks - 1
    assert not any(isinstance(m, TunerLayer) for m in model.base_model.modules())


@pytest.mark.parametrize("spec", ["seq_bn[reduction_factor=16]", "par_bn[scaling=learned,non_linearity=tanh]",
                                  'double_seq_bn[reduction_factor={"1":4,"default":8},leave_out=[0],cross_attention=true]'])
def test_shorthand_and_json_round_trip(spec):
    method, config = peftkit.parse_shorthand(spec)
    config = peftkit.get_method(method).make_config(**config)
    assert peftkit.get_method(method).make_config(**peftkit.parse_shorthand(config.to_shorthand())[1]) == config
    assert type(config).from_json(config.to_json()) == config


def test_shorthand_writes_only_changes():
    config = peftkit.get_method("seq_bn").make_config(reduction_factor=16)
    assert config.to_shorthand() == "seq_bn"
    assert peftkit.SeqBnConfig(reduction_factor=8).to_shorthand() == "seq_bn[reduction_factor=8]"


@pytest.mark.parametrize("spec,key", [
    ("seq_bn[reduction_factor=0]", "reduction_factor"),
    ("seq_bn[reduction_factor=-2.5]", "reduction_factor"),
    ('seq_bn[reduction_factor={"x":2}]', "reduction_factor"),
    ('seq_bn[reduction_factor={"0":0}]', "reduction_factor"),
    ("seq_bn[non_linearity=softmax]", "non_linearity"),
    ("seq_bn[dropout=1.5]", "dropout"),
    ("par_bn[scaling=big]", "scaling"),
    ("seq_bn[leave_out=[-1]]", "leave_out"),
    ("seq_bn[leave_out=1]", "leave_out"),
    ("seq_bn[residual=maybe]", "residual"),
    ("par_bn[residual=false]", "residual"),
    ("seq_bn[cross_attention=true]", "cross_attention"),
    ("seq_bn[reduction=4]", "reduction"),
])
def test_bad_values_raise_config_error_naming_the_key(spec, key):
    with pytest.raises(ConfigError, match=key):
        peftkit.adapt(build_tiny("llama"), spec)


def test_reduction_factor_too_large_for_the_model():
    with pytest.raises(ConfigError, match="reduction_factor=64"):
        peftkit.adapt(build_tiny("llama"), "seq_bn[reduction_factor=64]")
