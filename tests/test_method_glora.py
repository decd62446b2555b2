"""GLoRA on tiny llama (no biases) and bert (biases): PEFT's draws and weights files tensor for tensor, folders
both ways with the same logits merged and unmerged, the plain formula, PEFT's zeros for "none" paths, and
refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError, MergeError
from peftkit.plugins.glora.config import GloraConfig
from tests.method_helpers import (adapted_after_seed, adapter_modules, draw_peft_parameters, output_of,
                                  peft_file_loads_alike, peft_model_after_seed, peftkit_file_loads_alike, randomize,
                                  seen_at_site)
from tests.tiny_models import build_tiny

# The conformance suite runs glora[config_D_E=vector] on llama, bert and t5: tests/test_conformance.py.

CASES = [
    ("llama", dict(r=4)),  # lora paths; no biases: C, D and E are PEFT's zeros
    ("bert", dict(r=4, config_A_B="vector", config_C="vector", config_D_E="vector")),
    ("bert", dict(r=2, config_A_B="constant", config_C="lora", config_D_E="constant",
                  target_modules=["query", "output.dense"])),
    ("bert", dict(r=2, config_A_B="none", config_C="none", config_D_E="vector")),
]


def _peft_glora(arch: str, **options):
    from peft import GloraConfig as PeftGloraConfig

    model = peft_model_after_seed(build_tiny(arch), PeftGloraConfig(**options))
    draw_peft_parameters(model, "glora_", seed=3)
    return model


@pytest.mark.parametrize("arch,options", CASES)
def test_draws_and_weights_files_are_peft_tensor_for_tensor(tmp_path, arch, options):
    from peft import GloraConfig as PeftGloraConfig

    peft_model = peft_model_after_seed(build_tiny(arch), PeftGloraConfig(init_weights=False, **options))
    model = adapted_after_seed(build_tiny(arch), GloraConfig(init_weights=False, **options))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model.save_adapter(str(tmp_path / "peftkit"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = {k: v for k, v in load_file(str(tmp_path / "peftkit" / "adapter_model.safetensors")).items()
            if ".glora_" in k}  # bert: peftkit also saves the task model's head (modules_to_save)
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    torch.testing.assert_close(output_of(model, arch), output_of(peft_model, arch), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,options", CASES)
def test_peft_saved_glora_loads_with_identical_logits_merged_and_unmerged(tmp_path, arch, options):
    peft_file_loads_alike(_peft_glora(arch, **options), arch, tmp_path)


@pytest.mark.parametrize("arch,options", CASES)
def test_peftkit_saved_glora_loads_in_peft_with_identical_logits(tmp_path, arch, options):
    model = peftkit.adapt(build_tiny(arch), GloraConfig(**options))
    randomize(model, std=0.5)
    peftkit_file_loads_alike(model, arch, tmp_path)


def test_the_layer_computes_the_plain_formula_in_float64():
    model = peftkit.adapt(build_tiny("bert"), "glora[r=2,config_D_E=vector,target_modules=[query]]")
    randomize(model, std=0.5)
    site = "bert.encoder.layer.0.attention.self.query"
    adapter, seen = adapter_modules(model)[site], seen_at_site(model, site)
    base = model.base_model.get_submodule(site).base_layer
    weight, bias = base.weight.double(), base.bias.double()
    a = adapter.glora_A.Xd.double() @ adapter.glora_A.Xu.double()
    b = adapter.glora_B.Xd.double() @ adapter.glora_B.Xu.double()
    c = adapter.glora_C.Xd.double() @ adapter.glora_C.Xu.double()
    d, e = adapter.glora_D.X.double(), adapter.glora_E.X.double()
    expected = seen["x"].double() @ (weight + weight * a + b).t() + (bias + bias * d + e + (weight @ c).squeeze(-1))
    torch.testing.assert_close(seen["out"].double(), expected, atol=1e-5, rtol=1e-5)


def test_inference_reuses_the_changed_layer_until_the_adapter_or_the_layer_changes():
    """An inference forward runs one product with W' and b' kept from the last build, while neither the
    adapter's tensors nor the layer's change; a training forward builds them anew (gradients reach the paths)."""
    model = peftkit.adapt(build_tiny("bert"), "glora[r=2,config_D_E=vector]").eval()
    randomize(model, std=0.5)
    adapter = next(iter(adapter_modules(model).values()))
    expected = output_of(model, "bert")
    kept = adapter.__dict__["_kept_changed_layer"][1]
    torch.testing.assert_close(output_of(model, "bert"), expected, rtol=0, atol=0)
    assert adapter.__dict__["_kept_changed_layer"][1] is kept  # reused
    with torch.no_grad():
        adapter.glora_B.Xu.mul_(2)  # the adapter changes in place: W' is built again
    moved = output_of(model, "bert")
    assert not torch.allclose(moved, expected) and adapter.__dict__["_kept_changed_layer"][1] is not kept
    with torch.no_grad():
        model.base_model.bert.encoder.layer[0].attention.self.query.base_layer.weight.mul_(1.5)  # so does the layer
    assert not torch.allclose(output_of(model, "bert"), moved)
    model.merge_adapter()
    merged = output_of(model, "bert")
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, "bert"), merged, rtol=0, atol=1e-5)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()(input_ids=ids).logits.square().mean().backward()
    assert "_kept_changed_layer" not in adapter.__dict__ and adapter.glora_B.Xu.grad.abs().max() > 0


def test_identity_at_init_and_parameter_counts():
    model = peftkit.adapt(build_tiny("bert"), "glora[r=4,config_C=vector,config_D_E=vector]")
    model.set_active("default")
    assert torch.equal(output_of(model, "bert"), output_of(build_tiny("bert"), "bert"))
    sites = adapter_modules(model)
    assert {s.rsplit(".", 1)[-1] for s in sites} == {"query", "value"}  # LoRA's defaults, as PEFT's
    per_site = [2 * 4 * (m.glora_A.Xd.shape[0] + m.glora_A.Xu.shape[1]) + m.glora_C.X.shape[0]
                + 2 * m.glora_D.X.shape[0] for m in sites.values()]
    assert sum(p.numel() for m in sites.values() for p in m.parameters()) == sum(per_site)


def test_a_peft_file_with_nonzero_zeros_is_refused_by_key(tmp_path):
    _peft_glora("llama", r=4).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.glora_C.zeros"
    tensors[key] = torch.ones_like(tensors[key])
    save_file(tensors, str(path))
    with pytest.raises(AdapterLoadError, match=r"glora_C\.zeros should be zeros"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


def test_merging_reads_the_weight_so_glora_merges_first_and_weight_space_merges_are_refused():
    model = peftkit.adapt(build_tiny("bert"), "lora[r=2]", adapter_name="lora")
    model.add_adapter("glora", "glora[r=2,config_D_E=vector]")
    randomize(model, "lora", std=0.5)
    randomize(model, "glora", std=0.5, seed=1)
    model.merge_adapter("lora")
    with pytest.raises(MergeError):
        model.merge_adapter("glora")
    model.unmerge_adapter()
    model.add_adapter("other", "glora[r=2,config_D_E=vector]")
    with pytest.raises(MergeError, match="glora"):
        model.merge_adapters(["glora", "other"], [0.5, 0.5], name="m", strategy="linear")


@pytest.mark.parametrize("spec,error,message", [
    ("glora[r=0]", ConfigError, "r=0"),
    ("glora[config_A_B=full]", ConfigError, "config_A_B"),
    ("glora[config_D_E=lora]", ConfigError, "config_D_E"),
    ("glora[exclude_modules=[q_proj]]", ConfigError, "GloraConfig has no exclude_modules"),
    ("glora[layers_to_transform=0]", ConfigError, "layers_to_transform"),
])
def test_bad_values_raise_config_error_naming_the_key(spec, error, message):
    with pytest.raises(error, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_gpt2_conv1d_is_refused_by_name():
    with pytest.raises(ConfigError, match="is a Conv1D; GLoRA adapts torch Linear layers"):
        peftkit.adapt(build_tiny("gpt2"), "glora")
