"""The fused LoRA / DoRA layer (core/fused_lora.py) on both sides of ``TOKEN_MAJOR_FROM_RANK``, where
its rank-sized products change layout (rank-major below, token-major from it on), with and without the
rank-major products split into two halves of the tokens: the output and every gradient (input, LoRA input
under dropout, A, B, DoRA's magnitude) against hand formulas in float64, on nn.Linear and GPT-2's Conv1D,
in training and inference."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile, ProfilerActivity

from peftkit.core import fused_lora as fused
from peftkit.core.fused_lora import fused_lora, SPLIT_FROM_TOKENS, TOKEN_MAJOR_FROM_RANK
from tests.method_helpers import frozen_layer

IN, OUT, SCALE = 40, 24, 0.75
D = torch.float64
RANKS = [TOKEN_MAJOR_FROM_RANK - 1, TOKEN_MAJOR_FROM_RANK, TOKEN_MAJOR_FROM_RANK + 5]


def _weight_out_in(base: torch.nn.Module) -> torch.Tensor:
    return base.weight.t() if type(base).__name__ == "Conv1D" else base.weight


def _hand(x, x_d, a, b, base, magnitude=None):
    """x W^T + s (x_d A^T) B^T, rows rescaled by m / ||W + s B A|| (detached) for DoRA, plus the bias."""
    w = _weight_out_in(base)
    out = x @ w.t() + SCALE * (x_d @ a.t()) @ b.t()
    if magnitude is not None:
        out = (magnitude / (w + SCALE * b @ a).norm(dim=1).detach()) * out
    return out if base.bias is None else out + base.bias


@pytest.fixture
def two_threads():
    """Two torch threads for the test (the split needs more than one), the count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("own_input", [False, True])
def test_every_gradient_equals_the_formula_on_both_sides_of_the_layout_switch(r: int, conv1d: bool, dora: bool,
                                                                              own_input: bool, split: bool,
                                                                              monkeypatch, two_threads) -> None:
    monkeypatch.setattr(fused, "SPLIT_FROM_TOKENS", 2 if split else 10**9)  # 18 tokens below
    base = frozen_layer(IN, OUT, conv1d=conv1d, dtype=D)
    torch.manual_seed(r)
    a = torch.randn(r, IN, dtype=D, requires_grad=True)
    b = torch.randn(OUT, r, dtype=D, requires_grad=True)
    x = torch.randn(2, 9, IN, dtype=D, requires_grad=True)
    x_d = torch.randn(2, 9, IN, dtype=D, requires_grad=True) if own_input else None
    inputs = [x, a, b] + ([x_d] if own_input else [])
    magnitude = norm = None
    if dora:
        magnitude = torch.linspace(0.5, 2.0, OUT, dtype=D).requires_grad_(True)
        norm = (_weight_out_in(base) + SCALE * b @ a).norm(dim=1).detach()
        inputs.append(magnitude)
    out = fused_lora(x, x_d, a, b, base, SCALE, magnitude, norm)
    expected = _hand(x, x if x_d is None else x_d, a, b, base, magnitude)
    assert out.shape == (2, 9, OUT)
    torch.testing.assert_close(out, expected)
    seed = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, inputs, seed), torch.autograd.grad(expected, inputs, seed)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        inferred = fused_lora(x, x_d, a, b, base, SCALE, magnitude, norm)
    assert inferred.grad_fn is None
    torch.testing.assert_close(inferred, expected.detach())


@pytest.mark.parametrize("r", RANKS)
def test_the_saved_rank_intermediate_is_laid_out_by_the_rank_alone(r: int):
    """Below the switch ``A x^T`` is computed as written (a contiguous (r, tokens) tensor); from it on it is
    the transposed view of ``x A^T``. The layout is the switch's whole effect (values are equal), so it is
    checked on the tensor the layer saves for backward; the layer is wider than the switch rank, so only
    the rank decides."""
    base = frozen_layer(IN, OUT, dtype=D)
    x = torch.randn(7, IN, dtype=D)
    a = torch.randn(r, IN, dtype=D, requires_grad=True)
    b = torch.randn(OUT, r, dtype=D, requires_grad=True)
    out = fused_lora(x, None, a, b, base, SCALE)
    node = out.grad_fn.next_functions[0][0]  # the layer's own node, under the final reshape
    xa_t = next(t for t in node.saved_tensors if t is not None and t.shape == (r, 7))
    torch.testing.assert_close(xa_t, a.detach() @ x.t(), rtol=0, atol=1e-12)
    assert xa_t.is_contiguous() is (r < TOKEN_MAJOR_FROM_RANK)


def _batched_products(r: int, tokens: int) -> int:
    """How many batched products (aten::bmm) one training step of a fused LoRA layer runs."""
    base = frozen_layer(IN, OUT, dtype=D)
    a = torch.randn(r, IN, dtype=D, requires_grad=True)
    b = torch.randn(OUT, r, dtype=D, requires_grad=True)
    x = torch.randn(tokens, IN, dtype=D, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as run:
        fused_lora(x, None, a, b, base, SCALE).sum().backward()
    return sum(event.name == "aten::bmm" for event in run.events())


@pytest.mark.parametrize("threads", [1, 2])
def test_the_rank_major_products_split_the_tokens_in_halves_only_where_they_should(threads: int) -> None:
    """All four rank-major products of a step (A x^T, B^T g^T, the sums over tokens for A's and B's gradients)
    are split from SPLIT_FROM_TOKENS tokens on, for an even count, below the layout switch, with several
    threads; nowhere else."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        below = TOKEN_MAJOR_FROM_RANK - 1
        split = 4 if threads > 1 else 0
        assert _batched_products(below, SPLIT_FROM_TOKENS) == split
        assert _batched_products(below, SPLIT_FROM_TOKENS + 2) == split
        assert _batched_products(below, SPLIT_FROM_TOKENS - 2) == 0
        assert _batched_products(below, SPLIT_FROM_TOKENS + 1) == 0  # odd: no halves
        assert _batched_products(TOKEN_MAJOR_FROM_RANK, SPLIT_FROM_TOKENS) == 0
    finally:
        torch.set_num_threads(before)


def test_a_compiled_layer_traces_as_one_graph_where_eager_would_split(two_threads) -> None:
    """Under torch.compile the split is off (asking for the thread count breaks the graph): the fused layer
    compiles with fullgraph=True at a token count where eager splits, with the eager values and gradients."""
    base = frozen_layer(IN, OUT, dtype=torch.float32)
    a = torch.randn(TOKEN_MAJOR_FROM_RANK - 1, IN, requires_grad=True)
    b = torch.randn(OUT, TOKEN_MAJOR_FROM_RANK - 1, requires_grad=True)
    x = torch.randn(SPLIT_FROM_TOKENS, IN, requires_grad=True)

    def layer(x, a, b):
        return fused_lora(x, None, a, b, base, SCALE)

    eager = layer(x, a, b)
    eager_grads = torch.autograd.grad(eager.sum(), (x, a, b))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, a, b)
    # Eager sums each half of the tokens and then adds the halves; compiled sums them in one product: the
    # same sums in another order, so the tolerance follows the largest value (a's gradient reaches ~300,
    # where float32 rounding differs by ~5e-5 between the two orders).
    assert_close_to_scale(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled.sum(), (x, a, b)), eager_grads):
        assert_close_to_scale(got, want)


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding of sums reordered: within 1e-6 of ``want``'s largest magnitude."""
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-6 * want.abs().max().item())
