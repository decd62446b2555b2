"""PVeRA (probabilistic VeRA) on tiny llama, gpt2 and bert: PEFT's draws, files both ways (with and without the
saved projections), the noise PEFT draws for a generator_seed in training, the mean in eval, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.plugins.vera.config import PveraConfig
from tests.method_helpers import (adapter_modules, adapted_after_seed, draw_peft_parameters, loaded_in_peft,
                                  output_of, peft_file_loads_alike, peft_model_after_seed, peft_tensors_by_site,
                                  peftkit_file_loads_alike, randomize, seen_at_site)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

# The conformance suite runs pvera[r=8] on llama, gpt2, bert and t5: tests/test_conformance.py (BUILTIN_SPECS).

_LAMBDAS = ("pvera_lambda_b", "pvera_lambda_d")

CASES = [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(r=8, projection_prng_key=7, save_projection=False, target_modules="all-linear")),
    ("bert", dict(r=4, target_modules=["query", "value", "output.dense"])),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"])),
]


def _peft_pvera(arch: str, **options):
    """A PEFT PVeRA model with random lambda vectors, in eval mode."""
    from peft import PveraConfig as PeftPveraConfig

    config = PeftPveraConfig(**options, fan_in_fan_out=arch == "gpt2")
    model = peft_model_after_seed(build_tiny(arch), config)
    draw_peft_parameters(model, "pvera_lambda", seed=3)
    return model


@pytest.mark.parametrize("arch,options", CASES)
def test_peft_saved_pvera_loads_with_identical_logits_merged_and_unmerged(tmp_path, arch, options):
    peft_model = _peft_pvera(arch, **options)
    peft_file_loads_alike(peft_model, arch, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.pvera_A" in saved) == options.get("save_projection", True)


@pytest.mark.parametrize("arch,options", CASES)
def test_peftkit_saved_pvera_loads_in_peft_with_identical_logits(tmp_path, arch, options):
    model = peftkit.adapt(build_tiny(arch), PveraConfig(**options))
    randomize(model, std=1.0)
    peftkit_file_loads_alike(model, arch, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    projections = {k for k in saved if "pvera_A" in k or "pvera_B" in k}
    assert projections == ({"base_model.pvera_A", "base_model.pvera_B"} if options.get("save_projection", True)
                           else set())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PVERA" and "exclude_modules" not in config  # a field PEFT's config lacks


def test_projections_and_vectors_are_peft_draws():
    from peft import PveraConfig as PeftPveraConfig

    options = dict(r=4, projection_prng_key=11, target_modules=["q_proj", "up_proj"], init_weights=False)
    peft_model = peft_model_after_seed(build_tiny("llama"), PeftPveraConfig(**options))
    model = adapted_after_seed(build_tiny("llama"), PveraConfig(**options))
    shared = model.shared_state("default")
    assert torch.equal(shared.pvera_A, peft_model.base_model.pvera_A["default"])
    assert torch.equal(shared.pvera_B, peft_model.base_model.pvera_B["default"])
    assert tuple(shared.pvera_A.shape) == (8, 32) and tuple(shared.pvera_B.shape) == (64, 4)  # A: 2r rows
    theirs = peft_tensors_by_site(peft_model, _LAMBDAS)
    ours = {site: adapter.tensors() for site, adapter in adapter_modules(model).items()}
    assert ours.keys() == theirs.keys()
    for site, tensors in ours.items():
        for key in _LAMBDAS:
            assert torch.equal(tensors[key], theirs[site][key]), (site, key)


def test_identity_at_init_and_only_the_vectors_train():
    model = peftkit.adapt(build_tiny("llama"), "pvera[r=4,d_initial=0.3]")
    model.set_active("default")
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"))
    assert sorted(model.adapters["default"].target_modules) == ["q_proj", "v_proj"]  # LoRA's, as PEFT's default
    sites = adapter_modules(model)
    for adapter in sites.values():
        assert torch.equal(adapter.pvera_lambda_b, torch.zeros(adapter.out_features))
        assert torch.equal(adapter.pvera_lambda_d, torch.full((8,), 0.3))  # a mean and a log-variance half
    model.train_adapter("default")
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"pvera_lambda_b", "pvera_lambda_d"}
    assert model.trainable_parameters()[0] == sum(m.out_features + 8 for m in sites.values())


def _plain_mean_delta(adapter, x: torch.Tensor) -> torch.Tensor:
    """lambda_b * B (lambda_d[:r] * A[:r] x) in float64: the update with z at its mean."""
    r, shared = adapter.r, adapter.shared
    a = shared.pvera_A[:r, : adapter.in_features].double()
    b = shared.pvera_B[: adapter.out_features, :r].double()
    mean = adapter.pvera_lambda_d[:r].double() * (x.double() @ a.t())
    return adapter.pvera_lambda_b.double() * (mean @ b.t())


def test_eval_uses_the_mean_and_training_samples_around_it():
    model = peftkit.adapt(build_tiny("llama"), "pvera[r=4,target_modules=[q_proj]]")  # no dropout: all noise is ours
    randomize(model, std=1.0)
    site = "model.layers.0.self_attn.q_proj"
    seen = seen_at_site(model, site, "llama")
    adapter = adapter_modules(model)[site]
    torch.testing.assert_close(seen["out"].double() - seen["h"].double(), _plain_mean_delta(adapter, seen["x"]),
                               atol=1e-5, rtol=1e-5)
    evaluated = output_of(model.eval(), "llama")
    assert torch.equal(output_of(model, "llama"), evaluated)
    model.train()
    first, second = output_of(model, "llama"), output_of(model, "llama")
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)
    model.merge_adapter()  # the merge folds in the mean
    torch.testing.assert_close(output_of(model.eval(), "llama"), evaluated, atol=1e-5, rtol=1e-5)


def test_the_log_variance_half_trains_only_through_the_samples():
    model = peftkit.adapt(build_tiny("llama"), "pvera[r=4,target_modules=[q_proj]]")
    randomize(model, std=1.0)
    model.train_adapter("default")
    adapter = next(iter(adapter_modules(model).values()))
    for training, logvar_moves in ((True, True), (False, False)):
        model.train(training)
        adapter.pvera_lambda_d.grad = None
        output_tensor(model(**sample_inputs("llama"))).pow(2).mean().backward()
        grad = adapter.pvera_lambda_d.grad
        assert grad[:4].abs().sum() > 0
        assert bool(grad[4:].abs().sum() > 0) == logvar_moves


def test_training_draws_peft_noise_for_a_generator_seed_and_gives_peft_gradients(tmp_path):
    peft_model = _peft_pvera("llama", r=4, target_modules=["q_proj", "down_proj"], generator_seed=5)
    peft_model.save_pretrained(str(tmp_path))
    model = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    assert model.adapters["default"].generator_seed == 5
    model.train_adapter("default")
    model.train()
    peft_model.train()
    for _step in range(2):  # each layer's generator goes on drawing, in both libraries alike
        ours = output_tensor(model(**sample_inputs("llama")))
        theirs = output_tensor(peft_model(**sample_inputs("llama")))
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
        ours.pow(2).mean().backward()
        theirs.pow(2).mean().backward()
    peft_grads = peft_tensors_by_site(peft_model, _LAMBDAS)
    for site, adapter in adapter_modules(model).items():
        for key, tensor in adapter.tensors().items():
            torch.testing.assert_close(tensor.grad, peft_grads[site][key].grad, atol=1e-5, rtol=1e-4)


def test_sample_at_inference_samples_in_eval_and_reloads_with_its_seed(tmp_path):
    spec = "pvera[r=4,sample_at_inference=true,generator_seed=2]"
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, std=1.0)
    model.eval()
    model.save_adapter(str(tmp_path))
    first, second = output_of(model, "llama"), output_of(model, "llama")
    assert not torch.allclose(first, second)
    reloaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    assert torch.equal(output_of(reloaded, "llama"), first)  # a fresh generator from the same seed
    peft_model = loaded_in_peft(tmp_path, build_tiny("llama"))
    torch.testing.assert_close(output_of(peft_model, "llama"), first, atol=2e-6, rtol=1e-5)


def test_exclude_modules_is_kept_in_a_folder_peft_refuses(tmp_path):
    """PEFT's PveraConfig has no exclude_modules (it would adapt the excluded layers too): the folder says a
    type PEFT does not have, and peftkit loads it as saved."""
    spec = "pvera[r=4,target_modules=all-linear,exclude_modules=[down_proj]]"
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, std=1.0)
    model.eval()
    assert not any(site.endswith("down_proj") for site in adapter_modules(model))
    model.save_adapter(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PVERA_EXCLUDE_MODULES" and config["exclude_modules"] == ["down_proj"]
    reloaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    assert torch.equal(output_of(reloaded, "llama"), output_of(model, "llama"))
    with pytest.raises(Exception, match="PVERA_EXCLUDE_MODULES"):
        loaded_in_peft(tmp_path, build_tiny("llama"))


@pytest.mark.parametrize("spec,message", [
    ("pvera[r=0]", "r=0"), ("pvera[pvera_dropout=1.0]", "pvera_dropout"),
    ("pvera[projection_prng_key=x]", "projection_prng_key"), ("pvera[generator_seed=x]", "generator_seed"),
    ("pvera[generator_seed=true]", "generator_seed")])
def test_bad_values_raise_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_hotswap_replaces_the_vectors_and_projections_and_a_missing_projection_is_refused(tmp_path):
    from safetensors.torch import save_file

    from peftkit.core.errors import AdapterLoadError

    donor = peftkit.adapt(build_tiny("llama"), "pvera[r=4,projection_prng_key=9]")
    randomize(donor, std=1.0)
    donor.save_adapter(str(tmp_path / "seeded_9"))
    expected = output_of(donor.eval(), "llama")
    model = peftkit.adapt(build_tiny("llama"), "pvera[r=4]")
    model.set_active("default")
    projection = model.shared_state("default").pvera_A
    model.hotswap_adapter(str(tmp_path / "seeded_9"))
    assert model.shared_state("default").pvera_A is projection
    torch.testing.assert_close(output_of(model, "llama"), expected)
    weights = load_file(str(tmp_path / "seeded_9" / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "base_model.pvera_B"},
              str(tmp_path / "seeded_9" / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match="missing keys.*base_model.pvera_B"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "seeded_9"))
