"""RoAd (PEFT's ROAD) on tiny Llama and BERT: the same draws, outputs, gradients, merges and files as the real
``peft`` for its three variants, per-row routing as PEFT's mixed batches, the rotation's own node, quantized
layers, and the settings peftkit refuses by name.

The conformance suite runs road[group_size=16] on llama, bert and t5 (gpt2's Conv1D layers are refused, as by
PEFT): tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError, MergeError
from peftkit.plugins.road.layer import _Rotation, RoadLayer, rotate
from tests.method_helpers import (adapted_after_seed, adapter_modules, loaded_in_peft, merge_cycle_keeps_outputs,
                                  output_of, peft_model_after_seed, quantized_matches_twin)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

peft = pytest.importorskip("peft")

VARIANTS = ["road_1", "road_2", "road_4"]
#: Per architecture: PEFT RoadConfig options and the same in a peftkit spec (Llama: LoRA's default targets; BERT:
#: layers with a bias, and the classifier saved).
CASES = {
    "llama": (dict(group_size=8), "group_size=8"),
    "bert": (dict(group_size=16, target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"],
                  task_type="SEQ_CLS"),
             "group_size=16,target_modules=[query,value,output.dense],modules_to_save=[classifier]"),
}


def _base(arch: str) -> torch.nn.Module:
    """Tiny ``arch``; BERT's classifier scaled up, so that its logits (about 0.01 at init) show the adapters'
    changes well above the tolerances."""
    model = build_tiny(arch)
    if arch == "bert":
        with torch.no_grad():
            model.classifier.weight.mul_(100)
    return model


def _peft_model(arch: str, variant: str, seed: int = 0, init_weights: bool = False) -> torch.nn.Module:
    config = peft.RoadConfig(variant=variant, init_weights=init_weights, **CASES[arch][0])
    return peft_model_after_seed(_base(arch), config, seed)


def _ours(arch: str, variant: str, seed: int = 0, init_weights: bool = False) -> peftkit.AdaptedModel:
    spec = f"road[variant={variant},init_weights={str(init_weights).lower()},{CASES[arch][1]}]"
    return adapted_after_seed(_base(arch), spec, seed)


def _peft_from(folder: str, arch: str) -> torch.nn.Module:
    return loaded_in_peft(folder, _base(arch))


def _peft_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT's RoAd parameters keyed as peftkit's adapter_modules sites and tensors() names."""
    return {name.removeprefix("base_model.model.").replace(".default", ""): p
            for name, p in model.named_parameters() if ".road_" in name}


def _our_tensors(model: peftkit.AdaptedModel) -> dict[str, torch.Tensor]:
    return {f"{site}.{key}": tensor for site, layer in adapter_modules(model).items()
            for key, tensor in layer.tensors().items()}


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_vectors_are_drawn_as_pefts(variant, init_weights):
    theirs = _peft_tensors(_peft_model("llama", variant, seed=3, init_weights=init_weights))
    ours = _our_tensors(_ours("llama", variant, seed=3, init_weights=init_weights))
    assert set(ours) == set(theirs) and theirs
    for key, tensor in ours.items():
        assert tensor.shape == theirs[key].shape and torch.equal(tensor, theirs[key]), key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, variant):
    theirs = _peft_model(arch, variant)
    assert (output_of(theirs, arch) - output_of(_base(arch), arch)).abs().max() > 1e-2
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(_base(arch), str(tmp_path))
    states = ("unmerged", "merged", "unmerged again")
    for state, got, expected in zip(states, _through_a_merge_cycle(ours, arch), _through_a_merge_cycle(theirs, arch)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=lambda text, state=state: f"{state}: {text}")


def _through_a_merge_cycle(model: torch.nn.Module, arch: str) -> list[torch.Tensor]:
    """The outputs of a peftkit or PEFT model unmerged, merged (merge_adapter), and unmerged again."""
    outputs = [output_of(model, arch)]
    for change in (model.merge_adapter, model.unmerge_adapter):
        change()
        outputs.append(output_of(model, arch))
    return outputs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, variant):
    _peft_model(arch, variant).save_pretrained(str(tmp_path / "peft"))
    ours = _ours(arch, variant, seed=1)
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "variant", "group_size", "init_weights"):
        assert our_config[key] == peft_config[key], key
    assert set(our_config["modules_to_save"] or []) <= set(peft_config["modules_to_save"] or [])  # PEFT adds "score"
    assert sorted(our_config["target_modules"]) == sorted(peft_config["target_modules"])
    assert not {"exclude_modules", "layers_to_transform", "bias", "layers_pattern"} & set(our_config)  # not PEFT's
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys and any(k.endswith(".road_theta") for k in our_keys)
    torch.testing.assert_close(output_of(_peft_from(str(tmp_path / "ours"), arch), arch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradients_after_a_backward_equal_pefts(arch, variant):
    theirs, ours = _peft_model(arch, variant), _ours(arch, variant)
    inputs = sample_inputs(arch)
    output_tensor(theirs(**inputs)).pow(2).mean().backward()
    output_tensor(ours(**inputs)).pow(2).mean().backward()
    their_tensors, our_tensors = _peft_tensors(theirs), _our_tensors(ours)
    assert set(our_tensors) == set(their_tensors)
    for key, tensor in our_tensors.items():
        assert tensor.grad is not None and tensor.grad.abs().max() > 0, key
        torch.testing.assert_close(tensor.grad, their_tensors[key].grad, rtol=1e-5, atol=1e-7, msg=key)


def test_the_rotation_node_gives_the_true_gradients():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Rotation.apply, (h, f, c))
    dense = torch.zeros(16, 16, dtype=torch.float64)  # R as a matrix: y_a = f_a h_a + c_a h_b
    for group in range(2):
        for k in range(4):
            a, b = group * 8 + k, group * 8 + 4 + k
            dense[a, a], dense[a, b] = f[group, 0, k], c[group, 0, k]
            dense[b, b], dense[b, a] = f[group, 1, k], c[group, 1, k]
    torch.testing.assert_close(rotate(h, f, c), h @ dense.T)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_rotates_the_base_output_in_place_with_the_same_numbers(variant):
    """Without gradients, alone at a plain Linear layer, forward_alone rotates the fresh base output in place: the
    same numbers as the training path (base output, then a new rotated tensor)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 32).requires_grad_(False)
    layer = RoadLayer(base, variant=variant, group_size=8, init_weights=False)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        alone = layer.forward_alone(x, base)
        assert alone is not None
        assert torch.equal(alone, layer(x, base(x), base))
    assert layer.forward_alone(x, base) is None  # gradients on: the autograd node
    assert torch.equal(layer(x, base(x), base), alone)


def test_each_row_of_a_mixed_batch_gets_its_adapter_as_in_pefts_mixed_batches(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build_tiny("llama"), peft.RoadConfig(group_size=8, init_weights=False),
                                 adapter_name="first")
    theirs.add_adapter("second", peft.RoadConfig(group_size=16, variant="road_4", init_weights=False,
                                            target_modules=["v_proj", "down_proj"]))
    theirs.eval().save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "first"), adapter_name="first")
    ours.load_adapter(str(tmp_path / "second"), "second")
    ours.eval()
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    rows = ["second", "__base__", "first"]
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=rows).logits
        got = ours(input_ids=ids, adapter_names=rows).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        alone = {name: ours.set_active(name) or ours(input_ids=ids).logits for name in ("first", "second")}
    for row, name in enumerate(rows):
        if name != "__base__":
            assert torch.equal(got[row], alone[name][row]), name


@pytest.mark.parametrize("arch", ["llama", "bert"])  # without and with biases (R rotates the bias too)
def test_merge_unmerge_and_merge_and_unload_keep_outputs(arch):
    merge_cycle_keeps_outputs(_ours(arch, "road_4"), arch)


def test_a_singular_rotation_merges_and_unmerges_back_to_the_layer():
    """A pair whose scale is 0 makes R singular: merging keeps the layer's tensors, so unmerging gives them back."""
    model = _ours("bert", "road_2")
    layer = adapter_modules(model)["bert.encoder.layer.0.attention.self.query"]
    with torch.no_grad():
        layer.road_alpha[:3] = 0
    base = model.base_model.get_submodule("bert.encoder.layer.0.attention.self.query").base_layer
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    model.merge_adapter()
    assert not torch.equal(base.weight, weight)
    model.unmerge_adapter()
    assert torch.equal(base.weight, weight) and torch.equal(base.bias, bias)


def test_a_weight_change_alone_is_refused_where_the_bias_is_rotated_too():
    model = _ours("bert", "road_1")
    layer, base = next(iter(adapter_modules(model).values())), None
    base = model.base_model.get_submodule(next(iter(adapter_modules(model)))).base_layer
    with pytest.raises(MergeError, match="rotates the layer's bias"):
        layer.delta_weight(base)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    quantized_matches_twin(bits, "road[variant=road_2,group_size=16,init_weights=false,target_modules=['0']]")


def test_bfloat16_and_autocast_give_pefts_outputs():
    inputs = sample_inputs("llama")
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        torch.manual_seed(1)
        theirs = peft.get_peft_model(build_tiny("llama").to(dtype), peft.RoadConfig(group_size=8, variant="road_2",
                                                                                    init_weights=False)).eval()
        torch.manual_seed(1)
        ours = peftkit.adapt(build_tiny("llama").to(dtype), "road[group_size=8,variant=road_2,init_weights=false]")
        assert all(p.dtype == torch.float32 for p in ours.adapter_parameters("default"))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected, got = output_tensor(theirs(**inputs)), output_tensor(ours.eval()(**inputs))
        assert got.dtype == expected.dtype
        # float32's rounding differs in the last bit (one multiply-add where PEFT rounds twice): a rare bfloat16 flip
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0 if autocast else 1e-2)


# -- refusals ------------------------------------------------------------------------------------------------------


def test_a_group_size_not_dividing_a_layer_is_refused_naming_the_layer_and_one_that_fits():
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide the output width of layer "
                                          r"'model.layers.0.self_attn.q_proj' \(out 32\) \(so do 3 more layers\).*"
                                          r"group_size=16 divides every adapted layer's output width"):
        peftkit.adapt(build_tiny("llama"), "road")
    assert peftkit.adapt(build_tiny("llama"), "road[group_size=16]")  # the advice works


@pytest.mark.parametrize("option,match", [
    ("group_size=6", None), ("group_size=7", "positive even integer"), ("group_size=0", "positive even integer"),
    ("variant=road_3", "variant='road_3'.*one of 'road_1', 'road_2', 'road_4'"),
    ("exclude_modules=[q_proj]", "exclude_modules=.*PEFT's RoadConfig has no exclude_modules field"),
    ("layers_to_transform=[0]", "layers_to_transform=.*PEFT's RoadConfig has no layers_to_transform field"),
])
def test_settings_peft_refuses_or_cannot_hold_are_refused_by_name(option, match):
    spec = f"road[{option},target_modules=[o_proj]]"
    if match is None:  # 6 is even but divides no tiny layer: the layer check, not the config check, refuses it
        with pytest.raises(ConfigError, match="group_size=6 does not divide"):
            peftkit.adapt(build_tiny("llama"), spec)
        return
    with pytest.raises(ConfigError, match=match):
        peftkit.adapt(build_tiny("llama"), spec)


def test_gpt2s_conv1d_layers_are_refused_as_by_peft():
    with pytest.raises(ConfigError, match="'transformer.h.0.attn.c_attn' is a Conv1D; RoAd adapts torch Linear"):
        peftkit.adapt(build_tiny("gpt2"), "road[group_size=16]")
    with pytest.raises(ConfigError, match="Conv1D"):
        peftkit.adapt(build_tiny("gpt2"), "road[group_size=16,target_modules=[c_attn]]")


def test_a_peft_folder_with_a_field_peftkit_cannot_honour_is_refused_by_name(tmp_path):
    _peft_model("llama", "road_1").save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "layers_pattern": "layers"}))
    with pytest.raises(AdapterLoadError, match="layers_pattern='layers' is not supported by peftkit's road"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
