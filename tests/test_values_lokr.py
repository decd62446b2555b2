"""The fused LoKr layer with a rank-r w2 (plugins/lokr/fused.py) against the Kronecker formula in float64,
on bare torch layers: the rank-major intermediates entry by entry, the output and every gradient (input,
w1, w2's two factors) for nn.Linear and GPT-2's Conv1D with and without a bias, only the gradients
autograd asks for, and the inference path without an autograd node. Fast enough for ``make mutate``
(bench/mutation_map.toml)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from peftkit.plugins.lokr.fused import DENSE_MARGIN, dense_is_cheaper, fused_lokr, rank_major_products
from tests.method_helpers import frozen_layer

OUT_L, OUT_K, IN_M, IN_N, R = 2, 5, 3, 4, 2
IN, OUT = IN_M * IN_N, OUT_L * OUT_K
D = torch.float64


def _base(conv1d: bool = False, bias: bool = True) -> nn.Module:
    return frozen_layer(IN, OUT, conv1d=conv1d, bias=bias, dtype=D)


def _factors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w1s (out_l, in_m), w2_a (out_k, r), w2_b (r, in_n), all trained."""
    torch.manual_seed(1)
    return (torch.randn(OUT_L, IN_M, dtype=D, requires_grad=True),
            torch.randn(OUT_K, R, dtype=D, requires_grad=True),
            torch.randn(R, IN_N, dtype=D, requires_grad=True))


def _hand(x: torch.Tensor, base: nn.Module, w1s, w2_a, w2_b) -> torch.Tensor:
    """x (W + kron(w1s, w2_a w2_b))^T + b."""
    weight = base.weight.t() if type(base).__name__ == "Conv1D" else base.weight
    out = x @ (weight + torch.kron(w1s, w2_a @ w2_b)).t()
    return out if base.bias is None else out + base.bias


def test_rank_major_products_hold_x_w2b_and_w1s_times_it_rank_first() -> None:
    w1s, _, w2_b = _factors()
    x2 = torch.randn(3, IN, dtype=D)
    z_t, u_t = rank_major_products(x2, w1s, w2_b, IN_M)
    tokens = x2.reshape(3, IN_M, IN_N)
    z = tokens @ w2_b.t()  # (tokens, in_m, r): X w2_b^T per token
    assert z_t.shape == (R, 3 * IN_M)
    torch.testing.assert_close(z_t, z.permute(2, 0, 1).reshape(R, -1))
    u = w1s @ z  # (tokens, out_l, r)
    assert u_t.shape == (R * 3, OUT_L)
    torch.testing.assert_close(u_t, u.permute(2, 0, 1).reshape(R * 3, OUT_L))


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True), (True, False)])
def test_output_and_every_gradient_equal_the_kronecker_formula(conv1d: bool, bias: bool, scale: float) -> None:
    """The scale multiplies the update (w1's gradient included): x (W + s kron(w1, w2_a w2_b))^T + b."""
    base = _base(conv1d, bias)
    w1s, w2_a, w2_b = _factors()
    x = torch.randn(2, 3, IN, dtype=D, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on resizing an out= tensor of the wrong shape
        out = fused_lokr(x, w1s, w2_a, w2_b, base, IN_M, scale) if scale != 1.0 else fused_lokr(x, w1s, w2_a,
                                                                                                 w2_b, base, IN_M)
        grads = torch.autograd.grad(out, [x, w1s, w2_a, w2_b], torch.ones_like(out), retain_graph=True)
    assert all(grad is not None for grad in grads)
    assert out.shape == (2, 3, OUT)
    expected = _hand(x, base, w1s * scale, w2_a, w2_b)
    torch.testing.assert_close(out, expected)
    seed = torch.randn_like(expected)
    leaves = [x, w1s, w2_a, w2_b]
    for got, want in zip(torch.autograd.grad(out, leaves, seed), torch.autograd.grad(expected, leaves, seed)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("trained", ["x", "w1s", "w2_a", "w2_b"])
def test_only_the_gradients_asked_for_are_computed_and_right(trained: str) -> None:
    base = _base()
    w1s, w2_a, w2_b = _factors()
    x = torch.randn(4, IN, dtype=D)
    leaves = {"x": x, "w1s": w1s, "w2_a": w2_a, "w2_b": w2_b}
    for name, leaf in leaves.items():
        leaf.requires_grad_(name == trained)
    seed = torch.randn(4, OUT, dtype=D)
    fused_lokr(x, w1s, w2_a, w2_b, base, IN_M).backward(seed)
    for name, leaf in leaves.items():
        assert (leaf.grad is not None) == (name == trained)
    leaf = leaves[trained]
    torch.testing.assert_close(leaf.grad, torch.autograd.grad(_hand(x, base, w1s, w2_a, w2_b), [leaf], seed)[0])


@pytest.mark.parametrize("tokens", [1, 6])  # the products, and the update added to a copy of W
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True), (True, False)])
def test_inference_runs_the_same_formula_without_an_autograd_node(conv1d: bool, bias: bool, tokens: int) -> None:
    base = _base(conv1d, bias)
    w1s, w2_a, w2_b = _factors()
    x = torch.randn(tokens, 1, IN, dtype=D)
    weight_before = base.weight.clone()
    with torch.no_grad():
        out = fused_lokr(x, w1s, w2_a, w2_b, base, IN_M, 0.3)
        expected = _hand(x, base, w1s * 0.3, w2_a, w2_b)
    assert out.grad_fn is None and out.shape == (tokens, 1, OUT)
    torch.testing.assert_close(out, expected)
    assert torch.equal(base.weight, weight_before)  # the copy took the update, not W


def test_dense_is_cheaper_when_the_products_move_a_margin_more_memory_than_a_weight_pass() -> None:
    """2 out in floats (the weight read and its copy written) times DENSE_MARGIN against tokens
    (in + 2 out + 2 r (in_m + out_l)): out_l=1, out_k=4, in_m=1, in_n=4, r=1 gives 32 x 2.25 = 72 against
    16 a token."""
    assert DENSE_MARGIN == 2.25
    assert not dense_is_cheaper(4, 1, 4, 1, 4, 1)  # 64 < 72
    assert dense_is_cheaper(5, 1, 4, 1, 4, 1)  # 80 > 72
    # perf_table's Llama: 512x512 as (16, 32) x (16, 32), the 1376-wide layers with 43 in place of 32
    assert not dense_is_cheaper(512, 16, 32, 16, 32, 8)  # the products (measured 1.3-3% faster there)
    assert not dense_is_cheaper(576, 16, 32, 16, 32, 8) and dense_is_cheaper(577, 16, 32, 16, 32, 8)
    assert not dense_is_cheaper(768, 32, 43, 16, 32, 8) and dense_is_cheaper(1024, 32, 43, 16, 32, 8)
    assert not dense_is_cheaper(300, 16, 32, 16, 32, 8)  # a margin of 1 would take the copy here
    # the input's term counts: without it 577 tokens would move 577 x 1536 < 2.25 x 524288 floats
    assert 577 * 1536 < DENSE_MARGIN * 2 * 512 * 512 < 577 * 2048
    # at exactly the margin the products run (any other count tips it)
    for out_l, out_k, in_m, in_n, r, tokens in [(1, 1, 6, 4, 2, 2), (1, 2, 2, 4, 2, 3), (1, 2, 3, 5, 1, 5)]:
        per_token = in_m * in_n + 2 * out_l * out_k + 2 * r * (in_m + out_l)
        assert DENSE_MARGIN * 2 * out_l * out_k * in_m * in_n == tokens * per_token
        assert not dense_is_cheaper(tokens, out_l, out_k, in_m, in_n, r)
        assert dense_is_cheaper(tokens + 1, out_l, out_k, in_m, in_n, r)


@pytest.mark.parametrize("tokens, dtype, dense", [(10, D, False), (11, D, True), (12, torch.float32, True),
                                                  (12, torch.bfloat16, False)])
def test_inference_takes_the_dense_form_only_when_cheaper_and_in_32_or_64_bits(tokens: int, dtype: torch.dtype,
                                                                                dense: bool) -> None:
    """Which form ran, told by its matrix-product FLOPs: the dense form is one product over W's copy plus
    w2_a w2_b; the products' are the base product and X w2_b^T, w1 times it and w2_a's. In 16 bits the copy
    of W would round a small update away, so the products run."""
    from torch.utils.flop_counter import FlopCounterMode

    # 10 and 11 tokens sit on either side of the crossover (520 < 2.25 x 240 = 540 < 572 floats)
    assert dense_is_cheaper(11, OUT_L, OUT_K, IN_M, IN_N, R) and not dense_is_cheaper(10, OUT_L, OUT_K, IN_M, IN_N, R)
    base = frozen_layer(IN, OUT, bias=False, dtype=dtype)
    w1s, w2_a, w2_b = (t.detach().to(dtype) for t in _factors())
    x = torch.randn(tokens, IN, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fused_lokr(x, w1s, w2_a, w2_b, base, IN_M)
    base_flops = 2 * tokens * OUT * IN
    if dense:
        assert counter.get_total_flops() == base_flops + 2 * OUT_K * R * IN_N
    else:
        products = 2 * R * tokens * IN_M * IN_N + 2 * R * tokens * IN_M * OUT_L + 2 * tokens * OUT_L * R * OUT_K
        assert counter.get_total_flops() == base_flops + products


def _backward_products(trained: set[str]) -> int:
    """Matrix-product FLOPs of the fused backward on 7 tokens when only ``trained`` take gradients:
    g's product through w2_a when w1's, w2_b's or the input's gradient is asked for, the next one through
    w1 when w2_b's or the input's is, then one product per gradient asked for (the input's: its LoKr part,
    then g W accumulated onto it)."""
    t = 7
    g_u_t = 2 * R * OUT_K * t * OUT_L if trained & {"x", "w1s", "w2_b"} else 0
    g_z_t = 2 * R * t * OUT_L * IN_M if trained & {"x", "w2_b"} else 0
    own = {"w2_a": 2 * R * t * OUT_L * OUT_K, "w1s": 2 * OUT_L * R * t * IN_M, "w2_b": 2 * R * t * IN_M * IN_N,
           "x": 2 * t * IN_M * R * IN_N + 2 * t * OUT * IN}
    return g_u_t + g_z_t + sum(own[name] for name in trained)


@pytest.mark.parametrize("trained", [{"x"}, {"w1s"}, {"w2_a"}, {"w2_b"}, {"x", "w1s", "w2_a", "w2_b"}])
def test_backward_runs_only_the_products_of_the_gradients_asked_for(trained: set[str]) -> None:
    """A gradient autograd does not ask for is not computed (it would be thrown away): counted as the
    backward's matrix-product FLOPs, not timed."""
    from torch.utils.flop_counter import FlopCounterMode

    base = _base()
    w1s, w2_a, w2_b = _factors()
    x = torch.randn(7, IN, dtype=D)
    for name, leaf in {"x": x, "w1s": w1s, "w2_a": w2_a, "w2_b": w2_b}.items():
        leaf.requires_grad_(name in trained)
    out = fused_lokr(x, w1s, w2_a, w2_b, base, IN_M)
    counter = FlopCounterMode(display=False)
    with counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == _backward_products(trained)


# -- float32 factors on a half-precision layer (adapting a bfloat16 model keeps them float32, as PEFT does) ---

@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("grad", [True, False])
def test_float32_factors_on_a_half_precision_layer_compute_the_update_in_float32(
        layer_dtype: torch.dtype, conv1d: bool, bias: bool, grad: bool) -> None:
    """The output and the input's gradient are the formula rounded to the layer's dtype; the factors'
    gradients are float32 products of the exact half-precision values: float32 precision, not half."""
    base = frozen_layer(IN, OUT, conv1d=conv1d, bias=bias, dtype=layer_dtype)
    w1s, w2_a, w2_b = (t.detach().float().requires_grad_(True) for t in _factors())
    x = torch.randn(2, 3, IN).to(layer_dtype).requires_grad_(True)
    exact = frozen_layer(IN, OUT, conv1d=conv1d, bias=bias)
    with torch.no_grad():
        exact.weight.copy_(base.weight)
        if bias:
            exact.bias.copy_(base.bias)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w1s, w2_a, w2_b)]
    expected = _hand(leaves64[0], exact, leaves64[1] * 0.3, *leaves64[2:])
    with torch.set_grad_enabled(grad):
        out = fused_lokr(x, w1s, w2_a, w2_b, base, IN_M, 0.3)
    assert out.dtype == layer_dtype and (out.grad_fn is not None) == grad
    half_ulp = 2.0 ** -8 if layer_dtype == torch.bfloat16 else 2.0 ** -11
    size = float(expected.detach().abs().max())
    torch.testing.assert_close(out.detach().double(), expected.detach(), rtol=2 * half_ulp, atol=2 * half_ulp * size)
    if not grad:
        return
    seed = torch.randn(expected.shape).to(layer_dtype)
    got = torch.autograd.grad(out, [x, w1s, w2_a, w2_b], seed)
    want = torch.autograd.grad(expected, leaves64, seed.double())
    assert got[0].dtype == layer_dtype and all(g.dtype == torch.float32 for g in got[1:])
    torch.testing.assert_close(got[0].double(), want[0], rtol=4 * half_ulp,
                               atol=4 * half_ulp * float(want[0].abs().max()))
    for got_factor, want_factor in zip(got[1:], want[1:]):
        torch.testing.assert_close(got_factor.double(), want_factor, rtol=1e-5,
                                   atol=1e-5 * float(want_factor.abs().max()))


def test_float32_factors_on_a_bfloat16_layer_keep_the_input_not_a_float32_copy() -> None:
    base = frozen_layer(IN, OUT, dtype=torch.bfloat16)
    w1s, w2_a, w2_b = (t.detach().float().requires_grad_(True) for t in _factors())
    x = torch.randn(64, IN).to(torch.bfloat16).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_lokr(x, w1s, w2_a, w2_b, base, IN_M)
    input_sized = [t for t in saved if t.numel() == x.numel()]
    assert input_sized and all(t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr() for t in input_sized)
