"""VeRA layer values that tests/test_method_vera.py leaves unchecked (found by `make mutate`): the
starting vectors of each init, dropout only in training, and a half-precision base."""

from __future__ import annotations

import torch

import peftkit
from tests.tiny_models import build_tiny

SPEC = 'vera[r=8,target_modules=["q_proj"]{}]'


def _layers(model: peftkit.AdaptedModel, name: str = "default") -> list:
    return [layer for _, layer in model.tuner_layers() if name in layer.adapters]


def _by_hand(layer, x: torch.Tensor) -> torch.Tensor:
    """lambda_b * B (lambda_d * A x), in float64, from the layer's own shared projections."""
    adapter = layer.adapters["default"]
    a = adapter.shared.vera_A[: adapter.r, : adapter.in_features].double()
    b = adapter.shared.vera_B[: adapter.out_features, : adapter.r].double()
    return adapter.vera_lambda_b.double() * ((adapter.vera_lambda_d.double() * (x.double() @ a.t())) @ b.t())


def test_the_starting_vectors_of_each_init():
    torch.manual_seed(0)
    identity = peftkit.adapt(build_tiny("llama"), SPEC.format(",d_initial=0.3"))
    for layer in _layers(identity):
        adapter = layer.adapters["default"]
        assert torch.equal(adapter.vera_lambda_b, torch.zeros(adapter.out_features))
        assert torch.equal(adapter.vera_lambda_d, torch.full((8,), 0.3))
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), SPEC.format(",init_weights=false"))
    for layer in _layers(model):
        adapter = layer.adapters["default"]
        assert torch.equal(adapter.vera_lambda_b, torch.ones(adapter.out_features))
        assert adapter.vera_lambda_d.shape == (8,) and adapter.vera_lambda_d.std() > 0.3  # randn draws
        x = torch.randn(3, adapter.in_features)
        got = adapter.delta(x, layer.base_layer(x), layer.base_layer)
        assert torch.allclose(got.double(), _by_hand(layer, x), atol=1e-5)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), SPEC.format(",init_weights=false,vera_dropout=0.5"))
    layer = _layers(model)[0]
    adapter = layer.adapters["default"]
    x = torch.randn(4, adapter.in_features)
    h = layer.base_layer(x)
    model.eval()
    assert torch.allclose(adapter.delta(x, h, layer.base_layer).double(), _by_hand(layer, x), atol=1e-5)
    model.train()
    torch.manual_seed(1)
    dropped = adapter.delta(x, h, layer.base_layer)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    assert torch.allclose(dropped.double(), _by_hand(layer, x * mask), atol=1e-5)


def test_a_bfloat16_base_keeps_float32_vectors_and_returns_its_own_dtype():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16), SPEC.format(",init_weights=false"))
    layer = _layers(model)[0]
    adapter = layer.adapters["default"]
    assert adapter.vera_lambda_b.dtype == adapter.vera_lambda_d.dtype == torch.float32
    x = torch.randn(3, adapter.in_features, dtype=torch.bfloat16)
    got = adapter.delta(x, layer.base_layer(x), layer.base_layer)
    assert got.dtype == torch.bfloat16
    expected = _by_hand(layer, x)
    assert torch.allclose(got.double(), expected, atol=2e-2 * float(expected.abs().max()))


def test_a_float64_base_gets_float64_vectors_and_an_exact_update():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").double(), SPEC.format(",init_weights=false"))
    layer = _layers(model)[0]
    adapter = layer.adapters["default"]
    assert adapter.vera_lambda_b.dtype == adapter.vera_lambda_d.dtype == torch.float64
    x = torch.randn(3, adapter.in_features, dtype=torch.float64)
    got = adapter.delta(x, layer.base_layer(x), layer.base_layer)
    assert got.dtype == torch.float64 and torch.allclose(got, _by_hand(layer, x), atol=1e-12)
