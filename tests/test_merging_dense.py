"""Weight-space merges of methods without low-rank factors (LoKr, VeRA, OFT, LoHa): dense deltas -> a LoRA."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import MergeError
from peftkit.core import merge_strategies as ms
from tests.composition_util import assert_saves_and_loads, inputs, logits
from tests.tiny_models import build_tiny

TARGETS = '["q_proj","v_proj"]'
SPECS = {
    "kr": f"lokr[r=2,init_weights=false,target_modules={TARGETS}]",
    "ve": f"vera[r=8,target_modules={TARGETS}]",
    "ot": f"oft[oft_block_size=8,init_weights=false,target_modules={TARGETS}]",
    "ha": f"loha[r=2,target_modules={TARGETS}]",
}


def _model(names=("kr", "ve", "ot", "ha")) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model.add_adapter(name, SPECS[name])
        with torch.no_grad():  # trained-looking values (VeRA's lambda_b and LoHa's B start at zero)
            for _, layer in model.tuner_layers():
                if name in layer.adapters:
                    for param in layer.adapters[name].parameters():
                        if param.requires_grad:
                            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def dense(model, name) -> dict[str, torch.Tensor]:
    """Site -> the adapter's weight change, (out, in), by hand from the layer adapter."""
    out = {}
    for site, layer in model.tuner_layers():
        if name in layer.adapters:
            adapter = layer.adapters[name]
            if adapter.low_rank() is not None:
                a, b, s = adapter.low_rank()
                out[site] = (b @ a) * s
            else:
                out[site] = adapter.delta_weight(layer.base_layer).detach().float()
    return out


def test_linear_at_full_rank_is_the_weighted_sum_everywhere():
    model = _model()
    weights = [0.5, -1.0, 0.8, 1.5]
    parts = {n: dense(model, n) for n in SPECS}
    record = model.merge_adapters(list(SPECS), weights, name="m", strategy="linear")
    assert record.method.merge_low_rank and record.config.r == 32  # full rank of the 32 x 32 projections
    got = dense(model, "m")
    assert got.keys() == parts["kr"].keys() and len(got) == 4
    for site in got:
        expected = sum(w * parts[n][site] for n, w in zip(SPECS, weights))
        assert torch.allclose(got[site], expected, atol=1e-5), site
    assert all(abs(kept - 1.0) < 1e-6 for kept in record.merge_report["energy_kept"].values())


@pytest.mark.parametrize("strategy,fn", [("ties", ms.ties), ("magnitude_prune", ms.magnitude_prune),
                                         ("dare_linear", ms.dare_linear), ("dare_ties", ms.dare_ties)])
def test_dense_strategies_match_a_hand_computed_reference(strategy, fn):
    model = _model(("kr", "ve", "ot"))
    parts = {n: dense(model, n) for n in ("kr", "ve", "ot")}
    model.merge_adapters(["kr", "ve", "ot"], [1.0, 0.7, 0.4], name="m", strategy=strategy, density=0.5, seed=3)
    generator = torch.Generator().manual_seed(3)
    first = next(iter(parts["kr"]))  # the first site: DARE's draws start here, adapter by adapter
    expected = fn([parts[n][first] for n in ("kr", "ve", "ot")], [1.0, 0.7, 0.4], density=0.5,
                  majority_sign_method="total", generator=generator)
    assert torch.allclose(dense(model, "m")[first], expected, atol=1e-5)


def test_the_merged_lora_saves_and_loads_here_and_in_peft(tmp_path):
    model = _model(("kr", "ot"))
    model.merge_adapters(["kr", "ot"], [1.0, 1.0], name="m", strategy="ties", density=0.7, rank=8)
    assert_saves_and_loads(model, "m", tmp_path / "m")


def test_a_truncated_rank_reports_the_energy_it_keeps():
    model = _model(("kr", "ve"))
    full = {n: dense(model, n) for n in ("kr", "ve")}
    record = model.merge_adapters(["kr", "ve"], [1.0, 1.0], name="m", strategy="linear", rank=2)
    assert record.config.r == 2 and record.merge_report["rank"] == 2
    got = dense(model, "m")
    for site, kept in record.merge_report["energy_kept"].items():
        summed = full["kr"][site] + full["ve"][site]
        s = torch.linalg.svdvals(summed.double())
        assert kept == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
        assert 0 < kept < 1
        error = (got[site] - summed).double().norm() ** 2 / summed.double().norm() ** 2
        assert float(error) == pytest.approx(1 - kept, abs=1e-5)


def test_what_cannot_merge_is_refused_with_the_reason():
    model = _model(("kr",))
    model.add_adapter("bn", "seq_bn")
    model.add_adapter("pt", "prompt_tuning[num_virtual_tokens=2]")
    with pytest.raises(MergeError, match="different methods .*'bn'.*gives no weight change.*compose it instead"):
        model.merge_adapters(["kr", "bn"], [1, 1], "m", "linear")
    with pytest.raises(MergeError, match="changes the model's inputs"):
        model.merge_adapters(["kr", "pt"], [1, 1], "m", "linear")
    with pytest.raises(MergeError, match="'cat' concatenates low-rank factors"):
        model.merge_adapters(["kr"], [1], "m", "cat")
    with pytest.raises(MergeError, match="needs density"):
        model.merge_adapters(["kr"], [1], "m", "ties")
    assert list(model.adapters) == ["kr", "bn", "pt"]


def test_ia3_mixed_with_other_methods_merges_as_a_dense_delta():
    model = _model(("kr",))
    torch.manual_seed(9)
    model.add_adapter("ia", 'ia3[init_weights=false,target_modules=["q_proj","v_proj","down_proj"],'
                            'feedforward_modules=["down_proj"]]')
    parts = {n: dense(model, n) for n in ("kr", "ia")}
    model.merge_adapters(["kr", "ia"], [1.0, 0.5], name="m", strategy="linear")
    got = dense(model, "m")
    assert got.keys() == parts["ia"].keys()
    for site in got:
        expected = parts["ia"][site] * 0.5 + (parts["kr"][site] if site in parts["kr"] else 0)
        assert torch.allclose(got[site], expected, atol=1e-5), site
    # Not circular: with LoKr weighted 0 the merged LoRA alone gives the IA3 adapter's own outputs.
    model.merge_adapters(["kr", "ia"], [0.0, 1.0], name="only_ia3", strategy="linear")
    batch = inputs()
    assert torch.allclose(logits(model, batch, "only_ia3"), logits(model, batch, "ia"), atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_adapter_merged_at_full_rank_gives_its_own_outputs(name):
    """Checks delta_weight against the adapter's forward: the hand checks above are then not circular."""
    model = _model((name,))
    model.merge_adapters([name], [1.0], name="m", strategy="linear")
    batch = inputs()
    assert torch.allclose(logits(model, batch, "m"), logits(model, batch, name), atol=1e-5)


def test_gpt2_conv1d_layers_merge_in_out_by_in_layout_and_biased_ia3_is_refused():
    model = peftkit.AdaptedModel(build_tiny("gpt2"))
    torch.manual_seed(4)
    model.add_adapter("kr", "lokr[r=2,init_weights=false]")  # c_attn stores its weight as (in 32, out 96)
    model.eval().merge_adapters(["kr"], [1.0], name="m", strategy="linear")
    batch = inputs(model="gpt2")
    assert torch.allclose(logits(model, batch, "m"), logits(model, batch, "kr"), atol=1e-5)
    model.add_adapter("ia", "ia3[init_weights=false]")
    with pytest.raises(MergeError, match="'ia'.*also scales the layer's bias.*compose it instead"):
        model.merge_adapters(["kr", "ia"], [1, 1], "m2", "linear")
    assert "m2" not in model.adapters


# -- DoRA: its change depends on the base weight, so it merges densely -----------------------------------------------

DORA = f"lora[r=4,alpha=8,use_dora=true,init_weights=false,target_modules={TARGETS}]"
LORA = f"lora[r=4,alpha=8,init_weights=false,target_modules={TARGETS}]"


def _dora_model(specs: dict[str, str]) -> peftkit.AdaptedModel:
    """Adapters with random factors; DoRA magnitudes moved off the initial row norms (else m / n = 1)."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for seed, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(10 + seed)
        model.add_adapter(name, spec)
        with torch.no_grad():
            for _, layer in model.tuner_layers():
                magnitude = layer.adapters[name].tensors().get("lora_magnitude_vector") \
                    if name in layer.adapters else None
                if magnitude is not None:
                    magnitude.mul_(1 + 0.3 * torch.randn_like(magnitude))
    return model.eval()


def _dora_by_hand(layer, name: str) -> torch.Tensor:
    """m / ||W + s B A||_row * (W + s B A) - W, from the layer's tensors and its base weight."""
    tensors, adapter = layer.adapters[name].tensors(), layer.adapters[name]
    w = layer.base_layer.weight.detach()
    directed = w + adapter.scale * tensors["lora_B.weight"] @ tensors["lora_A.weight"]
    row_norm = torch.linalg.norm(directed, dim=1, keepdim=True)
    return (tensors["lora_magnitude_vector"].unsqueeze(1) / row_norm * directed - w).detach()


def test_one_dora_adapter_merged_linearly_at_full_rank_gives_the_dora_models_logits(tmp_path):
    model = _dora_model({"d": DORA})
    record = model.merge_adapters(["d"], [1.0], name="m", strategy="linear")
    assert not record.config.use_dora and record.config.r == 32  # a plain LoRA, full rank of the 32 x 32 layers
    batch = inputs()
    model.set_active(None)
    base = logits(model, batch)
    expected = logits(model, batch, "d")
    assert (expected - base).abs().max() > 1e-3  # the DoRA adapter changes the outputs
    assert torch.allclose(logits(model, batch, "m"), expected, atol=1e-5)
    assert_saves_and_loads(model, "m", tmp_path / "m")


@pytest.mark.parametrize("strategy", ["linear", "ties"])
def test_dora_mixed_with_lora_merges_the_hand_computed_dora_change(strategy):
    model = _dora_model({"d": DORA, "l": LORA})
    weights = [0.7, -0.4]
    sites = {site: layer for site, layer in model.tuner_layers() if "d" in layer.adapters}
    parts = {"d": {s: _dora_by_hand(layer, "d") for s, layer in sites.items()}, "l": dense(model, "l")}
    options = {"density": 0.5} if strategy == "ties" else {}
    model.merge_adapters(["d", "l"], weights, name="m", strategy=strategy, **options)
    got = dense(model, "m")
    assert got.keys() == sites.keys() and len(got) == 4
    for site in got:
        members = [parts["d"][site], parts["l"][site]]
        expected = ms.ties(members, weights, density=0.5) if strategy == "ties" else \
            sum(w * d for w, d in zip(weights, members))
        assert torch.allclose(got[site], expected, atol=1e-5), site


def test_dora_over_a_weight_holding_merged_adapters_is_refused_and_nothing_changes():
    model = _dora_model({"d": DORA, "l": LORA})
    model.set_active("l")
    model.merge_adapter()
    with pytest.raises(MergeError, match=r"'d'.*computed from the base weight.*merged adapter\(s\) l.*unmerge"):
        model.merge_adapters(["d", "l"], [1, 1], "m", "linear")
    assert "m" not in model.adapters
