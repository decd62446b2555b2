"""Compacter's PHM projections and MAD-X's invertible adapters: how their tensors are drawn and laid out,
and their changes inside a composition, against hand formulas (the layer values themselves are in
tests/test_method_bottleneck_compacter.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.plugins.bottleneck.config import SeqBnConfig
from peftkit.plugins.bottleneck.invertible import adapterhub_name, nice_shapes, nice_tensors
from peftkit.plugins.bottleneck.phm import PHMLinear, shared_phm_tensors
from peftkit.testing import randomize

from .test_method_bottleneck_compacter import _bert_mlm

FLOAT64 = {"dtype": torch.float64}


def _config(**options) -> SeqBnConfig:
    return SeqBnConfig(phm_layer=True, **options)


@pytest.mark.parametrize("how", ["glorot-uniform", "glorot-normal", "phm", "normal"])
def test_each_slice_of_a_weight_factor_is_drawn_on_its_own(how):
    """Glorot over each (in/n, out/n) slice (bound sqrt(6 / (fan_in + fan_out)), std sqrt(2 / (...))),
    or N(0, phm_init_range): not over the whole (n, in/n, out/n) tensor."""
    torch.manual_seed(0)
    layer = PHMLinear(64, 64, "down", _config(phm_dim=2, factorized_phm_W=False, hypercomplex_nonlinearity=how,
                                              phm_init_range=0.05), zero=False, **FLOAT64)
    assert layer.W.shape == (2, 32, 32)
    for part in layer.W.detach():
        if how == "glorot-uniform":
            bound = math.sqrt(6 / 64)
            assert part.abs().max() <= bound and part.abs().max() > 0.95 * bound
        else:
            std = 0.05 if how == "normal" else math.sqrt(2 / 64)
            assert abs(float(part.std()) / std - 1) < 0.1 and abs(float(part.mean())) < 0.2 * std


@pytest.mark.parametrize("how", ["normal", "uniform"])
def test_rule_matrices_are_drawn_with_phm_init_range_when_shared_and_0_01_per_layer(how):
    torch.manual_seed(0)
    config = _config(phm_dim=8, phm_c_init=how, phm_init_range=0.3, shared_phm_rule=False)
    layer = PHMLinear(64, 64, "down", config, zero=False, **FLOAT64)
    assert isinstance(layer.phm_rule, torch.nn.Parameter)  # learn_phm (the default): the rule trains
    own = layer.phm_rule.detach()
    shared = shared_phm_tensors(_config(phm_dim=8, phm_c_init=how, phm_init_range=0.3), 64, 16, zero_up=False,
                                factory=FLOAT64)["phm_rule"].detach()
    assert own.shape == shared.shape == (8, 8, 8)
    for rule, scale in ((own, 0.01), (shared, 0.3 if how == "normal" else 1.0)):
        if how == "uniform":  # over [-scale, scale]: both ends reached
            assert rule.abs().max() <= scale and rule.max() > 0.95 * scale and rule.min() < -0.95 * scale
        else:
            assert abs(float(rule.std()) / scale - 1) < 0.1


@pytest.mark.parametrize("factorized", [True, False])
def test_the_up_projection_starts_at_zero_through_one_factor_and_the_rest_is_drawn(factorized):
    torch.manual_seed(0)
    config = _config(phm_dim=2, factorized_phm_W=factorized, shared_W_phm=False)
    up = PHMLinear(8, 16, "up", config, zero=True, **FLOAT64)
    down = PHMLinear(16, 8, "down", config, zero=False, **FLOAT64)
    zero_name, drawn_name = ("W_right", "W_left") if factorized else ("W", None)
    assert torch.count_nonzero(getattr(up, zero_name)) == 0
    assert torch.count_nonzero(getattr(down, zero_name)) == getattr(down, zero_name).numel()
    if drawn_name:
        assert torch.count_nonzero(getattr(up, drawn_name)) == getattr(up, drawn_name).numel()
    assert torch.count_nonzero(up.b) == 0 and up.b.shape == (16,) and up.b.dtype == torch.float64
    shared = shared_phm_tensors(_config(phm_dim=2, factorized_phm_W=factorized, shared_W_phm=True), 16, 8,
                                zero_up=True, factory=FLOAT64)
    shapes = {name: tuple(t.shape) for name, t in shared.items()}
    if factorized:
        assert shapes == {"phm_rule": (2, 2, 2), "W_down_left": (2, 8, 1), "W_down_right": (2, 1, 4),
                          "W_up_left": (2, 4, 1), "W_up_right": (2, 1, 8)}
        assert torch.count_nonzero(shared["W_up_right"]) == 0 and torch.count_nonzero(shared["W_up_left"]) == 8
        assert torch.count_nonzero(shared["W_down_right"]) == 8
    else:
        assert shapes == {"phm_rule": (2, 2, 2), "W_down": (2, 8, 4), "W_up": (2, 4, 8)}
        assert torch.count_nonzero(shared["W_up"]) == 0 and torch.count_nonzero(shared["W_down"]) == 64
    assert all(isinstance(t, torch.nn.Parameter) for t in shared.values())
    drawn = shared_phm_tensors(_config(phm_dim=2, factorized_phm_W=False, shared_W_phm=True, phm_init_range=0.05,
                                       hypercomplex_nonlinearity="normal"), 128, 128, zero_up=False, factory=FLOAT64)
    for part in drawn["W_down"].detach():  # shared weight factors follow hypercomplex_nonlinearity too
        assert abs(float(part.std()) / 0.05 - 1) < 0.1


def test_frozen_rules_are_buffers_and_a_bias_free_layer_is_its_kronecker_sum():
    """learn_phm=false: the rules are not parameters (a per-layer rule is a buffer, so it still moves and
    saves with the module); phm_bias=false: y = x H, and the parameters are the weight factors alone."""
    torch.manual_seed(0)
    config = _config(phm_dim=2, factorized_phm_rule=True, shared_phm_rule=False, learn_phm=False, phm_bias=False,
                     phm_rank=3)
    layer = PHMLinear(8, 6, "down", config, zero=False, **FLOAT64)
    assert {n for n, _ in layer.named_parameters()} == {"W_left", "W_right"}
    assert {n for n, _ in layer.named_buffers()} == {"phm_rule_left", "phm_rule_right"}
    assert layer.b is None and layer.parameter_count() == 2 * 4 * 3 + 2 * 3 * 3
    shared = shared_phm_tensors(_config(phm_dim=2, learn_phm=False), 8, 4, zero_up=False, factory=FLOAT64)
    assert not isinstance(shared["phm_rule"], torch.nn.Parameter) and not shared["phm_rule"].requires_grad
    rule = torch.bmm(layer.phm_rule_left, layer.phm_rule_right)
    weight = torch.bmm(layer.W_left, layer.W_right)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x, None), x @ sum(torch.kron(rule[i], weight[i]) for i in range(2)))
    assert layer.extra_repr() == "in=8, out=6, n=2"
    narrow = x.float()  # the layer reads its tensors in the input's dtype
    torch.testing.assert_close(layer(narrow, None), (x @ sum(torch.kron(rule[i], weight[i]) for i in range(2))).float())


def test_a_compacter_without_biases_computes_in_its_shared_factors_dtype():
    """Compacter++ with phm_bias=false and shared weights: the down projection has no tensor of its own, so
    the branch's dtype is read from the shared factors (a float64 model computes in float64)."""
    model = peftkit.adapt(_bert_mlm().double(), "compacterpp[reduction_factor=4,phm_bias=false,shared_W_phm=true,"
                                                "init_weights=false]")
    site = model.base_model.bert.encoder.layer[1].output.dense
    adapter = site.adapters["default"]
    assert list(adapter.adapter_down.parameters()) == [] and adapter.compute_dtype == torch.float64
    shared = model.shared_state("default")
    h = torch.randn(2, 5, 32, dtype=torch.float64)
    rule = shared.phm_rule
    down = sum(torch.kron(rule[i], torch.bmm(shared.W_down_left, shared.W_down_right)[i]) for i in range(4))
    up = sum(torch.kron(rule[i], torch.bmm(shared.W_up_left, shared.W_up_right)[i]) for i in range(4))
    torch.testing.assert_close(adapter(h, h, site.base_layer), h + F.relu(h @ down) @ up)


def test_nice_shapes_split_an_odd_hidden_size_and_the_identity_init_zeroes_the_output_layers():
    assert nice_shapes(33, 2.0) == {
        "inv_F_0_weight": (8, 17), "inv_F_0_bias": (8,), "inv_F_2_weight": (16, 8), "inv_F_2_bias": (16,),
        "inv_G_0_weight": (8, 16), "inv_G_0_bias": (8,), "inv_G_2_weight": (17, 8), "inv_G_2_bias": (17,)}
    torch.manual_seed(0)
    for identity in (True, False):
        tensors = nice_tensors(128, 1.0, identity, FLOAT64)
        for name, tensor in tensors.items():
            assert isinstance(tensor, torch.nn.Parameter) and tensor.dtype == torch.float64
            if name.endswith("_bias") or (identity and "_2_" in name):
                assert torch.count_nonzero(tensor) == 0, name
            else:
                assert abs(float(tensor.detach().std()) / 0.02 - 1) < 0.1, name
                assert abs(float(tensor.detach().mean())) < 0.005, name
    assert adapterhub_name("inv_G_2_bias") == "G.2.bias"
    # the bottleneck is size // factor in floating point, as adapters computes it (16 // 0.1 is 159.0)
    assert nice_shapes(32, 0.1)["inv_F_0_weight"] == (159, 16)


def test_inside_a_composition_the_blocks_add_their_change_to_the_output():
    """At the embedding output the change is couple(h) - h; at the LM head's output layer, for an input x,
    base(uncouple(x)) - base(x) (so stacked with other adapters there, the inverse adds what it changes)."""
    model = peftkit.adapt(_bert_mlm(), "seq_bn_inv[init_weights=false]")
    randomize(model, "default", seed=5, scale=0.5)
    forward = model.base_model.bert.embeddings.dropout.adapters["default"]
    decoder = model.base_model.cls.predictions.decoder
    inverse = decoder.adapters["default"]
    shared = model.shared_state("default")
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        def net(name, t):
            hidden = F.relu(F.linear(t, getattr(shared, f"inv_{name}_0_weight"), getattr(shared, f"inv_{name}_0_bias")))
            return F.linear(hidden, getattr(shared, f"inv_{name}_2_weight"), getattr(shared, f"inv_{name}_2_bias"))
        y1 = x[..., :16] + net("F", x[..., 16:])
        coupled = torch.cat([y1, x[..., 16:] + net("G", y1)], dim=-1)
        torch.testing.assert_close(forward.delta(x, x, None), coupled - x)
        torch.testing.assert_close(forward(x, x, None), coupled)
        x2 = x[..., 16:] - net("G", x[..., :16])
        uncoupled = torch.cat([x[..., :16] - net("F", x2), x2], dim=-1)
        base = decoder.base_layer
        torch.testing.assert_close(inverse.delta(x, base(x), base), base(uncoupled) - base(x))
        torch.testing.assert_close(inverse(x, base(x), base), base(uncoupled), atol=1e-5, rtol=1e-5)
        assert inverse.base_input(x) is not None and forward.base_input(x) is None
        # float32 block tensors are read in the input's dtype
        torch.testing.assert_close(forward.couple(x.double()), coupled.double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inverse.uncouple(x.double()), uncoupled.double(), atol=1e-5, rtol=1e-5)
    assert (forward.additive, inverse.additive) == (False, True)
    assert forward.out_features == 32 and forward.tensors() == {} and inverse.tensors() == {}
    assert (forward.extra_repr(), inverse.extra_repr()) == ("NICE, hidden=32", "inverse NICE, hidden=32")


@pytest.mark.parametrize("init_weights", [True, False])
def test_a_compacter_starts_with_a_drawn_down_projection_and_a_zero_up_factor(init_weights):
    """Compacter's per-layer weight factors: the down projection (in -> bottleneck) drawn, the up projection's
    right factor zero with init_weights (the adapter starts as the identity), drawn without it."""
    torch.manual_seed(0)
    model = peftkit.adapt(_bert_mlm(), f"compacter[reduction_factor=4,init_weights={str(init_weights).lower()}]")
    adapter = model.base_model.bert.encoder.layer[1].output.dense.adapters["default"]
    down, up = adapter.adapter_down, adapter.adapter_up
    assert (down.in_features, down.out_features, up.in_features, up.out_features) == (32, 8, 8, 32)
    assert down.W_left.shape == (4, 8, 1) and down.W_right.shape == (4, 1, 2) and up.W_right.shape == (4, 1, 8)
    assert torch.count_nonzero(down.W_right) == down.W_right.numel()
    assert (torch.count_nonzero(up.W_right) == 0) == init_weights
