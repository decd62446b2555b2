"""AdapterFusion over any adapters: math, training with frozen members, weights, files."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit import AdapterLoadError, Average, CompositionError, Fuse, FuseConfig, Stack
from peftkit.core.composition_exec import run_node
from peftkit.core.fusion import fusion_layers
from tests.composition_util import inputs, logits, lora_model
from tests.tiny_models import build_tiny

ATOL = 1e-5


@pytest.fixture
def model():
    adapted = lora_model(("a", "b", "c"))
    torch.manual_seed(11)
    adapted.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")
    return adapted


def _randomize(fusion_layers) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in fusion_layers:
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.3)


def test_new_fusion_equals_the_average_of_its_members(model):
    batch = inputs()
    model.add_fusion(Fuse("a", "b", name="ab"))
    fused = logits(model, batch, Fuse("a", "b", name="ab"))
    assert torch.allclose(fused, logits(model, batch, Average("a", "b")), atol=ATOL)
    model.add_fusion(Fuse(Stack("a", "b"), "c", name="sc"))
    assert torch.allclose(logits(model, batch, "fuse(stack(a, b), c, name=\"sc\")"),
                          logits(model, batch, Average(Stack("a", "b"), "c")), atol=ATOL)


@pytest.mark.parametrize("residual", [True, False])
def test_site_math(model, residual):
    """out = h + sum_n p_n W_v z_n (or W_v h + ...) with p = softmax((W_q h + b_q) . W_k z_n / T)."""
    model.add_fusion(Fuse("a", "bn", name="f"), temperature=2.0, residual=residual)
    _randomize(fusion_layers(model, "f"))
    site, layer = next((s, layer) for s, layer in model.tuner_layers()
                       if "bn" in layer.adapters and "f" in layer.fusions)
    fusion = layer.fusions["f"]
    torch.manual_seed(0)
    x = torch.randn(2, 3, layer.adapters["a"].in_features)
    base = layer.base_layer
    with torch.no_grad():
        h = base(x)
        z = torch.stack([layer.adapters["a"](x, h, base) - h, layer.adapters["bn"](x, h, base) - h], dim=-2)
        q = h @ fusion.query.weight.t() + fusion.query.bias
        k = z @ fusion.key.weight.t()
        p = torch.softmax((k * q.unsqueeze(-2)).sum(-1) / 2.0, dim=-1)
        v = z @ fusion.value.weight.t()
        expected = h + (p.unsqueeze(-1) * v).sum(-2) if residual else \
            h @ fusion.value.weight.t() + (p.unsqueeze(-1) * v).sum(-2)
        got = run_node(Fuse("a", "bn", name="f"), layer, x, h)
    assert torch.allclose(got, expected, atol=ATOL)


def test_train_fusion_trains_only_the_fusion(model):
    batch = inputs()
    model.add_fusion(Fuse("a", "bn", name="f"))
    model.train_fusion("f")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fusion_params = {id(p) for p in model.fusion_parameters("f")}
    assert trainable and all(id(p) in fusion_params for p in model.parameters() if p.requires_grad)
    members = {n: [p.detach().clone() for p in model.adapter_parameters(n)] for n in ("a", "bn")}
    before = logits(model, batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss + model.fusion_regularization_loss()
        loss.backward()
        opt.step()
    assert not torch.allclose(logits(model, batch), before, atol=1e-4)
    for name, saved in members.items():
        assert all(torch.equal(a, b) for a, b in zip(saved, model.adapter_parameters(name)))
    # train_adapter() on a composition: adapters outside the fuse() train, fused members stay frozen
    model.train_adapter(Stack("c", Fuse("a", "bn", name="f")))
    assert all(p.requires_grad for p in model.adapter_parameters("c"))
    assert not any(p.requires_grad for p in model.adapter_parameters("a"))
    assert all(p.requires_grad for p in model.fusion_parameters("f"))
    model.train_fusion("f", unfreeze_adapters=True)
    assert all(p.requires_grad for p in model.adapter_parameters("a"))


def test_fusion_weights_can_be_captured(model):
    batch = inputs(batch=2)
    model.add_fusion(Fuse("a", "bn", name="f"), temperature=0.5)
    _randomize(fusion_layers(model, "f"))
    model.set_active(Fuse("a", "bn", name="f"))
    with model.capture_fusion_weights() as cap:
        with torch.no_grad():
            model(**batch)
    weights = cap.weights["f"]
    assert set(weights) == set(model.adapter_state.fusions["f"].sites)
    both = [w for w in weights.values() if w.members == ["a", "bn"]]
    assert both and all(w.weights.shape == (2, 6, 2) for w in both)
    for w in weights.values():
        assert torch.allclose(w.weights.sum(-1), torch.ones(2, 6), atol=1e-6)
    spread = both[0].weights.max(-1).values.mean()
    model.set_fusion_temperature("f", 100.0)  # hotter: closer to uniform
    with model.capture_fusion_weights() as cap2:
        with torch.no_grad():
            model(**batch)
    assert cap2.weights["f"][next(s for s, w in weights.items() if w.members == ["a", "bn"])].weights.max(-1) \
        .values.mean() < spread
    assert model.adapter_state.capture is None


def test_regularization_pulls_value_to_identity(model):
    model.add_fusion(Fuse("a", "b", name="ab"), regularization=0.5)
    assert model.fusion_regularization_loss().item() == 0.0
    expected = 0.0
    with torch.no_grad():
        for _, layer in fusion_layers(model, "ab"):
            layer.value.weight.add_(0.1)
            expected += 0.5 * (0.1 ** 2) * layer.value.weight.numel()
    assert abs(model.fusion_regularization_loss("ab").item() - expected) < 1e-4


def test_fusion_over_other_methods_and_sites_where_one_member_acts(model):
    """seq_bn acts only after the MLP; LoRA everywhere: sites with one member use it alone."""
    batch = inputs()
    model.add_fusion(Fuse("a", "bn", name="f"))
    record = model.adapter_state.fusions["f"]
    assert any(idx == [0] for idx in record.sites.values()) and any(idx == [0, 1] for idx in record.sites.values())
    out = logits(model, batch, Fuse("a", "bn", name="f"))
    assert out.shape == (4, 6, 128) and torch.isfinite(out).all()


def test_save_and_load_a_fusion(model, tmp_path):
    batch = inputs()
    model.add_fusion(Fuse("a", "bn", name="f"), temperature=2.5, query_key_dim=8)
    _randomize(fusion_layers(model, "f"))
    expected = logits(model, batch, Fuse("a", "bn", name="f"))
    model.save_fusion(tmp_path / "f", Fuse("a", "bn", name="f"))  # the block names its fusion too
    data = json.loads((tmp_path / "f" / "fusion_config.json").read_text())
    assert data["config"]["temperature"] == 2.5 and data["fuse"] == {"block": "fuse", "children": ["a", "bn"],
                                                                     "name": "f"}
    assert (tmp_path / "f" / "fusion_model.safetensors").is_file()
    model.set_active(None)
    model.delete_fusion("f")
    record = model.load_fusion(tmp_path / "f", activate=True)
    assert record.config.temperature == 2.5 and record.config.query_key_dim == 8
    assert torch.allclose(logits(model, batch), expected, atol=ATOL)
    # under another name
    model.load_fusion(tmp_path / "f", name="g")
    assert torch.allclose(logits(model, batch, Fuse("a", "bn", name="g")), expected, atol=ATOL)


def test_loading_a_fusion_checks_members_and_leaves_no_trace(model, tmp_path):
    model.add_fusion(Fuse("a", "b", name="ab"))
    model.save_fusion(tmp_path / "ab", "ab")
    other = lora_model(("a",))
    with pytest.raises(AdapterLoadError, match="'b', which are not on this model"):
        other.load_fusion(tmp_path / "ab")
    # a fusion file for other sites
    narrow = peftkit.AdaptedModel(build_tiny("llama"))
    for name in ("a", "b"):
        narrow.add_adapter(name, 'lora[r=4,target_modules=["q_proj"]]')
    with pytest.raises(AdapterLoadError, match="other sites"):
        narrow.load_fusion(tmp_path / "ab")
    assert narrow.fusions == {} and not any(layer.fusions for _, layer in narrow.tuner_layers())
    with pytest.raises(AdapterLoadError, match="no fusion_config.json"):
        model.load_fusion(tmp_path)


def test_fusion_errors(model):
    with pytest.raises(CompositionError, match="takes a fuse"):
        model.add_fusion(Stack("a", "b"))
    with pytest.raises(CompositionError, match="fusion name 'half' is taken by torch"):
        model.add_fusion(Fuse("a", "b", name="half"))
    assert "half" not in model.adapter_state.fusions
    model.add_fusion(Fuse("a", "b"))
    with pytest.raises(CompositionError, match="already exists"):
        model.add_fusion(Fuse("a", "b"))
    with pytest.raises(peftkit.ConfigError, match="temperature"):
        model.add_fusion(Fuse("a", "c"), temperature=0)
    with pytest.raises(peftkit.ConfigError, match="unknown fusion setting 'temp'"):
        FuseConfig.from_dict({"temp": 1})
    with pytest.raises(peftkit.AdapterError, match="fused in 'a_b'"):
        model.delete_adapter("a")
    model.set_active(Fuse("a", "b"))
    model.delete_fusion("a_b")
    assert model.active_composition is None
    model.delete_adapter("a")
    with pytest.raises(CompositionError, match="train_fusion"):
        model.set_active("b")
        model.train_fusion()


def test_individual_and_fused_outputs_in_one_pass(model):
    batch = inputs()
    fuse = Fuse("a", "bn", name="f")
    model.add_fusion(fuse)
    _randomize(fusion_layers(model, "f"))
    expected = [logits(model, batch, node) for node in ("a", "bn", fuse)]
    model.set_active(peftkit.Parallel("a", "bn", fuse))
    with torch.no_grad():
        parts = model.split_parallel(model(**batch))
    for part, want in zip(parts, expected):
        assert torch.allclose(part.logits, want, atol=ATOL)


def test_train_fusion_with_adapterhubs_list_says_to_pass_a_fuse(model):
    """AdapterHub's train_adapter_fusion(["a", "bn"]) spelling: a list is a stack here, which holds no fusion."""
    model.add_fusion(Fuse("a", "bn"))
    with pytest.raises(CompositionError, match=r"train_fusion\(\) takes a fuse\(\) block or a fusion's name, "
                                               r"e.g. train_fusion\(Fuse\('a', 'b'\)\) "
                                               r".*\['a', 'bn'\] is stack\(a, bn\)"):
        model.train_fusion(["a", "bn"])
    assert model.active_adapters == []  # nothing was activated
    model.train_fusion("a_bn")  # by the fusion's name
    assert model.active_composition == Fuse("a", "bn")
