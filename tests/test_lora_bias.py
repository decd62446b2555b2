"""PEFT's ``lora_bias`` (a trained bias on LoRA's B: the update is ``scale * (B A x + b)``): before, a PEFT folder
saved with it was refused ("only lora_bias=False"). Now LoRA takes it on linear, GPT-2 Conv1D and convolution
layers: the same outputs and gradients as PEFT, folders both ways, the fused layer's bias gradient against the
formula, merging into the base layer's bias, and clear refusals where PEFT refuses or a merged adapter could not
hold the bias."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError, MergeError
from peftkit.core.fused_lora import fused_lora
from tests.method_helpers import frozen_layer, merge_cycle_keeps_outputs, output_of, randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

#: (architecture, target modules): linear layers with a bias (BERT) and GPT-2's Conv1D.
CASES = [("bert", ["query", "value", "dense"]), ("gpt2", ["c_attn", "c_fc"])]


def _peft_model(arch: str, targets: list[str]):
    from peft import get_peft_model, LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True, init_lora_weights=False)
    model = get_peft_model(build_tiny(arch), config)
    with torch.no_grad():  # PEFT's init=False leaves the bias at nn.Linear's default: make it clearly nonzero
        gen = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def _bias_grads(model: nn.Module, arch: str, suffix: str, prefix: str) -> dict[str, torch.Tensor]:
    """The gradients of the LoRA biases (parameters ending in ``suffix``) after one backward of the summed output,
    keyed by the adapted module's name in the base model (the parameter's name after ``prefix``)."""
    model.zero_grad()
    output_tensor(model(**sample_inputs(arch))).square().sum().backward()
    out = {}
    for name, param in model.named_parameters():
        if name.endswith(suffix):
            site = name.removesuffix(suffix).removeprefix(prefix).removesuffix(".adapters")
            out[site] = param.grad.clone()
    return out


@pytest.mark.parametrize("arch, targets", CASES)
def test_peft_folder_with_lora_bias_loads_with_the_same_outputs_and_saves_back(tmp_path, arch, targets):
    from peft import PeftModel

    theirs = _peft_model(arch, targets).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"))
    assert ours.adapter_record("default").config.lora_bias is True
    torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), atol=1e-5, rtol=0)

    ours.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["lora_bias"] is True
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    again = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, arch), output_of(theirs, arch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, targets", CASES)
def test_bias_gradients_equal_peft_in_training(tmp_path, arch, targets):
    """Training runs the fused layer (one autograd node per layer): the bias's gradient flows back through it."""
    theirs = _peft_model(arch, targets)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"), is_trainable=True)
    theirs.eval(), ours.eval()  # the models' own dropout off; gradients still flow through the fused node
    expected = _bias_grads(theirs, arch, ".lora_B.default.bias", "base_model.model.")
    got = _bias_grads(ours, arch, ".default.lora_bias", "base_model.")
    assert sorted(got) == sorted(expected) and got
    for site, grad in expected.items():
        torch.testing.assert_close(got[site], grad, atol=1e-6, rtol=1e-4)
    assert max(grad.abs().max() for grad in expected.values()) > 1e-2


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("layer_bias", [True, False])
def test_fused_layer_output_and_gradients_equal_the_formula(conv1d, layer_bias):
    d = torch.float64
    base = frozen_layer(6, 5, conv1d=conv1d, bias=layer_bias, dtype=d)
    torch.manual_seed(1)
    a, b = torch.randn(3, 6, dtype=d, requires_grad=True), torch.randn(5, 3, dtype=d, requires_grad=True)
    lora_bias = torch.randn(5, dtype=d, requires_grad=True)
    x = torch.randn(4, 6, dtype=d, requires_grad=True)
    weight = base.weight.t() if conv1d else base.weight
    hand = x @ weight.t() + 1.5 * ((x @ a.t()) @ b.t() + lora_bias)
    hand = hand if base.bias is None else hand + base.bias
    out = fused_lora(x, None, a, b, base, 1.5, lora_bias=lora_bias)
    torch.testing.assert_close(out, hand)
    seed = torch.randn_like(out)
    inputs = [x, a, b, lora_bias]
    for got, want in zip(torch.autograd.grad(out, inputs, seed), torch.autograd.grad(hand, inputs, seed)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(fused_lora(x, None, a, b, base, 1.5, lora_bias=lora_bias), hand.detach())


@pytest.mark.parametrize("arch, targets", CASES)
def test_merge_folds_the_bias_into_the_layer_bias_and_unmerge_restores_it(arch, targets):
    model = peftkit.adapt(build_tiny(arch), peftkit.LoraConfig(r=4, target_modules=targets, lora_bias=True))
    randomize(model, std=0.3)
    merge_cycle_keeps_outputs(model, arch)


def test_conv_lora_bias_equals_peft_both_ways(tmp_path):
    from peft import get_peft_model, LoraConfig, PeftModel

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    theirs = get_peft_model(net(), LoraConfig(r=2, target_modules=["0", "2"], lora_bias=True,
                                              init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_(std=0.5)
    x = torch.randn(2, 3, 5, 5)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(net(), str(tmp_path / "peft"))
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    ours.save_pretrained(str(tmp_path / "ours"))
    again = PeftModel.from_pretrained(net(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(again(x), theirs(x), atol=1e-5, rtol=0)
    unmerged = ours(x)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), unmerged, atol=1e-5, rtol=0)


def test_merging_into_a_layer_without_a_bias_is_refused_and_nothing_changes():
    model = peftkit.adapt(build_tiny("llama"), "lora[lora_bias=true]")  # Llama's projections have no bias
    randomize(model, std=0.3)
    before = output_of(model, "llama")
    with pytest.raises(MergeError, match="lora_bias=true merges B's bias into the layer's bias, and this layer has "
                                         "none; keep the adapter unmerged"):
        model.merge_adapter()
    torch.testing.assert_close(output_of(model, "llama"), before, atol=0, rtol=0)


@pytest.mark.parametrize("spec, clash", [
    ("lora[lora_bias=true,use_dora=true]", "use_dora=true"),
    ("lora[lora_bias=true,init_weights=gaussian]", 'init_weights="gaussian"'),
    ("lora[lora_bias=true,use_gating=true]", "use_gating=true"),
])
def test_combinations_peft_refuses_are_refused_by_name(spec, clash):
    with pytest.raises(ConfigError, match=f"lora_bias=true cannot be combined with {clash}"):
        peftkit.adapt(build_tiny("bert"), spec)


def test_embedding_targets_are_refused_as_in_peft():
    with pytest.raises(ConfigError, match=r"lora_bias=true is not available for Embedding layers"):
        peftkit.adapt(build_tiny("llama"), "lora[lora_bias=true,target_modules=[embed_tokens]]")


def test_parameter_count_counts_the_biases():
    model = peftkit.adapt(build_tiny("bert"), "lora[r=4,lora_bias=true,target_modules=[query]]")
    plain = peftkit.adapt(build_tiny("bert"), "lora[r=4,target_modules=[query]]")
    layers = len(model.adapter_record("default").sites)
    hidden = build_tiny("bert").config.hidden_size
    count = lambda m: sum(p.numel() for p in m.adapter_parameters("default"))  # noqa: E731
    assert count(model) - count(plain) == layers * hidden
