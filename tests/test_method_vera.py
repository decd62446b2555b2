"""VeRA on tiny llama, gpt2 and bert, and two-way file compatibility with the real `peft`
(with and without the saved projections)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError
from peftkit.plugins.vera.config import VeraConfig
from tests.method_helpers import adapter_modules, draw_peft_parameters, output_of, randomize
from tests.tiny_models import build_tiny

# The conformance suite runs vera[r=8] on llama, gpt2, bert and t5: tests/test_conformance.py (BUILTIN_SPECS).


def _peft_vera(arch: str, **options):
    """A PEFT VeRA model with random lambda vectors, in eval mode."""
    from peft import VeraConfig as PeftVeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns
        model = get_peft_model(build_tiny(arch), PeftVeraConfig(**options)).eval()
    draw_peft_parameters(model, "vera_lambda", seed=3)
    return model


PEFT_CASES = [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(r=8, projection_prng_key=7, save_projection=False, target_modules="all-linear")),
    ("bert", dict(r=4, task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"])),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
]


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_saved_vera_loads_with_identical_logits_merged_and_unmerged(tmp_path, arch, options):
    peft_model = _peft_vera(arch, **options)
    expected = output_of(peft_model, arch)
    assert not torch.allclose(expected, output_of(build_tiny(arch), arch), atol=1e-4)
    peft_model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in saved) == options.get("save_projection", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    torch.testing.assert_close(output_of(model, arch), expected, atol=2e-6, rtol=1e-5)
    peft_model.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, arch), output_of(peft_model, arch), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peftkit_saved_vera_loads_in_peft_with_identical_logits(tmp_path, arch, options):
    from peft import PeftModel

    options = {k: v for k, v in options.items() if k not in ("task_type", "fan_in_fan_out")}
    model = peftkit.adapt(build_tiny(arch), VeraConfig(**options))
    randomize(model, std=1.0)
    model.eval()
    expected = output_of(model, arch)
    model.save_adapter(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    projections = {k for k in saved if "vera_A" in k or "vera_B" in k}
    assert projections == ({"base_model.vera_A", "base_model.vera_B"} if options.get("save_projection", True)
                           else set())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the extra "peftkit" key, and missing projections
        peft_model = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(peft_model, arch), expected, atol=2e-6, rtol=1e-5)


def test_projections_are_peft_draws_from_the_seed_and_leave_the_global_generator_alone():
    peft_model = _peft_vera("llama", r=4, projection_prng_key=11, target_modules=["q_proj", "up_proj"])
    base = build_tiny("llama")  # seeds torch's generator itself
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    model = peftkit.adapt(base, "vera[r=4,projection_prng_key=11,target_modules=[q_proj,up_proj]]")
    shared = model.shared_state("default")
    assert torch.equal(shared.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, peft_model.base_model.vera_B["default"])
    assert tuple(shared.vera_A.shape) == (4, 32) and tuple(shared.vera_B.shape) == (64, 4)  # largest site
    assert torch.equal(torch.random.get_rng_state(), before)


def test_identity_at_init_and_only_the_vectors_train():
    model = peftkit.adapt(build_tiny("llama"), "vera[r=4]")
    model.set_active("default")
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"))
    assert sorted(model.adapters["default"].target_modules) == ["q_proj", "v_proj"]  # LoRA's, as PEFT's default
    model.train_adapter("default")
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    sites = adapter_modules(model)
    trained, total = model.trainable_parameters()
    assert trained == sum(m.out_features + 4 for m in sites.values())


def test_save_projection_false_reloads_the_same_from_the_seed(tmp_path):
    model = peftkit.adapt(build_tiny("bert"), "vera[r=4,save_projection=false,projection_prng_key=5]")
    randomize(model, std=1.0)
    model.eval()
    expected = output_of(model, "bert")
    model.save_adapter(str(tmp_path))
    torch.manual_seed(123)  # the global generator plays no part in the projections
    loaded = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path))
    torch.testing.assert_close(output_of(loaded, "bert"), expected)


def test_a_file_missing_its_projections_is_refused_by_key(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "vera[r=4]")
    model.save_adapter(str(tmp_path))
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if k != "base_model.vera_B"},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="missing keys.*base_model.vera_B"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


def test_hotswapping_replaces_the_vectors_and_the_projections_in_place(tmp_path):
    donor = peftkit.adapt(build_tiny("llama"), "vera[r=4,projection_prng_key=9]")
    randomize(donor, std=1.0)
    donor.save_adapter(str(tmp_path / "seeded_9"))
    expected = output_of(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "seeded_9")), "llama")
    model = peftkit.adapt(build_tiny("llama"), "vera[r=4]")
    model.set_active("default")
    projection = model.shared_state("default").vera_A
    model.hotswap_adapter(str(tmp_path / "seeded_9"))
    assert model.shared_state("default").vera_A is projection
    torch.testing.assert_close(output_of(model, "llama"), expected)
    other_r = peftkit.adapt(build_tiny("llama"), "vera[r=8]")
    other_r.save_adapter(str(tmp_path / "r8"))
    with pytest.raises(AdapterLoadError, match="setting r is 8 in the folder"):
        model.hotswap_adapter(str(tmp_path / "r8"))


@pytest.mark.parametrize("spec,message", [("vera[r=0]", "r=0"), ("vera[vera_dropout=1.0]", "vera_dropout"),
                                          ("vera[projection_prng_key=x]", "projection_prng_key")])
def test_bad_values_raise_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)
