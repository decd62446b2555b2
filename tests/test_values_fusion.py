"""Values of core/fusion.py that the fusion tests left unchecked (issue #19 mutation survivors):
config limits and exact messages, the site layer's formula on 2-D inputs and mixed dtypes, the
output width of each kind of site, capture grouping, and the saved fusion folder's exact contents."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import AdapterLoadError, CompositionError, ConfigError, Fuse, FuseConfig, Stack
from peftkit.core.fusion import (FUSION_FORMAT_VERSION, FusionCapture, FusionLayer, as_fuse, fusion_layers,
                                 read_fusion_config, site_output_dim, train_fusion)
from tests.composition_util import lora_model


def _message(**options) -> str:
    with pytest.raises(ConfigError) as info:
        FuseConfig(**options)
    return str(info.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": 0.0}, "temperature must be a number > 0"),
    ({"query_key_dim": 0}, "query_key_dim must be a positive integer or null"),
    ({"query_key_dim": 2.0}, "query_key_dim must be a positive integer or null"),
    ({"value": 1}, "value must be true or false"),
    ({"residual": "yes"}, "residual must be true or false"),
    ({"regularization": -0.5}, "regularization must be a number >= 0"),
    ({"regularization": True}, "regularization must be a number >= 0"),
    ({"init_std": -1.0}, "init_std must be a number >= 0"),
    ({"init_std": False}, "init_std must be a number >= 0"),
    ({"query_from": "input"}, "query_from must be one of output, adapter_input, not 'input'"),
])
def test_each_bad_setting_is_refused_with_its_exact_message(options, message):
    assert _message(**options) == f"fusion config: {message}"


def test_the_smallest_allowed_settings_are_accepted():
    config = FuseConfig(query_key_dim=1, regularization=0, init_std=0)
    assert (config.query_key_dim, config.regularization, config.init_std) == (1, 0.0, 0.0)


def test_build_applies_options_to_a_copy_of_a_given_config():
    given = FuseConfig(temperature=3.0)
    built = FuseConfig.build(given, {"residual": False})
    assert (built.temperature, built.residual) == (3.0, False) and given.residual is True
    copy = FuseConfig.build(given, {})
    assert copy == given and copy is not given
    assert FuseConfig.build({"value": False}, {"init_std": 0.5}) == FuseConfig(value=False, init_std=0.5)
    with pytest.raises(ConfigError, match="a FuseConfig or a dict, not list"):
        FuseConfig.build([("value", False)], {})


def test_layer_parameters_dtype_and_initial_values():
    torch.manual_seed(0)
    layer = FusionLayer(64, [0, 1], FuseConfig(init_std=0.5), "s", dtype=torch.float64)
    assert layer.query.bias is not None and layer.key.bias is None and layer.value.bias is None
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert torch.equal(layer.value.weight, torch.eye(64, dtype=torch.float64))
    assert torch.count_nonzero(layer.key.weight) == 0 and torch.count_nonzero(layer.query.bias) == 0
    assert 0.45 < layer.query.weight.std().item() < 0.55  # 4096 draws of N(0, 0.5^2), not N(0, 1)
    narrow = FusionLayer(6, [0], FuseConfig(query_key_dim=3, value=False, init_std=0), "s")
    assert narrow.value is None and narrow.query.weight.shape == (3, 6)
    assert torch.count_nonzero(narrow.query.weight) == 0


def _expected(layer: FusionLayer, h: torch.Tensor, zs: list[torch.Tensor]) -> torch.Tensor:
    """The fusion formula by hand, in float64."""
    wq, bq = layer.query.weight.double(), layer.query.bias.double()
    wk = layer.key.weight.double()
    wv = layer.value.weight.double() if layer.value is not None else torch.eye(layer.dim, dtype=torch.float64)
    h64, z = h.double(), torch.stack([c.double() for c in zs], dim=-2)
    scores = torch.einsum("...k,...nk->...n", h64 @ wq.T + bq, z @ wk.T) / layer.config.temperature
    p = torch.softmax(scores, dim=-1)
    mixed = torch.einsum("...n,...nd->...d", p, z)
    if layer.config.residual:
        return h64 + mixed @ wv.T
    return (h64 + mixed) @ wv.T


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_site_formula_on_2d_inputs_of_another_dtype(value, residual, dtype):
    torch.manual_seed(1)
    layer = FusionLayer(5, [0, 1, 2], FuseConfig(temperature=0.7, value=value, residual=residual), "s",
                        dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.4)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    h = torch.randn(4, 5, dtype=other)
    zs = [torch.randn(4, 5, dtype=other) for _ in range(3)]
    with torch.no_grad():
        out, probs = layer(h, zs)
    assert out.dtype == other and out.shape == (4, 5) and probs.shape == (4, 3)
    assert torch.allclose(out.double(), _expected(layer, h, zs), atol=1e-5)
    assert torch.allclose(probs.sum(-1).double(), torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_value_distance_is_a_zero_scalar_without_a_value_projection():
    layer = FusionLayer(4, [0], FuseConfig(value=False), "s", dtype=torch.float64)
    distance = layer.value_distance()
    assert distance.shape == () and distance.item() == 0.0 and distance.dtype == torch.float64
    with_value = FusionLayer(4, [0], FuseConfig(), "s")
    with torch.no_grad():
        with_value.value.weight[0, 1] = 2.0
        with_value.value.weight[2, 2] = 4.0
    assert with_value.value_distance().item() == pytest.approx(4.0 + 9.0)


def test_capture_starts_a_new_pass_only_when_a_site_repeats():
    capture = FusionCapture()
    w = torch.zeros(1)
    capture.record("f", "s1", ["a"], w)
    capture.record("g", "s1", ["a"], w)  # another fusion at the same site: same pass
    capture.record("f", "s2", ["a"], w)
    assert len(capture.calls) == 1 and set(capture.weights) == {"f", "g"} and set(capture.weights["f"]) == {"s1", "s2"}
    capture.record("f", "s1", ["b"], w)  # f at s1 again: the next pass
    assert len(capture.calls) == 2 and capture.weights["f"]["s1"].members == ["b"]


class _Bare(nn.Module):
    pass


def _site(base: nn.Module, adapters: dict | None = None):
    return types.SimpleNamespace(base_layer=base, adapters=adapters or {})


def test_output_width_of_each_kind_of_site():
    assert site_output_dim(_site(nn.Linear(3, 7))) == 7
    assert site_output_dim(_site(Conv1D(9, 4))) == 9
    assert site_output_dim(_site(nn.Embedding(10, 6))) == 6
    assert site_output_dim(_site(nn.LayerNorm((3, 5)))) == 5
    assert site_output_dim(_site(_Bare(), {"a": types.SimpleNamespace(out_features=11)})) == 11
    assert site_output_dim(_site(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 8)))) == 8
    assert site_output_dim(_site(nn.ReLU())) is None


def test_fusion_layers_take_a_double_base_dtype_and_float32_for_half_bases():
    model = lora_model(("a", "b"))
    model.model.double()
    model.add_fusion(Fuse("a", "b", name="f"))
    layers = list(fusion_layers(model, "f"))
    assert layers and all({p.dtype for p in fusion.parameters()} == {torch.float64} for _, fusion in layers)
    assert not any(p.requires_grad for _, fusion in layers for p in fusion.parameters())
    half = lora_model(("a", "b"))
    half.model.to(torch.bfloat16)
    half.add_fusion(Fuse("a", "b", name="f"))
    assert all({p.dtype for p in fusion.parameters()} == {torch.float32} for _, fusion in fusion_layers(half, "f"))


@pytest.fixture
def saved(tmp_path):
    model = lora_model(("a", "b"))
    model.add_fusion(Fuse("a", "b", name="f"), temperature=1.5, value=False)
    torch.manual_seed(4)
    with torch.no_grad():
        for _, fusion in fusion_layers(model, "f"):
            for p in fusion.parameters():
                p.add_(torch.randn_like(p))
    model.save_fusion(tmp_path / "f", "f")
    return model, tmp_path / "f"


def test_saved_folder_holds_exactly_the_documented_fields(saved):
    from peftkit.core.serialization import base_model_id, base_model_info, peftkit_version

    model, folder = saved
    text = (folder / "fusion_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    record = model.adapter_state.fusions["f"]
    assert data["peftkit_fusion"] == {"format_version": FUSION_FORMAT_VERSION, "peftkit_version": peftkit_version()}
    assert data["name"] == "f" and data["composition"] == str(record.node)
    assert data["base_model_name_or_path"] == base_model_id(model)
    assert data["base_model"] == json.loads(json.dumps(base_model_info(model)))
    layers = list(fusion_layers(model, "f"))
    assert data["sites"] == {site: {"dim": fusion.dim, "members": ["a", "b"], "member_index": [0, 1]}
                             for site, fusion in layers}
    with safe_open(str(folder / "fusion_model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    tensors = load_file(str(folder / "fusion_model.safetensors"))
    own = {f"{site}.{key}": t for site, fusion in layers for key, t in fusion.state_dict().items()}
    assert set(tensors) == set(own) and all(torch.equal(tensors[k], own[k]) for k in own)


def test_saving_again_into_the_folder_rewrites_it_and_a_file_path_is_refused(saved, tmp_path):
    model, folder = saved
    model.delete_fusion("f")
    model.add_fusion(Fuse("a", "b", name="f"), temperature=4.0)
    model.save_fusion(folder, "f")
    assert json.loads((folder / "fusion_config.json").read_text())["config"]["temperature"] == 4.0
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="it is a file, not a folder"):
        model.save_fusion(tmp_path / "file", "f")


def _rewrite(folder, change) -> None:
    path = folder / "fusion_config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_format_version_defaults_to_zero_and_must_be_a_whole_number_not_newer(saved):
    _, folder = saved
    _rewrite(folder, lambda d: d["peftkit_fusion"].pop("format_version"))
    assert read_fusion_config(folder)["name"] == "f"
    _rewrite(folder, lambda d: d["peftkit_fusion"].update(format_version=True))
    with pytest.raises(AdapterLoadError, match="format_version must be a whole number, got True"):
        read_fusion_config(folder)
    _rewrite(folder, lambda d: d["peftkit_fusion"].update(format_version=FUSION_FORMAT_VERSION + 1))
    with pytest.raises(AdapterLoadError, match="newer than this"):
        read_fusion_config(folder)
    _rewrite(folder, lambda d: d.pop("fuse"))
    with pytest.raises(AdapterLoadError, match=r"fusion_config.json is not a peftkit fusion config"):
        read_fusion_config(folder)
    (folder / "fusion_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterLoadError, match="not a peftkit fusion config"):
        read_fusion_config(folder)


def test_a_fusion_for_another_base_model_is_refused_naming_the_folder_and_base(saved):
    model, folder = saved
    model.delete_fusion("f")
    _rewrite(folder, lambda d: (d["base_model"].update(num_hidden_layers=99),
                                d.update(base_model_name_or_path="org/other")))
    with pytest.raises(AdapterLoadError) as info:
        model.load_fusion(folder)
    assert str(info.value).startswith(f"{folder}: this adapter was made for a model with num_hidden_layers=99 "
                                      f"(org/other)")
    assert "f" not in model.fusions


def test_weights_that_do_not_match_the_layers_are_refused_naming_the_keys(saved):
    model, folder = saved
    expected = {site: [t.clone() for t in fusion.parameters()] for site, fusion in fusion_layers(model, "f")}
    model.delete_fusion("f")
    weights = folder / "fusion_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "extra.key": torch.zeros(1)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError) as info:
        model.load_fusion(folder)
    assert str(info.value) == (f"{folder}: fusion_model.safetensors does not match the fusion's layers "
                               f"(differing keys: extra.key)")
    first = sorted(tensors)[0]
    save_file({**tensors, first: torch.zeros(2, 2)}, str(weights), metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError, match=rf"{folder}: shape mismatch for {first}$"):
        model.load_fusion(folder)
    assert "f" not in model.fusions
    missing = (folder.parent / "nothing")
    missing.mkdir()
    (missing / "fusion_config.json").write_text((folder / "fusion_config.json").read_text())
    with pytest.raises(AdapterLoadError, match=rf"{missing} has no fusion_model.safetensors"):
        model.load_fusion(missing)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model.load_fusion(folder)
    for site, fusion in fusion_layers(model, "f"):
        assert all(torch.equal(a, b) for a, b in zip(fusion.parameters(), expected[site]))


def _two_fusions():
    model = lora_model(("a", "b", "c"))
    model.add_fusion(Fuse("a", "b", name="f"), regularization=0.5)
    model.add_fusion(Fuse("b", "c", name="g"), regularization=0.25)
    with torch.no_grad():
        for name, shift in (("f", 0.1), ("g", 0.3)):
            for _, fusion in fusion_layers(model, name):
                fusion.value.weight.add_(shift)
    return model


def test_regularization_loss_is_each_fusions_factor_times_its_distances():
    model = _two_fusions()
    per_site = {name: sum(fusion.value_distance() for _, fusion in fusion_layers(model, name)) for name in "fg"}
    assert model.fusion_regularization_loss("f").item() == pytest.approx(0.5 * per_site["f"].item(), rel=1e-5)
    assert model.fusion_regularization_loss("g").item() == pytest.approx(0.25 * per_site["g"].item(), rel=1e-5)
    total = 0.5 * per_site["f"].item() + 0.25 * per_site["g"].item()
    assert model.fusion_regularization_loss().item() == pytest.approx(total, rel=1e-5)
    bare = lora_model(("a",))
    zero = bare.fusion_regularization_loss()
    assert zero.shape == () and zero.item() == 0.0 and zero.device == bare.device


def test_an_unknown_fusion_is_named_with_the_known_ones():
    model = _two_fusions()
    with pytest.raises(CompositionError) as info:
        model.fusion_regularization_loss("h")
    assert str(info.value) == "no fusion named 'h' on this model; fusions: f, g"
    with pytest.raises(CompositionError) as info:
        lora_model(("a",)).fusion_regularization_loss("h")
    assert str(info.value) == "no fusion named 'h' on this model; fusions: none"


def test_fusions_used_in_a_composition_must_exist_with_the_same_members():
    model = _two_fusions()
    with pytest.raises(CompositionError, match="needs fusion weights named 'x'"):
        model.set_active(Stack("c", Fuse("a", "b", name="x")))
    with pytest.raises(CompositionError, match="fusion 'f' fuses fuse"):
        model.set_active(Fuse("b", "a", name="f"))


def test_as_fuse_takes_a_fusion_name_a_fuse_string_or_a_block():
    model = _two_fusions()
    assert as_fuse(model, "f") == Fuse("a", "b", name="f")
    assert as_fuse(model, 'fuse(b, c, name="g")') == Fuse("b", "c", name="g")
    assert as_fuse(model, Fuse("b", "c", name="g")) == Fuse("b", "c", name="g")
    with pytest.raises(CompositionError, match="is not a fuse"):
        as_fuse(model, "stack(a, b)")


def test_train_fusion_by_name_or_string_activates_that_fusion_and_trains_only_it():
    model = _two_fusions()
    model.train_fusion("g")
    assert model.active_composition == Fuse("b", "c", name="g")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.fusion_parameters("g")}
    model.train_fusion('fuse(a, b, name="f")')
    assert model.active_composition == Fuse("a", "b", name="f")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.fusion_parameters("f")}


class _WithOwnWidth(nn.Module):
    """A site module that states its own output width and holds a narrower inner layer."""

    def __init__(self) -> None:
        super().__init__()
        self.out_features = 7
        self.inner = nn.Linear(3, 4)


def test_output_width_prefers_the_sites_own_attribute_and_the_last_normalized_dim():
    assert site_output_dim(_site(_WithOwnWidth())) == 7
    assert site_output_dim(_site(nn.LayerNorm((2, 3, 5)))) == 5
    adapters = {"x": types.SimpleNamespace(), "a": types.SimpleNamespace(out_features=11)}
    assert site_output_dim(_site(_Bare(), adapters)) == 11


def test_a_folder_without_a_readable_fusion_config_is_refused_saying_so(tmp_path):
    with pytest.raises(AdapterLoadError) as info:
        read_fusion_config(tmp_path)
    assert str(info.value) == f"{str(tmp_path)!r} is not a fusion folder: it has no fusion_config.json"
    (tmp_path / "fusion_config.json").write_text("{")
    with pytest.raises(AdapterLoadError, match="is not valid JSON .*; save the fusion again$"):
        read_fusion_config(tmp_path)


def test_a_fusion_saved_for_other_sites_names_the_sites_that_differ(saved):
    from tests.tiny_models import build_tiny

    import peftkit

    _, folder = saved
    narrow = peftkit.AdaptedModel(build_tiny("llama"))
    for name in ("a", "b"):
        narrow.add_adapter(name, 'lora[r=4,target_modules=["q_proj"]]')
    saved_sites = sorted(json.loads((folder / "fusion_config.json").read_text())["sites"])
    differing = [s for s in saved_sites if not s.endswith("q_proj")][:5]
    with pytest.raises(AdapterLoadError) as info:
        narrow.load_fusion(folder)
    assert f"(differing: {', '.join(differing)}); load the same member adapters" in str(info.value)



def test_train_fusion_keeps_member_adapters_frozen_unless_asked_and_takes_any_composition():
    model = _two_fusions()
    train_fusion(model, "f")  # the function's own default, not only the model method's
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.fusion_parameters("f")}
    model.train_fusion('stack(c, fuse(a, b, name="f"))')
    assert model.active_composition == Stack("c", Fuse("a", "b", name="f"))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.fusion_parameters("f")}


def test_a_fusion_sits_only_at_the_sites_its_members_act_at_even_after_other_sites():
    from tests.tiny_models import build_tiny

    import peftkit

    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter("c", 'lora[r=4,target_modules=["q_proj"]]')
    for name in ("a", "b"):
        model.add_adapter(name, 'lora[r=4,target_modules=["down_proj"]]')
    record = model.add_fusion(Fuse("a", "b", name="f"))
    down = [site for site, layer in model.tuner_layers() if site.endswith("down_proj")]
    assert len(down) >= 2 and sorted(record.sites) == sorted(down)
    assert all(index == [0, 1] for index in record.sites.values())


def test_an_empty_normalized_shape_is_not_a_width_and_the_adapters_width_is_taken():
    bare = _Bare()
    bare.normalized_shape = ()
    assert site_output_dim(_site(bare, {"a": types.SimpleNamespace(out_features=11)})) == 11


def test_a_union_that_changes_the_models_inputs_is_refused_in_a_fusion():
    """A union with a prefix part allows fuse() as a block but has no output at a layer for its prefix part."""
    model = lora_model(("a",))
    model.add_adapter("u", "prefix_tuning[num_virtual_tokens=2]|par_bn[reduction_factor=4]")
    with pytest.raises(CompositionError, match="adapter 'u' changes the model's inputs and has no output at a layer"):
        model.add_fusion(Fuse("a", "u", name="f"))
    assert "f" not in model.adapter_state.fusions
    assert not any("f" in layer.fusions for _, layer in model.tuner_layers())


def test_a_site_whose_layer_holds_no_parameters_gets_a_float32_fusion():
    """The fusion's dtype and device come from the base layer's first parameter; a layer holding its weight as
    a buffer (as some quantization libraries do) has none: float32 on the default device, whatever the buffer's."""
    model = lora_model(("a", "b"))
    site, layer = next((s, l) for s, l in model.tuner_layers() if s.endswith("q_proj"))
    base = layer.base_layer
    weight = base.weight.detach().double()
    del base.weight
    base.register_buffer("weight", weight)
    assert next(base.parameters(), None) is None
    record = model.add_fusion(Fuse("a", "b", name="f"))
    assert site in record.sites
    fusion = layer.fusions["f"]
    assert {(p.dtype, p.device.type) for p in fusion.parameters()} == {(torch.float32, "cpu")}
    others = [l.fusions["f"] for s, l in model.tuner_layers() if s != site and "f" in l.fusions]
    assert others and all(p.dtype == torch.float32 for other in others for p in other.parameters())


def test_a_fusion_that_fails_at_a_later_site_is_removed_from_the_sites_it_was_placed_at(monkeypatch):
    import peftkit.core.fusion as fusion_module

    model = lora_model(("a", "b"))
    sites = [site for site, _ in model.tuner_layers()]
    layers = dict(model.tuner_layers())
    unknown = sites[2]
    real = fusion_module.site_output_dim
    monkeypatch.setattr(fusion_module, "site_output_dim",
                        lambda layer: None if layer is layers[unknown] else real(layer))
    with pytest.raises(CompositionError, match=f"cannot tell the output width of site '{unknown}'"):
        model.add_fusion(Fuse("a", "b", name="f"))
    assert not any("f" in layer.fusions for layer in layers.values())
    assert "f" not in model.adapter_state.fusions


def test_a_fusion_is_made_on_the_device_of_its_sites_layer():
    """Each site's fusion gets the device of that site's base layer: a layer on the meta device (a model
    built there to be loaded later) gets a meta fusion, the other sites CPU ones."""
    model = lora_model(("a", "b"))
    site, layer = next((s, l) for s, l in model.tuner_layers() if s.endswith("q_proj"))
    layer.base_layer.to("meta")
    model.add_fusion(Fuse("a", "b", name="f"))
    assert {(p.device.type, p.dtype) for p in layer.fusions["f"].parameters()} == {("meta", torch.float32)}
    others = [l.fusions["f"] for s, l in model.tuner_layers() if s != site and "f" in l.fusions]
    assert others and {p.device.type for other in others for p in other.parameters()} == {"cpu"}
