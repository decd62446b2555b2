"""LoRA / DoRA layer modules against hand formulas, on bare torch layers (no model): forward and delta
in every dtype path, DoRA with and without a bias, DoRA's merge/unmerge keeping a half-precision
weight's dtype, low_rank's forms, and Embedding LoRA honouring the table's padding, max_norm and
gradient options. Written to kill the mutants `make mutate` found alive (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from peftkit.core.errors import ConfigError
from peftkit.plugins.lora.layer import LoraEmbedding, LoraLinear

IN, OUT, R, SCALE = 6, 5, 3, 1.5


def _linear(bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=bias).to(dtype)


def _lora(base: nn.Module, *, dora: bool = False, dropout: float = 0.0) -> LoraLinear:
    torch.manual_seed(1)
    lora = LoraLinear(base, R, SCALE, dropout, False, dora)  # init=False: random B, so the adapter changes outputs
    if dora:
        with torch.no_grad():  # a magnitude away from the initial norms, so it matters
            lora.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, OUT, dtype=lora.lora_magnitude_vector.dtype))
    return lora


def _dense(lora: LoraLinear) -> torch.Tensor:
    return SCALE * lora.lora_B.detach().double() @ lora.lora_A.detach().double()


def _dora_hand(lora: LoraLinear, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """m * (W + sBA) x / ||W + sBA||_row + b, in float64."""
    w = base.weight.detach().double()
    merged = w + _dense(lora)
    norm = merged.norm(dim=1)
    out = (lora.lora_magnitude_vector.detach().double() / norm) * (x.double() @ merged.T)
    if base.bias is not None:
        out = out + base.bias.detach().double()
    return out


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(*shape, IN).to(dtype)


@pytest.mark.parametrize("shape", [(2, 4), (4,)], ids=["batched", "one-vector"])
def test_lora_forward_is_h_plus_scaled_bax(shape):
    base = _linear()
    lora = _lora(base)
    x = _x(*shape)
    h = base(x)
    expected = h.double() + x.double() @ _dense(lora).T
    with torch.no_grad():
        out = lora(x, h, base)
        delta = lora.delta(x, h, base)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.double(), expected - h.double(), atol=1e-5, rtol=1e-5)


def test_lora_output_and_delta_take_the_base_outputs_dtype():
    base = _linear(dtype=torch.bfloat16)
    lora = _lora(base)
    assert lora.lora_A.dtype == torch.float32
    x = _x(2, 4, dtype=torch.bfloat16)
    h = base(x)
    with torch.no_grad():
        out, delta = lora(x, h, base), lora.delta(x, h, base)
    assert out.dtype == delta.dtype == torch.bfloat16
    expected = x.double() @ _dense(lora).T
    torch.testing.assert_close(delta.double(), expected, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_dora_forward_and_delta_equal_the_dense_formula(bias):
    base = _linear(bias=bias)
    lora = _lora(base, dora=True)
    x = _x(2, 4)
    h = base(x)
    with torch.no_grad():
        out, delta = lora(x, h, base), lora.delta(x, h, base)
    expected = _dora_hand(lora, base, x)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.double(), expected - h.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.delta_weight(base).double(),
                               (lora.lora_magnitude_vector.detach().double() / (base.weight.double() + _dense(lora))
                                .norm(dim=1)).unsqueeze(1) * (base.weight.double() + _dense(lora))
                               - base.weight.double(), atol=1e-5, rtol=1e-5)


def test_dora_keeps_a_half_precision_base_in_its_dtype_through_forward_merge_and_unmerge():
    base = _linear(dtype=torch.bfloat16)
    lora = _lora(base, dora=True)
    original = base.weight.detach().clone()
    x = _x(2, 4, dtype=torch.bfloat16)
    h = base(x)
    with torch.no_grad():
        out = lora(x, h, base)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _dora_hand(lora, base, x), atol=0.05, rtol=0.02)
    lora.merge(base)
    assert base.weight.dtype == torch.bfloat16
    merged = _dora_hand(lora, _bias_free(base, original), torch.eye(IN)).T  # m/n * (W + sBA)
    torch.testing.assert_close(base.weight.double(), merged, atol=0.03, rtol=0.02)
    lora.unmerge(base)
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(base.weight.double(), original.double(), atol=0.03, rtol=0.02)


def _bias_free(base: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A bias-free float copy of ``base`` with ``weight``: its DoRA output on the identity is W'^T."""
    copy = nn.Linear(IN, OUT, bias=False)
    copy.weight.data = weight.float().clone()
    return copy


def test_dora_unmerge_restores_the_weight_with_the_merge_time_norm():
    base = _linear()
    lora = _lora(base, dora=True)
    original = base.weight.detach().clone()
    lora.merge(base)
    merged = _dora_hand(lora, _bias_free(base, original), torch.eye(IN)).T
    torch.testing.assert_close(base.weight.double(), merged, atol=1e-5, rtol=1e-5)
    lora.unmerge(base)
    torch.testing.assert_close(base.weight, original, atol=1e-5, rtol=1e-5)


def test_low_rank_forms():
    base = _linear()
    plain = _lora(base, dropout=0.5)
    a, b, scale = plain.low_rank()
    assert a is plain.lora_A and b is plain.lora_B and scale == SCALE
    plain.train()
    assert plain.low_rank(forward=True) is None  # dropout on the input: no batched form while training
    assert plain.low_rank() is not None  # the weight change itself does not depend on dropout
    plain.eval()
    assert plain.low_rank(forward=True) is not None
    assert _lora(base, dora=True).low_rank() is None


# -- Embedding -------------------------------------------------------------------------------------------------------


def _embedding(dtype: torch.dtype = torch.float32, **options) -> tuple[nn.Embedding, LoraEmbedding]:
    torch.manual_seed(3)
    base = nn.Embedding(10, 4, **options).to(dtype)
    lora = LoraEmbedding(base, R, SCALE, False)
    return base, lora


def test_embedding_delta_and_weight_are_scaled_rows_of_a_transposed_times_b():
    base, lora = _embedding()
    ids = torch.tensor([[1, 4, 4, 9]])
    a, b = lora.lora_embedding_A.detach(), lora.lora_embedding_B.detach()
    h = base(ids).double()
    with torch.no_grad():
        delta = lora.delta(ids, h, base)
    assert delta.dtype == torch.float64
    torch.testing.assert_close(delta, SCALE * (a.T[ids] @ b.T).double())
    torch.testing.assert_close(lora.delta_weight(base), SCALE * (b @ a).T)
    low_a, low_b, scale = lora.low_rank()
    assert low_a is lora.lora_embedding_A and low_b is lora.lora_embedding_B and scale == SCALE
    assert lora.low_rank(forward=True) is None


def test_embedding_factors_take_a_float64_tables_dtype():
    _, lora = _embedding(torch.float64)
    assert lora.lora_embedding_A.dtype == lora.lora_embedding_B.dtype == torch.float64


def test_embedding_lora_on_a_sparse_table_trains_with_the_dense_tables_gradient():
    ids = torch.tensor([[1, 4, 4, 9]])
    grads = []
    for sparse in (True, False):
        base, lora = _embedding(sparse=sparse)
        lora.delta(ids, base(ids), base).pow(2).sum().backward()
        grads.append(lora.lora_embedding_A.grad)
    assert not grads[0].is_sparse
    torch.testing.assert_close(grads[0], grads[1])


def test_embedding_delta_follows_the_tables_padding_and_gradient_options():
    base, lora = _embedding(padding_idx=0, scale_grad_by_freq=True)
    ids = torch.tensor([[0, 2, 2, 2, 5]])
    lora.delta(ids, base(ids), base).sum().backward()
    grad = lora.lora_embedding_A.grad  # (r, vocab): column i is token i's
    b = lora.lora_embedding_B.detach()
    one_use = SCALE * b.sum(dim=0)  # d(sum of delta)/d(A[:, i]) for one occurrence of token i
    torch.testing.assert_close(grad[:, 0], torch.zeros(R))  # padding: no gradient
    torch.testing.assert_close(grad[:, 2], one_use)  # three uses, scaled by 1/3 (scale_grad_by_freq)
    torch.testing.assert_close(grad[:, 5], one_use)


def test_embedding_delta_renormalizes_rows_like_the_tables_max_norm():
    base, lora = _embedding(max_norm=0.5, norm_type=1.0)
    with torch.no_grad():
        lora.lora_embedding_A.normal_(0, 1.0)  # rows of A^T with 1-norms well above 0.5
    a_t = lora.lora_embedding_A.detach().T.clone()
    ids = torch.tensor([[3, 7]])
    expected_rows = a_t[ids] * (0.5 / a_t[ids].abs().sum(dim=-1, keepdim=True)).clamp(max=1.0)
    with torch.no_grad():
        delta = lora.delta(ids, torch.zeros(1, 2, 4), base)
    torch.testing.assert_close(delta, SCALE * expected_rows @ lora.lora_embedding_B.detach().T, atol=1e-5, rtol=1e-4)


# -- hot-swap --------------------------------------------------------------------------------------------------------


def test_hotswap_into_lora_and_dora_gives_the_new_adapters_weight_change():
    base = _linear()
    for dora in (False, True):
        slot = _lora(base, dora=dora)
        torch.manual_seed(4)
        new = LoraLinear(base, R if dora else R - 1, 2 * SCALE, 0.0, False, dora)  # another alpha (and rank)
        expected = new.delta_weight(base).detach().clone()
        assert not torch.allclose(slot.delta_weight(base), expected)
        with torch.no_grad():
            slot.hotswap_plan(new)()
        assert slot.scale == SCALE  # the slot keeps its scale; the new one is folded into B
        torch.testing.assert_close(slot.delta_weight(base).detach(), expected, atol=1e-6, rtol=1e-5)


# -- PiSSA removal, repr, embedding init -----------------------------------------------------------------------------


def test_removing_a_plain_lora_leaves_the_weight_alone():
    base = _linear()
    original = base.weight.detach().clone()
    _lora(base).removed(base)
    assert torch.equal(base.weight, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_removing_a_pissa_lora_gives_back_the_original_weight_in_its_dtype(dtype):
    base = _linear(dtype=dtype)
    original = base.weight.detach().clone()
    lora = LoraLinear(base, R, SCALE, 0.0, "pissa", False)
    residual = original.double() - _dense(lora)
    torch.testing.assert_close(base.weight.double(), residual, atol=0.02 if dtype == torch.bfloat16 else 1e-5,
                               rtol=0.02 if dtype == torch.bfloat16 else 1e-5)
    lora.removed(base)
    assert base.weight.dtype == dtype
    torch.testing.assert_close(base.weight, original, atol=0.03 if dtype == torch.bfloat16 else 1e-5, rtol=0.02)


def test_removing_a_pissa_lora_on_a_gpt2_conv1d_gives_back_its_in_out_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(OUT, IN)  # weight (in, out)
    base.weight.data.normal_()
    original = base.weight.detach().clone()
    lora = LoraLinear(base, R, SCALE, 0.0, "pissa", False)
    torch.testing.assert_close(base.weight.double(), (original.double().T - _dense(lora)).T, atol=1e-5, rtol=1e-5)
    lora.removed(base)
    torch.testing.assert_close(base.weight, original, atol=1e-5, rtol=1e-5)


def test_linear_repr_names_sizes_rank_scale_and_dora():
    base = _linear()
    assert _lora(base).extra_repr() == "in=6, out=5, r=3, scale=1.5"
    assert _lora(base, dora=True).extra_repr() == "in=6, out=5, r=3, scale=1.5, dora"


def test_embedding_init_a_zero_by_default_gaussian_std_0_1_for_init_false():
    torch.manual_seed(5)
    base = nn.Embedding(2000, 4)
    default = LoraEmbedding(base, 8, SCALE, True)
    assert torch.count_nonzero(default.lora_embedding_A) == 0  # identity at init
    assert abs(default.lora_embedding_B.std().item() - 1.0) < 0.3  # B ~ N(0, 1), as PEFT
    random = LoraEmbedding(base, 8, SCALE, False)
    assert abs(random.lora_embedding_A.std().item() - 0.1) < 0.005  # 16000 draws: std within 5%


def test_dora_norm_cache_follows_every_change_of_w_a_and_b():
    base = _linear()
    lora = _lora(base, dora=True)
    x = _x(2, 4)
    changes = [lambda: lora.lora_A.mul_(1.5), lambda: lora.lora_B.add_(0.3), lambda: base.weight.mul_(0.5),
               lambda: setattr(base, "weight", nn.Parameter(base.weight.detach() + 0.2))]
    for change in [lambda: None, *changes]:
        with torch.no_grad():
            change()
            h = base(x)
            torch.testing.assert_close(lora(x, h, base).double(), _dora_hand(lora, base, x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lora(x, h, base).double(), _dora_hand(lora, base, x), atol=1e-5, rtol=1e-5)
    h = base(x)  # with gradients: computed afresh, same values
    torch.testing.assert_close(lora(x, h, base).double(), _dora_hand(lora, base, x), atol=1e-5, rtol=1e-5)


def test_dora_forward_after_merge_and_unmerge_uses_the_restored_weight():
    base = _linear()
    lora = _lora(base, dora=True)
    x = _x(2, 4)
    with torch.no_grad():
        h = base(x)
        before = lora(x, h, base)
        lora.merge(base)
        lora.base_changed()
        lora.unmerge(base)
        lora.base_changed()
        h = base(x)
        torch.testing.assert_close(lora(x, h, base), before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lora(x, h, base).double(), _dora_hand(lora, base, x), atol=1e-5, rtol=1e-5)


# -- factor initialisation -------------------------------------------------------------------------------------------


def test_factors_take_a_float64_bases_dtype_and_dropout_only_when_positive():
    base = _linear(dtype=torch.float64)
    lora = LoraLinear(base, R, SCALE, 0.0, True, True)
    assert lora.lora_A.dtype == lora.lora_B.dtype == lora.lora_magnitude_vector.dtype == torch.float64
    assert lora.dropout is None
    assert isinstance(LoraLinear(base, R, SCALE, 0.25, True, False).dropout, nn.Dropout)
    assert LoraLinear(base, R, SCALE, 0.25, True, False).dropout.p == 0.25


def test_default_init_is_kaiming_uniform_a_with_zero_b():
    torch.manual_seed(6)
    base = nn.Linear(3000, 4)
    lora = LoraLinear(base, 8, SCALE, 0.0, True, False)
    bound = 1 / 3000 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 3000: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.99 * bound
    assert torch.count_nonzero(lora.lora_B) == 0


def test_gaussian_init_draws_a_with_std_one_over_r_and_leaves_the_base_alone():
    torch.manual_seed(7)
    base = nn.Linear(2000, 4)
    original = base.weight.detach().clone()
    lora = LoraLinear(base, 8, SCALE, 0.0, "gaussian", False)
    assert abs(lora.lora_A.std().item() - 1 / 8) < 0.005
    assert torch.equal(base.weight, original) and torch.count_nonzero(lora.lora_B) == 0
    assert not hasattr(lora, "initial_lora_A")


def test_init_false_draws_b_with_std_0_1():
    torch.manual_seed(8)
    lora = LoraLinear(nn.Linear(4, 4000), 8, SCALE, 0.0, False, False)
    assert abs(lora.lora_B.std().item() - 0.1) < 0.005


def test_pissa_keeps_its_initial_factors_out_of_the_state_dict_and_refuses_float64():
    base = _linear()
    lora = LoraLinear(base, R, SCALE, 0.0, "pissa", False)
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float32
    assert torch.equal(lora.initial_lora_A, lora.lora_A) and torch.equal(lora.initial_lora_B, lora.lora_B)
    assert set(lora.state_dict()) == {"lora_A", "lora_B"}
    with pytest.raises(Exception) as refused:
        LoraLinear(_linear(dtype=torch.float64), R, SCALE, 0.0, "pissa", False)
    assert str(refused.value) == ("lora: init_weights='pissa' needs a float32/float16/bfloat16 base weight, "
                                  "not torch.float64")


@pytest.mark.parametrize("bits, init, named", [(8, "pissa", "8-bit (bitsandbytes)"),
                                               (4, "olora", "4-bit (bitsandbytes)")])
def test_pissa_and_olora_refuse_a_quantized_base_by_its_quantization_and_leave_it_alone(bits, init, named):
    """PiSSA / OLoRA rewrite the base weight; a bitsandbytes 4/8-bit weight (on CPU) is refused by name,
    before the dtype check (which would only say "not torch.uint8"), and keeps its bytes."""
    from tests.method_helpers import quantized_linear_and_twin

    quantized, _ = quantized_linear_and_twin(bits, in_features=16, out_features=8)
    base = quantized[0]
    before = base.weight.data.clone()
    with pytest.raises(ConfigError) as refused:
        LoraLinear(base, R, SCALE, 0.0, init, False)
    assert str(refused.value) == (f"lora: init_weights={init!r} rewrites the base weight, which is quantized "
                                  f"({named}); initialise on the unquantized model")
    assert torch.equal(base.weight.data, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_dropout_sends_the_dropped_input_through_the_lora_or_the_whole_dora_term(dora, dtype):
    """Dropout active (training, p > 0): plain LoRA gives h + s B A x_d; DoRA, as PEFT, gives
    h + (m/n - 1) W x_d + (m/n) s B A x_d, with x_d the dropped-out input. The output keeps h's dtype."""
    base = _linear(dtype=dtype)
    lora = _lora(base, dora=dora, dropout=0.5).train()
    x = _x(2, 4, dtype=dtype)
    h = base(x)
    torch.manual_seed(9)
    with torch.no_grad():
        out = lora(x, h, base)
    torch.manual_seed(9)
    x_d = nn.functional.dropout(x, 0.5, training=True).double()  # the same mask: same shape, dtype and seed
    assert out.dtype == dtype and x_d.count_nonzero() < x.count_nonzero()
    change = x_d @ _dense(lora).T
    if dora:
        w = base.weight.detach().double()
        m_over_n = lora.lora_magnitude_vector.detach().double() / (w + _dense(lora)).norm(dim=1)
        expected = h.double() + (m_over_n - 1) * (x_d @ w.T) + m_over_n * change
    else:
        expected = h.double() + change
    tol = 1e-5 if dtype == torch.float32 else 0.03
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_forward_alone_with_training_dropout_fuses_only_plain_lora_and_uses_the_dropped_input():
    """At a frozen Linear the fused path (forward_alone) gives h + s B A x_d with the dropout mask it drew,
    with and without autograd; DoRA with active dropout is left to the unfused forward (None)."""
    base = _linear().requires_grad_(False)
    x = _x(2, 4)
    h = base(x)
    lora = _lora(base, dropout=0.5).train()
    for grad in (False, True):
        torch.manual_seed(9)
        with torch.set_grad_enabled(grad):
            alone = lora.forward_alone(x, base)
        torch.manual_seed(9)
        x_d = nn.functional.dropout(x, 0.5, training=True).double()
        assert alone is not None and x_d.count_nonzero() < x.count_nonzero()
        torch.testing.assert_close(alone.detach().double(), h.double() + x_d @ _dense(lora).T, atol=1e-5, rtol=1e-5)
    assert _lora(base, dora=True, dropout=0.5).train().forward_alone(x, base) is None
