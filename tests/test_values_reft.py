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
        # the reflectors: below the diagonal of original^T (16 x 3), i.e. above original's own
        original.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).triu(diagonal=1))
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


def _householder_rows(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R by hand in float64: column j of original^T below its diagonal is reflector a_j, v_j = e_j + a_j,
    Q = (I - 2 v_0 v_0^T / |v_0|^2) ... (I - 2 v_{r-1} v_{r-1}^T / |v_{r-1}|^2) restricted to its first r
    columns, each column j multiplied by the sign of original[j, j] (0 counts as +); R = (base Q)^T."""
    tall = original.detach().double().mT
    n, r = tall.shape
    q = torch.eye(n, dtype=torch.float64)
    for j in range(r):
        v = torch.zeros(n, dtype=torch.float64)
        v[j] = 1.0
        v[j + 1:] = tall[j + 1:, j]
        q = q @ (torch.eye(n, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v))
    signs = torch.tensor([-1.0 if float(tall[j, j]) < 0 else 1.0 for j in range(r)], dtype=torch.float64)
    return (base.double() @ (q[:, :r] * signs)).mT


def test_the_frame_is_the_product_of_its_householder_reflections_and_a_zero_diagonal_reads_as_plus():
    """Every reflector entry counts, the first below the diagonal too; a diagonal entry of exactly 0 (weight
    decay's limit) reads as +1, and an optimizer step that sets the diagonal to its signs (orthonormal_projection registered it)
    leaves R as it was."""
    from peftkit.plugins.reft.units import HouseholderFrame, orthonormal_projection

    generator = torch.Generator().manual_seed(4)
    base, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    original = torch.randn(3, 6, generator=generator, dtype=torch.float64).triu(diagonal=1)
    original.diagonal().copy_(torch.tensor([0.0, -0.25, 0.5], dtype=torch.float64))
    rows = HouseholderFrame(base)(original)
    torch.testing.assert_close(rows, _householder_rows(original, base), atol=1e-12, rtol=0)
    torch.testing.assert_close(rows @ rows.mT, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)

    projection = orthonormal_projection(6, 3, torch.float64, frame_seed=0)
    signed = projection.parametrizations.weight.original
    with torch.no_grad():
        signed.copy_(original)
    before = projection.weight.detach().clone()
    torch.testing.assert_close(before, _householder_rows(original, projection.parametrizations.weight[0].base),
                               atol=1e-12, rtol=0)
    signed.grad = torch.zeros_like(signed)
    torch.optim.SGD([signed], lr=0.1).step()
    assert signed.diagonal().tolist() == [1.0, -1.0, 1.0]
    assert torch.equal(projection.weight.detach(), before)


def test_a_new_orthonormal_projection_is_its_seeded_frames_first_columns_as_torch_reads_it():
    """base: the seed's float64 Gaussian, QR'd, columns signed by R's diagonal (a uniformly random orthogonal
    matrix), cast to the unit's dtype; original: zero reflectors and a diagonal of exactly -1, so that torch's
    own parametrization (``adapters``, which truncates the diagonal to an integer) gives the same R."""
    from torch.nn.utils.parametrizations import orthogonal

    from peftkit.plugins.reft.units import orthonormal_projection

    projection = orthonormal_projection(8, 3, torch.float32, frame_seed=11)
    gaussian = torch.randn(8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    q, upper = torch.linalg.qr(gaussian)
    expected_base = (q * torch.sign(torch.diagonal(upper))).float()
    parametrization = projection.parametrizations.weight
    assert torch.equal(parametrization[0].base, expected_base)
    expected_original = torch.zeros(3, 8)
    expected_original.diagonal().fill_(-1.0)
    assert torch.equal(parametrization.original.detach(), expected_original)
    assert torch.equal(projection.weight.detach(), expected_base[:, :3].mT)

    reference = orthogonal(torch.nn.Linear(8, 3, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original.copy_(parametrization.original)
        reference.parametrizations.weight[0].base.copy_(parametrization[0].base)
    torch.testing.assert_close(reference.weight.detach(), projection.weight.detach(), atol=1e-6, rtol=0)


def test_r_must_be_below_the_width_for_a_projection_and_for_saved_rows():
    from peftkit.plugins.reft.units import frame_for_rows, orthonormal_projection

    for width, r in ((4, 4), (4, 5)):
        with pytest.raises(ValueError, match=f"r={r} below the hidden size {width}"):
            orthonormal_projection(width, r, torch.float32, frame_seed=0)
    for rows in (torch.eye(4), torch.eye(5)[:4, :4].repeat(2, 1), torch.ones(3), torch.ones(1, 2, 3)):
        with pytest.raises(ValueError, match="r x hidden with r below hidden"):
            frame_for_rows(rows)


def test_saved_rows_give_a_frame_that_reproduces_them_in_their_dtype_and_torchs_reading():
    """frame_for_rows: ``base`` in the rows' dtype, its first r columns the rows themselves, the rest
    orthonormal to them; ``original`` zero reflectors and a diagonal of -1 in that dtype. Rows exact in
    bfloat16 (entries +-1/2) keep bfloat16 (the orthogonal completion is computed in float64)."""
    from torch.nn.utils.parametrizations import orthogonal

    from peftkit.plugins.reft.units import HouseholderFrame, frame_for_rows

    hadamard = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]) / 2
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        rows = hadamard.to(dtype)
        original, base = frame_for_rows(rows)
        assert original.dtype == base.dtype == dtype
        expected_original = torch.zeros(3, 4, dtype=dtype)
        expected_original.diagonal().fill_(-1.0)
        assert torch.equal(original, expected_original)
        assert torch.equal(base[:, :3], rows.mT)
        wide = base.double()
        torch.testing.assert_close(wide.mT @ wide, torch.eye(4, dtype=torch.float64),
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
        if dtype != torch.bfloat16:  # torch has no bfloat16 Householder product on CPU
            assert torch.equal(HouseholderFrame(base)(original), rows)

    rows = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(2)))[0][:2]
    original, base = frame_for_rows(rows)
    reference = orthogonal(torch.nn.Linear(7, 2, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original.copy_(original)
        reference.parametrizations.weight[0].base.copy_(base)
    torch.testing.assert_close(reference.weight.detach(), rows, atol=1e-6, rtol=0)


def test_saved_rows_off_orthonormal_by_exactly_the_tolerance_pass_and_beyond_it_are_refused():
    """|R R^T - I| is compared in float64 with ``<=``: rows [e_0, t e_0 + e_1] are off by t (the
    off-diagonal; the diagonal's t^2 is smaller)."""
    from peftkit.plugins.reft.units import ORTHONORMAL_TOLERANCE, frame_for_rows

    def rows(t: float) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0, 0.0, 0.0], [t, 1.0, 0.0, 0.0]], dtype=torch.float64)

    original, base = frame_for_rows(rows(ORTHONORMAL_TOLERANCE))
    assert torch.equal(base[:, :2], rows(ORTHONORMAL_TOLERANCE).mT)
    for t in (2 * ORTHONORMAL_TOLERANCE, float("nan")):
        with pytest.raises(ValueError, match="not orthonormal"):
            frame_for_rows(rows(t))


def test_a_plain_projection_is_drawn_from_the_units_generator_not_the_global_one():
    from peftkit.plugins.reft.units import ReftUnit

    def unit(global_seed: int) -> ReftUnit:
        torch.manual_seed(global_seed)
        return ReftUnit(16, 4, orthogonal=False, subtract_projection=True, activation=None, dropout=0.0,
                        dtype=torch.float32, generator=torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)
    bound = 1 / 16 ** 0.5
    weight = torch.empty(4, 16).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(4).uniform_(-bound, bound, generator=generator)
    rows = torch.empty(4, 16).uniform_(-bound, bound, generator=generator)
    for global_seed in (0, 1):
        drawn = unit(global_seed)
        assert torch.equal(drawn.learned_source.weight.detach(), weight)
        assert torch.equal(drawn.learned_source.bias.detach(), bias)
        assert torch.equal(drawn.projection.weight.detach(), rows)
