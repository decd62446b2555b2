"""BOFT layer values that tests/test_method_boft.py leaves unchecked (found by `make mutate`): the layer
alone and the change a composition adds (delta) against s * W (x M) by hand, in float32 and bfloat16; the
weight change merge_adapters reads (delta_weight) equals what merging writes, on Linear, GPT-2 Conv1D and
Conv2d layers, with one and with two butterfly factors; a bfloat16 merge and unmerge; a bias-free
quantized layer; the printed description."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.plugins.boft.config import BoftConfig
from tests.method_helpers import cast_after_adapting_matches_float32, four_bit_site, quantized_matches_twin
from tests.tiny_models import build_tiny


def _sites(model: peftkit.AdaptedModel) -> list:
    return [layer for _, layer in model.tuner_layers()]


def _delta_weight_is_what_merging_adds(model: peftkit.AdaptedModel) -> None:
    layers = _sites(model)
    before = [layer.base_layer.weight.detach().clone() for layer in layers]
    deltas = [layer.adapters["default"].delta_weight(layer.base_layer).detach() for layer in layers]
    model.merge_adapter(["default"])
    for layer, w, dw in zip(layers, before, deltas, strict=True):
        assert dw.shape == w.shape and dw.abs().max() > 1e-3  # a real rotation and scale
        torch.testing.assert_close(layer.base_layer.weight.detach(), w + dw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,options", [("llama", ""), ("gpt2", ",boft_n_butterfly_factor=2")])
def test_delta_weight_is_what_merging_adds(arch, options):
    torch.manual_seed(0)
    _delta_weight_is_what_merging_adds(peftkit.adapt(build_tiny(arch), f"boft[init_weights=false{options}]"))


def test_a_conv2d_delta_weight_is_what_merging_adds():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(8, 6, 3)),  # filters of 8 * 3 * 3 = 72
                          BoftConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False,
                                     target_modules=["0"]))
    _delta_weight_is_what_merging_adds(model)


def test_the_printed_module_names_factors_blocks_and_features():
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=4,boft_n_butterfly_factor=2]")
    assert _sites(model)[0].adapters["default"].extra_repr() == "factors=2, blocks=8x4, features=32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_alone_and_its_change_follow_s_times_w_of_the_rotated_input(dtype):
    """Alone: s * (W (x M)) + b; inside a composition it adds s * (W (x M)) - W x (row vectors)."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert").to(dtype), "boft[boft_block_size=4,boft_n_butterfly_factor=2,"
                                                        "init_weights=false]")
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    with torch.no_grad():  # BERT starts with zero biases
        base.bias.normal_()
    x = torch.randn(3, 32).to(dtype)
    h = base(x)
    m, s = adapter.matrix().detach().double(), adapter.boft_s.detach().double().reshape(-1)
    w, b = base.weight.double(), base.bias.double()
    change = ((x.double() @ m) @ w.t()) * s - x.double() @ w.t()
    alone = ((x.double() @ m) @ w.t()) * s + b
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2 * float(alone.abs().max())
    delta = adapter.delta(x, h, base)
    assert delta.dtype == dtype and torch.allclose(delta.double(), change, atol=tolerance)
    out = adapter.forward_alone(x, base)
    assert out.dtype == dtype and torch.allclose(out.double(), alone, atol=tolerance)
    assert torch.allclose(layer(x).double(), alone, atol=tolerance)


def test_a_bfloat16_layer_merges_to_s_times_w_m_transposed_and_unmerges_back():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16), "boft[boft_block_size=4,init_weights=false]")
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    w = base.weight.detach().clone()
    m, s = adapter.matrix().detach().double(), adapter.boft_s.detach().double().reshape(-1, 1)
    model.merge_adapter(["default"])
    assert base.weight.dtype == torch.bfloat16
    expected = (w.double() @ m.t()) * s
    assert torch.allclose(base.weight.double(), expected, atol=1e-2 * float(expected.abs().max()))
    model.unmerge_adapter()
    assert base.weight.dtype == torch.bfloat16
    assert torch.allclose(base.weight.double(), w.double(), atol=2e-2 * float(w.abs().max()))


def test_a_bfloat16_conv2d_runs_its_rotated_scaled_filters():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(8, 6, 3)).to(torch.bfloat16),
                          BoftConfig(boft_block_size=4, init_weights=False, target_modules=["0"]))
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    x = torch.randn(2, 8, 5, 5).to(torch.bfloat16)
    w = base.weight.detach().double().reshape(6, -1)
    m, s = adapter.matrix().detach().double(), adapter.boft_s.detach().double().reshape(-1, 1)
    adapted = ((w @ m.t()) * s).reshape(base.weight.shape)
    alone = torch.nn.functional.conv2d(x.double(), adapted, base.bias.double())
    change = torch.nn.functional.conv2d(x.double(), adapted - w.reshape(base.weight.shape))
    tolerance = 3e-2 * float(alone.abs().max())
    out, delta = adapter.forward_alone(x, base), adapter.delta(x, base(x), base)
    assert out.dtype == delta.dtype == torch.bfloat16
    assert torch.allclose(out.double(), alone, atol=tolerance)
    assert torch.allclose(delta.double(), change, atol=tolerance)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bias_free_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    quantized_matches_twin(bits, "boft[boft_block_size=8,boft_n_butterfly_factor=2,init_weights=false,"
                                 "target_modules=['0']]", bias=False)


def test_a_non_identity_init_draws_rotations_with_std_0_1_and_scales_around_1():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=4,init_weights=false]")
    adapters = [layer.adapters["default"] for layer in _sites(model)]
    r = torch.cat([a.boft_R.detach().flatten() for a in adapters])
    s = torch.cat([a.boft_s.detach().flatten() for a in adapters])
    assert r.numel() > 400 and s.numel() >= 96
    assert abs(float(r.std()) - 0.1) < 0.02 and abs(float(r.mean())) < 0.02
    assert abs(float(s.std()) - 0.1) < 0.03 and abs(float(s.mean()) - 1.0) < 0.03


def test_the_module_state_holds_only_the_trained_tensors():
    """The permutations are derived buffers: a checkpoint of the model holds boft_R and boft_s alone."""
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=4,boft_n_butterfly_factor=2]")
    assert set(_sites(model)[0].adapters["default"].state_dict()) == {"boft_R", "boft_s"}


def test_merging_in_training_mode_leaves_dropout_out():
    """Dropout acts on forward passes only: M, the merged weight and the unmerge use every block."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=4,boft_dropout=0.5,init_weights=false]")
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    model.eval()
    m = adapter.matrix().detach().clone()
    model.train()
    torch.testing.assert_close(adapter.matrix().detach(), m, atol=0, rtol=0)
    w = base.weight.detach().clone()
    s = adapter.boft_s.detach().reshape(-1, 1)
    model.merge_adapter(["default"])
    torch.testing.assert_close(base.weight.detach(), (w @ m.t()) * s, atol=1e-6, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), w, atol=1e-5, rtol=1e-5)


def test_a_bfloat16_bias_free_layer_alone_and_its_delta_weight_keep_bfloat16():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16), "boft[boft_block_size=4,init_weights=false]")
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    assert base.bias is None
    x = torch.randn(3, 32).to(torch.bfloat16)
    m, s = adapter.matrix().detach().double(), adapter.boft_s.detach().double().reshape(-1)
    expected = ((x.double() @ m) @ base.weight.double().t()) * s
    out = adapter.forward_alone(x, base)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), expected, atol=3e-2 * float(expected.abs().max()))
    dw = adapter.delta_weight(base)
    assert dw.dtype == torch.bfloat16
    expected_dw = (base.weight.double() @ m.t()) * s.reshape(-1, 1) - base.weight.double()
    assert torch.allclose(dw.double(), expected_dw, atol=2e-2 * float(base.weight.double().abs().max()))


def test_a_scale_holding_nan_is_not_merged():
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=4]")
    layer = _sites(model)[0]
    with torch.no_grad():
        layer.adapters["default"].boft_s[0] = float("nan")
    w = layer.base_layer.weight.detach().clone()
    with pytest.raises(peftkit.MergeError, match="NaN or infinite"):
        model.merge_adapter(["default"])
    assert torch.equal(layer.base_layer.weight, w)


def test_a_float64_layer_merges_and_unmerges():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").double(), "boft[boft_block_size=4,boft_dropout=0.5,init_weights=false]")
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    w = base.weight.detach().clone()
    m, s = adapter.matrix().detach(), adapter.boft_s.detach().reshape(-1, 1)
    model.train()  # dropout never reaches a merge
    model.merge_adapter(["default"])
    assert base.weight.dtype == torch.float64
    torch.testing.assert_close(base.weight.detach(), (w @ m.t()) * s, atol=1e-13, rtol=0)  # not via float32
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), w, atol=1e-13, rtol=0)


def test_a_block_count_plan_needs_a_multiple_of_2_to_the_extra_factors_and_at_most_log2_of_it():
    from peftkit.plugins.boft.butterfly import Butterfly

    fits = Butterfly.plan(32, 0, 4, 3, "q")  # 2 extra factors, 4 = 2^2 blocks: exactly enough
    assert fits == Butterfly(features=32, block_size=8, block_num=4, factors=3)
    assert fits.rotation_parameter_count() == 3 * 4 * 8 * 8
    with pytest.raises(peftkit.PeftkitError, match=r"boft_block_num=6 must be a multiple of 2\^2"):
        Butterfly.plan(48, 0, 6, 3, "q")  # even, but not a multiple of 4


def test_a_bfloat16_input_to_a_4bit_layer_gets_s_times_the_turned_output_less_the_plain_one_in_bfloat16():
    """Inside a composition: the layer itself on the rotated input (float32, handed over in the input's
    bfloat16) and on the plain input, each less the bias in float32, s times the first less the second,
    returned in bfloat16."""
    adapter, base, computes = four_bit_site("boft[boft_block_size=8,boft_n_butterfly_factor=2,init_weights=false,"
                                            "target_modules=['0']]")
    x = torch.randn(3, 64).bfloat16()
    bias, scale = base.bias.detach(), adapter.boft_s.detach().reshape(-1)
    with torch.no_grad():
        rotated = adapter.rotate(x)
        delta = adapter.delta(x, computes(x), base)
    assert rotated.dtype == torch.float32 and float((rotated - x.float()).abs().max()) > 0.1
    assert delta.dtype == torch.bfloat16
    turned, plain = computes(rotated.bfloat16()) - bias, computes(x) - bias
    assert torch.equal(delta, (turned * scale - plain).bfloat16())


def _linear_site() -> tuple[peftkit.AdaptedModel, object, torch.nn.Module]:
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                          BoftConfig(boft_block_size=4, init_weights=False, target_modules=["0"]))
    layer = _sites(model)[0]
    return model, layer.adapters["default"], layer.base_layer


def test_a_float32_adapter_on_a_base_cast_to_float64_later_merges_and_unmerges_in_float64():
    """Merging and unmerging compute in the precision the base layer calls for (float64), with M and s taken
    exactly from the float32 adapter: W is not rounded to float32 on the way."""
    model, adapter, base = _linear_site()
    base.double()
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
    w = base.weight.detach().clone()
    m, s = adapter.matrix().detach().double(), adapter.boft_s.detach().double().reshape(-1, 1)
    model.merge_adapter(["default"])
    assert base.weight.dtype == torch.float64
    merged = base.weight.detach().clone()
    torch.testing.assert_close(merged, (w @ m.t()) * s, atol=1e-13, rtol=0)
    model.unmerge_adapter()  # M^T undoes M up to the float32 rounding of the blocks: check the formula itself
    torch.testing.assert_close(base.weight.detach(), (merged @ m) / s, atol=1e-13, rtol=0)
    torch.testing.assert_close(base.weight.detach(), w, atol=1e-6, rtol=0)


def test_a_float64_adapter_on_a_base_cast_to_float32_later_unmerges_in_float32():
    """On a float32 base, unmerging rotates back and divides by s in float32: s is rounded to float32 first."""
    model, adapter, base = _linear_site()
    adapter.double()
    with torch.no_grad():  # scales that float32 cannot hold
        adapter.boft_s.copy_(0.5 + torch.rand(adapter.boft_s.shape, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(1)))
    model.merge_adapter(["default"])
    merged = base.weight.detach().clone()
    assert merged.dtype == torch.float32
    m = adapter.matrix(adapter.blocks().float()).detach()
    s = adapter.boft_s.detach().float().reshape(-1, 1)
    model.unmerge_adapter()
    assert torch.equal(base.weight.detach(), (merged @ m) / s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_after_adapting_runs_trains_and_merges_like_float32(dtype):
    """Regression: model.to(bfloat16) after adapting cast boft_R too, and torch has no half-precision solve on
    the CPU; the blocks are now computed in float32 (as on a model adapted in half precision)."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=4,boft_n_butterfly_factor=2,init_weights=false]")
    cast_after_adapting_matches_float32(model, dtype)


def test_a_conv2d_cast_to_bfloat16_after_adapting_runs_trains_and_merges_like_float32():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(8, 6, 3)),
                          BoftConfig(boft_block_size=4, init_weights=False, target_modules=["0"]))
    x = torch.randn(2, 8, 5, 5)
    cast_after_adapting_matches_float32(model, torch.bfloat16, lambda m, dtype: m(x.to(dtype)))
