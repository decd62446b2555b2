"""FuseConfig(query_from=...): what a fusion's query reads. "adapter_input" queries with what the last member's
branch reads (LayerAdapter.fusion_query): LN(h + r) for a seq_bn member reading through the model's LayerNorm
(AdapterHub's default placement; checked against the real ``adapters`` in test_adapterhub_walkthrough_fusion.py),
h for every other adapter."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit import CompositionError, Fuse, Stack
from tests.tiny_models import build_tiny

IDS = torch.tensor([[5, 9, 2, 7, 11, 3]])


def _model(spec: str) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny("bert"))
    torch.manual_seed(1)
    for name in ("a", "b"):
        model.add_adapter(name, spec)
    return model


def _fused_output(model: peftkit.AdaptedModel, query_from: str) -> torch.Tensor:
    """The output under a fusion over a and b whose key and query are random (so the query matters)."""
    for name in list(model.fusions):
        model.delete_fusion(name)
    model.add_fusion(Fuse("a", "b"), query_from=query_from)
    torch.manual_seed(2)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".fusions." in key and (".key." in key or ".query." in key):
                param.copy_(torch.randn(param.shape))
    model.set_active(Fuse("a", "b"))
    with torch.no_grad():
        return model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]


def test_members_that_read_h_give_the_same_fusion_either_way() -> None:
    model = _model("seq_bn[init_weights=false]")
    torch.testing.assert_close(_fused_output(model, "adapter_input"), _fused_output(model, "output"), rtol=0,
                               atol=0)


def test_members_reading_through_the_model_layernorm_query_with_that() -> None:
    """The query's input at each fusion site is the last member's fusion_query, LN_model(h + r), not h."""
    model = _model("seq_bn[init_weights=false,original_ln_before=true]")
    on_h = _fused_output(model, "output")
    assert (_fused_output(model, "adapter_input") - on_h).abs().max() > 1e-4
    seen: list[torch.Tensor] = []
    norms = []
    for _, layer in model.tuner_layers():
        norms.append(layer.adapters["b"].model_norm)
        layer.fusions["a_b"].query.register_forward_pre_hook(lambda module, args, _n=norms[-1]: seen.append(
            (args[0] - _n.bias) / _n.weight))
    with torch.no_grad():
        model(input_ids=IDS)
    assert len(seen) == len(norms) and all(n is not None for n in norms)
    for normalized in seen:  # a LayerNorm's output before its affine map: mean 0, variance 1 per token (h: not)
        torch.testing.assert_close(normalized.mean(-1), torch.zeros(normalized.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(normalized.var(-1, unbiased=False), torch.ones(normalized.shape[:-1]),
                                   atol=1e-3, rtol=0)


def test_the_setting_is_saved_and_an_older_fusion_folder_queries_h(tmp_path) -> None:
    model = _model("seq_bn[init_weights=false,original_ln_before=true]")
    expected = _fused_output(model, "adapter_input")
    model.save_fusion(str(tmp_path / "f"), "a_b")
    saved = json.loads((tmp_path / "f" / "fusion_config.json").read_text())
    assert saved["config"]["query_from"] == "adapter_input"
    model.delete_fusion("a_b")
    model.load_fusion(str(tmp_path / "f"), activate=True)
    with torch.no_grad():
        again = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(again, expected, rtol=0, atol=0)
    del saved["config"]["query_from"]  # a folder written before the setting existed
    (tmp_path / "f" / "fusion_config.json").write_text(json.dumps(saved))
    model.delete_fusion("a_b")
    assert model.load_fusion(str(tmp_path / "f")).config.query_from == "output"


def test_a_block_as_the_last_member_is_refused_and_training_reaches_the_query() -> None:
    model = _model("seq_bn[init_weights=false,original_ln_before=true]")
    with pytest.raises(CompositionError, match=r"the last member of fuse\(a, stack\(a, b\)\) must be an adapter"):
        model.add_fusion(Fuse("a", Stack("a", "b")), query_from="adapter_input")
    model.add_fusion(Fuse("a", "b"), query_from="adapter_input")
    model.train_fusion(Fuse("a", "b"))
    with torch.no_grad():
        for key, param in model.named_parameters():
            if ".fusions." in key and ".key." in key:
                param.normal_()
    model(input_ids=IDS, output_hidden_states=True).hidden_states[-1].sum().backward()
    grads = [p.grad for k, p in model.named_parameters() if ".fusions." in k and ".query.weight" in k]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
