"""Values of weight-space merges that tests/test_merging*.py leave unchecked (found by `make mutate`):
how the merged factors are stored, precision per dtype, DARE's seeded draws across sites, the energy
report, heads kept by a dense or elementwise merge, and IA3 merges whose weights do not sum to 1."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import MergeError
from peftkit.core import merge_strategies as ms
from peftkit.core.layer import ModulesToSave
from tests.tiny_models import build_tiny

TARGETS = '["q_proj","v_proj","down_proj"]'


def _lora_pair(dtype: torch.dtype = torch.float32) -> peftkit.AdaptedModel:
    """Two LoRA adapters; cast afterwards, so their factors (float32 on a half-precision base) take ``dtype``."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, (name, alpha) in enumerate((("a", 8), ("b", 16))):
        torch.manual_seed(seed + 1)
        model.add_adapter(name, f"lora[r=4,alpha={alpha},init_weights=false,target_modules={TARGETS}]")
    model.base_model.to(dtype)
    return model.eval()


def _factors(model: peftkit.AdaptedModel, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {site: layer.adapters[name].low_rank() for site, layer in model.tuner_layers() if name in layer.adapters}


def _delta(factors: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    a, b, scale = factors
    return (b.double() @ a.double()) * scale


def test_linear_at_the_sum_of_ranks_stores_the_concatenated_factors():
    model = _lora_pair()
    a, b = _factors(model, "a"), _factors(model, "b")
    for rank in (None, 8):  # default rank for linear = the sum of the ranks
        name = f"lin{rank}"
        model.merge_adapters(["a", "b"], [0.7, -0.4], name=name, strategy="linear", rank=rank)
        for site, (a_new, b_new, scale) in _factors(model, name).items():
            assert scale == 1.0
            assert torch.equal(a_new, torch.cat([a[site][0] * (0.7 * a[site][2]), b[site][0] * (-0.4 * b[site][2])]))
            assert torch.equal(b_new, torch.cat([a[site][1], b[site][1]], dim=1))


def test_linear_below_the_sum_of_ranks_is_svd_and_weights_default_to_one():
    model = _lora_pair()
    model.merge_adapters(["a", "b"], [1.0, 0.5], name="lin", strategy="linear", rank=3)
    model.merge_adapters(["a", "b"], [1.0, 0.5], name="svd", strategy="svd", rank=3)
    model.merge_adapters(["a", "b"], name="plain", strategy="linear")
    a, b = _factors(model, "a"), _factors(model, "b")
    lin, svd, plain = _factors(model, "lin"), _factors(model, "svd"), _factors(model, "plain")
    for site in lin:
        assert torch.allclose(_delta(lin[site]), _delta(svd[site]), atol=1e-6), site
        assert torch.allclose(_delta(plain[site]), _delta(a[site]) + _delta(b[site]), atol=1e-6), site


def test_svd_of_one_adapter_is_its_best_rank_k_approximation():
    model = _lora_pair()
    model.merge_adapters(["a"], [0.5], name="m", strategy="svd", rank=2)
    a = _factors(model, "a")
    for site, got in _factors(model, "m").items():
        u, s, vh = torch.linalg.svd(0.5 * _delta(a[site]))
        assert torch.allclose(_delta(got), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-6), site


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_svd_merge_keeps_the_adapters_dtype_and_its_precision(dtype, atol):
    """float64 stays exact (no float32 detour); half-precision factors are combined in float32 (CPU QR has
    no bf16) and land in the new adapter, which add_adapter makes float32 on a half-precision base."""
    model = _lora_pair(dtype)
    a, b = _factors(model, "a"), _factors(model, "b")
    model.merge_adapters(["a", "b"], [1.0, 0.5], name="m", strategy="svd", rank=8)
    for site, got in _factors(model, "m").items():
        stored = torch.float32 if dtype == torch.bfloat16 else dtype
        assert got[0].dtype == stored and got[1].dtype == stored
        expected = _delta(a[site]) + 0.5 * _delta(b[site])
        assert torch.allclose(_delta(got), expected, atol=atol * expected.abs().max()), site


# -- dense merges -------------------------------------------------------------------------------------


def _dora_pair() -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed + 3)
        model.add_adapter(name, f"lora[r=4,use_dora=true,init_weights=false,target_modules={TARGETS}]")
    return model.eval()


def _dense_by_hand(model, names, weights, fn, **options) -> dict[str, torch.Tensor]:
    """strategy([delta_weight_i], weights) site by site, in the model's layer order (one generator throughout)."""
    out = {}
    for site, layer in model.tuner_layers():
        if names[0] in layer.adapters:
            deltas = [layer.adapters[n].delta_weight(layer.base_layer).detach().float() for n in names]
            out[site] = fn(deltas, weights, **options)
    return out


def test_dense_dare_draws_one_seeded_sequence_over_all_sites_or_torchs_global_one():
    model = _dora_pair()
    model.merge_adapters(["a", "b"], [0.7, 0.4], name="seeded", strategy="dare_linear", density=0.5, seed=3)
    torch.manual_seed(11)
    model.merge_adapters(["a", "b"], [0.7, 0.4], name="global", strategy="dare_linear", density=0.5, seed=None)
    seeded = _dense_by_hand(model, ["a", "b"], [0.7, 0.4], ms.dare_linear, density=0.5,
                            generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    drawn = _dense_by_hand(model, ["a", "b"], [0.7, 0.4], ms.dare_linear, density=0.5, generator=None)
    for name, expected in (("seeded", seeded), ("global", drawn)):
        got = _factors(model, name)
        assert got.keys() == expected.keys()
        for site in got:
            assert torch.allclose(_delta(got[site]).float(), expected[site], atol=1e-5), (name, site)


def test_full_rank_dense_merge_takes_the_largest_site_rank_and_reports_all_energy_kept():
    model = _dora_pair()
    record = model.merge_adapters(["a", "b"], [1.0, 1.0], name="m", strategy="linear")
    shapes = [layer.base_layer.weight.shape for _, layer in model.tuner_layers() if "a" in layer.adapters]
    assert record.config.r == record.merge_report["rank"] == max(min(shape) for shape in shapes)
    assert all(v == pytest.approx(1.0) and v <= 1.0 for v in record.merge_report["energy_kept"].values())


def test_a_dense_merge_above_a_sites_rank_pads_its_factors_with_zeros():
    """Rank 33 on 32 x 32 sites: 32 directions, then one zero column/row (the change stays exact)."""
    model = _dora_pair()
    record = model.merge_adapters(["a", "b"], [1.0, 1.0], name="m", strategy="linear", rank=33)
    expected = _dense_by_hand(model, ["a", "b"], [1.0, 1.0], ms.linear)
    assert record.config.r == 33
    for site, (a_new, b_new, _) in _factors(model, "m").items():
        assert a_new.shape[0] == b_new.shape[1] == 33
        assert torch.allclose(_delta((a_new, b_new, 1.0)).float(), expected[site], atol=1e-5), site


@pytest.mark.parametrize("rank", [1, 2])
def test_a_small_rank_dense_merge_is_the_best_approximation_of_that_rank(rank):
    """Rank 1 or 2 of 16..32: the Gram-matrix path (top eigenpairs in float64) must equal a truncated SVD."""
    model = _dora_pair()
    record = model.merge_adapters(["a", "b"], [1.0, -0.5], name="m", strategy="linear", rank=rank)
    expected = _dense_by_hand(model, ["a", "b"], [1.0, -0.5], ms.linear)
    got = _factors(model, "m")
    assert got.keys() == expected.keys()
    for site, delta in expected.items():
        u, s, vh = torch.linalg.svd(delta.double())
        assert torch.allclose(_delta(got[site]), (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-5), site
        kept = float(s[:rank].square().sum() / s.square().sum())
        assert record.merge_report["energy_kept"][site] == pytest.approx(kept, rel=1e-5), site


@pytest.mark.parametrize("rank", [None, 2])
def test_a_merge_of_changes_that_are_all_zero_is_zero_and_reports_all_energy_kept(rank):
    """LoRA (B = 0) and IA3 (l = 1) at their initialisation: no change anywhere, nothing lost (not 0/0)."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter("lo", f"lora[r=2,target_modules={TARGETS}]")
    model.add_adapter("ia", f'ia3[target_modules={TARGETS},feedforward_modules=["down_proj"]]')
    record = model.merge_adapters(["lo", "ia"], [1.0, 1.0], name="m", strategy="linear", rank=rank)
    assert record.merge_report["energy_kept"] and set(record.merge_report["energy_kept"].values()) == {1.0}
    for a, b, _ in _factors(model, "m").values():
        assert not a.any() and not b.any()


def test_members_at_different_layers_each_count_where_they_act():
    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter("bystander", 'lora[r=2,target_modules=["up_proj"]]')  # layers the merge must skip over
    for seed, target in enumerate(("q_proj", "v_proj")):
        torch.manual_seed(seed)
        model.add_adapter(target, f'lora[r=2,init_weights=false,target_modules=["{target}"]]')
    parts = {n: _factors(model, n) for n in ("q_proj", "v_proj")}
    model.merge_adapters(["q_proj", "v_proj"], [2.0, 0.5], name="m", strategy="cat")
    got = _factors(model, "m")
    assert got.keys() == parts["q_proj"].keys() | parts["v_proj"].keys()
    for site in got:
        owner, weight = ("q_proj", 2.0) if site in parts["q_proj"] else ("v_proj", 0.5)
        assert torch.allclose(_delta(got[site]), weight * _delta(parts[owner][site]), atol=1e-6), site


def test_an_svd_merge_above_the_members_combined_rank_pads_with_zero_directions():
    """Two rank-2 LoRAs merged at rank 6: 4 directions carry the exact sum, then 2 zero rows of A and zero
    columns of B (B is out x 4 with out = 32, so the padding must follow B's rows, not its rank)."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed + 3)
        model.add_adapter(name, 'lora[r=2,alpha=4,init_weights=false,target_modules=["q_proj","up_proj"]]')
    parts = {n: _factors(model, n) for n in "ab"}
    record = model.merge_adapters(["a", "b"], [1.0, -0.5], name="m", strategy="svd", rank=6)
    got = _factors(model, "m")
    assert record.config.r == 6 and got.keys() == parts["a"].keys()
    for site, (a_new, b_new, scale) in got.items():
        assert scale == 1.0 and a_new.shape[0] == b_new.shape[1] == 6
        assert not a_new[4:].any() and not b_new[:, 4:].any(), site
        expected = _delta(parts["a"][site]) - 0.5 * _delta(parts["b"][site])
        assert torch.allclose(_delta((a_new, b_new, 1.0)), expected, atol=1e-5), site


def test_a_lora_with_no_fixed_factors_is_refused_by_name_and_site_leaving_no_adapter():
    """A gated LoRA (its change depends on the input) has no low-rank weight change to merge."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter("plain", 'lora[r=2,target_modules=["q_proj"]]')
    model.add_adapter("gated", 'lora[r=2,use_gating=true,target_modules=["q_proj"]]')
    with pytest.raises(MergeError) as refused:
        model.merge_adapters(["plain", "gated"], name="m", strategy="svd")
    assert str(refused.value) == ("adapter 'gated' (method 'lora') has no low-rank weight change at "
                                  "model.layers.0.self_attn.q_proj; weight-space merging works for LoRA adapters")
    assert list(model.adapters) == ["plain", "gated"]


# -- heads (modules_to_save) ------------------------------------------------------------------------


def _heads(model: peftkit.AdaptedModel) -> ModulesToSave:
    (module,) = [m for m in model.base_model.modules() if isinstance(m, ModulesToSave)]
    return module


@pytest.mark.parametrize("arch, spec, head", [
    ("bert", 'lokr[r=2,init_weights=false,target_modules=["query","value"],modules_to_save=["classifier"]]',
     "classifier"),
    ("bert", 'ia3[init_ia3_weights=false,target_modules=["query","value"],feedforward_modules=[],'
     'modules_to_save=["classifier"]]', "classifier"),
    # Not a classification model's default head: only the members' modules_to_save can bring lm_head along.
    ("llama", 'lokr[r=2,init_weights=false,target_modules=["q_proj","v_proj"],modules_to_save=["lm_head"]]',
     "lm_head"),
])
def test_a_merge_keeps_the_members_heads_averaged_with_their_weights(arch, spec, head):
    """A dense (LoKr) or elementwise (IA3) merge: the new adapter lists the head and holds the weighted average."""
    model = peftkit.AdaptedModel(build_tiny(arch))
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        model.add_adapter(name, spec)
    heads = _heads(model)
    with torch.no_grad():
        for name in "ab":
            for param in heads.copies[name].parameters():
                param.copy_(torch.randn_like(param))
    record = model.merge_adapters(["a", "b"], [0.25, 0.5], name="m", strategy="linear", modules_to_save="average")
    assert list(record.config.modules_to_save) == [head] and record.modules_to_save == [head]
    assert set(heads.copies) == {"a", "b", "m"}
    for key, value in heads.copies["m"].state_dict().items():
        expected = (heads.copies["a"].state_dict()[key] * 0.25 + heads.copies["b"].state_dict()[key] * 0.5) / 0.75
        assert torch.allclose(value, expected, atol=1e-6), key
    # A refused head choice leaves no half-made adapter behind.
    with pytest.raises(MergeError, match="modules_to_save='c'"):
        model.merge_adapters(["a", "b"], [1, 1], name="bad", strategy="linear", modules_to_save="c")
    assert "bad" not in model.adapters


# -- elementwise merges (IA3) ---------------------------------------------------------------------------


def _ia3_model() -> tuple[peftkit.AdaptedModel, dict[str, dict[str, torch.Tensor]]]:
    """Two IA3 adapters at v_proj/down_proj next to a LoRA at q_proj (whose layers an IA3 merge skips)."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter("lo", 'lora[r=2,target_modules=["q_proj"]]')
    values = {}
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed + 5)
        model.add_adapter(name, 'ia3[init_ia3_weights=false,target_modules=["v_proj","down_proj"],'
                                'feedforward_modules=["down_proj"]]')
        values[name] = {s: layer.adapters[name].ia3_l.detach().clone()
                        for s, layer in model.tuner_layers() if name in layer.adapters}
    return model, values


def _ia3_values(model, name) -> dict[str, torch.Tensor]:
    return {s: layer.adapters[name].ia3_l for s, layer in model.tuner_layers() if name in layer.adapters}


def test_ia3_linear_merge_is_one_plus_the_weighted_changes_for_any_weights():
    model, values = _ia3_model()
    model.merge_adapters(["a", "b"], [0.5, 0.25], name="m", strategy="linear")
    model.merge_adapters(["a"], [-2.0], name="one", strategy="linear")
    merged, one = _ia3_values(model, "m"), _ia3_values(model, "one")
    assert merged.keys() == values["a"].keys() and len(merged) == 4
    for site in merged:
        expected = 1 + 0.5 * (values["a"][site] - 1) + 0.25 * (values["b"][site] - 1)
        assert torch.allclose(merged[site], expected, atol=1e-6), site
        assert torch.allclose(one[site], 1 - 2.0 * (values["a"][site] - 1), atol=1e-6), site
    with pytest.raises(MergeError, match="elementwise with linear"):
        model.merge_adapters(["a", "b"], [1, 1], "x", "cat")


def test_ia3_dare_merge_follows_the_seed_or_torchs_global_generator():
    model, values = _ia3_model()
    model.merge_adapters(["a", "b"], [0.5, 0.25], name="seeded", strategy="dare_ties", density=0.5, seed=4)
    torch.manual_seed(21)
    model.merge_adapters(["a", "b"], [0.5, 0.25], name="global", strategy="dare_ties", density=0.5, seed=None)
    for name, generator in (("seeded", torch.Generator().manual_seed(4)), ("global", None)):
        if generator is None:
            torch.manual_seed(21)
        got = _ia3_values(model, name)
        for site in got:  # the model's layer order: one generator throughout
            changes = [values[n][site] - 1 for n in "ab"]
            expected = 1 + ms.dare_ties(changes, [0.5, 0.25], density=0.5, generator=generator)
            assert torch.allclose(got[site], expected, atol=1e-6), (name, site)
