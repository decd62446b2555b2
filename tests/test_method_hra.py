"""HRA (``hra``, PEFT's HRA: Householder reflection adaptation, arXiv 2405.17484): the layer runs with its weight
times a chain of r Householder reflections. Before, a PEFT HRA folder or ``peft.HRAConfig`` was refused as an
unknown method. Tested against the real ``peft``: the same init draws, outputs and gradients, folders both ways
(keys, shapes, config fields), merging, Conv2d layers, and what is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError
from peftkit.plugins.hra.config import HRAConfig
from tests.method_helpers import (adapter_modules, autograd_node_names, merge_cycle_keeps_outputs, output_of,
                                  peft_file_loads_alike, peftkit_file_loads_alike, quantized_matches_twin, randomize)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs
from tests.tiny_vision import BLOCK_CONVS, image_logits, logits_through_deltas, SHORTCUT, tiny_resnet

# The conformance suite runs hra[r=4] on llama, bert and t5 (gpt2's Conv1D layers are refused): test_conformance.py.

OPTIONS = [dict(), dict(apply_GS=True), dict(r=3, init_weights=False), dict(r=4, apply_GS=True, init_weights=False)]
OPTION_IDS = ["default", "gs_at_init", "odd_random", "gs_random"]


def _peft_hra(arch: str, seed: int = 3, **options):
    """A PEFT HRA model on tiny ``arch``, its vectors drawn after ``torch.manual_seed(seed)``, in eval mode."""
    from peft import get_peft_model, HRAConfig as PeftHRAConfig

    torch.manual_seed(seed)
    return get_peft_model(build_tiny(arch), PeftHRAConfig(**options)).eval()


def _ours(arch: str, seed: int = 3, **options) -> peftkit.AdaptedModel:
    torch.manual_seed(seed)
    return peftkit.adapt(build_tiny(arch), HRAConfig(**options)).eval()


def _peft_vectors(peft_model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model.").replace(".hra_u.default", ""): param
            for name, param in peft_model.named_parameters() if ".hra_u." in name}


def test_the_built_in_plugin_registers_hra_without_importing_torch():
    code = ("import sys, peftkit; method = peftkit.get_method('hra'); "
            "assert (method.distribution, method.peft_type, method.can_merge) == ('peftkit', 'HRA', True); "
            "assert 'torch' not in sys.modules, 'loading the hra plugin imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert peftkit.HRAConfig is HRAConfig


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_same_init_draws_and_outputs_as_peft(options):
    """The same seed gives PEFT's vectors bit for bit (symmetric pairs for an even r, random for an odd r or
    init_weights=false) and PEFT's outputs, also with Gram-Schmidt at the symmetric init, where PEFT does not
    start at the base: the second of each equal pair is orthonormalized from rounding noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn about the odd r
        theirs, ours = _peft_hra("llama", **options), _ours("llama", **options)
    expected = _peft_vectors(theirs)
    got = {site: module.hra_u for site, module in adapter_modules(ours).items()}
    assert sorted(got) == sorted(expected) and got
    assert all(torch.equal(got[site], expected[site]) for site in expected)
    torch.testing.assert_close(output_of(ours, "llama"), output_of(theirs, "llama"), atol=1e-6, rtol=0)


def test_the_symmetric_init_starts_at_the_base_and_gram_schmidt_does_not():
    base = output_of(build_tiny("llama"), "llama")
    assert torch.allclose(output_of(_ours("llama"), "llama"), base, atol=1e-5)
    assert not torch.allclose(output_of(_ours("llama", apply_GS=True), "llama"), base, atol=1e-2)


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
@pytest.mark.parametrize("options", [dict(init_weights=False), dict(init_weights=False, apply_GS=True, r=6)],
                         ids=["chain", "gram_schmidt"])
def test_peft_folder_loads_with_peft_outputs_and_saves_back_the_same_keys(tmp_path, arch, options):
    from peft import PeftModel

    wide = {"target_modules": "all-linear"} if arch == "bert" else {}  # q and v alone barely move BERT's logits
    theirs = _peft_hra(arch, **options, **wide)
    ours = peft_file_loads_alike(theirs, arch, tmp_path / "peft")  # unmerged, merged both sides, unmerged again
    assert ours.adapter_record("default").method.name == "hra"
    ours.save_adapter(str(tmp_path / "ours"))
    saved, original = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    assert all(key.endswith(".hra_u") for key in saved)
    fields = ("peft_type", "r", "apply_GS", "init_weights", "bias", "layers_pattern", "layers_to_transform")
    ours_json, peft_json = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert {f: ours_json[f] for f in fields} == {f: peft_json[f] for f in fields}
    assert sorted(ours_json["target_modules"]) == sorted(peft_json["target_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the extra "peftkit" key
        again = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, arch), output_of(ours, arch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peftkit_folder_loads_in_peft_with_the_same_outputs(tmp_path, arch):
    model = peftkit.adapt(build_tiny(arch), "hra[r=4,init_weights=false,target_modules=all-linear]")
    peft_model = peftkit_file_loads_alike(model, arch, tmp_path)
    assert sorted(_peft_vectors(peft_model)) == sorted(adapter_modules(model))


def _gradients(model, arch: str, prefix: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    output_tensor(model(**sample_inputs(arch))).square().mean().backward()
    return {name.removeprefix(prefix).replace(".hra_u.default", "").replace(".adapters.default.hra_u", ""):
            param.grad.clone()
            for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("options", [dict(), dict(init_weights=False, apply_GS=True)], ids=["chain", "gram_schmidt"])
def test_gradients_equal_peft(tmp_path, arch, options):
    theirs = _peft_hra(arch, **options)
    with torch.no_grad():  # move the pairs apart, so that the gradients are not those of the identity alone
        for param in _peft_vectors(theirs).values():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path), is_trainable=True).eval()
    expected, got = _gradients(theirs, arch, "base_model.model."), _gradients(ours, arch, "base_model.")
    assert sorted(got) == sorted(expected) and got
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("apply_gs", [False, True], ids=["chain", "gram_schmidt"])
def test_a_training_forward_over_many_tokens_runs_the_fused_node_and_equals_the_reflected_input(apply_gs):
    """From FUSED_FROM_TOKENS tokens a training forward on a plain Linear is the fused LoRA node with A = U^T and
    B = -W U T: output and the gradients of the input and the vectors equal the base layer on the reflected
    input's, in float64."""
    from peftkit.plugins.hra.layer import FUSED_FROM_TOKENS, HraLayer

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12).double().requires_grad_(False)
    layer = HraLayer(base, r=4, apply_GS=apply_gs, init_weights=False).double()
    x = torch.randn(2, FUSED_FROM_TOKENS // 2, 16, dtype=torch.float64, requires_grad=True)
    fused = layer.forward_alone(x, base)
    expected = base(layer.base_input(x))
    torch.testing.assert_close(fused, expected)
    assert any("LoraFn" in name for name in autograd_node_names(fused))
    seed = torch.randn(fused.shape, dtype=torch.float64)
    leaves = (x, layer.hra_u)
    for got, want in zip(torch.autograd.grad(fused, leaves, seed), torch.autograd.grad(expected, leaves, seed)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # inference, and few tokens: the base layer on the reflected input
        assert layer.forward_alone(x, base) is None
    assert layer.forward_alone(x[:, :2], base) is None


@pytest.mark.parametrize("spec", ["hra[r=4]", "hra[r=2,apply_GS=true,target_modules=all-linear]"])
def test_merge_cycle_keeps_outputs_and_unmerge_restores_the_weights(spec):
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, std=0.3)
    weights = {name: layer.base_layer.weight.detach().clone() for name, layer in model.tuner_layers()}
    merge_cycle_keeps_outputs(model, "llama")  # ends with merge_and_unload
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, std=0.3)
    model.merge_adapter()
    model.unmerge_adapter()
    for name, layer in model.tuner_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)


def test_a_layer_change_inside_a_composition_equals_the_layer_alone():
    """Inside a stack with an inactive-at-this-site partner the change runs as ``W (H - I) x``: the same output."""
    model = peftkit.adapt(build_tiny("llama"), "hra[r=4,init_weights=false]", adapter_name="a")
    alone = output_of(model.eval(), "llama")
    model.add_adapter("b", "lora[target_modules=[o_proj]]")
    model.set_active(peftkit.Stack("a", "b"))  # b's B starts at zero: it adds nothing
    torch.testing.assert_close(output_of(model, "llama"), alone, atol=1e-5, rtol=0)


def test_merging_after_another_adapter_is_refused_naming_hra_and_two_hra_adapters_cannot_both_merge():
    """The refusal said only "DoRA's row norms" and advised merging the other adapter first, which fails the same
    way when both read the weight (two HRA adapters: W H_a H_b is not the stack's W H_a + W H_b - W)."""
    model = peftkit.adapt(build_tiny("llama"), "hra[r=4,init_weights=false]", adapter_name="a")
    model.add_adapter("b", "hra[r=4,init_weights=false]")
    with pytest.raises(peftkit.MergeError, match=r"'b' cannot be merged after 'a'.*HRA.*unless 'a' reads the weight "
                                                 r"too \(then only one of the two can be merged\)"):
        model.merge_adapter(["a", "b"])
    model.add_adapter("l", "lora[r=4]")
    model.merge_adapter(["b", "l"])  # the HRA adapter first: then the LoRA adds onto W H_b, as stack(b, l) computes


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    quantized_matches_twin(bits, "hra[r=4,init_weights=false,target_modules=['0']]")


# -- Conv2d ----------------------------------------------------------------------------------------------------------


def test_conv2d_peft_folder_gives_peft_logits_unmerged_and_merged(tmp_path):
    from peft import get_peft_model, HRAConfig as PeftHRAConfig, PeftModel

    targets = BLOCK_CONVS + SHORTCUT
    torch.manual_seed(0)
    theirs = get_peft_model(tiny_resnet(), PeftHRAConfig(r=4, init_weights=False, target_modules=targets)).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(tiny_resnet(), str(tmp_path / "peft")).eval()
    unmerged = image_logits(ours)
    assert not torch.allclose(unmerged, image_logits(tiny_resnet()), atol=1e-4)
    torch.testing.assert_close(unmerged, image_logits(theirs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_through_deltas(ours), unmerged, atol=1e-5, rtol=1e-5)
    theirs.merge_adapter()
    ours.merge_adapter()
    torch.testing.assert_close(image_logits(ours), image_logits(theirs), atol=1e-5, rtol=1e-5)
    ours.unmerge_adapter()
    ours.save_adapter(str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(tiny_resnet(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(image_logits(again), unmerged, atol=1e-5, rtol=1e-5)


def test_conv2d_starts_at_the_base_and_unsupported_convolutions_are_refused():
    model = peftkit.adapt(tiny_resnet(), HRAConfig(r=4, target_modules=BLOCK_CONVS + SHORTCUT))
    torch.testing.assert_close(image_logits(model), image_logits(tiny_resnet()), atol=1e-5, rtol=0)
    for conv, what in ((torch.nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                       (torch.nn.Conv2d(4, 4, (1, 3)), r"kernel_size=\(1, 3\)"),
                       (torch.nn.Conv2d(4, 4, 3, dilation=2), r"dilation=\(2, 2\)"),
                       (torch.nn.Conv2d(4, 4, 3, stride=(1, 2)), r"stride=\(1, 2\)"),
                       (torch.nn.Conv2d(4, 4, 3, padding="same"), "padding='same'"),
                       (torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'")):
        with pytest.raises(ConfigError, match=f"hra: '0' is a Conv2d with .*{what}.*exclude_modules"):
            peftkit.adapt(torch.nn.Sequential(conv), HRAConfig(r=2, target_modules=["0"]))


# -- what is refused -------------------------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_are_refused_by_name_as_peft_refuses_them():
    with pytest.raises(ConfigError, match=r"hra: target 'transformer\.h\.0\.attn\.c_attn' is a Conv1D; HRA adapts "
                                          r"torch's Linear and Conv2d layers, as PEFT's HRA, not GPT-2's Conv1D"):
        peftkit.adapt(build_tiny("gpt2"), "hra")
    with pytest.raises(ConfigError, match="hra: target_modules='all-linear' matched no layer HRA adapts"):
        peftkit.adapt(build_tiny("gpt2"), "hra[target_modules=all-linear]")


@pytest.mark.parametrize("field, value", [("bias", "all"), ("bias", "hra_only"), ("layers_pattern", "layers")])
def test_peft_options_peftkit_lacks_are_refused_by_name(tmp_path, field, value):
    _peft_hra("llama", init_weights=False).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update({field: value, "layers_to_transform": [0]})
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterLoadError, match=f"PEFT setting {field}={value!r} is not supported by peftkit's hra"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


def test_a_rank_below_one_is_refused_and_an_odd_rank_warns_as_in_peft():
    with pytest.raises(ConfigError, match=r"hra config: r=0 must be a positive integer \(an even one"):
        peftkit.adapt(build_tiny("llama"), "hra[r=0]")
    with pytest.warns(UserWarning, match=r"hra: r=3 is odd, .* use an even r \(e.g. r=4\)"):
        model = peftkit.adapt(build_tiny("llama"), "hra[r=3]")
    assert not torch.allclose(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), atol=1e-3)
