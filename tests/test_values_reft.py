"""ReFT against hand formulas with each preset's constants written out here (not read from the unit):
LoReFT and NoReFT h + R^T (W h + b - R h), DiReFT h + R^T act(W h + b); suffix-only interventions; a
bfloat16 base; the seed option; the intervention called directly (a composition takes forward - h)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from tests.method_helpers import adapter_modules, randomize
from tests.tiny_models import build_tiny

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 11], [8, 4, 19, 30, 6, 12, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
SITE = "model.layers.1"


def _site(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(the intervention at SITE, the layer's output h, the site's output) in one forward of tiny Llama."""
    model = peftkit.adapt(build_tiny("llama").to(dtype), spec)
    randomize(model, "default", std=0.3, seed=seed)
    model.eval()
    layer = model.base_model.get_submodule(SITE)
    seen = {}
    layer.base_layer.register_forward_hook(lambda m, a, out: seen.update(h=(out[0] if isinstance(out, tuple) else out)))
    layer.register_forward_hook(lambda m, a, out: seen.update(out=(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    return adapter_modules(model)[SITE], seen["h"], seen["out"]


def _formula(unit, h: torch.Tensor, *, subtract: bool, act=lambda t: t) -> torch.Tensor:
    rows = unit.projection.weight.detach().float()
    w, b = unit.learned_source.weight.detach().float(), unit.learned_source.bias.detach().float()
    source = act(h @ w.T + b) - (h @ rows.T if subtract else 0)
    return h + source @ rows


@pytest.mark.parametrize("spec, subtract, act, orthogonal", [
    ("loreft[prefix_positions=2,r=2]", True, None, True),
    ("noreft[prefix_positions=2,r=2]", True, None, False),
    ("direft[prefix_positions=2,r=2,non_linearity=tanh]", False, torch.tanh, False),
    ("direft[prefix_positions=2,r=2,non_linearity=leakyrelu]", False, torch.nn.functional.leaky_relu, False),
])
def test_each_preset_equals_its_formula_at_the_first_real_tokens(spec, subtract, act, orthogonal):
    module, h, out = _site(spec)
    unit = module.units["0"]
    assert hasattr(unit.projection, "parametrizations") == orthogonal
    expected = h.clone()
    for row, positions in ((0, (0, 1)), (1, (3, 4))):
        for pos in positions:
            expected[row, pos] = _formula(unit, h[row, pos], subtract=subtract, act=act or (lambda t: t))
    assert (expected - h).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_suffix_only_and_a_tied_single_suffix_position():
    """prefix_positions=0: the last real tokens only (unit 1); tied with one suffix position: unit 0 on both."""
    module, h, out = _site("noreft[prefix_positions=0,suffix_positions=2,r=2]")
    assert list(module.units) == ["1"] and not module.tied
    expected = h.clone()
    for row in (0, 1):
        for pos in (5, 6):
            expected[row, pos] = _formula(module.units["1"], h[row, pos], subtract=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    tied, h, out = _site("noreft[prefix_positions=1,suffix_positions=1,tied_weights=true,r=2]")
    assert tied.tied and list(tied.units) == ["0"]
    expected = h.clone()
    for row, positions in ((0, (0, 6)), (1, (3, 6))):
        for pos in positions:
            expected[row, pos] = _formula(tied.units["0"], h[row, pos], subtract=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # tied with no prefix positions: the one unit acts on the suffix (this raised KeyError '1')
    suffix_tied, h, out = _site("noreft[prefix_positions=0,suffix_positions=2,tied_weights=true,r=2]")
    assert suffix_tied.tied and list(suffix_tied.units) == ["0"]
    expected = h.clone()
    for row in (0, 1):
        for pos in (5, 6):
            expected[row, pos] = _formula(suffix_tied.units["0"], h[row, pos], subtract=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_bfloat16_base_intervenes_in_the_units_float32_and_returns_bfloat16():
    module, h, out = _site("loreft[prefix_positions=2,r=2]", dtype=torch.bfloat16)
    unit = module.units["0"]
    assert h.dtype == out.dtype == torch.bfloat16 and unit.learned_source.weight.dtype == torch.float32
    expected = h.float().clone()
    for row, positions in ((0, (0, 1)), (1, (3, 4))):
        for pos in positions:
            expected[row, pos] = _formula(unit, h[row, pos].float(), subtract=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_called_directly_the_change_is_the_output_less_h_and_the_repr_names_the_units():
    module, h, out = _site("reft[prefix_positions=2,suffix_positions=1,r=2]")
    with torch.no_grad():
        torch.testing.assert_close(module(h, h, None), out)
        torch.testing.assert_close(module.delta(h, h, None), out - h)
    assert module.out_features == 32
    assert module.extra_repr() == "prefix_positions=2, suffix_positions=1, units=['0', '1'], tied=False"


def test_the_seed_draws_every_layer_alike_and_another_seed_differently():
    """init_weights_seed: each intervention's W, b and R (its orthogonal frame too) come from the seed alone."""
    def tensors(seed: int) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(seed * 100)  # the global generator must not matter
        model = peftkit.adapt(build_tiny("llama"), f"loreft[prefix_positions=1,r=2,init_weights_seed={seed}]")
        return [{k: v.detach().clone() for k, v in m.tensors().items()} for m in adapter_modules(model).values()]

    first, again, other = tensors(1), tensors(1), tensors(2)
    assert len(first) == 2
    for a, b, c in zip(first, again, other):
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(not torch.equal(a[k], c[k]) for k in a if k.endswith(("weight", "bias", "base")))
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])  # every layer starts equal


def test_units_draw_like_nn_linear_and_positive_frame_signs_are_read_and_restored():
    """W, b and a plain R: uniform in [-1/sqrt(width), 1/sqrt(width)] from the generator. The orthogonal
    frame reads each diagonal entry of ``original`` by its sign, +1 as well as -1 (torch's parametrization
    gives the same R there), and an optimizer step sets a decayed diagonal back to those signs."""
    from torch.nn.utils.parametrizations import orthogonal

    from peftkit.plugins.reft.units import HouseholderFrame, ReftUnit

    unit = ReftUnit(64, 16, orthogonal=False, subtract_projection=True, activation=None, dropout=0.0,
                    dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bound = 1 / 64 ** 0.5
    for tensor in (unit.learned_source.weight, unit.learned_source.bias, unit.projection.weight):
        values = tensor.detach()
        assert values.abs().max() <= bound and values.max() > 0.8 * bound and values.min() < -0.8 * bound
    assert unit.projection.bias is None

    reference = orthogonal(torch.nn.Linear(16, 3, bias=False))
    with torch.no_grad():
        original = reference.parametrizations.weight.original
        original.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).tril(diagonal=-1))
        original.diagonal().copy_(torch.tensor([1.0, -1.0, 1.0]))
        frame = HouseholderFrame(reference.parametrizations.weight[0].base.detach().clone())
        torch.testing.assert_close(frame(original.detach()), reference.weight.detach(), atol=1e-6, rtol=0)
        decayed = original.detach().clone()
        decayed.diagonal().mul_(0.5)
        torch.testing.assert_close(frame(decayed), frame(original.detach()), atol=0, rtol=0)

    model = peftkit.adapt(build_tiny("llama"), "loreft[r=2]")
    projection = next(iter(adapter_modules(model).values())).units["0"].projection
    signed = projection.parametrizations.weight.original
    with torch.no_grad():
        signed.diagonal().copy_(torch.tensor([0.7, -0.4]))
    signed.grad = torch.zeros_like(signed)
    torch.optim.SGD([signed], lr=0.1).step()
    assert signed.diagonal().tolist() == [1.0, -1.0]
