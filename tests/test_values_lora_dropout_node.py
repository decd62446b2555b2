"""Plain LoRA with dropout in training draws the dropout inside its fused node (core/fused_lora.py): the
same entries as ``torch.nn.functional.dropout`` for one seed, every gradient equal to the formula with that
mask, and backward keeping the input and a one-byte mask instead of a dropped-out copy: the layers that read
one input (q, k, v) then keep it once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from peftkit.core.fused_lora import fused_lora
from peftkit.plugins.lora.layer import LoraLinear
from tests.method_helpers import frozen_layer

IN, OUT, R, SCALE, P = 24, 16, 4, 1.5, 0.3


def _factors(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(R, IN, dtype=dtype, requires_grad=True), torch.randn(OUT, R, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_and_gradients_equal_the_formula_with_the_mask_dropout_draws(dtype, bias):
    base = frozen_layer(IN, OUT, bias=bias, dtype=dtype)
    a, b = _factors(dtype)
    x = torch.randn(3, 5, IN, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    out = fused_lora(x, None, a, b, base, SCALE, dropout=P)
    torch.manual_seed(7)
    x_d = nn.functional.dropout(x, P, training=True)
    assert 0 < x_d.count_nonzero() < x.numel()
    expected = base(x) + SCALE * (x_d @ a.t()) @ b.t()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    seed = torch.randn_like(expected)
    got = torch.autograd.grad(out, [x, a, b], seed)
    want = torch.autograd.grad(expected, [x, a, b], seed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_a_half_precision_layer_with_float32_factors():
    base = frozen_layer(IN, OUT, dtype=torch.bfloat16)
    a, b = _factors(torch.float32)
    x = torch.randn(6, IN, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(3)
    out = fused_lora(x, None, a, b, base, SCALE, dropout=P)
    torch.manual_seed(3)
    x_d = nn.functional.dropout(x, P, training=True)
    expected = base(x).float() + SCALE * (x_d.float() @ a.t()) @ b.t()
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    seed = torch.randn_like(expected)
    for g, w in zip(torch.autograd.grad(out.float(), [x, a, b], seed), torch.autograd.grad(expected, [x, a, b], seed)):
        # bfloat16 rounding of sums whose terms are larger than the result: relative to the largest entry
        torch.testing.assert_close(g.float(), w.float(), atol=0.02 * w.abs().max().item(), rtol=0.02)


def test_backward_keeps_the_input_and_a_byte_mask_not_a_dropped_out_copy():
    base = frozen_layer(IN, OUT, dtype=torch.float32)
    a, b = _factors(torch.float32)
    x = torch.randn(8, IN, requires_grad=True)
    out = fused_lora(x, None, a, b, base, SCALE, dropout=P)
    node = out.grad_fn.next_functions[0][0]  # the layer's node, under the final view
    big = [t for t in node.saved_tensors if t is not None and t.shape == x.shape]
    assert {t.dtype for t in big} == {torch.float32, torch.bool}
    (kept,) = [t for t in big if t.dtype == torch.float32]
    assert kept.data_ptr() == x.data_ptr()  # x itself, not a copy


def test_three_layers_reading_one_input_keep_it_once():
    """q, k and v with dropout: saved for backward, beside the input itself, a one-byte mask each (the
    unfused path keeps a dropped-out float copy and a float noise tensor each)."""
    bases = [frozen_layer(IN, OUT, dtype=torch.float32) for _ in range(3)]
    torch.manual_seed(0)
    layers = [LoraLinear(base, R, SCALE, P, False, False).train() for base in bases]
    x = torch.randn(256, IN, requires_grad=True)  # its mask outweighs a weight (IN x OUT floats)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [layer.forward_alone(x, base) for layer, base in zip(layers, bases)]
    assert all(o is not None for o in outs)
    input_bytes = x.numel() * 4
    activations = sum(n for n in saved.values() if n >= x.numel())  # the (tokens, in)-sized ones
    assert activations == input_bytes + 3 * x.numel()  # x once, three bool masks


def test_the_dropped_input_is_bit_for_bit_the_one_dropout_gives_on_the_cpu():
    """Not only the same mask: the same kept values (x / (1 - p) rounded as dropout rounds it), so the fused
    output equals the fused layer fed ``nn.functional.dropout``'s output, with no rounding difference."""
    base = frozen_layer(IN, OUT, dtype=torch.float32)
    a, b = _factors(torch.float32)
    x = torch.randn(64, IN, requires_grad=True)
    for p in (0.3, 0.1, 0.05):
        torch.manual_seed(11)
        drawn_inside = fused_lora(x, None, a, b, base, SCALE, dropout=p)
        torch.manual_seed(11)
        x_d = nn.functional.dropout(x, p, training=True)
        assert torch.equal(drawn_inside, fused_lora(x, x_d, a, b, base, SCALE))
