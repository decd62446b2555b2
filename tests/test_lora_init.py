"""LoRA's PiSSA, fast PiSSA and OLoRA initialisations, against the real `peft` both ways, and
save_as_lora(): the trained adapter as a plain LoRA that loads on the original base model."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError, MergeError
from tests.method_helpers import adapter_modules, output_of
from tests.tiny_models import build_tiny

TARGETS = ["q_proj", "v_proj"]


def _trained(arch: str, spec: str, seed: int = 3) -> peftkit.AdaptedModel:
    """An adapted tiny model whose factors moved away from their init (as after training)."""
    model = peftkit.adapt(build_tiny(arch), spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def _peft_model(init: str, base=None):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base if base is not None else build_tiny("llama"),
                          LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS))


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_unchanged_at_init_and_base_holds_the_residual(arch, init):
    base = build_tiny(arch)
    expected = output_of(base, arch)
    model = peftkit.adapt(build_tiny(arch), f"lora[r=4,alpha=8,init_weights={init}]")
    torch.testing.assert_close(output_of(model, arch), expected, atol=1e-5, rtol=0)
    original = dict(base.named_parameters())
    for site, layer in adapter_modules(model).items():
        weight = model.base_model.get_submodule(site).base_layer.weight
        part = layer.scale * layer.lora_B @ layer.lora_A
        part = part.t() if arch == "gpt2" else part  # GPT-2's Conv1D stores (in, out)
        assert part.abs().max() > 1e-3  # the adapter took a real part of the weight
        torch.testing.assert_close(weight + part, original[site + ".weight"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_init_as_peft_gives_the_same_residual_factors_and_logits(init):
    ours = peftkit.adapt(build_tiny("llama"), f"lora[r=4,alpha=8,init_weights={init},target_modules=[q_proj,v_proj]]")
    theirs = _peft_model(init)
    params = dict(theirs.named_parameters())
    for site, layer in adapter_modules(ours).items():
        prefix = "base_model.model." + site
        torch.testing.assert_close(layer.lora_A, params[prefix + ".lora_A.default.weight"], atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B, params[prefix + ".lora_B.default.weight"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.base_model.get_submodule(site).base_layer.weight,
                                   params[prefix + ".base_layer.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(output_of(ours, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_loads_both_ways_with_peft(tmp_path, init):
    from peft import PeftModel

    ours = _trained("llama", f"lora[r=4,alpha=8,init_weights={init},target_modules=[q_proj,v_proj]]")
    expected = output_of(ours, "llama")
    ours.save_adapter(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    # peft re-runs the init on the original base when it loads, then takes the trained factors.
    theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "ours"))
    torch.testing.assert_close(output_of(theirs, "llama"), expected, atol=1e-5, rtol=0)

    peft_trained = _peft_model(init)
    with torch.no_grad():
        for name, param in peft_trained.named_parameters():
            if "lora_" in name:
                param.add_(0.05)
    peft_trained.save_pretrained(str(tmp_path / "peft"))
    loaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "peft"))
    torch.testing.assert_close(output_of(loaded, "llama"), output_of(peft_trained, "llama"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["lora[r=4,alpha=8,init_weights=pissa]", "lora[r=4,alpha=8,init_weights=olora]",
                                  "lora[r=4,alpha=16,init_weights=pissa_niter_3,use_rslora=true]",
                                  'lora[r=4,alpha=8,init_weights=pissa,rank_pattern={"v_proj":2}]'])
def test_save_as_lora_loads_on_the_original_base_in_peftkit_and_peft(tmp_path, spec):
    from peft import PeftModel

    model = _trained("llama", spec)
    expected = output_of(model, "llama")
    peftkit.save_as_lora(model, str(tmp_path / "plain"))
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    torch.testing.assert_close(output_of(model, "llama"), expected, atol=0, rtol=0)  # the model is as it was
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "plain"))
    torch.testing.assert_close(output_of(ours, "llama"), expected, atol=1e-5, rtol=0)
    theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "plain"))
    torch.testing.assert_close(output_of(theirs, "llama"), expected, atol=1e-5, rtol=0)


def test_merge_unmerge_and_delete_give_back_the_original_model():
    arch = "llama"
    expected_base = output_of(build_tiny(arch), arch)
    model = _trained(arch, "lora[r=4,alpha=8,init_weights=pissa]")
    trained = output_of(model, arch)
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, arch), trained, atol=1e-5, rtol=0)
    with pytest.raises(MergeError, match="unmerge"):
        peftkit.save_as_lora(model, "unused")
    model.unmerge_adapter()
    model.delete_adapter("default")
    torch.testing.assert_close(output_of(model, arch), expected_base, atol=1e-5, rtol=0)


def test_bad_inits_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="pissa_niter_N"):
        peftkit.adapt(build_tiny("llama"), "lora[init_weights=pisa]")
    with pytest.raises(ConfigError, match="use_dora"):
        peftkit.adapt(build_tiny("llama"), "lora[init_weights=olora,use_dora=true]")
    with pytest.raises(ConfigError, match="linear layers only"):
        peftkit.adapt(build_tiny("llama"), "lora[init_weights=pissa,target_modules=[embed_tokens]]")
    with pytest.raises(ConfigError, match="save it with save_adapter"):
        peftkit.save_as_lora(peftkit.adapt(build_tiny("llama"), "lora"), "unused")


def test_hotswap_between_pissa_adapters_keeps_the_residual_base(tmp_path):
    for seed in (1, 2):
        _trained("llama", "lora[r=4,alpha=8,init_weights=pissa]", seed=seed).save_adapter(str(tmp_path / str(seed)))
    expected = output_of(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "2")), "llama")
    model = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "1"))
    model.hotswap_adapter(str(tmp_path / "2"))
    torch.testing.assert_close(output_of(model, "llama"), expected, atol=1e-5, rtol=0)


def test_peft_converted_pissa_adapter_loads_in_peftkit_on_the_original_base(tmp_path):
    initial = _peft_model("pissa")
    initial.save_pretrained(str(tmp_path / "initial"))  # PEFT's conversion reads the adapter as initialised
    with torch.no_grad():
        for name, param in initial.named_parameters():
            if "lora_" in name:
                param.add_(0.05)
    initial.save_pretrained(str(tmp_path / "plain"),
                            path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "plain"))
    torch.testing.assert_close(output_of(ours, "llama"), output_of(initial, "llama"), atol=1e-5, rtol=0)
