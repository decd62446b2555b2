"""Weight-space merging: each strategy against its formula and against PEFT's add_weighted_adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peftkit
from peftkit import Average, MergeError
from peftkit.core import merge_strategies as ms
from tests.composition_util import assert_saves_and_loads, inputs, logits
from tests.tiny_models import build_tiny

TARGETS = '["q_proj","v_proj","down_proj"]'


def _model(spec_a: str = f"lora[r=4,alpha=8,init_weights=false,target_modules={TARGETS}]",
           spec_b: str = f"lora[r=4,alpha=16,init_weights=false,target_modules={TARGETS}]") -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny("llama"))
    torch.manual_seed(1)
    model.add_adapter("a", spec_a)
    torch.manual_seed(2)
    model.add_adapter("b", spec_b)
    return model.eval()


def deltas(model, name) -> dict[str, torch.Tensor]:
    """Site -> scale * B @ A of adapter ``name``, read from its live parameters."""
    out = {}
    for site, layer in model.tuner_layers():
        if name in layer.adapters:
            a, b, s = layer.adapters[name].low_rank()
            out[site] = (b @ a) * s
    return out


def assert_close_deltas(got: dict, expected: dict, atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for site in got:
        assert torch.allclose(got[site], expected[site], atol=atol), (site, (got[site] - expected[site]).abs().max())


# -- formulas ------------------------------------------------------------------------------------------


def test_linear_and_cat_are_the_exact_weighted_sum():
    model = _model()
    da, db = deltas(model, "a"), deltas(model, "b")
    expected = {k: 0.7 * da[k] - 0.4 * db[k] for k in da}
    model.merge_adapters(["a", "b"], [0.7, -0.4], name="lin", strategy="linear")
    model.merge_adapters(["a", "b"], [0.7, -0.4], name="cat", strategy="cat")
    assert_close_deltas(deltas(model, "lin"), expected)
    assert_close_deltas(deltas(model, "cat"), expected)
    assert model.adapters["lin"].r == 8 and model.adapters["cat"].r == 8
    assert model.adapters["lin"].alpha == 8 and not model.adapters["lin"].use_rslora


def test_svd_is_the_best_low_rank_approximation():
    model = _model()
    da, db = deltas(model, "a"), deltas(model, "b")
    model.merge_adapters(["a", "b"], [1.0, 0.5], name="m", strategy="svd", rank=3)
    expected = {}
    for k in da:
        u, s, vh = torch.linalg.svd((da[k] + 0.5 * db[k]).double())
        expected[k] = ((u[:, :3] * s[:3]) @ vh[:3]).float()
    assert model.adapters["m"].r == 3
    assert_close_deltas(deltas(model, "m"), expected)


def _ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[t.abs().flatten().topk(k).indices] = True
    return t * keep.view_as(t)


def _ref_ties(ts, ws, density):
    trimmed = torch.stack([_ref_trim(t, density) for t in ts])
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    weighted = trimmed * torch.tensor(ws).view(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_dense_strategies_follow_their_formulas():
    torch.manual_seed(0)
    ts = [torch.randn(16, 24) for _ in range(3)]
    ws = [0.5, 1.0, -0.3]
    assert torch.allclose(ms.linear(ts, ws), sum(w * t for w, t in zip(ws, ts)), atol=1e-6)
    assert torch.allclose(ms.magnitude_prune(ts, ws, density=0.3),
                          sum(w * _ref_trim(t, 0.3) for w, t in zip(ws, ts)), atol=1e-6)
    assert torch.allclose(ms.ties(ts, ws, density=0.4), _ref_ties(ts, ws, 0.4), atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    masks = [torch.bernoulli(torch.full_like(t, 0.6), generator=g2) for t in ts]
    assert torch.allclose(ms.dare_linear(ts, ws, density=0.6, generator=g1),
                          sum(w * t * m / 0.6 for w, t, m in zip(ws, ts, masks)), atol=1e-6)
    assert torch.allclose(ms.dare_linear(ts, ws, density=1.0), ms.linear(ts, ws))
    assert torch.equal(ms.magnitude_prune(ts, ws, density=0.0), torch.zeros(16, 24))


def test_dense_strategy_then_rank_truncation_at_full_rank_is_exact():
    model = _model()
    da, db = deltas(model, "a"), deltas(model, "b")
    model.merge_adapters(["a", "b"], [1.0, 1.0], name="t", strategy="ties", density=0.4, rank=32)
    assert_close_deltas(deltas(model, "t"), {k: _ref_ties([da[k], db[k]], [1.0, 1.0], 0.4) for k in da}, atol=1e-4)


def test_dare_is_seeded():
    model = _model()
    for name, seed in (("s1", 5), ("s2", 5), ("s3", 6)):
        model.merge_adapters(["a", "b"], [1.0, 1.0], name=name, strategy="dare_linear", density=0.5, seed=seed)
    d1, d2, d3 = deltas(model, "s1"), deltas(model, "s2"), deltas(model, "s3")
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert any(not torch.allclose(d1[k], d3[k]) for k in d1)


def test_merged_linear_lora_equals_the_output_average():
    """LoRA is linear in its weight change: merging with weights 1/2 equals average() of outputs."""
    model = _model()
    batch = inputs()
    averaged = logits(model, batch, Average("a", "b"))
    model.merge_adapters(["a", "b"], [0.5, 0.5], name="m", strategy="linear")
    assert torch.allclose(logits(model, batch, "m"), averaged, atol=1e-5)


def test_merged_adapter_saves_and_loads(tmp_path):
    model = _model()
    model.merge_adapters(["a", "b"], [1.0, 1.0], name="m", strategy="ties", density=0.5)
    assert_saves_and_loads(model, "m", tmp_path / "m")


# -- against PEFT on the same saved adapters ------------------------------------------------------------


def _peft_pair(model, tmp_path):
    """PEFT's model with adapters "a" and "b" loaded from the folders ``model`` saves them to."""
    from peft import PeftModel

    model.save_adapter(tmp_path / "a", "a")
    model.save_adapter(tmp_path / "b", "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "a"), adapter_name="a")
        peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    return peft_model


def _peft_deltas(peft_model, name):
    return {n.removeprefix("base_model.model."): m.get_delta_weight(name).detach()
            for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


def _seed_peft_draws(monkeypatch, seed):
    """PEFT draws DARE's masks from the global generator after creating the new adapter (which
    consumes random numbers too); reseed it at the first draw so both libraries draw the same masks."""
    import peft.utils.merge_utils as merge_utils

    original = merge_utils.random_pruning
    first = [True]

    def seeded(tensor, density, rescale):
        if first[0]:
            torch.manual_seed(seed)
            first[0] = False
        return original(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded)


@pytest.mark.parametrize("strategy, options", [
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 6}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.4}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
])
def test_same_delta_as_peft(tmp_path, monkeypatch, strategy, options):
    model = _model()
    peft_model = _peft_pair(model, tmp_path)
    _seed_peft_draws(monkeypatch, 3)
    peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "m", combination_type=strategy, **options)
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "m", combination_type=strategy, **options)
    if strategy.startswith("dare"):  # add_weighted_adapter uses seed 0; redo with PEFT's seed
        model.delete_adapter("m")
        model.merge_adapters(["a", "b"], [0.7, 0.4], "m", strategy, seed=3, density=options["density"],
                             majority_sign_method=options.get("majority_sign_method"))
    assert_close_deltas(deltas(model, "m"), _peft_deltas(peft_model, "m"), atol=1e-4)
    assert model.adapters["m"].r == peft_model.peft_config["m"].r


def test_rslora_merges_correctly_where_peft_scales_it_wrong(tmp_path):
    spec = f"lora[r=4,alpha=8,use_rslora=true,init_weights=false,target_modules={TARGETS}]"
    model = _model(spec, spec)
    da, db = deltas(model, "a"), deltas(model, "b")
    peft_model = _peft_pair(model, tmp_path)
    peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="cat")
    model.merge_adapters(["a", "b"], [1.0, 1.0], "m", "cat")
    ours = deltas(model, "m")
    assert_close_deltas(ours, {k: da[k] + db[k] for k in da})
    # PEFT copies use_rslora into the merged config, so its scale becomes r/sqrt(r) instead of 1:
    rank = peft_model.peft_config["m"].r
    assert_close_deltas(_peft_deltas(peft_model, "m"), {k: v * rank ** 0.5 for k, v in ours.items()}, atol=1e-4)


def test_dora_adapters_merge_through_their_dense_changes_into_a_plain_lora():
    """DoRA's change is not low rank: it takes the dense path (values: tests/test_merging_dense.py)."""
    model = _model(f"lora[r=4,use_dora=true,init_weights=false,target_modules={TARGETS}]")
    record = model.merge_adapters(["a", "b"], [1, 1], "m", "svd", rank=4)
    assert not record.config.use_dora and record.config.r == 4
    assert set(record.merge_report["energy_kept"]) == {s for s, layer in model.tuner_layers() if "a" in layer.adapters}


# -- elementwise methods ----------------------------------------------------------------------------


def test_ia3_merges_elementwise_like_peft(tmp_path):
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model.add_adapter(name, "ia3[init_ia3_weights=false]")
    model.merge_adapters(["a", "b"], [0.25, 0.75], "m", "linear")
    peft_model = _peft_pair(model, tmp_path)
    peft_model.add_weighted_adapter(["a", "b"], [0.25, 0.75], "m")
    ours = {s: layer.adapters["m"].ia3_l for s, layer in model.tuner_layers() if "m" in layer.adapters}
    theirs = {n.removeprefix("base_model.model."): m.ia3_l["m"] for n, m in peft_model.named_modules()
              if hasattr(m, "ia3_l") and "m" in m.ia3_l}
    assert ours.keys() == theirs.keys()
    for site in ours:
        assert torch.allclose(ours[site], theirs[site], atol=1e-6)
    with pytest.raises(MergeError, match="elementwise with linear"):
        model.merge_adapters(["a", "b"], [1, 1], "x", "svd")


def test_bitfit_merge_is_the_sum_of_effects():
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model.add_adapter(name, 'bitfit[init_weights=false,add_missing=true,target_modules=["q_proj","down_proj"]]')
    model.eval()
    batch = inputs()
    stacked = logits(model, batch, "stack(a, b)")
    model.merge_adapters(["a", "b"], [1, 1], "m", "linear")
    assert torch.allclose(logits(model, batch, "m"), stacked, atol=1e-5)


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, kwargs, fragment", [
    ((["a", "b"], [1, 1], "m", "blend"), {}, "unknown merge strategy 'blend'; available: cat, linear, svd"),
    ((["a", "b"], [1, 1], "m", "ties"), {}, "needs density"),
    ((["a", "b"], [1], "m", "svd"), {}, r"1 weight\(s\) for 2 adapter\(s\); give one weight per adapter"),
    ((["a", "b"], "m"), {}, "weights must be a list of numbers, one per adapter, not 'm' \\(the merged adapter's "
                            "name goes in name=...\\)"),
    ((["a", "b"], [1, float("nan")], "m", "svd"), {}, "weights must be finite numbers, got nan"),
    ((["a", "a"], [1, 1], "m", "svd"), {}, "listed twice"),
    ((["a", "b"], [1, 1], "m", "cat"), {"rank": 4}, "sum of ranks"),
    ((["a", "b"], [1, 1], "m", "ties"), {"density": 1.5}, "a number in \\(0, 1\\]"),
    ((["a", "b"], [1, 1], "a", "svd"), {}, "already exists"),
])
def test_bad_merges_are_refused(args, kwargs, fragment):
    model = _model()
    with pytest.raises(peftkit.PeftkitError, match=fragment):
        model.merge_adapters(*args, **kwargs)
    assert list(model.adapters) == ["a", "b"]


def test_mixed_methods_are_refused():
    model = _model()
    model.add_adapter("bn", "seq_bn")
    with pytest.raises(MergeError, match="different methods"):
        model.merge_adapters(["a", "bn"], [1, 1], "m")
    with pytest.raises(MergeError, match="compose it instead"):
        model.merge_adapters(["bn"], [1], "m", "linear")


def test_strategies_come_from_the_plugin_hook():
    registry = peftkit.get_registry()
    assert {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"} <= set(registry.merge_strategies)
    assert registry.records["builtin_merges"].merge_strategies
    merged = copy.deepcopy(_model())
    calls = []

    def halve(deltas, weights, **_):
        calls.append(len(deltas))
        return sum(d * w for d, w in zip(deltas, weights)) / 2

    class Plugin:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_merge_strategies(self, register):
            register("halve", halve)

    with peftkit.use_plugin(Plugin(), "halver"):
        merged.merge_adapters(["a", "b"], [1, 1], "h", "halve", rank=32)
    da, db = deltas(merged, "a"), deltas(merged, "b")
    assert calls and all(c == 2 for c in calls)
    assert_close_deltas(deltas(merged, "h"), {k: (da[k] + db[k]) / 2 for k in da}, atol=1e-5)


def test_add_weighted_adapter_takes_the_seed_of_dares_drops():
    """PEFT's spelling passes seed= on: a fixed seed gives the same merge, another seed another one, and None
    draws from torch's global generator (as PEFT does)."""
    model = _model()
    for name, seed in (("w1", 5), ("w2", 5), ("w3", 6)):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="dare_linear_svd", density=0.5,
                                   seed=seed)
    model.merge_adapters(["a", "b"], [1.0, 1.0], name="m5", strategy="dare_linear", density=0.5, seed=5)
    w1, w2, w3, m5 = (deltas(model, n) for n in ("w1", "w2", "w3", "m5"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and any(not torch.allclose(w1[k], w3[k]) for k in w1)
    assert all(torch.allclose(w1[k], m5[k], atol=1e-5) for k in w1)
    merged = {}
    for name in ("g1", "g2"):
        torch.manual_seed(11)
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="dare_linear_svd", density=0.5,
                                   seed=None)
        merged[name] = deltas(model, name)
    assert all(torch.equal(merged["g1"][k], merged["g2"][k]) for k in merged["g1"])
    assert any(not torch.allclose(merged["g1"][k], w1[k]) for k in w1)
