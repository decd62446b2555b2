"""The fused LoRA / DoRA layer (core/fused_lora.py) against hand formulas in float64, on bare torch
layers: the output and every gradient (input, LoRA input under dropout, A, B, DoRA's magnitude) for
nn.Linear and GPT-2's Conv1D with and without a bias, only the gradients autograd asks for, the
inference path without an autograd node, and when ``fusable_linear`` lets a layer in. Fast enough for
``make mutate`` (bench/mutation_map.toml)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from peftkit.plugin_api import fusable_linear
from peftkit.core.fused_lora import dense_is_cheaper, fused_lora
from peftkit.plugins.lora.layer import KEPT_NORM, KEPT_WEIGHT_SQ
from tests.method_helpers import frozen_layer, new_tensors

IN, OUT, R, SCALE = 6, 5, 3, 1.5
D = torch.float64
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


def _base(conv1d: bool = False, bias: bool = True) -> nn.Module:
    return frozen_layer(IN, OUT, conv1d=conv1d, bias=bias, dtype=D)


def _weight_out_in(base: nn.Module) -> torch.Tensor:
    return base.weight.t() if type(base).__name__ == "Conv1D" else base.weight


def _factors() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(R, IN, dtype=D, requires_grad=True), torch.randn(OUT, R, dtype=D, requires_grad=True)


def _magnitude() -> torch.Tensor:
    return torch.linspace(0.5, 2.0, OUT, dtype=D).requires_grad_(True)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, seed))


def _lora_hand(x, lora_x, a, b, base):
    """x W^T + b + s (x_d A^T) B^T."""
    out = x @ _weight_out_in(base).t() + SCALE * (lora_x @ a.t()) @ b.t()
    return out if base.bias is None else out + base.bias


def _dora_hand(x, lora_x, a, b, magnitude, base):
    """(m / n) * (x W^T + s (x_d A^T) B^T) + b, n = ||W + s B A||_row detached."""
    w = _weight_out_in(base)
    norm = (w + SCALE * b @ a).norm(dim=1).detach()
    out = (magnitude / norm) * (x @ w.t() + SCALE * (lora_x @ a.t()) @ b.t())
    return (out if base.bias is None else out + base.bias), norm


@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True), (True, False)])
def test_lora_output_and_every_gradient_equal_the_formula(conv1d: bool, bias: bool) -> None:
    base = _base(conv1d, bias)
    a, b = _factors()
    x = torch.randn(2, 4, IN, dtype=D, requires_grad=True)
    out = fused_lora(x, None, a, b, base, SCALE)
    assert out.shape == (2, 4, OUT)
    expected = _lora_hand(x, x, a, b, base)
    seed = torch.randn_like(expected)
    torch.testing.assert_close(out, expected)
    for got, want in zip(_grads(out, [x, a, b], seed), _grads(expected, [x, a, b], seed)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("conv1d", [False, True])
def test_lora_with_its_own_input_gives_each_input_its_gradient(conv1d: bool) -> None:
    """Dropout: the LoRA reads x_d, the base x; x and x_d each get their own gradient."""
    base = _base(conv1d)
    a, b = _factors()
    x = torch.randn(3, IN, dtype=D, requires_grad=True)
    x_d = torch.randn(3, IN, dtype=D, requires_grad=True)
    out = fused_lora(x, x_d, a, b, base, SCALE)
    expected = _lora_hand(x, x_d, a, b, base)
    seed = torch.randn_like(expected)
    torch.testing.assert_close(out, expected)
    for got, want in zip(_grads(out, [x, x_d, a, b], seed), _grads(expected, [x, x_d, a, b], seed)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("trained", ["a", "b", "x"])
def test_lora_computes_only_the_gradients_asked_for_and_those_right(trained: str) -> None:
    base = _base()
    a, b = _factors()
    x = torch.randn(4, IN, dtype=D, requires_grad=True)
    leaves = {"a": a, "b": b, "x": x}
    for name, leaf in leaves.items():
        leaf.requires_grad_(name == trained)
    out = fused_lora(x, None, a, b, base, SCALE)
    seed = torch.randn(4, OUT, dtype=D)
    out.backward(seed)
    for name, leaf in leaves.items():
        assert (leaf.grad is not None) == (name == trained)
    leaf = leaves[trained]
    want = _grads(_lora_hand(x, x, a, b, base), [leaf], seed)[0]
    torch.testing.assert_close(leaf.grad, want)


@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
def test_dora_output_and_every_gradient_equal_the_formula_with_detached_norms(conv1d: bool, bias: bool) -> None:
    base = _base(conv1d, bias)
    a, b = _factors()
    magnitude = _magnitude()
    x = torch.randn(2, 3, IN, dtype=D, requires_grad=True)
    expected, norm = _dora_hand(x, x, a, b, magnitude, base)
    out = fused_lora(x, None, a, b, base, SCALE, magnitude, norm)
    assert out.shape == (2, 3, OUT)
    seed = torch.randn_like(expected)
    torch.testing.assert_close(out, expected)
    leaves = [x, a, b, magnitude]
    for got, want in zip(_grads(out, leaves, seed), _grads(expected, leaves, seed)):
        torch.testing.assert_close(got, want)


def test_dora_with_its_own_input_and_a_frozen_magnitude() -> None:
    base = _base()
    a, b = _factors()
    magnitude = _magnitude().requires_grad_(False)
    x = torch.randn(3, IN, dtype=D, requires_grad=True)
    x_d = torch.randn(3, IN, dtype=D, requires_grad=True)
    expected, norm = _dora_hand(x, x_d, a, b, magnitude, base)
    out = fused_lora(x, x_d, a, b, base, SCALE, magnitude, norm)
    seed = torch.randn_like(expected)
    torch.testing.assert_close(out, expected)
    leaves = [x, x_d, a, b]
    for got, want in zip(_grads(out, leaves, seed), _grads(expected, leaves, seed)):
        torch.testing.assert_close(got, want)


def _mm_shapes(run) -> list[list[list[int]]]:
    """The operand shapes of every ``aten::mm`` that ``run()`` calls."""
    from torch.profiler import profile, ProfilerActivity

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as recorded:
        run()
    return [event.input_shapes[:2] for event in recorded.events() if event.name == "aten::mm"]


@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
def test_dora_computing_its_norms_in_the_node_equals_the_formula(conv1d: bool, bias: bool) -> None:
    """Given W's rows' squared norms instead of the norms (norm_joins_base_product), the node takes ``A W^T`` from
    the base product of x and A stacked: one product reads W, none of A alone with W; output and every gradient
    are the formula's with detached norms."""
    from peftkit.core.fused_lora import norm_joins_base_product

    base = _base(conv1d, bias)
    a, b = _factors()
    magnitude = _magnitude()
    x = torch.randn(2, 3, IN, dtype=D, requires_grad=True)
    assert norm_joins_base_product(x, a, OUT + 1)
    weight_sq = (_weight_out_in(base) ** 2).sum(dim=1)
    expected, _ = _dora_hand(x, x, a, b, magnitude, base)
    out = fused_lora(x, None, a, b, base, SCALE, magnitude, weight_sq=weight_sq)
    torch.testing.assert_close(out, expected)
    leaves = [x, a, b, magnitude]
    seed = torch.randn_like(expected)
    for got, want in zip(_grads(out, leaves, seed), _grads(expected, leaves, seed)):
        torch.testing.assert_close(got, want)
    shapes = _mm_shapes(lambda: fused_lora(x, None, a, b, base, SCALE, magnitude, weight_sq=weight_sq))
    assert [[6 + R, IN], [IN, OUT]] in shapes and [[R, IN], [IN, OUT]] not in shapes  # 6 tokens and A's R rows


def test_dora_norms_join_the_base_product_only_in_training_without_autocast_in_the_factors_dtype() -> None:
    """Inference keeps its norms between calls (no product per forward to save); under autocast or with float32
    factors on a half-precision layer the norms stay float32 products of the float32 weight; with more tokens
    than outputs the stacked copy of the input would move more than the pass over W it saves."""
    from peftkit.core.fused_lora import norm_joins_base_product

    a = torch.randn(R, IN)
    x = torch.randn(2, 2, IN)
    assert norm_joins_base_product(x, a, 4) and not norm_joins_base_product(x, a, 3)
    with torch.no_grad():
        assert not norm_joins_base_product(x, a, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not norm_joins_base_product(x, a, 4)
    assert not norm_joins_base_product(x.to(torch.bfloat16), a, 4)
    assert norm_joins_base_product(torch.randn(0, IN), a, 4)


def test_a_dora_layer_in_training_takes_its_norms_from_the_base_product() -> None:
    """The LoRA layer with use_dora asks the node for its norms in training (one product reads W in the forward,
    the stacked one), and gets the unfused layer's output and gradients."""
    import copy

    import peftkit
    from tests.method_helpers import randomize
    from tests.tiny_models import build_tiny

    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,use_dora=true,target_modules=[q_proj]]")
    randomize(model, "default", seed=5)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    unfused = copy.deepcopy(layer)
    unfused.base_layer.register_forward_hook(lambda module, args, out: None)  # a hook: the unfused path runs
    x = torch.randn(2, 3, layer.base_layer.in_features, requires_grad=True)
    in_f, out_f = layer.base_layer.in_features, layer.base_layer.out_features
    shapes = _mm_shapes(lambda: layer(x))
    assert [[6 + 4, in_f], [in_f, out_f]] in shapes and [[4, in_f], [in_f, out_f]] not in shapes
    out, expected = layer(x), unfused(x)
    torch.testing.assert_close(out, expected)
    seed = torch.randn_like(out)
    names = ("lora_A", "lora_B", "lora_magnitude_vector")
    got = torch.autograd.grad(out, [x, *(getattr(layer.adapters["default"], n) for n in names)], seed)
    want = torch.autograd.grad(expected, [x, *(getattr(unfused.adapters["default"], n) for n in names)], seed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("own_input", [False, True])
def test_inference_runs_the_same_formula_without_an_autograd_node(dora: bool, conv1d: bool, bias: bool,
                                                                 own_input: bool) -> None:
    base = _base(conv1d, bias)
    a, b = _factors()
    magnitude = _magnitude()
    x = torch.randn(2, 3, IN, dtype=D)
    x_d = torch.randn(2, 3, IN, dtype=D) if own_input else None
    with torch.no_grad():
        lora_in = x if x_d is None else x_d
        if dora:
            expected, norm = _dora_hand(x, lora_in, a, b, magnitude, base)
            out = fused_lora(x, x_d, a, b, base, SCALE, magnitude, norm)
        else:
            expected = _lora_hand(x, lora_in, a, b, base)
            out = fused_lora(x, x_d, a, b, base, SCALE)
    assert out.grad_fn is None and out.shape == (2, 3, OUT)
    torch.testing.assert_close(out, expected)


def test_fusable_takes_a_frozen_float_linear_or_conv1d_on_a_matching_input() -> None:
    a, _ = _factors()
    x = torch.randn(2, IN, dtype=D)
    assert fusable_linear(_base(), x, a)
    assert fusable_linear(_base(conv1d=True), x, a)
    assert fusable_linear(_base(bias=False), x, a)


def test_fusable_refuses_what_the_fused_path_would_compute_differently() -> None:
    a, _ = _factors()
    x = torch.randn(2, IN, dtype=D)
    base = _base()
    assert not fusable_linear(base, torch.randn(IN, dtype=D), a)  # a 1-d input
    assert not fusable_linear(base, x.float(), a)  # input dtype differs from the weight's
    assert not fusable_linear(base, x, a.detach().float())  # factor dtype differs
    trained = _base().requires_grad_(True)
    assert not fusable_linear(trained, x, a)  # a trained weight is not a plain linear layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable_linear(base, x, a)
    quantized_like = type("Quantized", (nn.Linear,), {})(IN, OUT).to(D).requires_grad_(False)
    assert not fusable_linear(quantized_like, x, a)  # a subclass of Linear may compute something else


def _backward_products(trained: set[str], tokens: int) -> int:
    """Matrix-product FLOPs of the fused backward when only ``trained`` take gradients: (s g B)^T always
    (every gradient needs it), then one product per gradient asked for; the input's g W, plus its LoRA part
    (s g B) A when the LoRA reads the same input, and x_d's own (s g B) A when the LoRA has its own input."""
    through = 2 * R * OUT * tokens
    lora_part = 2 * tokens * R * IN
    own = {"a": 2 * R * tokens * IN, "b": 2 * R * tokens * OUT, "x": 2 * tokens * OUT * IN, "x_d": lora_part}
    same_input = "x_d" not in trained
    return through + sum(own[name] for name in trained) + (lora_part if "x" in trained and same_input else 0)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("trained", [{"a"}, {"b"}, {"x"}, {"x_d"}, {"a", "b", "x"}, {"a", "b", "x", "x_d"}])
def test_backward_runs_only_the_products_of_the_gradients_asked_for(trained: set[str], dora: bool) -> None:
    """A gradient autograd does not ask for is not computed (it would be thrown away): counted as the
    backward's matrix-product FLOPs, not timed."""
    from torch.utils.flop_counter import FlopCounterMode

    base = _base()
    a, b = _factors()
    x = torch.randn(7, IN, dtype=D)
    x_d = torch.randn(7, IN, dtype=D) if "x_d" in trained else None
    for name, leaf in {"a": a, "b": b, "x": x, "x_d": x_d}.items():
        if leaf is not None:
            leaf.requires_grad_(name in trained)
    if dora:
        _, norm = _dora_hand(x, x if x_d is None else x_d, a, b, _magnitude(), base)
        out = fused_lora(x, x_d, a, b, base, SCALE, _magnitude().detach(), norm)
    else:
        out = fused_lora(x, x_d, a, b, base, SCALE)
    counter = FlopCounterMode(display=False)
    with counter:
        out.backward(torch.randn_like(out))
    assert counter.get_total_flops() == _backward_products(trained, 7)


@pytest.mark.parametrize("magnitude_trained", [False, True])
def test_dora_backward_sums_the_magnitudes_gradient_only_when_asked(magnitude_trained: bool) -> None:
    """DoRA's magnitude gradient (a sum over tokens) runs only when the magnitude takes a gradient."""
    from torch.profiler import profile, ProfilerActivity

    base = _base()
    a, b = _factors()
    magnitude = _magnitude().requires_grad_(magnitude_trained)
    x = torch.randn(4, IN, dtype=D)
    _, norm = _dora_hand(x, x, a, b, magnitude, base)
    out = fused_lora(x, None, a, b, base, SCALE, magnitude, norm)
    with profile(activities=[ProfilerActivity.CPU]) as run:
        out.backward(torch.randn_like(out))
    assert sum(event.name == "aten::sum" for event in run.events()) == int(magnitude_trained)
    assert (magnitude.grad is not None) == magnitude_trained


def _new_output_sized_tensors(run, rows: int) -> int:
    """How many (rows, OUT) tensors ``run()`` allocates (``new_tensors``); the fused DoRA writes over its
    buffers where it can."""
    return sum(shape == (rows, OUT) for _, shape in new_tensors(run))


@pytest.mark.parametrize("bias", [True, False])
def test_dora_inference_scales_the_base_product_in_place(bias: bool) -> None:
    """Without autograd the magnitude scaling (and bias) is written over the (tokens, out) product:
    one tensor of that size in all, the values the formula's (float64)."""
    base = _base(bias=bias)
    a, b = _factors()
    x = torch.randn(7, IN, dtype=D)
    magnitude = _magnitude()
    expected, norm = _dora_hand(x, x, a, b, magnitude, base)
    with torch.no_grad():
        assert _new_output_sized_tensors(lambda: fused_lora(x, None, a, b, base, SCALE, magnitude, norm), 7) == 1
        torch.testing.assert_close(fused_lora(x, None, a, b, base, SCALE, magnitude, norm), expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("magnitude_trained", [False, True])
def test_dora_backward_allocates_one_output_sized_tensor(magnitude_trained: bool) -> None:
    """The backward's ``g * (m / n)`` reuses the buffer of the magnitude gradient's products ``g * u``."""
    base = _base()
    a, b = _factors()
    magnitude = _magnitude().requires_grad_(magnitude_trained)
    x = torch.randn(7, IN, dtype=D, requires_grad=True)
    _, norm = _dora_hand(x, x, a, b, magnitude, base)
    out = fused_lora(x, None, a, b, base, SCALE, magnitude, norm)
    seed = torch.randn_like(out)
    assert _new_output_sized_tensors(lambda: out.backward(seed), 7) == 1


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
def test_forward_writes_the_update_then_accumulates_the_base_product_onto_it(conv1d: bool, bias: bool,
                                                                            grad: bool) -> None:
    """The update's product (with the bias) writes the one (tokens, out) tensor and the base product is
    accumulated onto it by a GEMM that FLOP counters see (perf_table's floor columns count it): the
    forward's matrix-product FLOPs are the base's plus both LoRA products, in training and inference."""
    from torch.utils.flop_counter import FlopCounterMode

    base = _base(conv1d, bias)
    a, b = _factors()
    tokens = 5  # below the dense crossover (test_inference_with_many_tokens_runs_one_product_on_a_weight_copy)
    x = torch.randn(tokens, IN, dtype=D, requires_grad=grad)
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(grad), counter:
        out = fused_lora(x, None, a, b, base, SCALE)
    assert counter.get_total_flops() == 2 * tokens * IN * OUT + 2 * tokens * R * IN + 2 * tokens * R * OUT
    with torch.set_grad_enabled(grad):
        assert _new_output_sized_tensors(lambda: fused_lora(x, None, a, b, base, SCALE), tokens) == 1
    torch.testing.assert_close(out, _lora_hand(x, x, a, b, base), rtol=1e-12, atol=1e-12)


# -- inference with many tokens: one product on a temporary weight copy (dense_is_cheaper) --------------------

#: The fewest tokens at which inference on the (IN, OUT, R) layer forms the weight copy: tokens (IN + 2 OUT)
#: must exceed 1.5 (the margin at rank 3) x 2 IN OUT = 90, so 6 tokens (96) do and 5 (80) do not.
DENSE_FROM_TOKENS = 6


def _forward_flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def test_dense_is_cheaper_once_the_products_move_a_rank_dependent_multiple_of_a_weight_pass() -> None:
    """The crossover: tokens (in + 2 out) floats against 2 in out, times 1.5 up to rank 16, 1 from rank 64
    on, linear in between; strictly more."""
    # 512 x 512, the perf table's attention shape: 2 * 512 * 512 = 524288 floats; tokens move 1536 each.
    assert not dense_is_cheaper(512, 512, 512, 8)  # 786432 == 1.5 x 524288: not more
    assert dense_is_cheaper(513, 512, 512, 8)
    assert not dense_is_cheaper(512, 512, 512, 16) and dense_is_cheaper(513, 512, 512, 16)
    assert not dense_is_cheaper(426, 512, 512, 40) and dense_is_cheaper(427, 512, 512, 40)  # 1.25: 426.7 tokens
    assert not dense_is_cheaper(341, 512, 512, 64) and dense_is_cheaper(342, 512, 512, 64)
    assert not dense_is_cheaper(341, 512, 512, 256) and dense_is_cheaper(342, 512, 512, 256)
    # in and out play different parts: the output is passed twice, the input once
    assert dense_is_cheaper(700, 512, 1376, 8) and not dense_is_cheaper(700, 1376, 512, 8)
    assert not dense_is_cheaper(DENSE_FROM_TOKENS - 1, IN, OUT, R) and dense_is_cheaper(DENSE_FROM_TOKENS, IN, OUT, R)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True), (True, False)])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_inference_with_many_tokens_runs_one_product_on_a_weight_copy(dora: bool, conv1d: bool, bias: bool,
                                                                      device: str) -> None:
    """From the crossover on, inference adds s B A to a copy of W and runs one product: the matrix-product
    FLOPs are the copy's (out x r x in) and the one product's, the values the formula's (float64), and the
    layer's own weight is left as it was."""
    base = _base(conv1d, bias).to(device)
    a, b = (t.detach().to(device) for t in _factors())
    magnitude = _magnitude().detach().to(device)
    weight_before = base.weight.detach().clone()
    for tokens in (DENSE_FROM_TOKENS, 40):
        x = torch.randn(tokens, IN, dtype=D, device=device)
        expected, norm = _dora_hand(x, x, a, b, magnitude, base) if dora else (_lora_hand(x, x, a, b, base), None)
        dora_args = (magnitude, norm) if dora else ()
        with torch.no_grad():
            assert _forward_flops(lambda: fused_lora(x, None, a, b, base, SCALE, *dora_args)) \
                == 2 * OUT * R * IN + 2 * tokens * IN * OUT  # noqa: B023 (called at once)
            out = fused_lora(x, None, a, b, base, SCALE, *dora_args)
        assert out.grad_fn is None
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(base.weight, weight_before)


def test_inference_below_the_crossover_runs_the_products() -> None:
    base = _base()
    a, b = _factors()
    tokens = DENSE_FROM_TOKENS - 1
    x = torch.randn(tokens, IN, dtype=D)
    with torch.no_grad():
        flops = _forward_flops(lambda: fused_lora(x, None, a, b, base, SCALE))
        torch.testing.assert_close(fused_lora(x, None, a, b, base, SCALE), _lora_hand(x, x, a, b, base),
                                   rtol=1e-12, atol=1e-12)
    assert flops == 2 * tokens * IN * OUT + 2 * tokens * R * (IN + OUT)


def test_the_weight_copy_is_left_to_one_input_float32_or_float64_inference() -> None:
    """Past the crossover the products still run in training, for a LoRA input of its own (dropout), and in
    half precision (a 16-bit weight copy would round a small update away)."""
    tokens = 40
    products = 2 * tokens * IN * OUT + 2 * tokens * R * (IN + OUT)
    a, b = _factors()
    x = torch.randn(tokens, IN, dtype=D)
    assert _forward_flops(lambda: fused_lora(x.requires_grad_(), None, a, b, _base(), SCALE)) == products
    with torch.no_grad():
        x_d = torch.randn(tokens, IN, dtype=D)
        assert _forward_flops(lambda: fused_lora(x, x_d, a, b, _base(), SCALE)) == products
        half = frozen_layer(IN, OUT, dtype=torch.bfloat16)
        a16, b16 = a.detach().bfloat16(), b.detach().bfloat16()
        assert _forward_flops(lambda: fused_lora(x.detach().bfloat16(), None, a16, b16, half, SCALE)) == products
        a32, b32 = a.detach().float(), b.detach().float()  # float32 factors on a bfloat16 layer
        layer32 = frozen_layer(IN, OUT, dtype=torch.float32)
        assert _forward_flops(lambda: fused_lora(x.detach().bfloat16(), None, a32, b32, half, SCALE)) == products
        assert _forward_flops(lambda: fused_lora(x.detach().float(), None, a32, b32, layer32, SCALE)) \
            == 2 * OUT * R * IN + 2 * tokens * IN * OUT  # float32 throughout: the copy


# -- float32 factors on a half-precision layer (PEFT keeps a bfloat16 model's LoRA factors in float32) --------



def _mixed_case(layer_dtype: torch.dtype, conv1d: bool, bias: bool, tokens: int, device: str = "cpu"):
    base = frozen_layer(IN, OUT, conv1d=conv1d, bias=bias, dtype=layer_dtype).to(device)
    torch.manual_seed(1)
    a = torch.randn(R, IN, device=device, requires_grad=True)
    b = torch.randn(OUT, R, device=device, requires_grad=True)
    magnitude = torch.linspace(0.5, 2.0, OUT, device=device).requires_grad_(True)
    x = torch.randn(tokens, IN, device=device).to(layer_dtype).requires_grad_(True)
    return base, a, b, magnitude, x


def _in_float64(base: nn.Module) -> nn.Module:
    exact = frozen_layer(IN, OUT, conv1d=type(base).__name__ == "Conv1D", bias=base.bias is not None)
    exact = exact.to(base.weight.device)
    with torch.no_grad():
        exact.weight.copy_(base.weight)
        if base.bias is not None:
            exact.bias.copy_(base.bias)
    return exact


@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("conv1d, bias", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("tokens", [6, 512])  # 512: the two-halves products (_split_in_halves) too
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_float32_factors_on_a_half_precision_layer_compute_the_factors_in_float32(
        layer_dtype: torch.dtype, dora: bool, conv1d: bool, bias: bool, tokens: int, device: str) -> None:
    """The output and the input's gradient are the formula rounded to the layer's dtype; the factors' (and
    the magnitude's) gradients are float32 products of the exact half-precision values, as PEFT's float32
    branch computes them: they match the float64 formula to float32 precision, not just half precision."""
    base, a, b, magnitude, x = _mixed_case(layer_dtype, conv1d, bias, tokens, device)
    exact_base = _in_float64(base)
    x64, a64, b64, m64 = (t.detach().double().requires_grad_(True) for t in (x, a, b, magnitude))
    if dora:
        expected, norm64 = _dora_hand(x64, x64, a64, b64, m64, exact_base)
        out = fused_lora(x, None, a, b, base, SCALE, magnitude, norm64.float())
        leaves, leaves64 = [x, a, b, magnitude], [x64, a64, b64, m64]
    else:
        expected = _lora_hand(x64, x64, a64, b64, exact_base)
        out = fused_lora(x, None, a, b, base, SCALE)
        leaves, leaves64 = [x, a, b], [x64, a64, b64]
    assert out.dtype == layer_dtype
    half_ulp = 2.0 ** -8 if layer_dtype == torch.bfloat16 else 2.0 ** -11
    scale_of = float(expected.detach().abs().max())
    torch.testing.assert_close(out.double(), expected, rtol=2 * half_ulp, atol=2 * half_ulp * scale_of)
    seed = torch.randn(expected.shape, device=device).to(layer_dtype)
    got = _grads(out, leaves, seed)
    want = _grads(expected, leaves64, seed.double())
    assert got[0].dtype == layer_dtype and all(g.dtype == torch.float32 for g in got[1:])
    torch.testing.assert_close(got[0].double(), want[0], rtol=4 * half_ulp,
                               atol=4 * half_ulp * float(want[0].abs().max()))
    factor_rtol = 4 * half_ulp if dora else 1e-5  # DoRA's g * (m / n) is taken in the layer's dtype first
    for got_factor, want_factor in zip(got[1:], want[1:]):
        torch.testing.assert_close(got_factor.double(), want_factor, rtol=factor_rtol,
                                   atol=factor_rtol * float(want_factor.abs().max()))


@pytest.mark.parametrize("dora", [False, True])
def test_float32_factors_on_a_bfloat16_layer_keep_the_input_not_a_float32_copy(dora: bool) -> None:
    """The unfused path (and PEFT) keep a float32 copy of each adapted layer's input for backward (twice the
    input's memory); the fused path keeps the bfloat16 input itself, which the layer before keeps anyway."""
    base, a, b, magnitude, x = _mixed_case(torch.bfloat16, False, True, 512)
    norm = torch.ones(OUT)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_lora(x, None, a, b, base, SCALE, *((magnitude, norm) if dora else ()))
    input_sized = [t for t in saved if t.numel() == x.numel()]
    assert input_sized and all(t.dtype == torch.bfloat16 for t in input_sized)
    assert any(t.data_ptr() == x.data_ptr() for t in input_sized)


def test_fusable_takes_float32_factors_on_a_half_precision_layer_only() -> None:
    a = torch.randn(R, IN)
    for layer_dtype in (torch.bfloat16, torch.float16):
        base = frozen_layer(IN, OUT, dtype=layer_dtype)
        assert fusable_linear(base, torch.randn(2, IN).to(layer_dtype), a)
        assert not fusable_linear(base, torch.randn(2, IN), a)  # a float32 input on a half-precision layer
        assert not fusable_linear(base, torch.randn(2, IN).to(layer_dtype), a.double())
    assert not fusable_linear(frozen_layer(IN, OUT, dtype=torch.float32), torch.randn(2, IN), a.to(torch.bfloat16))


def _decoding_model(spec: str = "lora[r=4,target_modules=all-linear]"):
    """A tiny Llama with an adapter on every linear layer, eval mode, its factors moved away from their init."""
    import peftkit
    from tests.method_helpers import randomize
    from tests.tiny_models import build_tiny

    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, "default", seed=3)
    return model.eval()


def _one_token(model) -> torch.Tensor:
    ids = torch.tensor([[5]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _without_kept_values(model):
    """A copy of ``model`` holding nothing an inference forward kept (scaled factors, DoRA's norms)."""
    import copy

    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        for kept in ("_kept_scaled_transposes", KEPT_NORM, KEPT_WEIGHT_SQ):
            module.__dict__.pop(kept, None)
    return fresh


def _training_forward(model) -> torch.Tensor:
    with torch.enable_grad():
        return model(input_ids=torch.tensor([[5]])).logits.detach()


@pytest.mark.parametrize("spec", ["lokr[r=2,target_modules=all-linear]",
                                  "lora[r=4,use_dora=true,target_modules=all-linear]"])
def test_lokr_and_dora_inference_with_kept_factors_equals_the_forward_without_them(spec: str) -> None:
    """Inference keeps scaled factors (and DoRA its norms) between calls and gets the numbers it gets without
    them, to the bit; for LoKr these are the training forward's too, for DoRA equal within float rounding
    (in training the node takes ``A W^T`` for its norms from the base product: fused.norm_joins_base_product)."""
    dora = "use_dora" in spec
    model = _decoding_model(spec)
    for change in (None, "factors"):
        if change:  # a changed factor is picked up
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lokr_w2_a" in name or "lora_B" in name:
                        param.mul_(-2.0)
        expected = _one_token(_without_kept_values(model))
        assert torch.equal(_one_token(model), expected) and torch.equal(_one_token(model), expected)
        assert any("_kept_scaled_transposes" in m.__dict__ for m in model.modules())
        training = _training_forward(model)
        if dora:
            torch.testing.assert_close(training, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(training, expected)


def test_inference_keeps_s_b_t_and_gives_the_training_forwards_numbers() -> None:
    """Without gradients a layer keeps s B^T between forwards (one token a call when decoding) and gets what
    the forward with gradients gets, to the bit; the copy is made once, not per forward."""
    from peftkit.plugins.lora.layer import LoraLinear

    model = _decoding_model()
    with torch.enable_grad():
        expected = model(input_ids=torch.tensor([[5]])).logits.detach()
    assert torch.equal(_one_token(model), expected)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    kept = [list(layer.__dict__["_kept_scaled_transposes"].values())[0][1] for layer in layers]
    assert torch.equal(_one_token(model), expected)
    assert all(list(layer.__dict__["_kept_scaled_transposes"].values())[0][1] is copy
               for layer, copy in zip(layers, kept))


@pytest.mark.parametrize("change", ["optimizer step", "to bfloat16 and back", "hotswap", "scale"])
def test_the_kept_s_b_t_follows_every_change_of_b_and_the_scale(change: str, tmp_path) -> None:
    """A change of B in place (its version moves), new storage (``.to()`` and ``.data =`` do not move the
    version), another adapter's weights copied in, or another scale: the next inference forward uses it."""
    from peftkit.plugins.lora.layer import LoraLinear

    model = _decoding_model()
    _one_token(model)  # keeps s B^T at every layer
    if change == "optimizer step":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(1.5)
    elif change == "to bfloat16 and back":
        model.to(torch.bfloat16).to(torch.float32)
    elif change == "hotswap":
        other = _decoding_model()
        from tests.method_helpers import randomize

        randomize(other, "default", seed=9)
        other.save_adapter(str(tmp_path / "other"))
        model.hotswap_adapter(str(tmp_path / "other"))
    else:
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.scale *= 3.0
    with torch.enable_grad():
        expected = model(input_ids=torch.tensor([[5]])).logits.detach()
    assert torch.equal(_one_token(model), expected)
