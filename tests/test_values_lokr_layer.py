"""The LoKr layer adapter (plugins/lokr/layer.py) against hand formulas in float64, on bare torch layers:
the factors' initial draws and dtype, rank and module dropout (PEFT's rules, at the boundary too, and
which dimension is an output channel), which path a forward takes, a trained base layer, CPU
autocast, an output in another layout, and the printed form. Fast enough for ``make mutate``
(bench/mutation_map.toml)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.plugins.lokr.layer import LokrLayer
from peftkit.plugins.lokr.shapes import LokrShapes
from tests.method_helpers import frozen_layer

D = torch.float64


def _adapted(base: nn.Module, options: str) -> tuple[nn.Module, LokrLayer]:
    """``base`` as the one adapted layer of a model (its TunerLayer) and its LoKr adapter, factors random."""
    model = nn.Sequential()
    model.add_module("proj", base.requires_grad_(False))
    torch.manual_seed(2)
    adapted = peftkit.adapt(model, f"lokr[{options},alpha=4,init_weights=false,target_modules=proj]")
    layer = adapted.base_model.proj
    return layer, layer.adapters["default"]


def _linear(in_features: int = 24, out_features: int = 20, options: str = "r=2") -> tuple[nn.Module, LokrLayer]:
    """A float64 nn.Linear with LoKr; r=2 keeps w2 a rank-r product on 24 -> 20 (w2 (5, 6)), r=8 makes it full."""
    return _adapted(frozen_layer(in_features, out_features), options)


def _update(lokr: LokrLayer, x: torch.Tensor) -> torch.Tensor:
    """s kron(w1, w2) x, from the dense update."""
    return F.linear(x, lokr.delta_out_in())


class _Draws:
    """Stands in for ``torch.rand``: returns ``values`` (a float or one value per element) for the next draws."""

    def __init__(self, values: float | list[float]) -> None:
        self.values = values

    def __call__(self, *size, device=None, **_) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, torch.Size)) else size
        if isinstance(self.values, float):
            return torch.full(shape, self.values, device=device)
        return torch.tensor(self.values, device=device).reshape(shape)


# -- the factors -----------------------------------------------------------------------------------------------------


def _plan(out_f: int, in_f: int, kernel: tuple[int, ...], r: int, **options) -> LokrShapes:
    flags = dict(decompose_both=False, decompose_factor=-1, use_effective_conv2d=False) | options
    return LokrShapes.plan(out_f, in_f, kernel, r, **flags)


@pytest.mark.parametrize("init, zero", [(True, {"lokr_w1", "lokr_w1_a"}), ("lycoris", {"lokr_w2", "lokr_w2_b"}),
                                        (False, set())])
@pytest.mark.parametrize("kind", ["linear", "decompose_both", "tucker"])
def test_factors_start_at_zero_or_kaiming_uniform_with_bound_one_over_sqrt_fan_in(init, zero, kind) -> None:
    """PEFT's init: kaiming_uniform_(a=sqrt(5)), i.e. uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in the
    product of every dimension past the first, drawn in file-key order, in the base weight's float64."""
    if kind == "tucker":
        base, shapes = nn.Conv2d(6, 8, 3).to(D), _plan(8, 6, (3, 3), 1, use_effective_conv2d=True)
    else:
        base, shapes = frozen_layer(64, 32), _plan(32, 64, (), 1, decompose_both=kind == "decompose_both")
    torch.manual_seed(5)
    lokr = LokrLayer(base, shapes, scale=1.0, rank_dropout=0.0, module_dropout=0.0, rank_dropout_scale=False,
                     init_weights=init)
    torch.manual_seed(5)
    for key, shape in shapes.tensor_shapes().items():
        bound = 1 / math.sqrt(math.prod(shape[1:]))
        expected = torch.zeros(shape, dtype=D) if key in zero else torch.empty(shape, dtype=D).uniform_(-bound, bound)
        torch.testing.assert_close(getattr(lokr, key).detach(), expected, rtol=1e-12, atol=0, msg=key)
    assert {t.dtype for t in lokr.tensors().values()} == {D}


# -- rank and module dropout -----------------------------------------------------------------------------------------


CHANNELS = {"linear": 20, "conv1d": 8, "conv2d": 6}


def _dropout_case(kind: str, options: str) -> tuple[nn.Module, LokrLayer, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        layer, lokr = _linear(options=options)
        return layer, lokr, torch.randn(3, 4, 24, dtype=D)
    if kind == "conv1d":
        layer, lokr = _adapted(nn.Conv1d(6, 8, 3, padding=1).to(D), options)
        return layer, lokr, torch.randn(2, 6, 5, dtype=D)
    layer, lokr = _adapted(nn.Conv2d(4, 6, 3, padding=1).to(D), options)
    return layer, lokr, torch.randn(2, 4, 5, 5, dtype=D)


def _full_update(layer: nn.Module, lokr: LokrLayer, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        return _update(lokr, x)
    return base._conv_forward(x, lokr.delta_out_in(), None)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("kind", list(CHANNELS))
def test_rank_dropout_drops_whole_output_channels_in_training_only(kind: str, scale: bool) -> None:
    """The update's output channels (a linear output's last dimension, dimension 1 of a convolution's
    (N, C, ...)) kept where a uniform draw exceeds rank_dropout, one draw per channel and forward, rescaled
    by 1 / (kept share) with rank_dropout_scale; in eval the whole update."""
    layer, lokr, x = _dropout_case(kind, f"r=2,rank_dropout=0.5,rank_dropout_scale={str(scale).lower()}")
    base = layer.base_layer
    with torch.no_grad():
        h, update = base(x), _full_update(layer, lokr, x)
        layer.eval()
        torch.testing.assert_close(layer(x), h + update)
        layer.train()
        torch.manual_seed(11)
        got = layer(x)
    torch.manual_seed(11)
    keep = (torch.rand(CHANNELS[kind]) > 0.5).to(D)
    assert 0 < keep.sum() < CHANNELS[kind]
    if scale:
        keep = keep / keep.mean()
    shape = [1] * x.dim()
    shape[-1 if kind == "linear" else 1] = -1
    torch.testing.assert_close(got, h + update * keep.reshape(shape))


def test_a_rank_dropout_draw_equal_to_the_probability_drops_the_channel(monkeypatch) -> None:
    """PEFT keeps a channel only when its draw exceeds rank_dropout; with rank_dropout_scale, one kept channel
    of 20 is scaled by 20, and none kept gives a zero update (PEFT's 0 / 0 would give NaN)."""
    layer, lokr = _linear(options="r=2,rank_dropout=0.25,rank_dropout_scale=true")
    x, h = torch.randn(3, 24, dtype=D), torch.zeros(3, 20, dtype=D)
    lokr.train()
    with torch.no_grad():
        monkeypatch.setattr(torch, "rand", _Draws(0.25))
        assert torch.equal(lokr.delta(x, h, layer.base_layer), h)
        monkeypatch.setattr(torch, "rand", _Draws([0.25] * 7 + [0.26] + [0.0] * 12))
        got = lokr.delta(x, h, layer.base_layer)
    expected = torch.zeros(3, 20, dtype=D)
    expected[:, 7] = 20 * _update(lokr, x).detach()[:, 7]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("options", ["r=2", "r=8"])  # a rank-r w2 (fused path) and a full one
@pytest.mark.parametrize("which", ["module_dropout", "rank_dropout"])
def test_either_dropout_alone_acts_in_training(monkeypatch, which: str, options: str) -> None:
    """module_dropout skips the whole update when its draw is at most the probability (PEFT: applied only
    when the draw exceeds it); rank_dropout alone drops channels: draws below 0.5 drop everything, above
    keep everything."""
    layer, lokr = _linear(options=f"{options},{which}=0.5")
    x = torch.randn(2, 3, 24, dtype=D)
    layer.train()
    with torch.no_grad():
        h, full = layer.base_layer(x), layer.base_layer(x) + _update(lokr, x)
        for draw, expected in ((0.5 if which == "module_dropout" else 0.25, h), (0.75, full)):
            monkeypatch.setattr(torch, "rand", _Draws(draw))
            torch.testing.assert_close(layer(x), expected)


# -- paths -----------------------------------------------------------------------------------------------------------


def _node(out: torch.Tensor) -> str:
    node = out.grad_fn
    while type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
        node = node.next_functions[0][0]
    return type(node).__name__


@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 3, 24)])
def test_a_rank_r_w2_runs_fused_on_inputs_of_any_batch_shape(shape: tuple[int, ...]) -> None:
    layer, lokr = _linear()
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x) + _update(lokr, x))
    if len(shape) > 1:  # 2-d and more: the whole layer is one autograd node
        assert _node(out) == "_LokrFnBackward"


def test_a_base_layer_that_trains_gets_its_gradient() -> None:
    """A base weight that requires grad is no plain frozen layer: the unfused path runs, so the weight gets
    its gradient g^T x (the fused node returns none for it)."""
    layer, lokr = _linear()
    base = layer.base_layer.requires_grad_(True)
    x, g = torch.randn(4, 24, dtype=D), torch.randn(4, 20, dtype=D)
    layer(x).backward(g)
    torch.testing.assert_close(base.weight.grad, g.t() @ x)
    torch.testing.assert_close(base.bias.grad, g.sum(0))


def test_cpu_autocast_computes_in_autocasts_dtype() -> None:
    """Under autocast the layer (its fused node, tests/test_autocast_fused.py) computes in autocast's dtype:
    h + delta computed by hand under autocast, to bfloat16 rounding (the two round in other places)."""
    layer, lokr = _linear(options="r=2")
    layer.to(torch.float32)
    x = torch.randn(3, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        h = layer.base_layer(x)
        expected = h + lokr.delta(x, h, layer.base_layer)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("in_features, out_features, options", [(24, 20, "r=2"), (24, 20, "r=8"), (64, 16, "r=8")])
def test_an_output_in_another_layout_gets_the_update_added(in_features: int, out_features: int,
                                                           options: str) -> None:
    """forward(x, h) with h a transposed (non-contiguous) view: h + s kron(w1, w2) x, whichever product
    order or factor form the layer uses."""
    layer, lokr = _linear(in_features, out_features, options)
    x = torch.randn(6, in_features, dtype=D)
    h = torch.randn(out_features, 6, dtype=D).t()
    with torch.no_grad():
        torch.testing.assert_close(lokr.forward(x, h, layer.base_layer), h + _update(lokr, x))


T = 16  # tokens


def _products(run) -> int:
    """Matrix-product FLOPs of ``run()`` (counted, not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("in_features, out_features, options, flops", [
    # full w2, w1 applied first: (tokens * in_n, in_m) w1^T then (tokens * out_l, in_n) w2^T,
    # 2 T out_l in_n (in_m + out_k) = 2 T 4 8 (8 + 8), cheaper than w2 first, 2 T in_m out_k (in_n + out_l) = 2 T 8 8 12
    (64, 32, "r=8", 2 * T * 4 * 8 * (8 + 8)),
    # full w2, w2 applied first: 2 T in_m out_k (in_n + out_l) = 2 T 4 8 (8 + 8), cheaper than 2 T 8 8 (4 + 8)
    (32, 64, "r=8", 2 * T * 4 * 8 * (8 + 8)),
    # rank-r w2 with r < in_n: X w2_b^T, w1 by that, then by w2_a^T: 2 T r (in_n in_m + in_m out_l + out_l out_k)
    (24, 20, "r=2", 2 * T * 2 * (6 * 4 + 4 * 4 + 4 * 5)),
    # rank-r w2 with r = in_n (2 of 256 = 16 x 16 by 4 = 2 x 2): w2 = w2_a w2_b (2 out_k r in_n) then both orders
    # cost 2 T 16 2 (2 + 16); the three rank-r products would cost more per token, 2 T 2 (4 + 32 + 256)
    (4, 256, "r=2", 2 * 16 * 2 * 2 + 2 * T * 16 * 2 * (2 + 16)),
])
def test_the_update_runs_its_cheapest_products(in_features: int, out_features: int, options: str, flops: int) -> None:
    """The unfused update's matrix products: a rank-r w2 applied factor by factor when r < in_n, else w2
    formed and the cheaper order of s w1 X w2^T (both orders give the same value: test_an_output_in_another_layout_gets_the_update_added)."""
    _, lokr = _linear(in_features, out_features, options)
    x = torch.randn(T, in_features, dtype=D)
    assert _products(lambda: lokr._linear_delta(x)) == flops


# -- printed form ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base, options, expected", [
    (lambda: frozen_layer(24, 20), "r=8", "w1=(4, 4), w2=(5, 6), scale=0.5"),
    (lambda: frozen_layer(64, 32), "r=1,decompose_both=true", "w1=(4, 8) rank 1, w2=(8, 8) rank 1, scale=4"),
    (lambda: nn.Conv2d(6, 8, 3), "r=1", "w1=(2, 2), w2=(4, 3, 3, 3) rank 1, scale=4"),
    (lambda: nn.Conv1d(6, 8, 3), "r=1,use_effective_conv2d=true", "w1=(2, 2), w2=(4, 3, 3) tucker rank 1, scale=4"),
])
def test_the_printed_form_names_each_factor_its_shape_and_rank(base, options: str, expected: str) -> None:
    _, lokr = _adapted(base(), options)
    assert lokr.extra_repr() == expected
