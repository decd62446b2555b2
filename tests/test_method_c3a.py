"""C3A (PEFT's C3A) on tiny Llama and BERT: the same kernel draws, outputs, gradients and files as the real
``peft``, merging, half precision, several adapters, and the settings peftkit refuses by name.

The conformance suite runs c3a[block_size=16] on llama, bert and t5 (gpt2's Conv1D layers are refused, as by
PEFT): tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.composition import Stack
from peftkit.core.errors import AdapterLoadError, ConfigError
from peftkit.plugins.c3a.config import C3AConfig
from peftkit.plugins.c3a.layer import block_circulant, FUSED_FROM_TOKENS, kernel_gradient, weight_plus_change
from tests.method_helpers import (adapted_after_seed, adapter_modules, loaded_in_peft, merge_cycle_keeps_outputs,
                                  output_of)
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")
from peft.tuners.c3a.utils import get_circulant_fast  # noqa: E402

#: PEFT C3AConfig options per case (Linear layers only: PEFT's C3A takes no other kind).
PEFT_CASES = [
    ("llama", dict(block_size=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("bert", dict(block_size=32, block_size_pattern={"value": 8}, init_weights="kaiming_uniform",
                  task_type="SEQ_CLS")),
]
#: The same in a peftkit spec (no task_type: peftkit reads the task from the model's class).
OUR_SPECS = {
    "llama": "c3a[block_size=16,target_modules=[q_proj,v_proj,down_proj]]",
    "bert": 'c3a[block_size=32,block_size_pattern={"value":8},init_weights=kaiming_uniform,'
            'modules_to_save=[classifier]]',
}


def _peft_model(arch: str, seed: int = 0, model: torch.nn.Module | None = None, **options: object
                ) -> torch.nn.Module:
    """A PEFT C3A model (kernels drawn after ``torch.manual_seed(seed)``), in eval mode; the head of a classifier
    moved off its init so that saving it matters."""
    model = build_tiny(arch) if model is None else model
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.C3AConfig(**options)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    return model


def _ours(arch: str, spec: str, seed: int = 0, model: torch.nn.Module | None = None) -> peftkit.AdaptedModel:
    return adapted_after_seed(build_tiny(arch) if model is None else model, spec, seed)


def _peft_from(folder: str, arch: str) -> torch.nn.Module:
    return loaded_in_peft(folder, build_tiny(arch))


def _peft_kernels(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name.removeprefix("base_model.model.").removesuffix(".c3a_kernel.default"): p
            for name, p in model.named_parameters() if "c3a_kernel" in name}


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options):
    theirs = _peft_model(arch, **options)
    assert (output_of(theirs, arch) - output_of(build_tiny(arch), arch)).abs().max() > 1e-2
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    for state, change in (("unmerged", "merge_adapter"), ("merged", "unmerge_adapter"), ("unmerged again", None)):
        torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), rtol=0, atol=1e-5,
                                   msg=lambda text, state=state: f"{state}: {text}")
        if change:
            getattr(ours, change)()
            getattr(theirs, change)()


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, options):
    _peft_model(arch, **options).save_pretrained(str(tmp_path / "peft"))
    ours = _ours(arch, OUR_SPECS[arch], seed=1)
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "block_size", "block_size_pattern", "init_weights", "bias", "layers_pattern"):
        assert our_config[key] == peft_config[key], key
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys and any(k.endswith(".c3a_kernel") for k in our_keys)
    assert "exclude_modules" not in our_config  # PEFT's C3AConfig has no such field (it would warn)
    torch.testing.assert_close(output_of(_peft_from(str(tmp_path / "ours"), arch), arch), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", [True, False, "xavier_uniform", "kaiming_uniform", "gaussian"])
def test_the_kernels_are_drawn_as_pefts_for_every_init(init):
    options = dict(block_size=8, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=init)
    theirs = _peft_kernels(_peft_model("llama", seed=3, **options))
    spec = f"c3a[block_size=8,target_modules=[q_proj,v_proj,up_proj],init_weights={str(init).lower()}]"
    ours = adapter_modules(_ours("llama", spec, seed=3))
    assert set(ours) == set(theirs)
    for name, layer in ours.items():
        assert layer.c3a_kernel.shape == theirs[name].shape == (layer.out_features // 8, layer.in_features // 8, 8)
        assert torch.equal(layer.c3a_kernel, theirs[name]), name
    assert all(bool(layer.c3a_kernel.any()) == (init is not True) for layer in ours.values())


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 1, 5), (3, 2, 1)])
def test_the_block_circulant_matrix_is_pefts_fft_built_one(shape):
    kernel = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(block_circulant(kernel), get_circulant_fast(kernel), rtol=0, atol=1e-6)
    m, n, b = shape
    assert block_circulant(kernel)[b - 1, 0] == kernel[0, 0, 1 % b]  # row t is the vector rotated right by t


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 1, 5), (3, 2, 1), (4, 2, 8)])
def test_the_summed_weight_is_the_weight_plus_the_divided_circulant_bit_for_bit(shape):
    """The training product's W + C / in, built in two passes in W's layout, has the very numbers of
    ``weight + block_circulant(kernel) / in``."""
    m, n, b = shape
    gen = torch.Generator().manual_seed(1)
    kernel, weight = torch.randn(shape, generator=gen), torch.randn(m * b, n * b, generator=gen)
    assert torch.equal(weight_plus_change(weight, kernel, n * b + 3), weight + block_circulant(kernel) / (n * b + 3))


#: Kernels with no other C3A layer between them and the loss (PEFT's input gradient is wrong, see below):
#: the last layer's attention inputs, BERT's last value projection.
GRADIENT_CASES = [
    ("llama", dict(block_size=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
     "c3a[block_size=16,target_modules=[q_proj,v_proj],layers_to_transform=[1]]"),
    ("bert", dict(block_size=8, target_modules=["value"], layers_to_transform=[1], init_weights="gaussian"),
     "c3a[block_size=8,target_modules=[value],layers_to_transform=[1],init_weights=gaussian]"),
]


@pytest.mark.parametrize("length", [6, 20])  # 2 x 20 tokens: one product with W + dW (forward_alone)
@pytest.mark.parametrize("arch,options,spec", GRADIENT_CASES)
def test_kernel_gradients_after_a_backward_equal_pefts(arch, options, spec, length):
    theirs = _peft_model(arch, **options)
    ours = _ours(arch, spec)
    peft_kernels = _peft_kernels(theirs)
    our_layers = adapter_modules(ours)
    with torch.no_grad():
        for name, layer in our_layers.items():
            assert torch.equal(layer.c3a_kernel, peft_kernels[name])
            layer.c3a_kernel.mul_(20)  # a change large enough to move the gradients
            peft_kernels[name].mul_(20)
    ids = torch.randint(1, 120, (2, length), generator=torch.Generator().manual_seed(length))
    assert (2 * length >= FUSED_FROM_TOKENS) == (length == 20)
    with torch.no_grad():
        torch.testing.assert_close(output_of_ids(ours, ids), output_of_ids(theirs, ids), rtol=0, atol=1e-5)
    for model in (theirs, ours):  # eval mode: the models' own dropout off
        model(input_ids=ids).logits.pow(2).mean().backward()
    for name, layer in our_layers.items():
        assert layer.c3a_kernel.grad.abs().max() > 0, name
        torch.testing.assert_close(layer.c3a_kernel.grad, peft_kernels[name].grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)


def test_the_input_gradient_is_the_true_one_where_pefts_hand_written_backward_is_not():
    """PEFT's BlockCircularConvolution.backward gives a wrong gradient for the layer's input (its kernel gradient
    is right): gradcheck refuses it. peftkit's is autograd's through the dense matrix, which gradcheck accepts;
    so with C3A layers behind one another, PEFT's kernel gradients of the earlier layers are not the true ones."""
    from peft.tuners.c3a.utils import BlockCircularConvolution
    from torch.autograd.gradcheck import GradcheckError

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    kernel = torch.randn(2, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, kernel: x @ block_circulant(kernel).T, (x, kernel))
    with pytest.raises(GradcheckError, match="with respect to input 0"):
        torch.autograd.gradcheck(BlockCircularConvolution.apply, (x, kernel))
    theirs = torch.autograd.grad(BlockCircularConvolution.apply(x, kernel).sum(), kernel)[0]
    ours = torch.autograd.grad((x @ block_circulant(kernel).T).sum(), kernel)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_the_training_product_with_w_plus_dw_has_the_true_gradients_and_keeps_no_dense_matrix():
    """Alone at a plain layer from FUSED_FROM_TOKENS tokens on, training runs one product with W + dW in a node
    that keeps x and the kernel for backward (as PEFT's FFT form), not W + dW: gradcheck on x and the kernel,
    and what autograd keeps holds no (out, in) matrix."""
    from peftkit.plugins.c3a.layer import C3ALayer

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12).double().requires_grad_(False)
    layer = C3ALayer(base, block_size=4, init_weights="gaussian").double()
    x = torch.randn(FUSED_FROM_TOKENS, 8, dtype=torch.float64, requires_grad=True)
    kernel = layer.c3a_kernel

    expected = x @ (base.weight + block_circulant(kernel) / 8).T + base.bias
    torch.testing.assert_close(layer.forward_alone(x, base), expected)
    assert torch.autograd.gradcheck(lambda x: layer.forward_alone(x, base), (x,))
    seed = torch.randn(FUSED_FROM_TOKENS, 12, dtype=torch.float64)
    got = torch.autograd.grad(layer.forward_alone(x, base), (x, kernel), seed)
    want = torch.autograd.grad(expected, (x, kernel), seed)
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours, theirs)
    kept = []  # what autograd keeps for backward, the frozen weight itself left out
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer.forward_alone(x, base)
    assert sorted(tuple(t.shape) for t in kept if t.data_ptr() != base.weight.data_ptr()) == [(3, 2, 4), (32, 8)]


def output_of_ids(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_a_bfloat16_model_runs_trains_and_matches_peft():
    """The kernels stay float32 beside bfloat16 weights and dW x is computed in float32, as PEFT's FFT;
    PEFT rounds its drawn kernels through bfloat16 (it casts them to the layer's dtype and back), so the
    comparison uses PEFT's kernels."""
    options = dict(block_size=16, target_modules=["q_proj", "v_proj", "o_proj"], init_weights="gaussian")
    theirs = _peft_model("llama", model=build_tiny("llama").to(torch.bfloat16), **options)
    ours = _ours("llama", "c3a[block_size=16,target_modules=[q_proj,v_proj,o_proj],init_weights=gaussian]",
                 model=build_tiny("llama").to(torch.bfloat16))
    kernels = _peft_kernels(theirs)
    with torch.no_grad():
        for name, layer in adapter_modules(ours).items():
            assert layer.c3a_kernel.dtype == kernels[name].dtype == torch.float32
            layer.c3a_kernel.copy_(kernels[name])
    ids = torch.randint(1, 120, (2, 20), generator=torch.Generator().manual_seed(0))  # 40 tokens
    with torch.no_grad():
        expected = output_of_ids(theirs, ids)
        assert expected.dtype == torch.bfloat16
        torch.testing.assert_close(output_of_ids(ours, ids), expected, rtol=0, atol=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(output_of_ids(ours, ids), output_of_ids(theirs, ids), rtol=0, atol=1e-2)
    ours.train()
    output_of_ids(ours, ids).float().pow(2).mean().backward()
    grads = [layer.c3a_kernel.grad for layer in adapter_modules(ours).values()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs():
    merge_cycle_keeps_outputs(_ours("llama", "c3a[block_size=16,target_modules=all-linear]"), "llama")


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("llama"), peft.C3AConfig(block_size=8, init_weights=True))
    config = model.adapter_record("default").config
    assert isinstance(config, C3AConfig)
    assert (config.block_size, config.init_weights, config.target_modules) == (8, True, ["q_proj", "v_proj"])
    assert len(adapter_modules(model)) == 4  # PEFT's (LoRA's) default targets: q_proj and v_proj of each layer
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


def test_the_kept_weight_change_follows_training_steps_loads_and_zeroing(tmp_path):
    """Forwards without gradients reuse dW until the kernel changes (an optimizer step, a load, a write)."""
    model = _ours("llama", "c3a[block_size=16]")
    layers = adapter_modules(model).values()
    first = output_of(model, "llama")
    kept = [layer.__dict__["_kept_change"][1] for layer in layers]
    assert torch.equal(output_of(model, "llama"), first)
    assert all(layer.__dict__["_kept_change"][1] is change for layer, change in zip(layers, kept))
    ids = torch.tensor([[1, 5, 9, 17]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all("_kept_change" not in layer.__dict__ for layer in layers)  # a training forward keeps nothing
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0).step()
    stepped = output_of(model, "llama")
    assert (stepped - first).abs().max() > 1e-4
    model.save_adapter(str(tmp_path))
    assert torch.equal(output_of(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), "llama"), stepped)
    with torch.no_grad():
        for layer in layers:
            layer.c3a_kernel.zero_()
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


def test_a_stack_of_two_adapters_equals_both_merged():
    model = _ours("llama", "c3a[block_size=16]")
    model.add_adapter("b", "c3a[block_size=8,init_weights=gaussian]")
    model.eval().set_active(Stack("default", "b"))
    stacked = output_of(model, "llama")
    assert (stacked - output_of(build_tiny("llama"), "llama")).abs().max() > 1e-2
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, "llama"), stacked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("field,value", [("bias", "all"), ("bias", "c3a_only"), ("layers_pattern", "layers")])
def test_pefts_options_peftkit_lacks_are_refused_by_name(tmp_path, field, value):
    options = dict(block_size=16, target_modules=["q_proj"])
    if field == "layers_pattern":
        options["layers_to_transform"] = [0]
    _peft_model("llama", **options, **{field: value}).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError, match=rf"PEFT setting {field}='{value}' is not supported by peftkit's c3a"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec,message", [
    ("c3a", r"block_size=256 does not divide both widths of layer 'model.layers.0.self_attn.q_proj' \(in 32, "
            r"out 32\) \(so do 3 more layers\).*\(block_size=16 does\).*"
            r"block_size_pattern=\{\"q_proj\":32,\"v_proj\":16\}"),
    ("c3a[block_size=0]", r"block_size=0 must be a positive integer"),
    ('c3a[block_size_pattern={"q_proj":-4}]', r"block_size_pattern\['q_proj'\]=-4 must be a positive integer"),
    ("c3a[init_weights=xavier_normal]", r"init_weights"),
    ("c3a[block_size=16,target_modules=all-linear,exclude_modules=[down_proj]]",
     r"exclude_modules=\['down_proj'\] is not supported \(PEFT's C3A has no such field.*name the layers to adapt "
     r"in target_modules"),
    ("c3a[block_size=8,target_modules=[embed_tokens]]", r"'model.embed_tokens' is an Embedding; C3A adapts"),
])
def test_bad_settings_are_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_the_suggested_block_size_pattern_works():
    with pytest.raises(ConfigError) as refusal:
        peftkit.adapt(build_tiny("llama"), "c3a[target_modules=all-linear,block_size=64]")
    suggestion = str(refusal.value).split("block_size_pattern=")[1]
    model = peftkit.adapt(build_tiny("llama"), f"c3a[target_modules=all-linear,block_size=64,"
                                               f"block_size_pattern={suggestion}]")
    # every tiny width is 32 or 64, so no layer takes 64 (it must divide both widths)
    assert {layer.block_size for layer in adapter_modules(model).values()} == {32, 16}


def test_gpt2s_conv1d_layers_are_refused_as_by_peft():
    with pytest.raises(ConfigError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D; C3A adapts torch's Linear"):
        peftkit.adapt(build_tiny("gpt2"), "c3a[block_size=16]")
    with pytest.raises(ConfigError) as named:  # a listed target: the fix is the list (C3A refuses exclude_modules)
        peftkit.adapt(build_tiny("gpt2"), "c3a[block_size=16,target_modules=[c_attn]]")
    assert str(named.value).endswith("Leave it out of target_modules") and "exclude_modules" not in str(named.value)
    with pytest.raises(ConfigError) as by_default:  # the user named no targets: the model's defaults are the cause
        peftkit.adapt(build_tiny("gpt2"), "c3a[block_size=16]")
    assert str(by_default.value).endswith("It is one of this model's default targets (c_attn): name the layers to "
                                          "adapt in target_modules")
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        _peft_model("gpt2", block_size=16, target_modules=["c_attn"])


@pytest.mark.parametrize("blocks,size", [((3, 2), 5), ((2, 4), 8), ((1, 1), 1)])
def test_the_kernel_gradient_is_block_circulants_adjoint_in_float64(blocks, size):
    """plugins/c3a/layer.py's per-frequency kernel gradient against autograd through the circulant matrix
    applied to g^T x, on odd and even block sizes."""
    generator = torch.Generator().manual_seed(size)
    kernel = torch.randn(*blocks, size, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(7, blocks[0] * size, dtype=torch.float64, generator=generator)
    x2 = torch.randn(7, blocks[1] * size, dtype=torch.float64, generator=generator)
    expected, = torch.autograd.grad(block_circulant(kernel), kernel, grad.t() @ x2)
    torch.testing.assert_close(kernel_gradient(grad, x2, kernel.shape), expected, rtol=1e-12, atol=1e-12)
