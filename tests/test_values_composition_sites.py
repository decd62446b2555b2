"""Composition blocks run at one site (core/composition_exec.py), against hand formulas from the
adapters' own factors: a half-precision site input with float32 LoRA factors, a learned average's
weights, what a fusion records, and the refusals around merged adapters and missing fusion weights."""

from __future__ import annotations

import re

import pytest
import torch

from peftkit import Average, CompositionError, Fuse, Split, Stack
from peftkit.core.composition_exec import run_node

from .composition_util import inputs, lora_model

SITE = "model.layers.0.self_attn.q_proj"


def _delta(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """LoRA's change at a site by hand, in float32: scale * (x A^T) B^T."""
    a, b, scale = layer.adapters[name].low_rank()
    return (x.float() @ a.T) @ b.T * scale


@pytest.fixture(scope="module")
def model():
    adapted = lora_model(("a", "b"))
    torch.manual_seed(4)
    adapted.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")  # after the MLP only
    return adapted


def _site_input(layer, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(9)
    x = torch.randn(2, 3, layer.base_layer.in_features)
    with torch.no_grad():
        return x.to(dtype), layer.base_layer(x).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stack_and_average_of_float32_loras_add_their_hand_deltas_to_a_half_precision_output(model, dtype):
    layer = model.base_model.get_submodule(SITE)
    x, h = _site_input(layer, dtype)
    da, db = _delta(layer, "a", x), _delta(layer, "b", x)
    assert da.abs().mean() > 0.05 and db.abs().mean() > 0.05
    with torch.no_grad():
        stacked = run_node(Stack("a", "b"), layer, x, h.clone())
        averaged = run_node(Average("a", "b", weights=[3.0, 1.0]), layer, x, h.clone())
    for out, delta in ((stacked, da + db), (averaged, 0.75 * da + 0.25 * db)):
        assert out.dtype == dtype and out.shape == h.shape
        torch.testing.assert_close(out.float(), h.float() + delta.to(dtype).float(), atol=2e-2, rtol=1e-2)


def test_a_learned_average_runs_with_its_learned_weights_not_the_blocks(model):
    layer = model.base_model.get_submodule(SITE)
    x, h = _site_input(layer)
    da, db = _delta(layer, "a", x), _delta(layer, "b", x)
    block = Average("a", "b")
    with model.learn_average(block) as learned:
        with torch.no_grad():
            learned.free.copy_(torch.tensor([0.9, 0.3]))  # normalized: 0.75 and 0.25
            out = run_node(block, layer, x, h)
        torch.testing.assert_close(out, h + 0.75 * da + 0.25 * db, atol=1e-5, rtol=1e-5)
        trained = run_node(block, layer, x, h)  # recording gradients: the weights as a tensor
        torch.testing.assert_close(trained, h + 0.75 * da + 0.25 * db, atol=1e-5, rtol=1e-5)
        trained.sum().backward()
        assert learned.free.grad is not None and learned.free.grad.abs().sum() > 0
    with torch.no_grad():  # closed: the block's own (equal) weights again
        torch.testing.assert_close(run_node(block, layer, x, h), h + 0.5 * da + 0.5 * db, atol=1e-5, rtol=1e-5)


def test_merged_adapters_are_refused_where_their_output_must_be_taken_apart_from_the_base():
    model = lora_model(("a", "b"))
    model.add_fusion(Fuse("a", "b", name="f"))
    layer = model.base_model.get_submodule(SITE)
    x, h = _site_input(layer)
    model.merge_adapter(["a"])
    try:
        with torch.no_grad():
            h_merged = layer.base_layer(x)
            for node, where in ((Average("a", "b"), "average()"), (Fuse("a", "b", name="f"), "fuse()")):
                with pytest.raises(CompositionError, match=rf"'a' is merged .* in {re.escape(where)}; unmerge"):
                    run_node(node, layer, x, h_merged)
            # a merged adapter alone is the base with it folded in: nothing is added again
            torch.testing.assert_close(run_node("a", layer, x, h_merged), h_merged)
            with pytest.raises(CompositionError, match=r"'a' is merged .* in split\(\); unmerge"):
                run_node(Split("a", "b", splits=[1, 2]), layer, x, h_merged)
            # a stack adds what is not merged yet: b's change on top of the base with a folded in
            out = run_node(Stack("a", "b"), layer, x, h_merged)
            torch.testing.assert_close(out, h + _delta(layer, "a", x) + _delta(layer, "b", x), atol=1e-4, rtol=1e-4)
    finally:
        model.unmerge_adapter()


def test_a_fusion_without_weights_is_refused_where_its_members_act_and_skipped_where_they_do_not():
    model = lora_model(("a", "b"), spec='lora[r=4,init_weights=false,target_modules=["q_proj"]]')
    torch.manual_seed(2)
    model.add_adapter("c", 'lora[r=2,init_weights=false,target_modules=["v_proj"]]')
    model.add_fusion(Fuse("a", "b", name="f"))
    q_site = model.base_model.get_submodule(SITE)
    v_site = model.base_model.get_submodule(SITE.replace("q_proj", "v_proj"))
    assert "f" in q_site.fusions and "f" not in v_site.fusions
    with torch.no_grad():
        x, h = _site_input(v_site)
        assert run_node(Fuse("a", "b", name="f"), v_site, x, h) is h  # neither member acts here
        x, h = _site_input(q_site)
        with pytest.raises(CompositionError, match="fusion 'other' has no weights at a site where its members act"):
            run_node(Fuse("a", "b", name="other"), q_site, x, h)


def test_a_fusion_records_its_attention_weights_per_site_with_the_members_acting_there():
    model = lora_model(("a",), spec='lora[r=4,init_weights=false,target_modules=["q_proj"]]')
    torch.manual_seed(11)
    model.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")
    model.add_adapter("b", 'lora[r=4,init_weights=false,target_modules=["q_proj"]]')
    node = Fuse("a", "bn", "b", name="f")
    model.add_fusion(node)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, fusion_layer in model.base_model.named_modules():
            if type(fusion_layer).__name__ == "FusionLayer":
                for p in fusion_layer.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
    layer = model.base_model.get_submodule(SITE)
    fusion = layer.fusions["f"]
    assert fusion.member_index == [0, 2]  # the bottleneck does not act at q_proj
    x, h = _site_input(layer)
    with torch.no_grad(), model.capture_fusion_weights() as capture:
        out = run_node(node, layer, x, h)
        expected_out, expected_probs = fusion(h, [_delta(layer, "a", x), _delta(layer, "b", x)])
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    recorded = capture.weights["f"][fusion.site]
    assert fusion.site == SITE and recorded.members == ["a", "b"]
    torch.testing.assert_close(recorded.weights, expected_probs)
    assert not recorded.weights.requires_grad and recorded.weights.std() > 0.01
    with torch.no_grad():  # no capture open: nothing recorded, same output
        torch.testing.assert_close(run_node(node, layer, x, h), out)
    assert len(capture.calls) == 1


def _dora_delta(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """DoRA's change by hand: m / ||W + s B A||_row * (W + s B A) x - W x (no bias on Llama's projections)."""
    adapter = layer.adapters[name]
    weight = layer.base_layer.weight
    combined = weight + adapter.scale * adapter.lora_B @ adapter.lora_A
    scale = adapter.lora_magnitude_vector / combined.norm(dim=1)
    return x @ (scale[:, None] * combined).T - x @ weight.T


@pytest.fixture(scope="module")
def mixed():
    """LoRA a (all linear), a DoRA d and a rank-40 LoRA (above the width 32) on q_proj, and a parallel
    bottleneck with a LayerNorm after its branch (not additive; reads the MLP's input) at down_proj."""
    adapted = lora_model(("a",))
    torch.manual_seed(21)
    adapted.add_adapter("d", 'lora[r=4,init_weights=false,use_dora=true,target_modules=["q_proj"]]')
    with torch.no_grad():
        for _, layer in adapted.tuner_layers():
            if "d" in layer.adapters:
                layer.adapters["d"].lora_magnitude_vector.mul_(1.5)  # not the norm it starts from
    adapted.add_adapter("big", 'lora[r=40,init_weights=false,target_modules=["q_proj"]]')
    adapted.add_adapter("pbn", "par_bn[init_weights=false,ln_after=true,reduction_factor=4]")
    return adapted


def test_average_of_blocks_and_adapters_without_factors_is_the_weighted_sum_of_their_changes(mixed):
    layer = mixed.base_model.get_submodule(SITE)
    x, h = _site_input(layer)
    da, dbig, dd = _delta(layer, "a", x), _delta(layer, "big", x), _dora_delta(layer, "d", x)
    with torch.no_grad():
        torch.testing.assert_close(run_node("d", layer, x, h), h + dd, atol=1e-5, rtol=1e-5)
        out = run_node(Average(Stack("a", "big"), "d", weights=[1.0, 3.0]), layer, x, h)
        torch.testing.assert_close(out, h + 0.25 * (da + dbig) + 0.75 * dd, atol=1e-5, rtol=1e-5)
        out = run_node(Average("a", "d", "__base__"), layer, x, h)
        torch.testing.assert_close(out, h + (da + dd) / 3, atol=1e-5, rtol=1e-5)
        # a stack holding an adapter that does not act here, one without factors (DoRA rescales the output
        # it is given, so it goes first) and a nested block
        out = run_node(Stack("pbn", "d", Average("a", "big")), layer, x, h)
        torch.testing.assert_close(out, h + 0.5 * (da + dbig) + dd, atol=1e-5, rtol=1e-5)
        out = run_node(Stack("pbn", "a", "big"), layer, x, h)
        torch.testing.assert_close(out, h + da + dbig, atol=1e-5, rtol=1e-5)


def _branch(bottleneck, z: torch.Tensor) -> torch.Tensor:
    """A bottleneck's branch by hand (ReLU, no LayerNorm before it): up(relu(down(z))) * scaling."""
    return bottleneck.adapter_up(torch.relu(bottleneck.adapter_down(z))) * bottleneck.scaling


def _forward_seeing(model, node, site, mlp, batch: dict) -> dict[str, torch.Tensor]:
    """One forward with ``node`` active: the MLP's input, and the site's input and output (the test's own hooks)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, args: seen.update(mlp_in=args[0])),
             site.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))]
    try:
        with torch.no_grad():
            model.set_active(node)
            model(**batch)
    finally:
        model.set_active(None)
        for hook in hooks:
            hook.remove()
    return seen


def test_average_with_an_adapter_that_is_not_additive_takes_its_output_less_the_sites(mixed):
    """par_bn with ln_after reads the MLP's input (not down_proj's) and normalizes h + branch: its change is
    its output minus h, computed here from the MLP input captured by a hook of the test's own."""
    site = mixed.base_model.get_submodule("model.layers.0.mlp.down_proj")
    mlp = mixed.base_model.get_submodule("model.layers.0.mlp")
    assert not site.adapters["pbn"].additive
    seen = _forward_seeing(mixed, Average("a", "pbn", weights=[1.0, 3.0]), site, mlp, inputs(batch=2))
    with torch.no_grad():
        x = seen["x"]
        h = site.base_layer(x)
        pbn_out = h + site.adapters["pbn"].adapter_norm_after(_branch(site.adapters["pbn"], seen["mlp_in"]))
        assert (pbn_out - h).abs().mean() > 0.05
        expected = h + 0.25 * _delta(site, "a", x) + 0.75 * (pbn_out - h)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_forget_products_drops_the_kept_products_of_a_site():
    from peftkit.core.composition_exec import CACHE_KEY, forget_products

    model = lora_model(("a", "b"))
    layer = model.base_model.get_submodule(SITE)
    x, h = _site_input(layer)
    with torch.no_grad():
        first = run_node(Stack("a", "b"), layer, x, h)
    assert CACHE_KEY in layer.__dict__
    forget_products(layer)
    assert CACHE_KEY not in layer.__dict__
    forget_products(layer)  # nothing kept: nothing to drop
    with torch.no_grad():
        torch.testing.assert_close(run_node(Stack("a", "b"), layer, x, h), first)


def test_low_rank_blocks_in_training_apply_each_adapters_dropout():
    """With dropout active a LoRA's change is not its factors' product: a stack must not take the product path."""
    model = lora_model(("a", "b"), spec='lora[r=4,alpha=8,init_weights=false,dropout=0.5,target_modules="all-linear"]')
    layer = model.base_model.get_submodule(SITE)
    x, h = _site_input(layer)
    plain = h + _delta(layer, "a", x) + _delta(layer, "b", x)
    model.train()
    try:
        with torch.no_grad():
            torch.manual_seed(0)
            dropped = run_node(Stack("a", "b"), layer, x, h)
            torch.manual_seed(0)
            by_hand = run_node("b", layer, x, run_node("a", layer, x, h))
    finally:
        model.eval()
    assert (dropped - plain).abs().max() > 1e-2
    torch.testing.assert_close(dropped, by_hand)


def test_replaced_factors_are_not_served_from_the_kept_products():
    """Products are kept by the factors' identity and version; a factor replaced by another tensor of the same
    version (a load or a hot swap writing new Parameters) must be read again."""
    model = lora_model(("a", "b"))
    layer = model.base_model.get_submodule(SITE)
    x, h = _site_input(layer)
    with torch.no_grad():
        run_node(Stack("a", "b"), layer, x, h)  # kept
        for attr in ("lora_A", "lora_B"):
            old = getattr(layer.adapters["a"], attr)
            new = torch.nn.Parameter(torch.randn_like(old))
            while new._version < old._version:
                new.add_(0.0)
            assert new._version == old._version
            setattr(layer.adapters["a"], attr, new)
            out = run_node(Stack("a", "b"), layer, x, h)
            torch.testing.assert_close(out, h + _delta(layer, "a", x) + _delta(layer, "b", x), atol=1e-5, rtol=1e-5)


def test_split_spans_of_embeddings_and_of_adapters_reading_another_modules_input():
    model = lora_model(("a",))
    torch.manual_seed(12)
    model.add_adapter("e", 'lora[r=4,init_weights=false,target_modules=["embed_tokens"]]')
    model.add_adapter("pbn", "par_bn[init_weights=false,reduction_factor=4]")
    model.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")
    embed = model.base_model.get_submodule("model.embed_tokens")
    ids = torch.tensor([[3, 7, 11, 2, 5], [1, 4, 9, 8, 6]])  # 2-D token ids, a 3-D output
    with torch.no_grad():
        h = embed.base_layer(ids)
        out = run_node(Split("e", "a", splits=[2, 3]), embed, ids, h)
    lora = embed.adapters["e"]
    delta = lora.lora_embedding_A.t()[ids[:, :2]] @ lora.lora_embedding_B.T * lora.scale
    torch.testing.assert_close(out, torch.cat([h[:, :2] + delta, h[:, 2:]], dim=1), atol=1e-5, rtol=1e-5)

    down = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        hd = down.base_layer(x)
        # seq_bn reads only the output: a site input that is not a tensor passes through as it is
        out = run_node(Split("bn", "__base__", splits=[2, 3]), down, None, hd)
        branch = _branch(down.adapters["bn"], hd[:, :2])
        torch.testing.assert_close(out, torch.cat([hd[:, :2] + branch, hd[:, 2:]], dim=1), atol=1e-5, rtol=1e-5)
        for bad, what in ((x[:, :4], "input"), (None, "input of")):
            (source,) = down.input_sources.values()
            down.captured[source] = torch.randn(2, 4 if bad is None else 5, 32)
            try:
                with pytest.raises(CompositionError, match=rf"a layer's {what} .*has shape"):
                    run_node(Split("pbn", "a", splits=[2, 3]), down, x if bad is None else bad, hd)
            finally:
                down.captured.clear()
        with pytest.raises(CompositionError, match=r"a layer's output has shape \(2, 4, 32\)"):
            run_node(Split("pbn", "a", splits=[2, 3]), down, x[:, :4], hd[:, :4])

    # par_bn reads the MLP's input: each span gets its own span of it (captured by the test's own hook)
    mlp = model.base_model.get_submodule("model.layers.0.mlp")
    seen = _forward_seeing(model, Split("a", "pbn", splits=[2, 3]), down, mlp, inputs(batch=2, seq=5))
    with torch.no_grad():
        x = seen["x"]
        hd = down.base_layer(x)
        branch = _branch(down.adapters["pbn"], seen["mlp_in"][:, 2:])
        expected = torch.cat([hd[:, :2] + _delta(down, "a", x[:, :2]), hd[:, 2:] + branch], dim=1)
    assert branch.abs().mean() > 1e-3
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
    assert source not in down.captured or down.captured[source].shape[1] == 5  # the full input is put back


def test_row_and_token_splits_hand_each_group_its_part_of_captured_tensors_and_other_values_as_they_are():
    """Captured inputs of a layer (one per module an adapter reads): a tensor is cut like the output, by rows
    (a 1-D tensor too: its rows) or by token span (the tensors with tokens); a value that is not a tensor (None: its module ran with
    keywords only) passes as it is; afterwards every entry is put back whole. A 0-D tensor has no rows."""
    from peftkit import BatchSplit

    model = lora_model(("a",))
    torch.manual_seed(13)
    model.add_adapter("pbn", "par_bn[init_weights=false,reduction_factor=4]")
    down = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    (source,) = down.input_sources.values()
    x, src = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    per_row = torch.tensor([4.0, 6.0])
    with torch.no_grad():
        hd = down.base_layer(x)
        down.captured.update({source: src, "keywords.only": None, "per.row": per_row})
        try:
            by_rows = run_node(BatchSplit("pbn", "a", sizes=[1, 1]), down, x, hd)
            assert down.captured[source] is src and down.captured["per.row"] is per_row
            assert down.captured["keywords.only"] is None
            del down.captured["per.row"]  # a token split needs tokens on dimension 1 (tested elsewhere)
            by_tokens = run_node(Split("pbn", "a", splits=[2, 3]), down, x, hd)
            assert down.captured[source] is src and down.captured["keywords.only"] is None
            down.captured["per.row"] = torch.tensor(4.0)  # 0-D: no rows to hand out
            with pytest.raises(CompositionError, match=r"'per.row'.* leading dimension \(\) but the layer's output"):
                run_node(BatchSplit("pbn", "a", sizes=[1, 1]), down, x, hd)
        finally:
            down.captured.clear()
        bn = down.adapters["pbn"]
        rows = torch.cat([hd[:1] + _branch(bn, src[:1]), hd[1:] + _delta(down, "a", x[1:])])
        tokens = torch.cat([hd[:, :2] + _branch(bn, src[:, :2]), hd[:, 2:] + _delta(down, "a", x[:, 2:])], dim=1)
    assert (rows - hd).abs().mean() > 1e-3
    torch.testing.assert_close(by_rows, rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_tokens, tokens, atol=1e-5, rtol=1e-5)


def test_an_average_takes_a_union_of_dora_and_a_normalizing_bottleneck_as_its_output_less_h():
    """A union that is not additive (its bottleneck normalizes h + branch) adds its output less h; its DoRA
    part reads the base layer's weight, so the site's base layer must reach the union there."""
    model = lora_model(("a",))
    torch.manual_seed(17)
    model.add_adapter("u", 'lora[r=2,use_dora=true,init_weights=false,target_modules=["down_proj"]]'
                           '|seq_bn[ln_after=true,init_weights=false,reduction_factor=4]')
    down = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    union = down.adapters["u"]
    assert not union.additive and list(union.parts) == ["lora", "seq_bn"]
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        union.parts["lora"].lora_magnitude_vector.mul_(1.5)
        h = down.base_layer(x)
        dora, bottleneck = union.parts["lora"], union.parts["seq_bn"]
        weight = down.base_layer.weight
        combined = weight + dora.scale * dora.lora_B @ dora.lora_A
        after_dora = h + x @ ((dora.lora_magnitude_vector / combined.norm(dim=1))[:, None] * combined).T - x @ weight.T
        chained = bottleneck(x, after_dora, down.base_layer)
        assert (after_dora - h).abs().mean() > 1e-3 and (chained - after_dora).abs().mean() > 1e-2
        out = run_node(Average("a", "u", weights=[1.0, 3.0]), down, x, h)
    torch.testing.assert_close(out, h + 0.25 * _delta(down, "a", x) + 0.75 * (chained - h), atol=1e-5, rtol=1e-5)
