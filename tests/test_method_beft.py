"""BEFT (PEFT's BEFT) on tiny Llama and BERT: the same draws, outputs, gradients, merges and files as the real
``peft``, the bias joined into the layer's own product, and the merges peftkit refuses by name.

The conformance suite runs beft on llama, bert and t5 (gpt2's Conv1D layers are refused, as by PEFT):
tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError, MergeError
from peftkit.plugins.beft.layer import BeftLayer
from tests.method_helpers import (adapted_after_seed, adapter_modules, loaded_in_peft, merge_cycle_keeps_outputs,
                                  output_of, peft_model_after_seed, peft_tensors_by_site)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

peft = pytest.importorskip("peft")

#: Per architecture: PEFT BeftConfig options and the same in a peftkit spec (Llama: PEFT's default, v_proj, a layer
#: without a bias; BERT: layers with a bias, and the classifier saved).
CASES = {
    "llama": ({}, ""),
    "bert": (dict(target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"],
                  task_type="SEQ_CLS"), ",target_modules=[query,value,output.dense],modules_to_save=[classifier]"),
}


def _base(arch: str) -> torch.nn.Module:
    """Tiny ``arch``; BERT's classifier scaled up, so that its logits show the adapters' changes well above the
    tolerances."""
    model = build_tiny(arch)
    if arch == "bert":
        with torch.no_grad():
            model.classifier.weight.mul_(100)
    return model


def _peft_model(arch: str, seed: int = 0, init_weights: bool = False) -> torch.nn.Module:
    return peft_model_after_seed(_base(arch), peft.BeftConfig(init_weights=init_weights, **CASES[arch][0]), seed)


def _ours(arch: str, seed: int = 0, init_weights: bool = False) -> peftkit.AdaptedModel:
    return adapted_after_seed(_base(arch), f"beft[init_weights={str(init_weights).lower()}{CASES[arch][1]}]", seed)


def _peft_tensors(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return peft_tensors_by_site(model, ("beft_bias",))


def _our_tensors(model: peftkit.AdaptedModel) -> dict[str, dict[str, torch.Tensor]]:
    return {site: layer.tensors() for site, layer in adapter_modules(model).items()}


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_vectors_are_drawn_as_pefts(arch, init_weights):
    theirs = _peft_tensors(_peft_model(arch, seed=3, init_weights=init_weights))
    ours = _our_tensors(_ours(arch, seed=3, init_weights=init_weights))
    assert set(ours) == set(theirs) and theirs
    for site, tensors in ours.items():
        assert torch.equal(tensors["beft_bias"], theirs[site]["beft_bias"]), site


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_peft_folder_loads_with_pefts_outputs(tmp_path, arch):
    theirs = _peft_model(arch)
    assert (output_of(theirs, arch) - output_of(_base(arch), arch)).abs().max() > 1e-2
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(_base(arch), str(tmp_path))
    assert ours.adapter_record("default").method.name == "beft"
    torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), rtol=0, atol=1e-5)


def test_merging_into_layers_with_a_bias_keeps_pefts_outputs(tmp_path):
    theirs = _peft_model("bert")
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(_base("bert"), str(tmp_path))
    for model in (ours, theirs):
        model.merge_adapter()
    torch.testing.assert_close(output_of(ours, "bert"), output_of(theirs, "bert"), rtol=0, atol=1e-5)
    merge_cycle_keeps_outputs(_ours("bert"), "bert")


def test_merging_into_a_layer_without_a_bias_is_refused_and_changes_nothing():
    """PEFT refuses it too (Llama's v_proj has no bias); every layer is checked before any is changed."""
    model = _ours("llama")
    before = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    expected = output_of(model, "llama")
    with pytest.raises(MergeError, match="no bias to add it to"):
        model.merge_adapter()
    after = dict(model.base_model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    torch.testing.assert_close(output_of(model, "llama"), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch):
    _peft_model(arch).save_pretrained(str(tmp_path / "peft"))
    ours = _ours(arch, seed=1)
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert our_config["peft_type"] == peft_config["peft_type"] == "BEFT"
    assert our_config["init_weights"] == peft_config["init_weights"]
    assert sorted(our_config["target_modules"]) == sorted(peft_config["target_modules"])
    assert not {"exclude_modules", "layers_to_transform", "bias", "layers_pattern"} & set(our_config)  # not PEFT's
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys and any(k.endswith(".beft_bias") for k in our_keys)
    torch.testing.assert_close(output_of(loaded_in_peft(str(tmp_path / "ours"), _base(arch)), arch), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradients_after_a_backward_equal_pefts(arch):
    theirs, ours = _peft_model(arch), _ours(arch)
    inputs = sample_inputs(arch)
    output_tensor(theirs(**inputs)).pow(2).mean().backward()
    output_tensor(ours(**inputs)).pow(2).mean().backward()
    their_tensors, our_tensors = _peft_tensors(theirs), _our_tensors(ours)
    assert set(our_tensors) == set(their_tensors)
    for site, tensors in our_tensors.items():
        ours_grad, theirs_grad = tensors["beft_bias"].grad, their_tensors[site]["beft_bias"].grad
        assert ours_grad is not None and ours_grad.abs().max() > 0, site
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-7, msg=site)


@pytest.mark.parametrize("bias", [True, False])
def test_alone_at_a_linear_layer_the_vector_joins_the_layers_product(bias):
    """forward_alone computes ``x W^T + (b0 + b)`` in one product: the numbers of the base output plus b, with and
    without gradients; a half-precision input or autocast takes the added path (None)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 32, bias=bias).requires_grad_(False)
    layer = BeftLayer(base, init_weights=False)
    x = torch.randn(2, 7, 24)
    alone = layer.forward_alone(x, base)
    torch.testing.assert_close(alone, layer(x, base(x), base), rtol=1e-6, atol=1e-6)
    alone.pow(2).sum().backward()
    fused_grad, layer.beft_bias.grad = layer.beft_bias.grad.clone(), None
    layer(x, base(x), base).pow(2).sum().backward()
    torch.testing.assert_close(fused_grad, layer.beft_bias.grad, rtol=1e-5, atol=1e-6)
    assert layer.forward_alone(x.bfloat16(), base) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.forward_alone(x, base) is None


def test_a_weight_space_merge_of_beft_adapters_is_refused_by_name():
    """Their effect is a bias, which a merged weight change cannot hold (the method says merge_dense = False)."""
    model = _ours("bert")
    model.add_adapter("other", "beft[init_weights=false,target_modules=[value]]")
    with pytest.raises(MergeError, match="beft"):
        model.merge_adapters(["default", "other"], name="both")


@pytest.mark.parametrize(("spec", "says"), [
    ("beft[exclude_modules=[query]]", "exclude_modules"),
    ("beft[layers_to_transform=[0]]", "layers_to_transform"),
])
def test_settings_peft_has_no_field_for_are_refused_by_name(spec, says):
    with pytest.raises(ConfigError, match=says):
        peftkit.adapt(build_tiny("bert"), spec)


def test_gpt2s_conv1d_layers_are_refused_by_name():
    with pytest.raises(ConfigError, match="Conv1D"):
        peftkit.adapt(build_tiny("gpt2"), "beft")
