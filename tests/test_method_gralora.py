"""GraLoRA (PEFT's GRALORA) on tiny Llama, GPT-2 (Conv1D) and BERT: the same draws, outputs, gradients, dropout masks
and files as the real ``peft``, the block layout against a float64 formula, merging, half precision, quantized
layers, the memory kept for backward, and the settings peftkit refuses by name.

The conformance suite runs gralora[r=4,hybrid_r=2,alpha=8] on llama, gpt2, bert and t5: tests/test_conformance.py
(BUILTIN_SPECS).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterError, AdapterLoadError, ConfigError
from peftkit.plugins.gralora.config import GraloraConfig
from peftkit.plugins.gralora.layer import GraloraLayer
from tests.method_helpers import (adapted_after_seed, adapter_modules, frozen_layer, loaded_in_peft,
                                  merge_cycle_keeps_outputs, new_tensors, output_of, peft_file_loads_alike,
                                  peft_model_after_seed)
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

#: PEFT GraloraConfig options per case, and the same as a peftkit spec (BERT's classifier head is saved as
#: modules_to_save: peftkit reads the task from the model's class).
CASES = [
    ("llama", dict(r=4, hybrid_r=2, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
     "gralora[r=4,hybrid_r=2,alpha=6,target_modules=[q_proj,v_proj,down_proj],init_weights=false]"),
    ("gpt2", dict(r=4, gralora_k=4, alpha=4, init_weights=False),
     "gralora[r=4,gralora_k=4,alpha=4,init_weights=false]"),
    ("bert", dict(r=6, gralora_k=2, hybrid_r=1, alpha=16, init_weights=False, task_type="SEQ_CLS"),
     "gralora[r=6,hybrid_r=1,alpha=16,init_weights=false,modules_to_save=[classifier]]"),
]
#: PEFT's parameter names (less the adapter name) -> our file keys.
PEFT_NAMES = {"gralora_A": "gralora_A", "gralora_B": "gralora_B", "gralora_A_general.weight":
              "gralora_A_general.weight", "gralora_B_general.weight": "gralora_B_general.weight"}


def _peft_model(arch: str, seed: int = 0, model: torch.nn.Module | None = None, **options: object
                ) -> torch.nn.Module:
    """A PEFT GraLoRA model (drawn after ``torch.manual_seed(seed)``), in eval mode."""
    return peft_model_after_seed(build_tiny(arch) if model is None else model, peft.GraloraConfig(**options), seed)


def _ours(arch: str, spec: str, seed: int = 0, model: torch.nn.Module | None = None) -> peftkit.AdaptedModel:
    return adapted_after_seed(build_tiny(arch) if model is None else model, spec, seed)


def _peft_tensors(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """site -> PEFT's GraLoRA parameters there, by our file key."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in model.named_parameters():
        if ".gralora_" not in name:
            continue
        site, rest = name.removeprefix("base_model.model.").split(".gralora_")
        key = "gralora_" + rest.replace(".default", "")
        out.setdefault(site, {})[PEFT_NAMES[key]] = tensor
    return out


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 120, (2, length), generator=torch.Generator().manual_seed(seed))


def _formula(layer: GraloraLayer, x: torch.Tensor) -> torch.Tensor:
    """The update by the paper's blocks, one (j, n) pair at a time: output block j gets, from input block n,
    x_n A_n[:, chunk j] B_j[chunk n, :], plus the hybrid LoRA, all times alpha / (r + hybrid_r)."""
    k, s = layer.gralora_k, layer.r // layer.gralora_k
    i = layer.in_features // k
    a, b = layer.gralora_A, layer.gralora_B
    blocks = [sum(x[..., n * i:(n + 1) * i] @ a[n][:, j * s:(j + 1) * s] @ b[j][n * s:(n + 1) * s] for n in range(k))
              for j in range(k)]
    update = torch.cat(blocks, dim=-1)
    if layer.gralora_A_general is not None:
        update = update + x @ layer.gralora_A_general.t() @ layer.gralora_B_general.t()
    return update * layer.scale


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options, spec):
    peft_file_loads_alike(_peft_model(arch, **options), arch, tmp_path)


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, options, spec):
    _peft_model(arch, **options).save_pretrained(str(tmp_path / "peft"))
    ours = _ours(arch, spec, seed=1)
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "hybrid_r", "alpha", "gralora_dropout", "gralora_k", "init_weights", "bias",
                "fan_in_fan_out", "layers_pattern", "layers_to_transform"):
        assert our_config[key] == peft_config[key] and type(our_config[key]) is type(peft_config[key]), key
    assert sorted(our_config["target_modules"]) == sorted(peft_config["target_modules"])
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys
    assert any(k.endswith(".gralora_A_general.weight") for k in our_keys) == (options.get("hybrid_r", 0) > 0)
    peft_model = loaded_in_peft(str(tmp_path / "ours"), build_tiny(arch))
    torch.testing.assert_close(output_of(peft_model, arch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("arch,options,spec", CASES[:2])
def test_the_draws_are_pefts(arch, options, spec, init):
    """A per block as (r, in/k), then B unless zero; hybrid: two nn.Linear inits PEFT overwrites, then A_h, B_h."""
    theirs = _peft_tensors(_peft_model(arch, seed=3, **{**options, "init_weights": init}))
    ours = adapter_modules(_ours(arch, spec.replace("init_weights=false", f"init_weights={str(init).lower()}"),
                                 seed=3))
    assert set(ours) == set(theirs) and ours
    for site, layer in ours.items():
        assert set(layer.tensors()) == set(theirs[site])
        for key, tensor in layer.tensors().items():
            assert tensor.shape == theirs[site][key].shape and torch.equal(tensor, theirs[site][key]), (site, key)
        assert bool(layer.gralora_B.any()) == (not init)


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_gradients_after_a_backward_equal_pefts(arch, options, spec):
    theirs, ours = _peft_model(arch, **options), _ours(arch, spec)
    peft_tensors = _peft_tensors(theirs)
    ids = _ids(7, seed=2)
    for model in (theirs, ours):  # eval mode: the models' own dropout off
        output = model(input_ids=ids).logits
        output.pow(2).mean().backward()
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            assert tensor.grad is not None and tensor.grad.abs().max() > 0, (site, key)
            torch.testing.assert_close(tensor.grad, peft_tensors[site][key].grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)


def test_dropout_draws_pefts_two_masks_in_training():
    """PEFT drops the block update's input and, with hybrid_r, the LoRA part's input with a second mask (two
    nn.Dropout calls, torch's global generator): with the same seed peftkit draws the same masks."""
    options, spec = CASES[0][1], CASES[0][2]
    theirs = _peft_model("llama", **{**options, "gralora_dropout": 0.3}).train()
    ours = _ours("llama", spec.replace("]", ",gralora_dropout=0.3]")).train()
    ids = _ids(6)
    torch.manual_seed(11)
    expected = theirs(input_ids=ids).logits
    torch.manual_seed(11)
    got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (got - ours.eval()(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("k,hybrid_r", [(1, 0), (2, 3), (4, 0)])
def test_every_path_equals_the_block_formula_with_its_gradients(conv1d, k, hybrid_r):
    """forward_alone (the base output accumulated into), forward (a copy of h) and delta (a new update) equal the
    block-by-block formula in float64, outputs and gradients (x, A, B, A_h, B_h); merging adds that formula's
    weight."""
    base = frozen_layer(16, 24, conv1d=conv1d)
    torch.manual_seed(1)
    layer = GraloraLayer(base, r=4, gralora_k=k, hybrid_r=hybrid_r, alpha=5, init_weights=False).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    params = (x, *layer.tensors().values())
    seed = torch.randn(3, 5, 24, dtype=torch.float64)
    paths = {"alone": lambda: layer.forward_alone(x, base), "forward": lambda: layer(x, base(x), base),
             "delta": lambda: base(x) + layer.delta(x, base(x), base)}
    for path, run in paths.items():
        got, expected = run(), base(x) + _formula(layer, x)
        torch.testing.assert_close(got, expected, msg=path)
        for g, want in zip(torch.autograd.grad(got, params, seed), torch.autograd.grad(expected, params, seed)):
            torch.testing.assert_close(g, want)
    eye = torch.eye(16, dtype=torch.float64)
    change = _formula(layer, eye).t().detach()  # (out, in)
    torch.testing.assert_close(layer.delta_weight(base), change.t() if conv1d else change)


def test_the_fused_forward_makes_no_update_tensor():
    """Alone at a plain layer the update's products accumulate into the base output: besides it, only the
    (k, tokens, r) intermediates are new (PEFT also makes the (tokens, out) update and its scaled copy)."""
    base = frozen_layer(32, 48, dtype=torch.float32)
    layer = GraloraLayer(base, r=8, gralora_k=2, init_weights=False)
    x = torch.randn(40, 32)
    with torch.no_grad():
        made = new_tensors(lambda: layer.forward_alone(x, base))
    assert sum(shape == (40, 48) for _, shape in made) == 1, made
    assert all(math.prod(shape) == 2 * 40 * 8 for _, shape in made if shape != (40, 48)), made


def test_training_alone_runs_one_node_with_the_formulas_gradients():
    """In training, without a hybrid part or an active dropout, the layer is one autograd node (fused.py) whose
    gradients equal the block formula's in float64, input gradient included; its backward makes no copy of the
    (tokens, out) output gradient (the autograd graph of the in-place path did)."""
    base = frozen_layer(16, 24)
    torch.manual_seed(1)
    layer = GraloraLayer(base, r=4, gralora_k=2, alpha=5, init_weights=False).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    got = layer.forward_alone(x, base)
    assert type(got.grad_fn).__name__ == "ViewBackward0"
    assert type(got.grad_fn.next_functions[0][0]).__name__ == "GraloraFnBackward"
    expected = base(x) + _formula(layer, x)
    torch.testing.assert_close(got, expected)
    params, seed = (x, *layer.tensors().values()), torch.randn(3, 5, 24, dtype=torch.float64)
    for g, want in zip(torch.autograd.grad(got, params, seed), torch.autograd.grad(expected, params, seed)):
        torch.testing.assert_close(g, want)
    made = new_tensors(lambda: torch.autograd.grad(layer.forward_alone(x, base), params, seed))
    assert sum(shape == (15, 24) for _, shape in made) == 1, made  # the forward's output, not a gradient copy


def test_the_memory_kept_for_backward_is_not_above_pefts():
    """Bytes of the tensors autograd keeps for backward in one adapted layer's forward (the input and the layer's
    own parameters left out): the permuted intermediate, at most what PEFT keeps."""
    base = torch.nn.Linear(64, 96).requires_grad_(False)
    ours = peftkit.adapt(torch.nn.Sequential(base), "gralora[r=8,hybrid_r=4,target_modules=['0']]")
    theirs = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 96).requires_grad_(False)),
                                 peft.GraloraConfig(r=8, hybrid_r=4, target_modules=["0"]))
    x = torch.randn(4, 50, 64, requires_grad=True)

    def kept(model: torch.nn.Module) -> int:
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in skip:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    ours_bytes, peft_bytes = kept(ours), kept(theirs)
    assert 0 < ours_bytes <= peft_bytes, (ours_bytes, peft_bytes)


@pytest.mark.parametrize("arch,spec", [
    ("llama", "gralora[r=4,hybrid_r=2,init_weights=false,target_modules=all-linear]"),
    ("gpt2", "gralora[r=4,gralora_k=4,init_weights=false]"),
])
def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs(arch, spec):
    merge_cycle_keeps_outputs(_ours(arch, spec), arch)


def test_a_bfloat16_model_runs_trains_and_matches_peft():
    """The factors are float32 beside bfloat16 weights; the update is computed in float32 and added in bfloat16,
    as PEFT adds it. PEFT rounds its drawn factors through bfloat16 (it casts them to the layer's dtype and back);
    peftkit keeps the float32 draws, so the comparison copies PEFT's."""
    options, spec = CASES[0][1], CASES[0][2]
    theirs = _peft_model("llama", model=build_tiny("llama").to(torch.bfloat16), **options)
    ours = _ours("llama", spec, model=build_tiny("llama").to(torch.bfloat16))
    peft_tensors = _peft_tensors(theirs)
    with torch.no_grad():
        for site, layer in adapter_modules(ours).items():
            for key, tensor in layer.tensors().items():
                assert tensor.dtype == peft_tensors[site][key].dtype == torch.float32, (site, key)
                tensor.copy_(peft_tensors[site][key])
    ids = _ids(20)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert expected.dtype == torch.bfloat16
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-2)
    ours.train()
    ours(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = [layer.gralora_A.grad for layer in adapter_modules(ours).values()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_a_quantized_layer_runs_unmerged_as_its_float_twin():
    """PEFT's GraLoRA wraps bitsandbytes layers (Linear subclasses) and adds its update to their output: peftkit
    gives the twin's output alone and stacked, and refuses to merge into the packed weight."""
    pytest.importorskip("bitsandbytes")
    from tests.method_helpers import quantized_matches_twin

    quantized_matches_twin(4, "gralora[r=4,hybrid_r=2,init_weights=false,target_modules=['0']]")


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("llama"), peft.GraloraConfig(r=4, hybrid_r=2, alpha=12))
    config = model.adapter_record("default").config
    assert isinstance(config, GraloraConfig)
    assert (config.r, config.hybrid_r, config.alpha, config.gralora_k) == (4, 2, 12, 2)
    assert config.target_modules == ["q_proj", "v_proj"]  # PEFT's (LoRA's) default targets
    assert {layer.scale for layer in adapter_modules(model).values()} == {2.0}
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


def test_prepare_for_hotswap_says_gralora_has_no_rank_to_pad():
    model = _ours("llama", "gralora[r=2]")
    with pytest.raises(AdapterError, match=r"'default' \(gralora\) has no rank to pad"):
        model.prepare_for_hotswap(8, "default")


@pytest.mark.parametrize("setting", [{"bias": "all"}, {"bias": "gralora_only"},
                                     {"layers_pattern": "layers", "layers_to_transform": [0]}])
def test_pefts_options_peftkit_lacks_are_refused_by_name_in_a_folder_and_a_config_object(tmp_path, setting):
    """bias other than "none" trains the base biases too; layers_pattern names the layer list, which peftkit finds
    from the model family."""
    field, value = next(iter(setting.items()))
    config = peft.GraloraConfig(r=2, target_modules=["q_proj"], **setting)
    message = rf"PEFT setting {field}='{value}' is not supported by peftkit's gralora"
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), config)
    peft.get_peft_model(build_tiny("llama"), config).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError, match=message):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec,message", [
    ("gralora[r=0]", r"r=0 must be a positive integer"),
    ("gralora[gralora_k=0]", r"gralora_k=0 must be a positive integer"),
    ("gralora[hybrid_r=-1]", r"hybrid_r=-1 must be an integer of at least 0"),
    ("gralora[r=6,gralora_k=4]", r"r=6 is not a multiple of gralora_k=4 .*\(e\.g\. r=8\) or a gralora_k dividing r=6"),
    ("gralora[gralora_dropout=1.0]", r"gralora_dropout=1.0 must be at least 0 and below 1"),
    ("gralora[exclude_modules=[k_proj],target_modules=all-linear]",
     r"exclude_modules=\['k_proj'\] is not supported \(PEFT's GraloraConfig has no such field"),
    ("gralora[target_modules='.*q_proj',layers_to_transform=[0]]",
     r"layers_to_transform=\[0\] cannot be used with target_modules given as one string.*PEFT ignores"),
    ("gralora[r=6,gralora_k=3,target_modules=[q_proj]]",
     r"gralora_k=3 does not divide 'model.layers.0.self_attn.q_proj''s in_features=32 .*here 1, 2\), or leave"),
    ("gralora[target_modules=[embed_tokens]]", r"'model.embed_tokens' is an Embedding; GraLoRA adapts torch's Linear"),
])
def test_bad_settings_are_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_pefts_own_refusals_are_the_same():
    with pytest.raises(ValueError, match="r should be divisible by gralora_k"):
        peft.GraloraConfig(r=6, gralora_k=4)
    with pytest.raises(ValueError, match="in_features should be divisible by gralora_k"):
        _peft_model("llama", r=6, gralora_k=3, target_modules=["q_proj"])


def test_pefts_gralora_ignores_layer_indices_with_a_string_target_so_peftkit_refuses_them():
    """PEFT's GraLoRA adapts every matching layer when target_modules is one string ("all-linear" too), whatever
    layers_to_transform says: peftkit refuses the pair rather than save a folder PEFT reads otherwise."""
    theirs = _peft_model("llama", r=2, target_modules="all-linear", layers_to_transform=[1])
    assert any(".layers.0." in site for site in _peft_tensors(theirs))
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[1\] cannot be used with target_modules given as "
                                          r"one string \('all-linear'\).*give target_modules as a list"):
        peftkit.adapt(build_tiny("llama"), "gralora[target_modules=all-linear,layers_to_transform=[1]]")
    ours = _ours("llama", "gralora[r=2,target_modules=[q_proj],layers_to_transform=[1]]")
    assert list(adapter_modules(ours)) == ["model.layers.1.self_attn.q_proj"]
