"""IA3 layer values against hand formulas (found unchecked by `make mutate`): output scaling
(W x + b) * l, feed-forward input scaling W (x * l) + b, their deltas, and merge/unmerge on a
layer with a bias, zero scales included."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import MergeError
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
