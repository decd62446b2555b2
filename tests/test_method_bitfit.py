"""BitFit: bias deltas per adapter, on tiny llama (add_missing), gpt2, bert and t5 (add_missing)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.core.errors import ConfigError
from tests.method_helpers import (adapter_modules, changed_by_a_train_step, merge_keeps_output, output_of, randomize,
                                  save_and_reload, two_adapters, unload_keeps_output)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

#: Spec per architecture: llama and t5 have no bias terms at all.
SPECS = {"llama": "bitfit[add_missing=true]", "gpt2": "bitfit", "bert": "bitfit", "t5": "bitfit[add_missing=true]"}
HEADS = ("lm_head", "classifier")


def _deltas(model, name="default") -> dict[str, torch.Tensor]:
    return {n: a.bias_delta for n, a in adapter_modules(model, name).items()}


def _bias_formula(base: nn.Module, add_missing: bool) -> dict[str, int]:
    """What BitFit should adapt: every bias outside the head; with add_missing,
    also the output size of every bias-free Linear outside the head."""
    out = {}
    for name, module in base.named_modules():
        if not name or name.split(".")[0] in HEADS:
            continue
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.dim() == 1:
            out[name] = bias.numel()
        elif add_missing and isinstance(module, nn.Linear):
            out[name] = module.out_features
    return out


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_sites_identity_and_parameter_count(arch):
    base = build_tiny(arch)
    formula = _bias_formula(base, "add_missing" in SPECS[arch])
    reference = output_of(base, arch)
    model = peftkit.adapt(base, SPECS[arch])
    assert torch.allclose(output_of(model, arch), reference, atol=1e-6)
    deltas = _deltas(model)
    assert {n: d.numel() for n, d in deltas.items()} == formula
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".copies." in n)
    assert model.trainable_parameters()[0] == sum(formula.values()) + head
    record = model.adapter_record("default")
    assert record.method.expected_parameter_count(model.base_model, record.config, record.sites) == sum(formula.values())
    if arch == "gpt2":  # LayerNorm biases are included, as in the BitFit paper
        assert "transformer.h.0.ln_1" in deltas and "transformer.ln_f" in deltas
    randomize(model)
    assert not torch.allclose(output_of(model, arch), reference, atol=1e-4)


def test_models_without_biases_need_add_missing():
    with pytest.raises(ConfigError, match="add_missing=true"):
        peftkit.adapt(build_tiny("llama"), "bitfit")
    with pytest.raises(ConfigError, match="add_missing=true"):
        peftkit.adapt(build_tiny("llama"), 'bitfit[target_modules=["q_proj"]]')


def test_non_identity_init_differs():
    reference = output_of(build_tiny("gpt2"), "gpt2")
    model = peftkit.adapt(build_tiny("gpt2"), "bitfit[init_weights=false]")
    assert not torch.allclose(output_of(model, "gpt2"), reference, atol=1e-4)


def test_target_modules_select_biases():
    model = peftkit.adapt(build_tiny("bert"), 'bitfit[target_modules=["query","value"]]')
    assert sorted(_deltas(model)) == sorted(f"bert.encoder.layer.{i}.attention.self.{m}"
                                            for i in range(2) for m in ("query", "value"))
    model = peftkit.adapt(build_tiny("bert"), "bitfit[target_modules=all-linear]")
    assert not any("LayerNorm" in n for n in _deltas(model))
    with pytest.raises(ConfigError, match="word_embeddings"):
        peftkit.adapt(build_tiny("bert"), 'bitfit[target_modules=["word_embeddings"]]')


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_merge_unmerge_and_unload(arch):
    model = peftkit.adapt(build_tiny(arch), SPECS[arch])
    randomize(model)
    model.eval()
    unmerged = output_of(model, arch)
    before = {n: t.detach().clone() for n, t in model.base_model.state_dict().items()}
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    after = model.base_model.state_dict()
    assert set(after) == set(before), "unmerge must take away the biases merge created"
    assert all(torch.equal(after[n], before[n]) for n in before), "unmerge must restore the exact bits"
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=1e-6, rtol=0)
    bare = unload_keeps_output(model, arch, unmerged)
    if arch == "llama":
        assert bare.model.layers[0].self_attn.q_proj.bias is not None


def test_two_adapters_merge_and_unmerge_exactly():
    model = two_adapters("llama", "bitfit[add_missing=true]")
    model.set_active("a", "b")  # a stack: both deltas add up
    both = merge_keeps_output(model, "llama", ["a", "b"])
    model.unmerge_adapter()
    assert model.base_model.model.layers[0].mlp.down_proj.base_layer.bias is None
    torch.testing.assert_close(output_of(model, "llama"), both, atol=1e-6, rtol=0)


def test_train_step_changes_only_this_adapter():
    changed = changed_by_a_train_step("bert", "bitfit")
    assert any(n.endswith("adapters.a.bias_delta") for n in changed)


def test_save_load_round_trip(tmp_path):
    model, loaded, saved = save_and_reload("llama", "bitfit[add_missing=true]", tmp_path / "bf")
    data = json.loads((tmp_path / "bf" / "adapter_config.json").read_text())
    assert data["peft_type"] == "BITFIT" and data["peftkit"]["method"] == "bitfit"
    assert all(k.endswith(".bias_delta") for k in saved)
    assert tuple(saved["base_model.model.model.layers.0.mlp.gate_proj.bias_delta"].shape) == (64,)
    assert set(saved) == {f"base_model.model.{n}.bias_delta" for n in _deltas(model)}
    restored = _deltas(loaded, "restored")
    assert all(torch.equal(restored[n], saved[f"base_model.model.{n}.bias_delta"]) for n in restored)


def test_two_adapters_switch_and_mixed_batches():
    model = two_adapters("gpt2", "bitfit", 'bitfit[target_modules=["c_attn"]]')
    inputs = sample_inputs("gpt2", batch=3)
    with torch.no_grad():
        outs = {}
        for name in ("a", "b"):
            model.set_active(name)
            outs[name] = output_tensor(model(**inputs))
        assert not torch.allclose(outs["a"], outs["b"], atol=1e-4)
        model.set_active("a")
        assert torch.equal(output_tensor(model(**inputs)), outs["a"])
        routed = output_tensor(model(**inputs, adapter_names=["b", "a", "b"]))
    for row, name in enumerate(["b", "a", "b"]):
        torch.testing.assert_close(routed[row], outs[name][row], atol=1e-5, rtol=0)


def test_conv_and_norm_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(2, 3, 6, 6)
    model = peftkit.adapt(net, "bitfit")
    assert sorted(_deltas(model)) == ["0", "1", "4"]
    randomize(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["bitfit[add_missing=true]", 'bitfit[target_modules=["dense"],init_weights=false]'])
def test_shorthand_and_json_round_trip(spec):
    method = peftkit.get_method("bitfit")
    config = method.make_config(**peftkit.parse_shorthand(spec)[1])
    assert method.make_config(**peftkit.parse_shorthand(config.to_shorthand())[1]) == config
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize("spec,key", [("bitfit[add_missing=yes]", "add_missing"),
                                      ("bitfit[init_weights=3]", "init_weights"),
                                      ("bitfit[bias=all]", "bias"),
                                      ("bitfit[target_modules=3]", "target_modules")])
def test_bad_values_raise_config_error_naming_the_key(spec, key):
    with pytest.raises(ConfigError, match=key):
        peftkit.adapt(build_tiny("gpt2"), spec)
