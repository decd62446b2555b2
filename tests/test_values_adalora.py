"""AdaLoRA layer values against hand formulas (for `make mutate`; tests/test_method_adalora.py compares
with PEFT through training runs, too slow to run per mutant): the update s * P diag(E) Q x with
s = alpha / (init_r + 1e-5) on Linear, GPT-2 Conv1D and Conv2d layers, the starting factors of each
init, dropout in training only, a bfloat16 base, the orthogonality regularizer, and shrinking with keep."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.plugins.adalora.config import AdaloraConfig
from tests.tiny_models import build_tiny

EPS = 1e-5  # PEFT adds it to ranknum (init_r) before dividing


def _adapters(model: peftkit.AdaptedModel) -> list:
    return [(layer.adapters["default"], layer.base_layer) for _, layer in model.tuner_layers()]


def _update(adapter) -> torch.Tensor:
    """s * P diag(E) Q as (out, in), in float64."""
    a, e, b = (t.detach().double() for t in (adapter.lora_A, adapter.lora_E, adapter.lora_B))
    return adapter.scale * b @ (a * e)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_update_is_scaled_p_diag_e_q_and_delta_weight_is_in_the_layers_layout(arch):
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny(arch), "adalora[init_r=4,target_r=2,alpha=6,init_weights=false]")
    for adapter, base in _adapters(model):
        assert adapter.scale == pytest.approx(6 / (4 + EPS), rel=1e-12)
        update = _update(adapter)
        x = torch.randn(3, adapter.in_features)
        delta = adapter.delta(x, base(x), base)
        torch.testing.assert_close(delta.double(), x.double() @ update.t(), atol=1e-5, rtol=1e-5)
        expected = update.t() if arch == "gpt2" else update  # GPT-2's Conv1D stores (in, out)
        torch.testing.assert_close(adapter.delta_weight(base).double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha,numerator", [(0, 4), (0.5, 0.5), (1, 1)])
def test_a_positive_alpha_is_the_numerator_and_zero_takes_the_rank(alpha, numerator):
    model = peftkit.adapt(build_tiny("llama"), f"adalora[init_r=4,target_r=2,alpha={alpha}]")
    assert all(a.scale == pytest.approx(numerator / (4 + EPS), rel=1e-12) for a, _ in _adapters(model))


def test_a_conv2d_update_is_the_kernel_of_the_scaled_product():
    torch.manual_seed(0)
    model = peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(3, 5, (3, 2))),  # kh != kw
                          AdaloraConfig(init_r=4, target_r=2, init_weights=False, target_modules=["0"]))
    adapter, base = _adapters(model)[0]
    assert adapter.in_features == 3 * 3 * 2
    kernel = _update(adapter).reshape(5, 3, 3, 2)
    x = torch.randn(2, 3, 6, 6)
    delta = adapter.delta(x, base(x), base)
    torch.testing.assert_close(delta.double(), torch.nn.functional.conv2d(x.double(), kernel), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.delta_weight(base).double(), kernel, atol=1e-6, rtol=1e-5)


def test_the_starting_factors_of_each_init():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "adalora[init_r=12,target_r=2]")
    pairs = _adapters(model)
    for adapter, _ in pairs:  # singular values start at zero: the adapter starts as the identity
        assert torch.equal(adapter.lora_E, torch.zeros(12, 1))
    factors = torch.cat([torch.cat([a.lora_A.detach().flatten(), a.lora_B.detach().flatten()]) for a, _ in pairs])
    assert abs(float(factors.std()) - 0.02) < 0.002
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "adalora[init_r=12,target_r=2,init_weights=false]")
    values = torch.cat([torch.cat([a.lora_A.detach().flatten(), a.lora_E.detach().flatten(),
                                   a.lora_B.detach().flatten()]) for a, _ in _adapters(model)])
    assert abs(float(values.std()) - 1.0) < 0.1


def test_dropout_acts_on_the_branch_input_in_training_only():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "adalora[init_r=4,target_r=2,dropout=0.5,init_weights=false]")
    adapter, base = _adapters(model)[0]
    x = torch.randn(4, adapter.in_features)
    update = _update(adapter)
    model.eval()
    torch.testing.assert_close(adapter.delta(x, base(x), base).double(), x.double() @ update.t(), atol=1e-5, rtol=1e-5)
    model.train()
    torch.manual_seed(1)
    dropped = adapter.delta(x, base(x), base)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    torch.testing.assert_close(dropped.double(), (x * mask).double() @ update.t(), atol=1e-5, rtol=1e-5)


def test_a_bfloat16_base_keeps_float32_factors_and_returns_its_own_dtype():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama").to(torch.bfloat16), "adalora[init_r=4,target_r=2,init_weights=false]")
    adapter, base = _adapters(model)[0]
    assert adapter.lora_A.dtype == adapter.lora_E.dtype == adapter.lora_B.dtype == torch.float32
    x = torch.randn(3, adapter.in_features).to(torch.bfloat16)
    delta = adapter.delta(x, base(x), base)
    expected = x.double() @ _update(adapter).t()
    assert delta.dtype == torch.bfloat16
    assert torch.allclose(delta.double(), expected, atol=2e-2 * float(expected.abs().max()))


def test_the_orthogonality_regularizer_is_the_two_frobenius_distances_from_the_identity():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "adalora[init_r=4,target_r=2,init_weights=false]")
    adapter, _ = _adapters(model)[0]
    a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
    eye = torch.eye(4, dtype=torch.float64)
    expected = torch.linalg.norm(a @ a.t() - eye) + torch.linalg.norm(b.t() @ b - eye)
    assert float(adapter.orthogonality()) == pytest.approx(float(expected), rel=1e-5)


def test_keep_shrinks_to_the_flagged_triplets_and_records_them_against_the_initial_ones():
    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "adalora[init_r=4,target_r=2,init_weights=false]")
    adapter, base = _adapters(model)[0]
    a, e, b = (t.detach().clone() for t in (adapter.lora_A, adapter.lora_E, adapter.lora_B))
    scale = adapter.scale
    adapter.keep(torch.tensor([True, False, True, True]))
    adapter.keep(torch.tensor([[1.0], [0.0], [1.0]]))  # E-shaped, as the allocator's masks are
    assert adapter.kept == [True, False, False, True] and adapter.r == 2
    torch.testing.assert_close(adapter.lora_A.detach(), a[[0, 3]])
    torch.testing.assert_close(adapter.lora_E.detach(), e[[0, 3]])
    torch.testing.assert_close(adapter.lora_B.detach(), b[:, [0, 3]])
    assert adapter.lora_A.requires_grad and adapter.lora_A.is_contiguous() and adapter.lora_B.is_contiguous()
    assert adapter.scale == scale  # the scale stays alpha / init_r (PEFT's ranknum is fixed)
    x = torch.randn(3, adapter.in_features)
    expected = scale * (x.double() @ (a[[0, 3]] * e[[0, 3]]).double().t()) @ b[:, [0, 3]].double().t()
    torch.testing.assert_close(adapter.delta(x, base(x), base).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep\\(\\) got 3 flags for 2 triplets"):
        adapter.keep(torch.tensor([True, True, False]))
    adapter.lora_B.requires_grad_(False)  # a frozen factor stays frozen
    adapter.keep(torch.tensor([True, False]))
    assert not adapter.lora_B.requires_grad and adapter.lora_A.requires_grad and adapter.kept == [True] + [False] * 3


def test_a_rank_pattern_builds_the_kept_triplets_only():
    base = build_tiny("llama")
    site = "model.layers.0.self_attn.q_proj"
    config = AdaloraConfig(init_r=4, target_r=2, alpha=0, target_modules=["q_proj"],
                           rank_pattern={f"{site}.lora_E": [False, True, False, True]})
    model = peftkit.adapt(base, config)
    adapter = dict(model.tuner_layers())[site].adapters["default"]
    assert adapter.r == 2 and adapter.init_r == 4 and adapter.kept == [False, True, False, True]
    assert adapter.lora_A.shape == (2, 32) and adapter.lora_B.shape == (32, 2)
    assert adapter.scale == pytest.approx(2 / (4 + EPS), rel=1e-12)  # alpha 0: the rank it was built with
    assert adapter.extra_repr() == "in=32, out=32, r=2 of 4, scale=0.499999"


def test_layers_adalora_cannot_adapt_are_refused_by_name():
    with pytest.raises(peftkit.PeftkitError, match="0 is a grouped Conv2d \\(groups=2\\)"):
        peftkit.adapt(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)),
                      AdaloraConfig(init_r=4, target_r=2, target_modules=["0"]))
