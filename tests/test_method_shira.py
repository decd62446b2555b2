"""SHiRA (PEFT's SHIRA) on tiny Llama and BERT: the same random masks and initial values as the real ``peft`` for a
seed, the same outputs, gradients and files both ways (shira_weight and the int32 shira_indices), merging, a
folder whose mask came from PEFT's custom mask_fn, and the settings peftkit refuses by name.

The conformance suite runs shira[r=2] on llama, bert and t5 (gpt2's Conv1D layers are refused, as by PEFT):
tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError
from peftkit.plugins.shira.config import ShiraConfig
from peftkit.plugins.shira.layer import MaskPositions, ShiraLayer
from tests.method_helpers import (adapted_after_seed, adapter_modules, merge_cycle_keeps_outputs, output_of,
                                  peft_file_loads_alike, peft_model_after_seed, peftkit_file_loads_alike)
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

peft = pytest.importorskip("peft")

#: PEFT ShiraConfig options and the same adapter as a peftkit spec, per architecture.
CASES = [
    ("llama", dict(r=2, random_seed=7, target_modules=["q_proj", "v_proj", "down_proj"]),
     "shira[r=2,random_seed=7,target_modules=[q_proj,v_proj,down_proj]]"),
    ("bert", dict(r=3, task_type="SEQ_CLS"), "shira[r=3,modules_to_save=[classifier]]"),
]


def _peft_model(arch: str, seed: int = 0, **options: object) -> torch.nn.Module:
    """A PEFT SHiRA model with its values drawn at random after ``torch.manual_seed(seed)``, in eval mode."""
    return peft_model_after_seed(build_tiny(arch), peft.ShiraConfig(init_weights=False, **options), seed)


def _ours(arch: str, spec: str, seed: int = 0) -> peftkit.AdaptedModel:
    return adapted_after_seed(build_tiny(arch), spec.replace("shira[", "shira[init_weights=false,"), seed)


def _peft_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if isinstance(module, peft.tuners.shira.ShiraLayer)}


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_the_masks_and_initial_values_are_pefts_for_a_seed(arch, options, spec):
    theirs, ours = _peft_layers(_peft_model(arch, **options)), adapter_modules(_ours(arch, spec))
    assert sorted(theirs) == sorted(ours)
    for name, layer in ours.items():
        assert torch.equal(layer.shira_indices, theirs[name].shira_indices["default"])
        assert layer.shira_indices.dtype == torch.int32
        assert torch.equal(layer.shira_weight, theirs[name].shira_weight["default"])


def test_without_a_seed_the_mask_is_pefts_unseeded_one():
    theirs = _peft_layers(_peft_model("llama", r=2))
    ours = adapter_modules(_ours("llama", "shira[r=2]"))
    for name, layer in ours.items():
        assert torch.equal(layer.shira_indices, theirs[name].shira_indices["default"])


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options, spec):
    peft_file_loads_alike(_peft_model(arch, **options), arch, tmp_path)


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_our_folder_loads_in_peft_with_the_same_outputs_keys_and_fields(tmp_path, arch, options, spec):
    ours = _ours(arch, spec)
    peftkit_file_loads_alike(ours, arch, tmp_path / "ours")
    _peft_model(arch, **options).save_pretrained(str(tmp_path / "theirs"))
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs_file = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in ours_file.items()} == \
        {k: (v.dtype, v.shape) for k, v in theirs_file.items()}
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert ours_config["peft_type"] == "SHIRA"
    assert set(theirs_config) - {"auto_mapping", "peft_version", "revision"} <= set(ours_config)
    for key in ("r", "mask_type", "random_seed", "fan_in_fan_out", "init_weights"):
        assert ours_config[key] == theirs_config[key], key


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_gradients_after_one_backward_equal_pefts(arch, options, spec):
    theirs, ours = _peft_model(arch, **options), _ours(arch, spec)
    for model in (theirs, ours):
        output_tensor(model(**sample_inputs(arch))).pow(2).sum().backward()
    theirs_layers, ours_layers = _peft_layers(theirs), adapter_modules(ours)
    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.shira_weight.grad, theirs_layers[name].shira_weight["default"].grad,
                                   rtol=1e-5, atol=1e-6)


def _layer(dtype: torch.dtype = torch.float64) -> tuple[ShiraLayer, torch.nn.Linear]:
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, dtype=dtype).requires_grad_(False)
    return ShiraLayer(base, r=2, random_seed=3, init_weights=False).to(dtype), base


def _by_formula(layer: ShiraLayer, base: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows, cols = layer.shira_indices.long()
    change = torch.zeros(layer.out_features, layer.in_features, dtype=x.dtype).index_put(
        (rows, cols), layer.shira_weight, accumulate=True)
    return torch.nn.functional.linear(x, base.weight + change, base.bias)


@pytest.mark.parametrize("shuffled", [False, True])
def test_the_training_product_gives_the_formulas_output_and_gradients(shuffled):
    """The fused forward (sampled gradient at the mask) against autograd through W + dW, for PEFT's row-major
    mask and for a file's mask in another order."""
    layer, base = _layer()
    if shuffled:
        layer.shira_indices.copy_(layer.shira_indices[:, torch.randperm(layer.shira_indices.shape[1])])
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    fused = layer.forward_alone(x, base)
    assert fused is not None and fused.grad_fn is not None
    fused_grads = torch.autograd.grad(fused.pow(2).sum(), (x, layer.shira_weight))
    expected = _by_formula(layer, base, x)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (x, layer.shira_weight))
    torch.testing.assert_close(fused, expected)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda v, w: layer.forward_alone(v, base),
                                    (x[:1, :2].detach().requires_grad_(True), layer.shira_weight))


def test_the_sampled_product_of_other_dtypes_reads_the_dense_product():
    layer, _ = _layer(dtype=torch.bfloat16)
    positions = MaskPositions(layer.shira_indices, layer.out_features, layer.in_features)
    grad, x = torch.randn(7, 10, dtype=torch.bfloat16), torch.randn(7, 12, dtype=torch.bfloat16)
    rows, cols = layer.shira_indices.long()
    assert torch.equal(positions.sampled_product(grad, x), (grad.t() @ x)[rows, cols])


def test_merge_and_unmerge_keep_the_outputs():
    merge_cycle_keeps_outputs(_ours("llama", CASES[0][2]), "llama")


def test_a_folder_with_a_custom_peft_mask_loads_with_its_positions(tmp_path):
    """PEFT's mask_fn is a Python function; the folder holds its positions, and peftkit loads them whatever
    mask_type says (PEFT's own loading does the same)."""
    def first_positions(base_layer: torch.nn.Module, r: int, **kwargs: object) -> torch.Tensor:
        out_features, in_features = base_layer.weight.shape
        mask = torch.zeros(out_features * in_features, dtype=base_layer.weight.dtype)
        mask[:r * (in_features + out_features)] = 1
        return mask.view(out_features, in_features)

    config = peft.ShiraConfig(r=2, mask_type="first", init_weights=False)
    config.mask_fn = first_positions
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that mask_type 'first' is not its own
        theirs = peft.get_peft_model(build_tiny("llama"), config).eval()
    model = peft_file_loads_alike(theirs, "llama", tmp_path)
    layer = next(iter(adapter_modules(model).values()))
    assert layer.shira_indices[0].max() < 2 * 2  # the first positions: rows 0..3 of the 32-wide q_proj
    model.save_adapter(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["mask_type"] == "first"


def test_a_mask_peftkit_cannot_draw_is_refused_by_name_with_the_fix(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "shira[r=2,mask_type=first]")
    with pytest.raises(ConfigError, match=r"mask_type='first' names a mask peftkit cannot compute.*"
                                          r"mask_type='random'.*save_pretrained"):
        output_of(model, "llama")
    with pytest.raises(ConfigError, match="mask_type='first'"):
        model.save_adapter(str(tmp_path / "never"))
    assert not (tmp_path / "never" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"mask_fn=.* cannot be set.*mask_type='random'.*save_pretrained"):
        ShiraConfig(r=2).mask_fn = lambda base_layer, r: None


def test_indices_saved_as_float32_on_windows_load(tmp_path):
    """PEFT saves shira_indices as float32 on Windows and turns them back into integers when loading."""
    theirs = _peft_model("llama", **CASES[0][1])
    theirs.save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v.float() if k.endswith("shira_indices") else v for k, v in tensors.items()}, str(weights))
    model = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    torch.testing.assert_close(output_of(model, "llama"), output_of(theirs, "llama"), rtol=0, atol=1e-5)
    assert all(layer.shira_indices.dtype == torch.int32 for layer in adapter_modules(model).values())


@pytest.mark.parametrize("spec,message", [
    ("shira[r=2,exclude_modules=[v_proj]]", r"exclude_modules=\['v_proj'\] is not supported.*target_modules"),
    ("shira[r=2,layers_to_transform=[0]]", r"layers_to_transform=\[0\] is not supported.*target_modules"),
    ("shira[r=0]", r"r=0 must be a positive integer"),
    ("shira[r=20]", r"r=20 asks for .* more than its 1024 weights \(so do 3 more layers\); use r=10 or less"),
])
def test_settings_peft_refuses_or_cannot_express_are_refused_by_name(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_gpt2s_conv1d_layers_are_refused_as_by_peft():
    with pytest.raises(ConfigError, match="is a Conv1D; SHiRA adapts torch.s Linear layers"):
        peftkit.adapt(build_tiny("gpt2"), "shira[r=2]")


def test_a_peft_folder_with_an_option_peftkit_lacks_is_refused_by_name(tmp_path):
    _peft_model("llama", **CASES[0][1]).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "layers_pattern": "layers"}))
    with pytest.raises(AdapterLoadError, match="layers_pattern"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
