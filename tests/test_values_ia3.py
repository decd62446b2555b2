"""IA3 layer values against hand formulas (found unchecked by `make mutate`): output scaling
(W x + b) * l, feed-forward input scaling W (x * l) + b, their deltas, and merge/unmerge on a
layer with a bias, zero scales included."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import MergeError
from tests.method_helpers import four_bit_site, new_tensors, quantized_matches_twin
from tests.tiny_models import build_tiny

SPEC = 'ia3[init_ia3_weights=false,target_modules=["query","intermediate.dense"],feedforward_modules=["intermediate.dense"]]'


def _sites() -> tuple[peftkit.AdaptedModel, dict[str, object]]:
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert"), SPEC)
    layers = {site: layer for site, layer in model.tuner_layers()}
    output = next(layer for site, layer in layers.items() if site.endswith("query"))
    feedforward = next(layer for site, layer in layers.items() if site.endswith("intermediate.dense"))
    with torch.no_grad():  # BERT starts with zero biases, which would hide what happens to them
        for layer in (output, feedforward):
            layer.base_layer.bias.normal_()
    return model, {"output": output, "feedforward": feedforward}


def test_output_and_feedforward_scaling_follow_their_formulas():
    _, sites = _sites()
    for kind, layer in sites.items():
        adapter, base = layer.adapters["default"], layer.base_layer
        l = adapter.ia3_l.detach().flatten().double()
        w, b = base.weight.detach().double(), base.bias.detach().double()
        x = torch.randn(3, w.shape[1])
        h = base(x)
        if kind == "output":
            expected = (x.double() @ w.t() + b) * l
            assert adapter.base_input(x) is None
        else:
            expected = (x.double() * l) @ w.t() + b
            assert torch.allclose(adapter.base_input(x).double(), x.double() * l, atol=1e-6)
        assert torch.allclose(adapter.forward(x, h, base).double(), expected, atol=1e-5), kind
        assert torch.allclose((h + adapter.delta(x, h, base)).double(), expected, atol=1e-5), kind


def test_delta_weight_is_w_times_l_minus_one_and_a_scaled_bias_is_refused():
    _, sites = _sites()
    layer = sites["feedforward"]
    adapter, base = layer.adapters["default"], layer.base_layer
    expected = base.weight.detach() * (adapter.ia3_l.detach() - 1)
    assert torch.allclose(adapter.delta_weight(base), expected, atol=1e-7)
    with pytest.raises(MergeError, match="also scales the layer's bias"):
        sites["output"].adapters["default"].delta_weight(sites["output"].base_layer)


def test_merge_scales_weight_and_bias_and_unmerge_restores_them_even_where_a_scale_is_zero():
    model, sites = _sites()
    originals = {}
    for kind, layer in sites.items():
        with torch.no_grad():
            layer.adapters["default"].ia3_l.view(-1)[:2] = 0.0  # zero scales: the weights there need the backup
        originals[kind] = (layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone())
    model.merge_adapter(["default"])
    for kind, layer in sites.items():
        l = layer.adapters["default"].ia3_l.detach()
        w, b = originals[kind]
        assert torch.allclose(layer.base_layer.weight, w * l, atol=1e-7), kind
        expected_bias = b * l.flatten() if kind == "output" else b
        assert torch.allclose(layer.base_layer.bias, expected_bias, atol=1e-7), kind
    model.unmerge_adapter()
    for kind, layer in sites.items():
        w, b = originals[kind]
        assert torch.allclose(layer.base_layer.weight, w, atol=1e-5), kind
        assert torch.allclose(layer.base_layer.bias, b, atol=1e-5), kind


@pytest.mark.parametrize("bits", [4, 8])
def test_feedforward_scaling_on_a_quantized_layer_equals_its_float_twin(bits):
    """A quantized layer's feed-forward delta runs the layer itself and takes its (random) bias off:
    alone and stacked, the same as on the float twin holding the dequantized weight."""
    quantized_matches_twin(bits, "ia3[init_ia3_weights=false,target_modules=['0'],feedforward_modules=['0']]")


def test_a_bfloat16_base_keeps_its_dtype_through_forward_delta_merge_and_unmerge():
    """Float32 vectors on a bfloat16 layer: outputs, deltas and the merged weight and bias stay bfloat16,
    with the values of the float32 formula rounded once."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert").to(torch.bfloat16), SPEC)
    layers = {site: layer for site, layer in model.tuner_layers()}
    sites = {"output": next(v for k, v in layers.items() if k.endswith("query")),
             "feedforward": next(v for k, v in layers.items() if k.endswith("intermediate.dense"))}
    originals = {}
    for kind, layer in sites.items():
        adapter, base = layer.adapters["default"], layer.base_layer
        with torch.no_grad():
            base.bias.normal_()
        assert adapter.ia3_l.dtype == torch.float32
        l = adapter.ia3_l.detach().flatten().double()
        w, b = base.weight.detach().double(), base.bias.detach().double()
        x = torch.randn(3, w.shape[1]).to(torch.bfloat16)
        h = base(x)
        expected = (x.double() @ w.t() + b) * l if kind == "output" else (x.double() * l) @ w.t() + b
        tolerance = 3e-2 * float(expected.abs().max())
        got, delta = adapter.forward(x, h, base), adapter.delta(x, h, base)
        assert got.dtype == delta.dtype == torch.bfloat16, kind
        assert torch.allclose(got.double(), expected, atol=tolerance), kind
        assert torch.allclose((h.double() + delta.double()), expected, atol=tolerance), kind
        if kind == "feedforward":
            scaled = adapter.base_input(x)
            assert scaled.dtype == torch.bfloat16
            assert torch.equal(scaled, (x.float() * l.float()).to(torch.bfloat16))
        originals[kind] = (base.weight.detach().clone(), base.bias.detach().clone())
    model.merge_adapter(["default"])
    for kind, layer in sites.items():
        base, l = layer.base_layer, layer.adapters["default"].ia3_l.detach()
        w, b = originals[kind]
        assert base.weight.dtype == base.bias.dtype == torch.bfloat16, kind
        assert torch.equal(base.weight, (w.float() * l).to(torch.bfloat16)), kind
        expected_bias = (b.float() * l.flatten()).to(torch.bfloat16) if kind == "output" else b
        assert torch.equal(base.bias, expected_bias), kind
    model.unmerge_adapter()
    for kind, layer in sites.items():
        base, l = layer.base_layer, layer.adapters["default"].ia3_l.detach()
        w, b = originals[kind]
        assert base.weight.dtype == base.bias.dtype == torch.bfloat16, kind
        merged_w = (w.float() * l).to(torch.bfloat16)
        assert torch.equal(base.weight, (merged_w.float() / l).to(torch.bfloat16)), kind
        if kind == "output":
            merged_b = (b.float() * l.flatten()).to(torch.bfloat16)
            assert torch.equal(base.bias, (merged_b.float() / l.flatten()).to(torch.bfloat16))
        else:
            assert torch.equal(base.bias, b)


def test_an_all_zero_output_vector_merges_to_zero_and_unmerges_to_the_original_weight_and_bias():
    model, sites = _sites()
    layer = sites["output"]
    base = layer.base_layer
    with torch.no_grad():
        layer.adapters["default"].ia3_l.zero_()
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    model.merge_adapter(["default"])
    assert torch.equal(base.weight, torch.zeros_like(w)) and torch.equal(base.bias, torch.zeros_like(b))
    model.unmerge_adapter()
    assert torch.equal(base.weight, w) and torch.equal(base.bias, b)


def test_the_printed_module_names_shape_and_what_is_scaled():
    _, sites = _sites()
    assert sites["output"].adapters["default"].extra_repr() == "shape=(32, 1), scales=output"
    assert sites["feedforward"].adapters["default"].extra_repr() == "shape=(1, 32), scales=input"


def test_feedforward_delta_on_a_bias_free_quantized_layer_is_w_times_x_scaled_by_l_minus_one():
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 96, bias=False).state_dict())
    spec = "ia3[init_ia3_weights=false,target_modules=['0'],feedforward_modules=['0']]"
    model = peftkit.adapt(torch.nn.Sequential(layer.to("cpu")), spec).train()  # .to() quantizes the weight
    site = dict(model.tuner_layers())["0"]
    adapter, base = site.adapters["default"], site.base_layer
    weight = BF.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    l = adapter.ia3_l.detach().flatten().double()
    x = torch.randn(3, 64)
    delta = adapter.delta(x, base(x), base)
    assert torch.allclose(delta.double(), (x.double() * (l - 1)) @ weight.t(), atol=1e-4)


def test_on_a_4bit_layer_the_scaled_input_is_computed_in_float32_and_handed_over_in_the_inputs_dtype():
    """Feed-forward IA3 on a quantized layer: x * l (alone) and x * (l - 1) (the change a composition adds)
    are computed in the vector's float32 from x rounded to float32, then handed to the layer in x's dtype
    (the layer rounds a bfloat16 input no further; a float64 one it computes in float32 again)."""
    adapter, base, computes = four_bit_site("ia3[init_ia3_weights=false,target_modules=['0'],"
                                            "feedforward_modules=['0']]")
    l = adapter.ia3_l.detach().flatten()
    bias = base.bias.detach()
    for dtype in (torch.bfloat16, torch.float64):
        x = torch.randn(3, 64, dtype=torch.float64).to(dtype)
        h = computes(x)
        with torch.no_grad():
            scaled = adapter.base_input(x)
            delta = adapter.delta(x, h, base)
        assert scaled.dtype == delta.dtype == dtype
        assert torch.equal(scaled, (x.float() * l).to(dtype))
        assert torch.equal(delta, (computes((x.float() * (l - 1)).to(dtype)) - bias).to(dtype))


def test_a_bfloat16_feedforward_vector_keeps_the_input_not_a_float32_copy_for_its_gradient():
    """x * l with a float32 l computes in float32 by type promotion; autograd then keeps the bfloat16 x for
    l's gradient, where multiplying a float32 copy of x (PEFT's way) keeps that copy: twice x's memory."""
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert").to(torch.bfloat16), SPEC)
    layer = next(v for k, v in model.tuner_layers() if k.endswith("intermediate.dense"))
    adapter = layer.adapters["default"]
    x = torch.randn(64, layer.base_layer.in_features).to(torch.bfloat16).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    input_sized = [t for t in saved if t.numel() == x.numel()]
    assert input_sized and all(t.dtype == torch.bfloat16 for t in input_sized)
    seed = torch.randn(out.shape).to(torch.bfloat16)
    (grad_l,) = torch.autograd.grad(out, [adapter.ia3_l], seed)
    weight = layer.base_layer.weight.double()
    expected = ((seed.double() @ weight) * x.detach().double()).sum(0)  # d/dl of (x * l) W^T, in float64
    assert grad_l.dtype == torch.float32
    torch.testing.assert_close(grad_l.flatten().double(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


# -- inference alone at a plain linear layer (IA3Vector.forward_alone) -------------------------------------

def _ia3_layer(feedforward: bool, conv1d: bool, bias: bool, dtype: torch.dtype, in_f: int = 6, out_f: int = 5):
    from peftkit.plugins.ia3.layer import IA3Vector
    from tests.method_helpers import frozen_layer

    base = frozen_layer(in_f, out_f, conv1d=conv1d, bias=bias, dtype=dtype)
    torch.manual_seed(3)
    vector_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # PEFT's: float32 on half precision
    return IA3Vector(base, feedforward, init_weights=False, dtype=vector_dtype), base


def _hand(adapter, base, x: torch.Tensor) -> torch.Tensor:
    """The plain formula in float64: (x W^T + b) * l, or (x * l) W^T + b."""
    w = (base.weight.t() if type(base).__name__ == "Conv1D" else base.weight).double()
    l = adapter.ia3_l.detach().flatten().double()
    b = 0 if base.bias is None else base.bias.double()
    x = x.double()
    return (x * l) @ w.t() + b if adapter.feedforward else (x @ w.t() + b) * l


@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_scaling_in_inference_scales_the_fresh_output_in_place(conv1d, bias, dtype):
    """Alone in inference, output scaling multiplies the base product in place: one (tokens, out)
    tensor in all, the formula's values, and in bfloat16 exactly the unfused forward's."""
    adapter, base = _ia3_layer(False, conv1d, bias, dtype)
    x = torch.randn(2, 7, 6).to(dtype)
    with torch.no_grad():
        out = adapter.forward_alone(x, base)
        unfused = adapter.forward(x, base(x), base)
        fresh = new_tensors(lambda: adapter.forward_alone(x, base))
    assert out.dtype == dtype and out.shape == (2, 7, 5)
    assert torch.equal(out, unfused)
    assert len([shape for _, shape in fresh if torch.Size(shape).numel() == 2 * 7 * 5]) == 1  # the base product
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), _hand(adapter, base, x), rtol=tolerance, atol=tolerance)


def test_the_in_place_scaling_is_left_to_output_scaling_in_inference_at_a_plain_layer():
    """forward_alone answers None (the TunerLayer's own path) in training, for input scaling, and at a layer
    that is not a plain frozen Linear/Conv1D."""
    adapter, base = _ia3_layer(False, False, True, torch.float32)
    x = torch.randn(40, 6)
    assert adapter.forward_alone(x, base) is None  # gradients on: training
    with torch.no_grad():
        assert adapter.forward_alone(x, base) is not None
        feedforward, feedforward_base = _ia3_layer(True, False, True, torch.float32)
        assert feedforward.forward_alone(x, feedforward_base) is None
        base.weight.requires_grad_(True)  # a trained base weight: not a plain frozen layer
        assert adapter.forward_alone(x, base) is None


def test_an_adapted_model_in_inference_equals_its_training_path():
    """Through the TunerLayer: the inference forward (in-place output scaling) equals the same model's
    forward with gradients on (the plain path), eval mode both, to the bit."""
    model, _ = _sites()
    model.eval()
    ids = torch.randint(0, 100, (4, 64))
    with torch.no_grad():
        fast = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    plain = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].detach()
    assert torch.equal(fast, plain)
