"""PEFT's "orthogonal" and "mica" LoRA inits (init_lora_weights), against the real `peft`: a new adapter from
either starts as PEFT's does (they were read as the default init before, B = 0), MiCA's B stays frozen in
training as in PEFT, and folders go both ways."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.testing import make_conformance_class
from tests.method_helpers import adapter_modules, output_of
from tests.tiny_models import build_tiny

TARGETS = ["q_proj", "v_proj"]
SPEC = "lora[r=4,alpha=8,init_weights={init},target_modules=[q_proj,v_proj]]"


def _peft_config(init: str, r: int = 4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=8, init_lora_weights=init, target_modules=TARGETS)


def _peft_model(init: str, base=None):
    from peft import get_peft_model

    return get_peft_model(base if base is not None else build_tiny("llama"), _peft_config(init))


def _loss(model) -> torch.Tensor:
    ids = torch.arange(2 * 6).reshape(2, 6) % 50 + 3
    return model(input_ids=ids).logits.float().pow(2).mean()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_orthogonal_starts_at_the_base_with_both_factors_nonzero_as_peft(arch):
    expected = output_of(build_tiny(arch), arch)
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny(arch), "lora[r=8,alpha=16,init_weights=orthogonal]")
    torch.testing.assert_close(output_of(model, arch), expected, atol=1e-6, rtol=0)
    for layer in adapter_modules(model).values():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        assert (b @ a).abs().max() < 1e-6  # B A = 0: the halves of one orthogonal matrix
        assert torch.linalg.matrix_rank(a) == 4 and torch.linalg.matrix_rank(b) == 4  # r / 2 each, as PEFT's
        assert isinstance(layer.lora_B, torch.nn.Parameter)  # both train

    theirs = _peft_model("orthogonal")
    peft_b = [p for n, p in theirs.named_parameters() if "lora_B" in n]
    ours = adapter_modules(peftkit.adapt(build_tiny("llama"), _peft_config("orthogonal")))  # PEFT's config object
    assert all(layer.lora_B.abs().max() > 0 for layer in ours.values())  # not read as the default any more
    ours_std = torch.cat([layer.lora_B.detach().flatten() for layer in ours.values()]).std()
    peft_std = torch.cat([p.detach().flatten() for p in peft_b]).std()
    assert 0.5 < float(ours_std / peft_std) < 2  # the same scale as PEFT's draw


def test_mica_factors_equal_peft_and_b_stays_frozen_in_training():
    ours = peftkit.adapt(build_tiny("llama"), SPEC.format(init="mica"))
    theirs = _peft_model("mica")
    params = dict(theirs.named_parameters())
    for site, layer in adapter_modules(ours).items():
        prefix = "base_model.model." + site
        torch.testing.assert_close(layer.lora_B, params[prefix + ".lora_B.default.weight"], atol=1e-6, rtol=0)
        assert not layer.lora_A.any() and not params[prefix + ".lora_B.default.weight"].requires_grad
    torch.testing.assert_close(output_of(ours, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)

    ours.train_adapter("default")
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name for name in trainable)
    assert ours.trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    _loss(ours).backward()
    _loss(theirs).backward()
    for site, layer in adapter_modules(ours).items():
        torch.testing.assert_close(layer.lora_A.grad, params["base_model.model." + site + ".lora_A.default.weight"]
                                   .grad, atol=1e-6, rtol=1e-4)
        assert layer.lora_A.grad.abs().max() > 0


def test_mica_folders_load_both_ways_with_b_frozen(tmp_path):
    from peft import PeftModel

    ours = peftkit.adapt(build_tiny("llama"), SPEC.format(init="mica"))
    with torch.no_grad():
        for layer in adapter_modules(ours).values():
            layer.lora_A.add_(0.05)  # as after training
    expected = output_of(ours, "llama")
    ours.save_adapter(str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "ours"), is_trainable=True)
    torch.testing.assert_close(output_of(theirs, "llama"), expected, atol=1e-5, rtol=0)

    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_A" in name:
                param.add_(0.05)
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "peft"), is_trainable=True)
    torch.testing.assert_close(output_of(loaded, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)
    assert all("lora_A" in name for name, p in loaded.named_parameters() if p.requires_grad)


def test_orthogonal_and_mica_refusals_name_the_fix():
    with pytest.raises(ConfigError, match=r"needs even ranks, not r=5, rank_pattern\['v_proj'\]=3; choose even"):
        peftkit.adapt(build_tiny("llama"), 'lora[r=5,init_weights=orthogonal,rank_pattern={"v_proj":3}]')
    with pytest.raises(ConfigError, match="mica.*cannot be combined with use_dora=true"):
        peftkit.adapt(build_tiny("llama"), "lora[init_weights=mica,use_dora=true]")
    for init in ("orthogonal", "mica"):
        with pytest.raises(ConfigError, match=f"init_weights='{init}' applies to linear layers only"):
            peftkit.adapt(build_tiny("llama"), f"lora[r=2,init_weights={init},target_modules=[embed_tokens]]")
    with pytest.raises(ConfigError, match=r"mica.*at most 32, not r=64; choose a smaller r"):
        peftkit.adapt(build_tiny("llama"), "lora[r=64,init_weights=mica,target_modules=[q_proj]]")


#: The conformance suite (save/load, merge, hot-swap, composition blocks, PEFT's format, ...) on both inits.
TestConformance_lora_orthogonal = make_conformance_class("lora[r=4,init_weights=orthogonal]")
TestConformance_lora_mica = make_conformance_class("lora[r=4,init_weights=mica]")
