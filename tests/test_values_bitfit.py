"""BitFit layer values that tests/test_method_bitfit.py leaves unchecked (found by `make mutate`): the
random init's spread, channel-first layers (a Conv1d's delta on dim 1), a bfloat16 base through forward,
merge and unmerge, a bias created by merging and taken away again, and an out-of-order unmerge."""

from __future__ import annotations

import torch
import torch.nn as nn

import peftkit
from peftkit.plugins.bitfit.layer import RANDOM_STD
from tests.tiny_models import build_tiny


def _layer(model: peftkit.AdaptedModel, suffix: str):
    return next(layer for site, layer in model.tuner_layers() if site.endswith(suffix))


def test_a_non_identity_init_draws_deltas_with_the_documented_spread():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert"), "bitfit[init_weights=false]")
    deltas = torch.cat([layer.adapters["default"].bias_delta.detach() for _, layer in model.tuner_layers()])
    assert deltas.numel() > 500
    assert abs(float(deltas.std()) - RANDOM_STD) < 0.2 * RANDOM_STD
    assert abs(float(deltas.mean())) < 0.2 * RANDOM_STD


def test_a_conv1d_delta_acts_on_its_channel_dimension():
    torch.manual_seed(0)
    model = peftkit.adapt(nn.Sequential(nn.Conv1d(3, 4, kernel_size=3)),
                          "bitfit[init_weights=false,target_modules=['0']]")
    layer = _layer(model, "0")
    adapter, base = layer.adapters["default"], layer.base_layer
    d = adapter.bias_delta.detach()
    x = torch.randn(2, 3, 7)
    h = base(x)  # (2, 4, 5): channels on dim 1, positions last
    expected = h + d.view(1, 4, 1)
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.equal(adapter.delta(x, h, base), d.view(1, 4, 1).expand(2, 4, 5))


def test_a_bfloat16_base_keeps_its_dtype_and_merging_rounds_the_delta_once():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("bert").to(torch.bfloat16),
                          'bitfit[init_weights=false,target_modules=["query"]]')
    layer = _layer(model, "layer.0.attention.self.query")
    adapter, base = layer.adapters["default"], layer.base_layer
    with torch.no_grad():  # BERT starts with zero biases
        base.bias.normal_()
        adapter.bias_delta.normal_(std=0.3)
    b, d = base.bias.detach().clone(), adapter.bias_delta.detach().clone()
    assert d.dtype == torch.float32
    x = torch.randn(3, 32).to(torch.bfloat16)
    h = base(x)
    out = adapter.forward(x, h, base)
    assert out.dtype == torch.bfloat16 and torch.equal(out, h + d.to(torch.bfloat16))
    model.merge_adapter(["default"])
    merged = b + d.to(torch.bfloat16)  # the delta rounded to bfloat16, then added in bfloat16
    assert base.bias.dtype == torch.bfloat16 and torch.equal(base.bias, merged)
    model.unmerge_adapter()
    assert torch.equal(base.bias, b)


def test_merging_into_a_bias_free_layer_creates_a_frozen_bias_of_its_dtype_and_unmerging_removes_it():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16),
                          'bitfit[add_missing=true,init_weights=false,target_modules=["q_proj"]]')
    layer = _layer(model, "layers.0.self_attn.q_proj")
    base, d = layer.base_layer, layer.adapters["default"].bias_delta.detach().clone()
    assert base.bias is None
    x = torch.randn(3, base.in_features).to(torch.bfloat16)
    model.merge_adapter(["default"])
    assert base.bias.dtype == torch.bfloat16 and not base.bias.requires_grad
    assert torch.equal(base.bias, d.to(torch.bfloat16))
    expected = x.double() @ base.weight.double().t() + d.double()
    assert torch.allclose(base(x).double(), expected, atol=2e-2 * float(expected.abs().max()))
    assert not any(p is base.bias for p in model.parameters() if p.requires_grad)
    model.unmerge_adapter()
    assert base.bias is None


def test_unmerging_out_of_order_subtracts_the_rounded_delta():
    """Merged a then b at one site, a unmerged first: a cannot restore its saved bias (b is still in
    it), so it subtracts exactly what it added (its delta rounded to the bias's dtype)."""
    torch.manual_seed(0)
    spec = 'bitfit[init_weights=false,target_modules=["query"]]'
    model = peftkit.adapt(build_tiny("bert").to(torch.bfloat16), spec)
    model.add_adapter("b", spec)
    layer = _layer(model, "layer.0.attention.self.query")
    base = layer.base_layer
    with torch.no_grad():
        base.bias.normal_()
        for name in ("default", "b"):
            layer.adapters[name].bias_delta.normal_(std=0.3)
    b0 = base.bias.detach().clone()
    da, db = (layer.adapters[n].bias_delta.detach().to(torch.bfloat16) for n in ("default", "b"))
    model.merge_adapter(["default", "b"])
    assert torch.equal(base.bias, b0 + da + db)
    layer.unmerge("default")
    assert torch.equal(base.bias, b0 + da + db - da)
    layer.unmerge("b")  # the bias changed since b's merge too (a left): b subtracts as well
    assert torch.equal(base.bias, b0 + da + db - da - db)


def test_the_printed_module_names_the_delta_shape():
    model = peftkit.adapt(build_tiny("bert"), 'bitfit[target_modules=["query"]]')
    assert _layer(model, "layer.0.attention.self.query").adapters["default"].extra_repr() == "shape=(32,)"
