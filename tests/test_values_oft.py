"""OFT layer values that tests/test_method_oft.py leaves unchecked (found by `make mutate`): the change
a composition adds (delta) equals the layer alone on a rotated input, in float32 and bfloat16; the weight
change merge_adapters reads (delta_weight) equals what merging writes, on Linear, GPT-2 Conv1D and Conv2d
layers and with shared blocks; a bfloat16 merge; a bias-free quantized layer; the printed description."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.plugins.oft.config import OftConfig
from tests.method_helpers import cast_after_adapting_matches_float32, four_bit_site, quantized_matches_twin
from tests.tiny_models import build_tiny


def _sites(model: peftkit.AdaptedModel) -> list:
    return [layer for _, layer in model.tuner_layers()]


@pytest.mark.parametrize("arch,options", [("llama", ""), ("gpt2", ",block_share=true"),
                                          ("bert", ",use_cayley_neumann=false")])
def test_delta_weight_is_what_merging_adds(arch, options):
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny(arch), f"oft[oft_block_size=8,init_weights=false{options}]")
    layers = _sites(model)
    before = [layer.base_layer.weight.detach().clone() for layer in layers]
    deltas = [layer.adapters["default"].delta_weight(layer.base_layer).detach() for layer in layers]
    model.merge_adapter(["default"])
    for layer, w, dw in zip(layers, before, deltas, strict=True):
        assert dw.shape == w.shape
        assert dw.abs().max() > 1e-3  # a real rotation
        torch.testing.assert_close(layer.base_layer.weight.detach(), w + dw, atol=1e-6, rtol=1e-5)


def test_a_conv2d_delta_weight_is_what_merging_adds():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3)),
                          OftConfig(oft_block_size=4, init_weights=False, target_modules=["0"]))
    layer = _sites(model)[0]
    w = layer.base_layer.weight.detach().clone()
    dw = layer.adapters["default"].delta_weight(layer.base_layer).detach()
    model.merge_adapter(["default"])
    assert dw.shape == w.shape and dw.abs().max() > 1e-3
    torch.testing.assert_close(layer.base_layer.weight.detach(), w + dw, atol=1e-6, rtol=1e-5)


def test_the_printed_module_names_blocks_form_and_constraint():
    plain = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8]")
    assert _sites(plain)[0].adapters["default"].extra_repr() == "blocks=4x8, cayley-neumann"
    options = "oft_block_size=8,block_share=true,use_cayley_neumann=false,coft=true,eps=0.01"
    every = peftkit.adapt(build_tiny("llama"), f"oft[{options}]")
    assert _sites(every)[0].adapters["default"].extra_repr() == "blocks=4x8 shared, cayley, coft eps=0.01"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_change_inside_a_composition_is_w_times_the_rotated_input_less_the_input(dtype):
    """delta = W (x R - x) (row vectors, R block-diagonal): base + delta is the layer alone on x R."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(dtype), "oft[oft_block_size=8,init_weights=false]")
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    x = torch.randn(3, 32).to(dtype)
    h = base(x)
    r = adapter.block_matrix().detach().double()
    expected = (x.double() @ r - x.double()) @ base.weight.double().t()
    delta = adapter.delta(x, h, base)
    rotated = adapter.base_input(x)
    assert delta.dtype == rotated.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2 * float(expected.abs().max())
    assert torch.allclose(delta.double(), expected, atol=tolerance)
    assert torch.allclose(rotated.double(), x.double() @ r, atol=1e-5 if dtype == torch.float32 else 3e-2)
    assert torch.allclose(layer(x).double(), h.double() + expected, atol=tolerance)


def test_a_bfloat16_layer_merges_to_its_weight_times_the_rotation_in_bfloat16():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16), "oft[oft_block_size=8,init_weights=false]")
    layer = _sites(model)[0]
    w = layer.base_layer.weight.detach().clone()
    r = layer.adapters["default"].block_matrix().detach().double()
    dw = layer.adapters["default"].delta_weight(layer.base_layer)
    assert dw.dtype == torch.bfloat16
    assert torch.allclose(dw.double(), w.double() @ r.t() - w.double(), atol=1e-2 * float(w.abs().max()))
    model.merge_adapter(["default"])
    merged = layer.base_layer.weight
    assert merged.dtype == torch.bfloat16
    assert torch.allclose(merged.double(), w.double() @ r.t(), atol=1e-2 * float(w.abs().max()))


def _bfloat16_conv2d() -> tuple[peftkit.AdaptedModel, object, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A bfloat16 Conv2d (with a bias) under a random OFT: the model, adapter, base layer, its weight and
    the change the rotation makes to it, both in float64."""
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3)).to(torch.bfloat16),
                          OftConfig(oft_block_size=4, init_weights=False, target_modules=["0"]))
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    w = base.weight.detach().double()
    r = adapter.block_matrix().detach().double()
    change = ((w.reshape(6, -1) @ r.t()) - w.reshape(6, -1)).reshape(w.shape)
    return model, adapter, base, w, change


def test_a_bfloat16_conv2d_change_inside_a_composition_is_the_rotated_filters_less_the_filters():
    _, adapter, base, _, change = _bfloat16_conv2d()
    x = torch.randn(2, 4, 5, 5).to(torch.bfloat16)
    expected = torch.nn.functional.conv2d(x.double(), change)
    delta = adapter.delta(x, base(x), base)
    assert delta.dtype == torch.bfloat16
    assert torch.allclose(delta.double(), expected, atol=3e-2 * float(expected.abs().max()))
    dw = adapter.delta_weight(base)
    assert dw.dtype == torch.bfloat16
    assert torch.allclose(dw.double(), change, atol=1e-2 * float(base.weight.double().abs().max()))


def test_a_bfloat16_conv2d_alone_runs_its_rotated_filters_and_its_bias():
    """Regression: the rotated filters are float32 and the bias was passed in bfloat16 (a dtype error)."""
    model, _, base, w, change = _bfloat16_conv2d()
    x = torch.randn(2, 4, 5, 5).to(torch.bfloat16)
    alone = torch.nn.functional.conv2d(x.double(), w + change, base.bias.double())
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), alone, atol=3e-2 * float(alone.abs().max()))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bias_free_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    quantized_matches_twin(bits, "oft[oft_block_size=16,init_weights=false,target_modules=['0']]", bias=False)


def _skew(upper: torch.Tensor, size: int) -> torch.Tensor:
    """Q - Q^T per row of ``upper`` (the entries above the diagonal, row by row: PEFT's oft_R layout)."""
    q = torch.zeros(upper.shape[0], size, size, dtype=upper.dtype)
    rows, cols = torch.triu_indices(size, size, 1)
    q[:, rows, cols] = upper
    return q - q.transpose(1, 2)


def test_a_non_identity_init_draws_the_upper_triangles_with_std_0_1():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8,init_weights=false]")
    entries = torch.cat([layer.adapters["default"].weight.detach().flatten() for layer in _sites(model)])
    assert entries.numel() > 400
    assert abs(float(entries.std()) - 0.1) < 0.02 and abs(float(entries.mean())) < 0.02


@pytest.mark.parametrize("terms", [1, 2, 3, 5, 6])
def test_the_truncated_neumann_series_of_each_length(terms):
    """PEFT's series: I (1 term), I + 2Q (2), then I + 2Q + ... + 2Q^(m-1) + Q^m with m = max(n, 4) - 1."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), f"oft[oft_block_size=8,init_weights=false,"
                                               f"num_cayley_neumann_terms={terms}]")
    adapter = _sites(model)[0].adapters["default"]
    entries = adapter.weight.detach().double().requires_grad_()
    q = _skew(entries, 8)
    eye = torch.eye(8, dtype=torch.float64).expand_as(q)
    if terms == 1:
        expected = eye
    elif terms == 2:
        expected = eye + 2 * q
    else:
        m = max(terms, 4) - 1
        expected = eye + sum(2 * torch.linalg.matrix_power(q, k) for k in range(1, m)) + torch.linalg.matrix_power(q, m)
    rotations = adapter.rotations()
    torch.testing.assert_close(rotations.detach().double(), expected.detach(), atol=1e-6, rtol=1e-5)
    if terms > 1:  # the trained entries' gradient, against the float64 series' own
        seed = torch.randn(expected.shape, dtype=torch.float64)
        got, = torch.autograd.grad((rotations * seed.float()).sum(), adapter.weight)
        want, = torch.autograd.grad((expected * seed).sum(), entries)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_power", [2, 3, 4, 5])
def test_the_neumann_node_backward_is_its_forwards_derivative(top_power):
    """plugins/oft/neumann.py's closed-form backward, checked numerically in float64 (blocks of 5)."""
    from peftkit.plugins.oft.neumann import flat_indices, neumann_rotations

    upper, lower = flat_indices(5, torch.device("cpu"))
    entries = (0.3 * torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert torch.autograd.gradcheck(lambda e: neumann_rotations(e, upper, lower, 5, top_power),
                                    (entries.requires_grad_(),))


def test_module_dropout_over_two_blocks_sets_one_to_the_identity_in_training():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=16,module_dropout=0.5,init_weights=false]")
    adapter = _sites(model)[0].adapters["default"]
    assert adapter.blocks.count == 2
    x = torch.randn(3, 32)
    adapter.train()
    kept = (adapter.rotate(x).reshape(3, 2, 16) == x.reshape(3, 2, 16)).all(-1).all(0)
    assert int(kept.sum()) == 1


def test_the_module_state_holds_only_the_trained_rotations():
    """The triangle indices are derived buffers: a checkpoint of the model holds the rotations alone."""
    model = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8]")
    assert set(_sites(model)[0].adapters["default"].state_dict()) == {"weight"}


def test_a_float64_layer_with_a_one_term_series_is_exactly_the_identity():
    """One Neumann term is R = I: a float64 input must not be rounded through float32 on its way."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").double(),
                          "oft[oft_block_size=8,init_weights=false,num_cayley_neumann_terms=1]")
    layer = _sites(model)[0]
    x = torch.randn(3, 32, dtype=torch.float64)  # not representable in float32
    assert torch.equal(layer(x), layer.base_layer(x))


def test_a_bfloat16_input_to_a_4bit_layer_gets_its_change_as_the_layer_computes_a_bfloat16_input():
    """Inside a composition the rotated input less the input (float32) goes through the quantized layer
    itself in the input's dtype, bfloat16; the layer's bias comes off in float32, then bfloat16 again."""
    adapter, base, computes = four_bit_site("oft[oft_block_size=16,init_weights=false,target_modules=['0']]")
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        shifted = adapter.rotate(x) - x.float()
        delta = adapter.delta(x, computes(x), base)
    assert shifted.dtype == torch.float32 and float(shifted.abs().max()) > 0.1
    assert delta.dtype == torch.bfloat16
    assert torch.equal(delta, (computes(shifted.bfloat16()) - base.bias.detach()).bfloat16())


def _linear_site(dtype: torch.dtype = torch.float32) -> tuple[peftkit.AdaptedModel, object, torch.nn.Module]:
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Linear(32, 16).to(dtype)),
                          OftConfig(oft_block_size=8, init_weights=False, target_modules=["0"]))
    layer = _sites(model)[0]
    return model, layer.adapters["default"], layer.base_layer


def test_a_float64_layer_merges_and_unmerges_in_float64():
    """W R^T and back with R^-1, both in float64: not rounded through float32 on the way."""
    model, adapter, base = _linear_site(torch.float64)
    assert adapter.block_matrix().dtype == torch.float64
    w = base.weight.detach().clone()
    r = adapter.block_matrix().detach()
    model.merge_adapter(["default"])
    torch.testing.assert_close(base.weight.detach(), w @ r.t(), atol=1e-13, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), w, atol=1e-13, rtol=0)


def test_a_float32_adapter_on_a_base_cast_to_float64_later_merges_in_the_bases_float64():
    """The merge computes in the precision the base layer calls for (float64), not the adapter's float32: W is
    not rounded to float32 (R is taken from the float32 rotations exactly)."""
    model, adapter, base = _linear_site()
    base.double()
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    w = base.weight.detach().clone()
    r = adapter.block_matrix().detach().double()
    model.merge_adapter(["default"])
    assert base.weight.dtype == torch.float64
    torch.testing.assert_close(base.weight.detach(), w @ r.t(), atol=1e-13, rtol=0)
    model.unmerge_adapter()  # the rotations inverted in float64 too: float32 would miss by about 1e-7
    torch.testing.assert_close(base.weight.detach(), w, atol=1e-12, rtol=0)


def test_a_model_cast_to_bfloat16_after_adapting_merges_and_unmerges_through_float32():
    """model.to(bfloat16) casts the rotations' parameters too; merging rotates W in float32 and unmerging
    inverts the rotations in float32 (torch has no bfloat16 inverse on CPU), back to W within bfloat16 rounding."""
    model, adapter, base = _linear_site()
    model.to(torch.bfloat16)
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    w = base.weight.detach().clone()
    r = adapter.block_matrix().detach().double()
    model.merge_adapter(["default"])
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(base.weight.detach().double(), w.double() @ r.t(), atol=1e-2, rtol=0)
    model.unmerge_adapter()
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(base.weight.detach().double(), w.double(), atol=2e-2 * float(w.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", ["use_cayley_neumann=false", "use_cayley_neumann=false,coft=true,eps=0.5",
                                     "use_cayley_neumann=true"])
def test_a_model_cast_to_half_precision_after_adapting_runs_trains_and_merges_like_float32(options, dtype):
    """Regression: model.to(bfloat16) after adapting cast oft_R too, and torch has no half-precision solve on
    the CPU (the exact Cayley form); the rotations are now computed in float32 (as on a model adapted in half
    precision)."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), f"oft[oft_block_size=4,{options},init_weights=false]")
    cast_after_adapting_matches_float32(model, dtype)


def test_a_conv2d_cast_to_bfloat16_after_adapting_runs_trains_and_merges_like_float32():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3)),
                          OftConfig(oft_block_size=4, use_cayley_neumann=False, init_weights=False,
                                    target_modules=["0"]))
    x = torch.randn(2, 4, 5, 5)
    cast_after_adapting_matches_float32(model, torch.bfloat16, lambda m, dtype: m(x.to(dtype)))
