"""Adapter-wide state (Method.create_shared_state): created once per adapter, shared by every site's
layer adapter as one storage (also after model.to), saved and loaded once per adapter, dropped with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit.plugin_api import AdapterConfig, LayerAdapter, linear_features, Method, PluginError, Site
from tests.method_helpers import adapter_modules, method_plugin, output_of
from tests.tiny_models import build_tiny


@dataclasses.dataclass
class SharedScaleConfig(AdapterConfig):
    method = "shared_scale"
    r: int = 4


class SharedScaleLayer(LayerAdapter):
    """delta = (x[:, :r] @ basis) * gain[:out], with basis (a frozen buffer) and gain (a trained
    parameter) shared by every site."""

    def __init__(self, out_features: int, r: int) -> None:
        super().__init__()
        self.out_features, self.r = out_features, r
        self.own = nn.Parameter(torch.zeros(()))

    def delta(self, x, h, base):
        s = self.shared
        return ((x[..., : self.r] @ s.basis)[..., : self.out_features] * s.gain[: self.out_features]
                + self.own).to(h.dtype)


class SharedScaleMethod(Method):
    """A third-party-style method with one frozen and one trained shared tensor, saved under the default keys."""

    name = "shared_scale"
    config_class = SharedScaleConfig
    seen_sites: list[str] = []

    def create_shared_state(self, model, config, sites):
        SharedScaleMethod.seen_sites = [s.name for s in sites]
        widest = max(linear_features(model.get_submodule(s.name))[1] for s in sites)
        gen = torch.Generator().manual_seed(0)
        return {"basis": torch.randn(config.r, widest, generator=gen),
                "gain": nn.Parameter(torch.ones(widest))}

    def create_layer_adapter(self, site: Site, base_layer, config, model):
        assert self.seen_sites, "shared state is created before any layer adapter"
        return SharedScaleLayer(linear_features(base_layer)[1], config.r)


@pytest.fixture
def shared_scale():
    with peftkit.use_plugin(method_plugin(SharedScaleMethod()), "shared_scale_plugin") as record:
        assert not record.errors
        yield


def _model():
    return peftkit.adapt(build_tiny("llama"), "shared_scale[target_modules=[q_proj,v_proj,up_proj]]")


def _storages(model, key):
    return {getattr(m.shared, key).data_ptr() for m in adapter_modules(model).values()}


def test_the_method_sees_every_site_and_all_layers_share_one_storage(shared_scale):
    model = _model()
    assert len(SharedScaleMethod.seen_sites) == 6
    assert len(_storages(model, "basis")) == 1 and len(_storages(model, "gain")) == 1
    assert _storages(model, "basis") == {model.shared_state("default").basis.data_ptr()}


@pytest.mark.parametrize("move", [lambda m: m.to(torch.float64), lambda m: m.to("cpu"),
                                  lambda m: m.double().float()])
def test_shared_tensors_stay_one_storage_after_to(shared_scale, move):
    model = _model()
    move(model)
    shared = model.shared_state("default")
    assert _storages(model, "basis") == {shared.basis.data_ptr()}
    assert _storages(model, "gain") == {shared.gain.data_ptr()}
    assert shared.basis.dtype == next(model.base_model.parameters()).dtype
    with torch.no_grad():  # a change through the adapter-wide module reaches every site
        shared.gain.mul_(2)
    assert all(torch.equal(m.shared.gain, shared.gain) for m in adapter_modules(model).values())


def test_vera_projections_stay_shared_after_to():
    model = peftkit.adapt(build_tiny("llama"), "vera[r=4,target_modules=all-linear]")
    for move in (lambda m: m.to(torch.float64), lambda m: m.to("cpu")):
        move(model)
        for key in ("vera_A", "vera_B"):
            assert _storages(model, key) == {getattr(model.shared_state("default"), key).data_ptr()}
    model.set_active("default")
    out = output_of(model, "llama")
    assert out.dtype == torch.float64


def test_shared_parameters_train_with_the_adapter_and_buffers_stay_frozen(shared_scale):
    model = _model()
    model.train_adapter("default")
    shared = model.shared_state("default")
    assert shared.gain.requires_grad and not shared.basis.requires_grad
    assert any(p is shared.gain for p in model.adapter_parameters("default"))
    trained, _ = model.trainable_parameters()
    assert trained == 6 + shared.gain.numel()  # counted once, not once per site


def test_saved_and_loaded_once_per_adapter(shared_scale, tmp_path):
    model = _model()
    with torch.no_grad():
        model.shared_state("default").gain.uniform_(0.5, 1.5)
    model.set_active("default")
    expected = output_of(model, "llama")
    model.save_adapter(str(tmp_path))
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in keys if "peftkit_shared" in k} == {"peftkit_shared.basis", "peftkit_shared.gain"}
    loaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    torch.testing.assert_close(output_of(loaded, "llama"), expected)


def test_each_adapter_has_its_own_and_deleting_drops_it(shared_scale):
    model = _model()
    model.add_adapter("other", "shared_scale[target_modules=[q_proj]]")
    assert model.shared_state("other") is not model.shared_state("default")
    model.delete_adapter("other")
    assert model.shared_state("other") is None
    assert "other" not in dict(model.named_modules()).keys()


def test_a_bad_shared_name_is_refused_naming_it():
    class BadName(SharedScaleMethod):
        def create_shared_state(self, model, config, sites):
            return {"not a name": torch.zeros(1)}

    with peftkit.use_plugin(method_plugin(BadName()), "bad_shared"):
        model = peftkit.adapt(build_tiny("llama"), "lora")
        with pytest.raises(PluginError, match="not a name"):
            model.add_adapter("x", "shared_scale[target_modules=[q_proj]]")
        assert "x" not in model.adapters
