"""OFT layer values that tests/test_method_oft.py leaves unchecked (found by `make mutate`): the change
a composition adds (delta) equals the layer alone on a rotated input, in float32 and bfloat16; the weight
change merge_adapters reads (delta_weight) equals what merging writes, on Linear, GPT-2 Conv1D and Conv2d
layers and with shared blocks; a bfloat16 merge; a bias-free quantized layer; the printed description."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.plugins.oft.config import OftConfig
from tests.method_helpers import quantized_matches_twin
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
    model.merge_adapter(["default"])
    merged = layer.base_layer.weight
    assert merged.dtype == torch.bfloat16
    assert torch.allclose(merged.double(), w.double() @ r.t(), atol=1e-2 * float(w.abs().max()))


def test_a_bfloat16_conv2d_alone_and_inside_a_composition_runs_its_rotated_filters():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3)).to(torch.bfloat16),
                          OftConfig(oft_block_size=4, init_weights=False, target_modules=["0"]))
    layer = _sites(model)[0]
    adapter, base = layer.adapters["default"], layer.base_layer
    x = torch.randn(2, 4, 5, 5).to(torch.bfloat16)
    w = base.weight.detach().double()
    r = adapter.block_matrix().detach().double()
    change = ((w.reshape(6, -1) @ r.t()) - w.reshape(6, -1)).reshape(w.shape)
    expected = torch.nn.functional.conv2d(x.double(), change)
    delta = adapter.delta(x, base(x), base)
    assert delta.dtype == torch.bfloat16
    assert torch.allclose(delta.double(), expected, atol=3e-2 * float(expected.abs().max()))
    # alone: the convolution with the rotated filters and the (bfloat16) bias; this raised a dtype error before
    alone = torch.nn.functional.conv2d(x.double(), w + change, base.bias.double())
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), alone, atol=3e-2 * float(alone.abs().max()))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_bias_free_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    quantized_matches_twin(bits, "oft[oft_block_size=16,init_weights=false,target_modules=['0']]", bias=False)
