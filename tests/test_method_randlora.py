"""RandLoRA (PEFT's RANDLORA) on tiny Llama, GPT-2 and BERT: the same bases (dense, sparse, very sparse) and initial
parameters as the real ``peft``, the same outputs and gradients, folders both ways (with and without the saved
bases, PEFT's keys), merging, a quantized base, and the options peftkit refuses by name.

The conformance suite runs randlora[r=8,randlora_alpha=16,init_weights=false] on llama, gpt2, bert and t5:
tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.plugins.randlora.config import RandLoraConfig
from tests.method_helpers import (adapter_modules, merge_cycle_keeps_outputs, output_of, peft_file_loads_alike,
                                  peftkit_file_loads_alike, quantized_matches_twin)
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

#: PEFT RandLoraConfig options per case. Llama's layers are 32 -> 32, 32 -> 16 (in > out: the bases apply the
#: other way round), 32 -> 64 and 64 -> 32; GPT-2's are Conv1D; BERT trains its head. init_weights=False draws
#: lambda at random (PEFT's draws from torch's generator), so the adapter changes the outputs.
PEFT_CASES = [
    ("llama", dict(r=4, randlora_alpha=8, init_weights=False,
                   target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    ("llama", dict(r=3, randlora_alpha=6, init_weights=False, projection_prng_key=5, save_projection=False,
                   target_modules="all-linear")),
    ("gpt2", dict(r=8, randlora_alpha=4, init_weights=False, target_modules=["c_attn", "c_fc"])),
    ("bert", dict(r=6, randlora_alpha=6, init_weights=False, sparse=True, task_type="SEQ_CLS")),
    ("llama", dict(r=4, randlora_alpha=8, init_weights=False, very_sparse=True, target_modules=["q_proj", "v_proj"])),
]
#: The same as peftkit specs (no task_type: peftkit reads the task from the model's class).
OUR_SPECS = [
    "randlora[r=4,randlora_alpha=8,init_weights=false,target_modules=[q_proj,v_proj,up_proj,down_proj]]",
    "randlora[r=3,randlora_alpha=6,init_weights=false,projection_prng_key=5,save_projection=false,"
    "target_modules=all-linear]",
    "randlora[r=8,randlora_alpha=4,init_weights=false,target_modules=[c_attn,c_fc]]",
    "randlora[r=6,randlora_alpha=6,init_weights=false,sparse=true,modules_to_save=[classifier]]",
    "randlora[r=4,randlora_alpha=8,init_weights=false,very_sparse=true,target_modules=[q_proj,v_proj]]",
]
CASES = [(arch, options, spec) for (arch, options), spec in zip(PEFT_CASES, OUR_SPECS, strict=True)]
IDS = torch.tensor([[1, 5, 9, 17, 33, 64], [3, 3, 70, 2, 8, 100]])
BASES = ("randlora_A", "randlora_B")


def _peft_model(arch: str, **options: object) -> torch.nn.Module:
    """A PEFT RandLoRA model drawn from torch's generator as build_tiny leaves it, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out from GPT-2's Conv1D, save_projection=False: warnings
        model = peft.get_peft_model(build_tiny(arch), peft.RandLoraConfig(**options)).eval()
    with torch.no_grad():  # the saved head copy differs from the fresh model's head
        for param in (p for name, p in model.named_parameters() if "modules_to_save" in name):
            param.add_(torch.linspace(-0.2, 0.2, param.numel()).view(param.shape))
    return model


def _peft_params(model: torch.nn.Module) -> dict[str, dict[str, torch.nn.Parameter]]:
    """Site -> {"randlora_lambda": ..., "randlora_gamma": ...} of a PEFT model's default adapter."""
    out: dict[str, dict[str, torch.nn.Parameter]] = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.randlora.layer.RandLoraLayer):
            site = name.removeprefix("base_model.model.")
            out[site] = {key: getattr(module, key)["default"] for key in ("randlora_lambda", "randlora_gamma")}
    return out


def _keys(folder) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_the_bases_and_initial_parameters_are_pefts_draws(arch, options, spec):
    theirs = _peft_model(arch, **options)
    ours = peftkit.adapt(build_tiny(arch), spec).eval()
    for name in BASES:
        peft_basis = getattr(theirs.base_model, name)["default"]
        assert torch.equal(getattr(ours.shared_state("default"), name), peft_basis.float()), name
    peft_params = _peft_params(theirs)
    our_layers = adapter_modules(ours)
    assert set(our_layers) == set(peft_params)
    for site, layer in our_layers.items():
        for key, tensor in layer.tensors().items():
            assert torch.equal(tensor, peft_params[site][key]), (site, key)
    if arch != "bert":  # bert's head is moved off its init in the PEFT model only
        torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), rtol=1e-5, atol=1e-6)


def test_the_default_init_is_pefts_and_the_identity():
    """init_weights=true: lambda zero and gamma 1 / max(its shape), after the same draw of lambda as PEFT."""
    theirs = _peft_model("llama", r=4, target_modules=["v_proj", "up_proj"])
    after_theirs = torch.randn(3)
    ours = peftkit.adapt(build_tiny("llama"), "randlora[r=4,target_modules=[v_proj,up_proj]]").eval()
    assert torch.equal(torch.randn(3), after_theirs)  # torch's generator is left where PEFT leaves it
    peft_params = _peft_params(theirs)
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            assert torch.equal(tensor, peft_params[site][key]), (site, key)
    assert adapter_modules(ours)["model.layers.0.self_attn.v_proj"].randlora_gamma[0, 0] == 1 / 16  # (4, 16)
    torch.testing.assert_close(output_of(ours, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options, spec):
    model = peft_file_loads_alike(_peft_model(arch, **options), arch, tmp_path)
    assert model.adapter_record("default").config.save_projection == options.get("save_projection", True)


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, options, spec):
    _peft_model(arch, **options).save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(1)
    peftkit_file_loads_alike(peftkit.adapt(build_tiny(arch), spec), arch, tmp_path / "ours")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "save_projection",
                "sparse", "very_sparse", "init_weights", "fan_in_fan_out", "bias", "layers_pattern"):
        assert our_config[key] == peft_config[key], key
    ours, peft_keys = _keys(tmp_path / "ours"), _keys(tmp_path / "peft")
    assert ours == peft_keys  # with save_projection: the bases once per adapter and once under every layer
    assert ("base_model.randlora_A" in ours) == options.get("save_projection", True)


@pytest.mark.parametrize("arch,options,spec", [CASES[0], CASES[2]])
def test_gradients_after_a_backward_equal_pefts(arch, options, spec):
    theirs = _peft_model(arch, **options)
    ours = peftkit.adapt(build_tiny(arch), spec)  # the same draws: see the first test
    for model in (theirs, ours):  # eval mode: GPT-2's dropout would draw differently
        model(input_ids=IDS, labels=IDS).loss.backward()
    peft_params = _peft_params(theirs)
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            assert tensor.grad.abs().max() > 0, (site, key)
            torch.testing.assert_close(tensor.grad, peft_params[site][key].grad, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)
    assert not any(t.requires_grad for t in ours.shared_state("default").tensors().values())


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("gpt2"), peft.RandLoraConfig(r=4, randlora_alpha=12, very_sparse=True))
    config = model.adapter_record("default").config
    assert isinstance(config, RandLoraConfig)
    assert (config.r, config.randlora_alpha, config.very_sparse, config.target_modules) == (4, 12, True, ["c_attn"])


def test_the_parameter_count_is_lambda_and_gamma_per_layer():
    model = peftkit.adapt(build_tiny("llama"), OUR_SPECS[0])
    # r=4: q 32x32, up 32->64, down 64->32: 8 bases, 8 * (4 + 32); v 32->16: 4 bases, 4 * (4 + 16); two layers
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (3 * 8 * 36 + 4 * 20)


@pytest.mark.parametrize("arch,spec", [("llama", OUR_SPECS[0]), ("gpt2", OUR_SPECS[2])])
def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs(arch, spec):
    merge_cycle_keeps_outputs(peftkit.adapt(build_tiny(arch), spec).eval(), arch)


def test_dropout_drops_the_update_input_in_training_only():
    spec = "randlora[r=4,randlora_alpha=8,init_weights=false,randlora_dropout=0.5,target_modules=[q_proj]]"
    model = peftkit.adapt(build_tiny("llama"), spec)
    torch.testing.assert_close(output_of(model.eval(), "llama"), output_of(model.eval(), "llama"), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    first = output_of(model, "llama")
    assert (first - output_of(model, "llama")).abs().max() > 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_matches_its_float_twin_and_refuses_merging(bits):
    pytest.importorskip("bitsandbytes")
    quantized_matches_twin(bits, "randlora[r=8,randlora_alpha=16,init_weights=false,target_modules=['0']]")


def test_a_file_with_the_bases_missing_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    peftkit.adapt(build_tiny("llama"), OUR_SPECS[0]).save_adapter(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "base_model.randlora_B"},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(peftkit.AdapterLoadError, match=r"missing keys \(1\): base_model.randlora_B"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("options, message", [
    (dict(bias="all"), r"bias='all' is not supported by peftkit's randlora \(only bias='none'\)"),
    (dict(bias="randlora_only"), r"bias='randlora_only' is not supported"),
    (dict(layers_to_transform=[0], layers_pattern="layers"), r"layers_pattern='layers' is not supported"),
])
def test_pefts_settings_peftkit_lacks_are_refused_by_name(tmp_path, options, message):
    config = {"peft_type": "RANDLORA", "r": 4, "target_modules": ["q_proj"], **options}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(peftkit.AdapterLoadError, match=message):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec, message", [
    ("randlora[r=0]", r"r=0 must be a positive integer"),
    ("randlora[randlora_dropout=1.0]", r"randlora_dropout=1.0 must be in \[0, 1\)"),
    ("randlora[target_modules=[rotary_emb]]", r"RandLoRA"),
])
def test_impossible_settings_are_refused_by_name(spec, message):
    with pytest.raises((ConfigError, peftkit.PeftkitError), match=message):
        peftkit.adapt(build_tiny("llama"), spec)
