"""VB-LoRA (PEFT's VBLORA) on tiny Llama, GPT-2 and BERT: the same initial draws, outputs, gradients and files
as the real ``peft`` (both the logits form and save_only_topk_weights), merging, the kept factors, and the
options peftkit refuses by name.

The conformance suite runs vblora[num_vectors=32,vector_length=16,init_vector_bank_bound=0.5] on llama, gpt2,
bert and t5: tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.plugins.vblora.config import VBLoRAConfig
from peftkit.plugins.vblora.layer import TopkOnlyAdapterError
from tests.method_helpers import (adapter_modules, bytes_kept_for_backward, loaded_in_peft, merge_cycle_keeps_outputs,
                                  output_of, peft_file_loads_alike, peftkit_file_loads_alike)
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

#: PEFT VBLoRAConfig options per case: Linear (llama; bert with a trained head) and GPT-2's Conv1D.
PEFT_CASES = [
    ("llama", dict(r=2, num_vectors=16, vector_length=8, init_vector_bank_bound=0.3,
                   target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(r=3, num_vectors=20, vector_length=16, topk=3, init_vector_bank_bound=0.3,
                  target_modules=["c_attn", "c_fc"])),
    ("bert", dict(r=4, num_vectors=300, vector_length=32, init_vector_bank_bound=0.3, task_type="SEQ_CLS")),
]
#: The same in a peftkit spec (no task_type: peftkit reads the task from the model's class).
OUR_SPECS = {
    "llama": "vblora[r=2,num_vectors=16,vector_length=8,init_vector_bank_bound=0.3,"
             "target_modules=[q_proj,v_proj,down_proj]]",
    "gpt2": "vblora[r=3,num_vectors=20,vector_length=16,topk=3,init_vector_bank_bound=0.3,"
            "target_modules=[c_attn,c_fc]]",
    "bert": "vblora[r=4,num_vectors=300,vector_length=32,init_vector_bank_bound=0.3,modules_to_save=[classifier]]",
}
IDS = torch.tensor([[1, 5, 9, 17, 33, 64], [3, 3, 70, 2, 8, 100]])


def _peft_model(arch: str, **options: object) -> torch.nn.Module:
    """A PEFT VB-LoRA model drawn from torch's generator as build_tiny leaves it, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is set from GPT-2's Conv1D, with a warning
        model = peft.get_peft_model(build_tiny(arch), peft.VBLoRAConfig(**options)).eval()
    with torch.no_grad():  # the saved head copy differs from the fresh model's head
        for param in (p for name, p in model.named_parameters() if "modules_to_save" in name):
            param.add_(torch.linspace(-0.2, 0.2, param.numel()).view(param.shape))
    return model


def _peft_from(folder: str, arch: str) -> torch.nn.Module:
    return loaded_in_peft(folder, build_tiny(arch))


def _peft_logits(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Site -> {"vblora_logits_A": ..., "vblora_logits_B": ...} of a PEFT model's default adapter."""
    out: dict[str, dict[str, torch.nn.Parameter]] = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.vblora.layer.VBLoRALayer):
            site = name.removeprefix("base_model.model.")
            out[site] = {key: getattr(module, key)["default"] for key in ("vblora_logits_A", "vblora_logits_B")}
    return out


def _bank(model: peftkit.AdaptedModel, name: str = "default") -> torch.nn.Parameter:
    return model.shared_state(name).vblora_vector_bank


def _keys(folder) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_the_initial_bank_and_logits_are_pefts_draws(arch, options):
    theirs = _peft_model(arch, **options)
    ours = peftkit.adapt(build_tiny(arch), OUR_SPECS[arch]).eval()
    assert torch.equal(_bank(ours), theirs.base_model.vblora_vector_bank["default"])
    peft_logits = _peft_logits(theirs)
    our_layers = adapter_modules(ours)
    assert set(our_layers) == set(peft_logits)
    for site, layer in our_layers.items():
        for key, tensor in layer.tensors().items():
            assert torch.equal(tensor, peft_logits[site][key]), (site, key)
    if arch != "bert":  # bert's head is moved off its init in the PEFT model only
        torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options):
    peft_file_loads_alike(_peft_model(arch, **options), arch, tmp_path)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, options):
    _peft_model(arch, **options).save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(1)
    peftkit_file_loads_alike(peftkit.adapt(build_tiny(arch), OUR_SPECS[arch]), arch, tmp_path / "ours")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "vblora_dropout",
                "init_vector_bank_bound", "init_logits_std", "fan_in_fan_out", "bias"):
        assert our_config[key] == peft_config[key], key
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")  # the bank once, as base_model.vblora_vector_bank
    assert "base_model.vblora_vector_bank" in _keys(tmp_path / "ours")


@pytest.mark.parametrize("arch,options", PEFT_CASES[:2])
def test_gradients_after_a_backward_equal_pefts(arch, options):
    theirs = _peft_model(arch, **options)
    ours = peftkit.adapt(build_tiny(arch), OUR_SPECS[arch])  # the same draws: see the first test
    for model in (theirs, ours):  # eval mode: GPT-2's dropout would draw differently
        model(input_ids=IDS, labels=IDS).loss.backward()
    peft_logits = _peft_logits(theirs)
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            assert tensor.grad.abs().max() > 0, (site, key)
            torch.testing.assert_close(tensor.grad, peft_logits[site][key].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_bank(ours).grad, theirs.base_model.vblora_vector_bank["default"].grad,
                               rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)


def test_a_peft_topk_folder_loads_with_peft_outputs_and_refuses_training(tmp_path):
    arch, options = PEFT_CASES[1]
    theirs = _peft_model(arch, save_only_topk_weights=True, **options)
    theirs.save_pretrained(str(tmp_path))
    keys = _keys(tmp_path)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.vblora_logits_A_topk_indices"] == ((3, 2, 3), torch.uint8)
    expected = output_of(_peft_from(str(tmp_path), arch), arch)
    torch.testing.assert_close(expected, output_of(theirs, arch), rtol=0, atol=1e-5)
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    torch.testing.assert_close(output_of(ours, arch), expected, rtol=0, atol=1e-5)
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, arch), expected, rtol=0, atol=1e-5)
    ours.unmerge_adapter()
    ours.train_adapter("default")
    with pytest.raises(TopkOnlyAdapterError, match=r"save_only_topk_weights=true.*not training.*save_only_topk_"
                                                   r"weights=false"):
        ours(input_ids=IDS, labels=IDS)


def test_peftkit_writes_pefts_topk_form_when_the_config_asks(tmp_path):
    arch = "llama"
    spec = OUR_SPECS[arch].replace("[", "[save_only_topk_weights=true,num_vectors=300,", 1).replace(
        "num_vectors=16,", "")
    ours = peftkit.adapt(build_tiny(arch), spec).eval()
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    keys = _keys(tmp_path / "ours")
    site = "base_model.model.model.layers.0.self_attn.q_proj."
    assert keys[site + "vblora_logits_A_topk_indices"] == ((2, 4, 2), torch.int16)  # 300 vectors: PEFT's int16
    assert keys[site + "vblora_logits_A_topk_weights"] == ((2, 4, 1), torch.float32)
    assert not any(key.endswith(("vblora_logits_A", "vblora_logits_B")) for key in keys)
    _peft_model(arch, **{**PEFT_CASES[0][1], "num_vectors": 300, "save_only_topk_weights": True}).save_pretrained(
        str(tmp_path / "peft"))
    assert keys == _keys(tmp_path / "peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["save_only_topk_weights"] is True
    torch.testing.assert_close(output_of(_peft_from(str(tmp_path / "ours"), arch), arch), expected,
                               rtol=0, atol=1e-5)
    again = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "ours"))
    torch.testing.assert_close(output_of(again, arch), expected, rtol=0, atol=1e-5)
    ours.train()
    ours(input_ids=IDS, labels=IDS).loss.backward()  # the model that wrote the folder still trains


def test_a_damaged_topk_file_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    model = peftkit.adapt(build_tiny("llama"), "vblora[r=2,num_vectors=16,vector_length=8,save_only_topk_weights=true]")
    model.save_adapter(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A_topk_weights"
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(peftkit.AdapterLoadError, match=r"q_proj.*vblora_logits_A_topk_weights is missing"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("gpt2"), peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16))
    config = model.adapter_record("default").config
    assert isinstance(config, VBLoRAConfig)
    assert (config.r, config.num_vectors, config.vector_length, config.target_modules) == (2, 8, 16, ["c_attn"])


def test_default_targets_are_pefts_per_model_family():
    assert set(adapter_modules(peftkit.adapt(build_tiny("llama"), "vblora[vector_length=16]"))) == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    t5 = peftkit.adapt(build_tiny("t5"), "vblora[vector_length=16]")
    t5 = {site.rsplit(".", 1)[-1] for site in adapter_modules(t5)}
    assert t5 == {"q", "k", "v", "o", "wi", "wo"}  # PEFT's VB-LoRA default for T5, not LoRA's q, v


def test_the_parameter_count_is_the_bank_plus_the_logits():
    model = peftkit.adapt(build_tiny("llama"), OUR_SPECS["llama"])
    # q_proj 32 -> 32, v_proj 32 -> 16, down_proj 64 -> 32, twice; (in + out) / 8 pieces of r=2 rows of 16 logits
    pieces = 2 * ((32 + 32) + (32 + 16) + (64 + 32)) // 8
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * 8 + pieces * 2 * 16


def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs():
    model = peftkit.adapt(build_tiny("gpt2"), OUR_SPECS["gpt2"]).eval()
    merge_cycle_keeps_outputs(model, "gpt2")


def test_the_kept_factors_follow_training_steps_loads_and_dtype_moves(tmp_path):
    """Forwards without gradients reuse A and B until the logits or the bank change (an optimizer step, an
    in-place write, a load, a move to another dtype); a training forward drops them."""
    model = peftkit.adapt(build_tiny("llama"), OUR_SPECS["llama"])
    before = output_of(model, "llama")
    assert torch.equal(output_of(model, "llama"), before)
    assert all(layer.__dict__.get("_kept_factors") for layer in adapter_modules(model).values())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert not any(layer.__dict__.get("_kept_factors") for layer in adapter_modules(model).values())
    optimizer.step()
    after = output_of(model, "llama")
    assert (after - before).abs().max() > 1e-4
    model.save_adapter(str(tmp_path))
    assert torch.equal(output_of(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), "llama"), after)
    with torch.no_grad():
        _bank(model).mul_(2)  # the bank alone changes: every layer's factors with it
    doubled = output_of(model, "llama")
    assert (doubled - after).abs().max() > 1e-4
    model.to(torch.float64)
    torch.testing.assert_close(output_of(model, "llama").float(), doubled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(bias="all"), r"bias='all' is not supported by peftkit's vblora \(only bias='none'\)"),
    (dict(layers_to_transform=[0], layers_pattern="layers"), r"layers_pattern='layers' is not supported"),
])
def test_pefts_settings_peftkit_lacks_are_refused_by_name(tmp_path, options, message):
    config = {"peft_type": "VBLORA", "r": 2, "num_vectors": 16, "vector_length": 8, "target_modules": ["q_proj"],
              **options}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(peftkit.AdapterLoadError, match=message):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec, message", [
    ("vblora[vector_length=12,target_modules=[q_proj,down_proj]]",
     r"vector_length=12 does not divide the input size 32 of layer 'model.layers.0.self_attn.q_proj' \(so do 3 "
     r"more layers\).*divisor of 32 \(the largest up to 12: vector_length=8\).*exclude_modules"),
    ("vblora[vector_length=64,target_modules=[down_proj]]",
     r"does not divide the output size 32 of layer 'model.layers.0.mlp.down_proj'"),
    ("vblora[topk=5,num_vectors=4,vector_length=8]", r"topk=5 is more than num_vectors=4"),
    ("vblora[r=0,vector_length=8]", r"r=0 must be a positive integer"),
    ("vblora[vblora_dropout=1.0,vector_length=8]", r"vblora_dropout=1.0 must be in \[0, 1\)"),
    ("vblora[init_logits_std=-1,vector_length=8]", r"init_logits_std=-1.* must be non-negative"),
])
def test_impossible_settings_are_refused_by_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_a_training_step_keeps_no_more_for_backward_than_pefts():
    """The first layer's q and v read an input that takes no gradient (frozen embeddings): A, built from the bank
    in every forward, is then not kept for backward (no input gradient reads it), as in PEFT."""
    arch, options = PEFT_CASES[0]
    theirs = _peft_model(arch, **options).train()
    ours = peftkit.adapt(build_tiny(arch), OUR_SPECS[arch]).train()
    assert bytes_kept_for_backward(ours, input_ids=IDS) <= bytes_kept_for_backward(theirs, input_ids=IDS)
