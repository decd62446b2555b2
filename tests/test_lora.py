"""LoRA and DoRA on tiny models of several architectures: PEFT parity, identity at init, merges."""

from __future__ import annotations

import functools

import pytest
import torch

import peftkit
from peftkit.plugins.lora.layer import LoraEmbedding, LoraLinear
from tests.method_helpers import merge_keeps_output, output_of, randomize, two_adapters, unload_keeps_output
from tests.tiny_models import TINY_BUILDERS, build_tiny, sample_inputs

ARCHS = sorted(TINY_BUILDERS)


_randomize = functools.partial(randomize, std=0.05)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["lora[r=4,target_modules=all-linear]",
                                  "lora[r=4,alpha=16,use_rslora=true]",
                                  "lora[r=4,use_dora=true,target_modules=all-linear]"])
def test_identity_at_init_then_merge_equivalence(arch, spec):
    base = build_tiny(arch)
    reference = output_of(base, arch)
    model = peftkit.adapt(base, spec)
    assert torch.allclose(output_of(model, arch), reference, atol=1e-6), "output must equal the base at init"
    _randomize(model)
    unmerged = merge_keeps_output(model, arch)
    assert not torch.allclose(unmerged, reference, atol=1e-4)
    assert model.merged_adapters == ["default"]
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=1e-4, rtol=0)
    with model.disable_adapters():
        torch.testing.assert_close(output_of(model, arch), reference, atol=1e-4, rtol=0)
    unload_keeps_output(model, arch, unmerged)


def test_non_identity_init_differs_from_base():
    base = build_tiny("llama")
    reference = output_of(base, "llama")
    model = peftkit.adapt(base, "lora[r=4,init_weights=false]")
    assert not torch.allclose(output_of(model, "llama"), reference, atol=1e-4)


def test_scaling_plain_and_rslora():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,alpha=16]")
    layer = model.base_model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert layer.scale == pytest.approx(4.0)
    model.add_adapter("rs", "lora[r=4,alpha=16,use_rslora=true]")
    layer = model.base_model.model.layers[0].self_attn.q_proj.adapters["rs"]
    assert layer.scale == pytest.approx(8.0)


def test_rank_and_alpha_patterns():
    model = peftkit.adapt(build_tiny("llama"), 'lora[r=4,rank_pattern={"v_proj":2},alpha_pattern={"v_proj":6}]')
    attn = model.base_model.model.layers[0].self_attn
    assert attn.q_proj.adapters["default"].r == 4
    assert attn.v_proj.adapters["default"].r == 2
    assert attn.v_proj.adapters["default"].scale == pytest.approx(3.0)


def test_embedding_lora_merges():
    base = build_tiny("llama")
    model = peftkit.adapt(base, 'lora[r=4,target_modules=["embed_tokens","q_proj"]]')
    assert isinstance(model.base_model.model.embed_tokens.adapters["default"], LoraEmbedding)
    assert isinstance(model.base_model.model.layers[0].self_attn.q_proj.adapters["default"], LoraLinear)
    _randomize(model)
    merge_keeps_output(model, "llama")


def test_several_lora_adapters_active_at_once_add_their_deltas():
    model = two_adapters("llama", "lora[r=2]", "lora[r=2,target_modules=all-linear]", noise=_randomize)
    x = torch.randn(3, 32)
    q = model.base_model.model.layers[0].self_attn.q_proj
    model.set_active("a", "b")
    both = q(x)
    with torch.no_grad():
        h = q.base_layer(x)
        da = q.adapters["a"].delta(x, h, q.base_layer)
        db = q.adapters["b"].delta(x, h, q.base_layer)
    torch.testing.assert_close(both, h + da + db, atol=1e-6, rtol=0)
    merge_keeps_output(model, "llama", ["a", "b"])  # merged together == unmerged together


def test_train_step_changes_only_the_trained_adapter():
    base = build_tiny("llama")
    model = peftkit.adapt(base, "lora[r=4,target_modules=all-linear]", adapter_name="a")
    model.add_adapter("b", "lora[r=4,target_modules=all-linear]")
    model.train_adapter("a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = sample_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "the step changed nothing"
    assert all(".adapters.a." in k for k in changed), sorted(changed)[:5]
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_dora_trains_magnitude_and_merges_after_training():
    base = build_tiny("gpt2")
    model = peftkit.adapt(base, "lora[r=4,use_dora=true]")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = sample_inputs("gpt2")
    for _ in range(3):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = model.base_model.transformer.h[0].attn.c_attn.adapters["default"]
    assert not torch.allclose(layer.lora_magnitude_vector, layer._weight_norm(model.base_model.transformer.h[0].attn.c_attn.base_layer))
    merge_keeps_output(model, "gpt2")


def test_dora_norm_matches_dense_formula():
    base = build_tiny("llama")
    model = peftkit.adapt(base, "lora[r=3,use_dora=true,init_weights=false]")
    q = model.base_model.model.layers[0].self_attn.q_proj
    adapter = q.adapters["default"]
    dense = torch.linalg.vector_norm(q.base_layer.weight + adapter.scale * adapter.lora_B @ adapter.lora_A, dim=1)
    torch.testing.assert_close(adapter._weight_norm(q.base_layer), dense, atol=1e-5, rtol=1e-5)


def test_bf16_base_keeps_fp32_adapter_and_runs():
    base = build_tiny("llama").to(torch.bfloat16)
    model = peftkit.adapt(base, "lora[r=4,init_weights=false]")
    adapter = model.base_model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32
    out = output_of(model, "llama")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_merging_into_a_tied_weight_is_refused_before_anything_changes():
    """GPT-2's lm_head shares its weight with the input embedding: merging a LoRA on lm_head would change
    the embedding too (wrong logits), so the merge is refused, and the other sites stay unmerged."""
    model = peftkit.adapt(build_tiny("gpt2"), 'lora[r=2,target_modules=["c_attn","lm_head"]]')
    assert model.base_model.lm_head.base_layer.weight is model.base_model.transformer.wte.weight
    randomize(model, seed=3)
    before = output_of(model, "gpt2")
    with pytest.raises(peftkit.MergeError, match=r"into lm_head: its weight is tied to transformer\.wte"):
        model.merge_adapter()
    assert model.merged_adapters == [] and torch.equal(output_of(model, "gpt2"), before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_merges_only_first_into_a_layer(arch):
    """A DoRA merge reads the weight it merges into (row norms): merged after another adapter at the same
    layer it would be wrong, so that order is refused before anything changes; DoRA first is exact."""
    model = peftkit.adapt(build_tiny(arch), "lora[r=2,target_modules=all-linear]", adapter_name="plain")
    model.add_adapter("dora", "lora[r=2,use_dora=true,target_modules=all-linear]")
    randomize(model, "plain", seed=1)
    randomize(model, "dora", seed=2)
    model.eval()
    model.set_active("stack(plain, dora)")
    before = output_of(model, arch)
    with pytest.raises(peftkit.MergeError, match=r"'dora' cannot be merged after 'plain'.*merge 'dora' first"):
        model.merge_adapter(["plain", "dora"])
    assert model.merged_adapters == [] and torch.equal(output_of(model, arch), before)
    model.set_active("stack(dora, plain)")
    unmerged = output_of(model, arch)
    model.merge_adapter(["dora", "plain"])
    model.set_active(None)
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    model.set_active("dora")
    alone = output_of(model, arch)
    model.merge_adapter(["plain"])  # plain folded into the base: DoRA's norms now come from W + plain's change
    from peftkit.core.base_layers import weight_out_in
    from peftkit.core.layer import TunerLayer

    for layer in (m for m in model.modules() if isinstance(m, TunerLayer) and "dora" in m.adapters):
        dora = layer.adapters["dora"]
        with torch.no_grad():
            fresh = (weight_out_in(layer.base_layer) + dora.lora_delta_out_in()).norm(dim=1)
        torch.testing.assert_close(dora._weight_norm(layer.base_layer), fresh, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, arch), alone, atol=1e-5, rtol=1e-5)  # and again on unmerge
