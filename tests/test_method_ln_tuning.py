"""LayerNorm tuning (``ln_tuning``, PEFT's LN_TUNING): a trainable copy of each normalization layer runs in its
place. Before, a PEFT LN-tuning folder or ``peft.LNTuningConfig`` was refused as an unknown method. Tested against
the real ``peft``: outputs and gradients, folders both ways, merging, weight-space merges, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError, PeftkitError
from tests.method_helpers import merge_cycle_keeps_outputs, output_of, randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

ARCHS = ["llama", "gpt2", "t5"]


def _peft_model(arch: str):
    from peft import get_peft_model, LNTuningConfig

    model = get_peft_model(build_tiny(arch), LNTuningConfig())
    with torch.no_grad():  # the copies start equal to the layers: move them, so that they matter
        gen = torch.Generator().manual_seed(2)
        for name, param in model.named_parameters():
            if "ln_tuning_layers" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_with_the_same_outputs_and_saves_back(tmp_path, arch):
    from peft import PeftModel

    theirs = _peft_model(arch)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"))
    assert ours.adapter_record("default").method.name == "ln_tuning"
    torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), atol=1e-6, rtol=0)

    ours.save_pretrained(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    assert sorted(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == \
        sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    again = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, arch), output_of(theirs, arch), atol=1e-6, rtol=0)


def _gradients(model, arch: str, prefix: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    output_tensor(model(**sample_inputs(arch))).square().mean().backward()
    return {name.removeprefix(prefix).replace(".adapters.default.", ".").replace(".ln_tuning_layers.default.", ".")
            .replace(".ln_tuning_layers.", "."): param.grad.clone()
            for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_equal_peft(tmp_path, arch):
    theirs = _peft_model(arch)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"), is_trainable=True).eval()
    expected = _gradients(theirs, arch, "base_model.model.")
    got = _gradients(ours, arch, "base_model.")
    assert sorted(got) == sorted(expected) and got
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-4)


def test_defaults_cover_the_bert_family_too():
    """PEFT has no default targets for BERT (it asks for target_modules); peftkit takes its LayerNorm modules."""
    model = peftkit.adapt(build_tiny("bert"), "ln_tuning")
    sites = [site.name for site in model.adapter_record("default").sites]
    assert sites and all(name.endswith("LayerNorm") for name in sites)
    layers = [model.base_model.get_submodule(name) for name in sites]
    copies = sum(p.numel() for layer in layers for p in layer.adapters["default"].parameters())
    assert len(sites) == 5 and copies == 5 * 2 * build_tiny("bert").config.hidden_size  # weight and bias each


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_cycle_keeps_outputs(arch):
    model = peftkit.adapt(build_tiny(arch), "ln_tuning")
    randomize(model, std=0.3)
    merge_cycle_keeps_outputs(model, arch)


def test_weight_space_merge_is_elementwise_around_the_base_layer():
    model = peftkit.adapt(build_tiny("llama"), "ln_tuning", "a")
    model.add_adapter("b", "ln_tuning")
    randomize(model, "a", std=0.3, seed=1)
    randomize(model, "b", std=0.3, seed=2)
    model.merge_adapters(["a", "b"], [0.25, 0.75], name="m", strategy="linear")
    site = "model.layers.0.input_layernorm"
    layer = model.base_model.get_submodule(site)
    base = layer.base_layer.weight
    a, b, m = (layer.adapters[n].ln_tuning_layers.weight for n in ("a", "b", "m"))
    torch.testing.assert_close(m, base + 0.25 * (a - base) + 0.75 * (b - base))


def test_two_stacked_at_one_layer_are_refused_and_an_average_runs():
    model = peftkit.adapt(build_tiny("llama"), "ln_tuning", "a")
    model.add_adapter("b", "ln_tuning")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    model.set_active("stack(a, b)")
    with pytest.raises(PeftkitError, match="two ln_tuning adapters are stacked at one layer"):
        output_of(model, "llama")
    model.set_active("average(a, b)")
    assert torch.isfinite(output_of(model, "llama")).all()


@pytest.mark.parametrize("spec, message", [
    ("ln_tuning[layers_to_transform=[0]]", "ln_tuning: layers_to_transform=\\[0\\] is not available"),
    ("ln_tuning[target_modules=[act_fn]]", r"ln_tuning: model.layers.0.mlp.act_fn \(\w+\) has no parameters to train"),
])
def test_wrong_settings_are_refused_by_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)
