"""Per-row routing values (core/composition_exec.py): which rows run which node, how a plan
expands for generate()'s repeated rows, which zero slot rows without an adapter here take, and
how a task head saved per adapter (modules_to_save) runs each group of rows on its own copy,
compared with each copy run by hand on its own rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import CompositionError, Stack
from peftkit.core.composition_exec import RowPlan, run_copies


def test_a_plan_gives_each_distinct_node_one_slot_and_the_base_none():
    plan = RowPlan.from_entries(["b", "a", "__base__", "b", Stack("a", "b")])
    assert plan.nodes == ["b", "a", Stack("a", "b")]
    assert plan.row_slot == [0, 1, -1, 0, 2]
    assert plan.rows == 5 and not plan.all_leaves
    sized = RowPlan.from_sizes(["a", "__base__", "b"], [2, 1, 3])
    assert sized.nodes == ["a", "b"] and sized.row_slot == [0, 0, -1, 1, 1, 1] and sized.all_leaves


def test_a_plan_repeats_each_row_in_place_for_a_multiple_of_its_rows():
    """generate() with beams or samples repeats every row k times next to itself."""
    plan = RowPlan.from_entries(["a", "__base__", "b"])
    assert plan.for_rows(3) is plan
    tripled = plan.for_rows(9)
    assert tripled.nodes == plan.nodes
    assert tripled.row_slot == [0, 0, 0, -1, -1, -1, 1, 1, 1] and tripled.rows == 9
    assert plan.for_rows(9) is tripled  # kept: its index tensors are built once per shape
    assert plan.for_rows(6).row_slot == [0, 0, -1, -1, 1, 1]
    for rows in (4, 2, 1):
        with pytest.raises(CompositionError, match=f"has {rows} rows but the composition routes 3 rows"):
            plan.for_rows(rows)
    with pytest.raises(CompositionError, match="routes 0 rows"):
        RowPlan([], []).for_rows(2)


def test_the_zero_slot_is_taken_by_the_base_and_by_nodes_not_acting_here():
    plan = RowPlan.from_entries(["c", "a", "__base__", Stack("a", "b"), "b", "a"])
    dev = plan.on(torch.device("cpu"))
    assert plan.on(torch.device("cpu")) is dev
    # present here: b then a; c does not act at this site, a stack takes the general path
    index = dev.stacked_index(("b", "a"))
    assert index.tolist() == [2, 1, 2, 2, 0, 1]
    assert index.dtype == torch.long
    assert dev.stacked_index(("b", "a")) is index  # built once per set of adapters present
    assert dev.stacked_index(("a",)).tolist() == [1, 0, 1, 1, 1, 0]


def test_row_groups_are_slices_when_contiguous_and_the_inverse_restores_the_order():
    plan = RowPlan.from_entries(["a", "a", "b", "a", "__base__"])
    dev = plan.on(torch.device("cpu"))
    slots = [slot for slot, _ in dev.groups]
    assert slots == [0, 1, -1]
    (_, rows_a), (_, rows_b), (_, rows_base) = dev.groups
    assert isinstance(rows_a, torch.Tensor) and rows_a.tolist() == [0, 1, 3]
    assert rows_b == slice(2, 3) and rows_base == slice(4, 5)
    assert not dev.in_order
    flat = torch.tensor([0, 1, 3, 2, 4])
    assert torch.equal(flat[dev.inverse], torch.arange(5))
    assert plan.on(torch.device("cpu")).row_slot.tolist() == [0, 0, 1, 0, 2]  # the base's slot is len(nodes)
    ordered = RowPlan.from_entries(["a", "a", "__base__", "b"]).on(torch.device("cpu"))
    assert ordered.in_order is True and ordered.inverse is None
    assert [sel for _, sel in ordered.groups] == [slice(0, 2), slice(2, 3), slice(3, 4)]


class Scaled(nn.Module):
    """A stand-in task head: ``x * factor + bias + shift`` (``bias`` a per-feature tensor argument that
    is not split by rows, ``shift`` a keyword tensor with one value per row)."""

    def __init__(self, factor: float, width: int = 3) -> None:
        super().__init__()
        self.factor = factor
        self.width = width
        self.calls: list[int] = []

    def forward(self, x, bias, scalar, flag, *, shift, weight, offset, label=None):
        assert bias.shape == (4,) and scalar.dim() == 0 and flag == "keep" and weight.shape == (4,)
        assert shift.shape[0] == x.shape[0] and offset.dim() == 0
        self.calls.append(x.shape[0])
        out = x * self.factor + bias + scalar + shift[:, None] * weight + offset
        return out[:, : self.width]


class Wrapper(nn.Module):
    def __init__(self, original: nn.Module, copies: dict[str, nn.Module]) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict(copies)


OFFSET = torch.tensor(-0.5)  # a 0-d keyword tensor: passed whole


def _by_hand(module: Scaled, x, bias, scalar, shift, weight):
    return (x * module.factor + bias + scalar + shift[:, None] * weight + OFFSET)[:, : module.width]


def _call(plan_entries, wrapper, active, x, bias, scalar, shift, weight):
    return run_copies(RowPlan.from_entries(plan_entries), wrapper, active, (x, bias, scalar, "keep"),
                      {"shift": shift, "weight": weight, "offset": OFFSET, "label": None})


def test_each_group_of_rows_runs_its_own_adapters_copy_with_only_its_rows_split():
    torch.manual_seed(0)
    rows = 5
    x, shift = torch.randn(rows, 4), torch.randn(rows)
    bias, weight, scalar = torch.randn(4), torch.randn(4), torch.tensor(0.25)  # 4 != rows: never split
    original, copy_a, copy_b = Scaled(1.0), Scaled(2.0), Scaled(-3.0)
    wrapper = Wrapper(original, {"a": copy_a, "b": copy_b})
    out = _call(["b", "a", "__base__", "b", "a"], wrapper, ["a"], x, bias, scalar, shift, weight)
    expected = torch.empty(rows, 3)
    for module, picked in ((copy_b, [0, 3]), (copy_a, [1, 4]), (original, [2])):
        expected[picked] = _by_hand(module, x[picked], bias, scalar, shift[picked], weight)
    torch.testing.assert_close(out, expected)
    assert copy_a.calls == [2] and copy_b.calls == [2] and original.calls == [1]


def test_rows_of_an_adapter_without_a_copy_use_the_first_active_adapters_copy_else_the_original():
    torch.manual_seed(1)
    x, shift, bias, weight, scalar = torch.randn(3, 4), torch.randn(3), torch.randn(4), torch.randn(4), torch.tensor(1.5)
    original, copy_a, copy_b = Scaled(1.0), Scaled(2.0), Scaled(5.0)
    wrapper = Wrapper(original, {"a": copy_a, "b": copy_b})
    # "c" keeps no copy: its rows use the first active adapter that has one (b; "c" itself has none)
    out = _call(["c", "a", "c"], wrapper, ["c", "b", "a"], x, bias, scalar, shift, weight)
    expected = torch.empty(3, 3)
    expected[[0, 2]] = _by_hand(copy_b, x[[0, 2]], bias, scalar, shift[[0, 2]], weight)
    expected[[1]] = _by_hand(copy_a, x[[1]], bias, scalar, shift[[1]], weight)
    torch.testing.assert_close(out, expected)
    # no active adapter keeps a copy: the original head, called once for every row with every argument
    lone = Wrapper(Scaled(-1.0), {})
    out = _call(["c", "__base__", "d"], lone, ["c"], x, bias, scalar, shift, weight)
    torch.testing.assert_close(out, _by_hand(lone.original_module, x, bias, scalar, shift, weight))
    assert lone.original_module.calls == [3]
    out = _call(["c", "c", "c"], lone, ["c"], x, bias, scalar, shift, weight)  # one group of rows
    torch.testing.assert_close(out, _by_hand(lone.original_module, x, bias, scalar, shift, weight))


def test_the_rows_are_counted_on_the_first_tensor_with_a_batch_dimension():
    torch.manual_seed(2)
    x = torch.randn(2, 4)
    labels = torch.tensor([3.0, -1.0])  # 1-D: one value per row, it counts the rows
    calls = []

    class Head(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, scalar, number, labels, table, x):
            calls.append((scalar.dim(), number, labels.shape[0], table.shape[0], x.shape[0]))
            return x * self.factor + labels[:, None] + scalar + table.sum()

    wrapper = Wrapper(Head(1.0), {"a": Head(2.0), "b": Head(3.0)})
    table = torch.randn(4, 1)  # 4 rows, not the batch's: passed whole to every group
    out = run_copies(RowPlan.from_entries(["a", "b"]), wrapper, ["a"], (torch.tensor(0.5), 7, labels, table, x), {})
    expected = torch.stack([x[0] * 2.0 + labels[0] + 0.5, x[1] * 3.0 + labels[1] + 0.5]) + table.sum()
    torch.testing.assert_close(out, expected)
    assert calls == [(0, 7, 1, 4, 1), (0, 7, 1, 4, 1)]
    # no tensor with a batch dimension at all: nothing to split, the caller runs the module as usual
    assert run_copies(RowPlan.from_entries(["a", "b"]), wrapper, ["a"], (torch.tensor(0.5), 7), {"k": 1}) is None
    # rows that the plan cannot route here (not batch-first): the caller's plain choice
    assert run_copies(RowPlan.from_entries(["a", "b"]), wrapper, ["a"], (torch.randn(3, 4),), {}) is None


def test_heads_of_different_widths_are_refused_naming_each_group():
    torch.manual_seed(3)
    x, shift, bias, weight, scalar = torch.randn(3, 4), torch.randn(3), torch.randn(4), torch.randn(4), torch.tensor(0.0)
    wrapper = Wrapper(Scaled(1.0, width=3), {"a": Scaled(2.0, width=2), "b": Scaled(1.0, width=3)})
    with pytest.raises(CompositionError) as info:
        _call(["a", "__base__", "a"], wrapper, ["b"], x, bias, scalar, shift, weight)
    assert "(a: (2,), __base__: (3,))" in str(info.value)

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(CompositionError, match="Pair returns tuple"):
        run_copies(RowPlan.from_entries(["a", "__base__"]), Wrapper(Pair(), {"a": Pair()}), ["a"], (x[:2],), {})


# -- rows routed at one site of a model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def routed():
    """q_proj holds a (rank 4) and big (rank 40, above the width 32); c acts only at k_proj; a bottleneck
    (no low-rank factors) sits at down_proj; e is a LoRA of the token embeddings."""
    from .composition_util import lora_model

    model = lora_model(("a",))
    torch.manual_seed(31)
    model.add_adapter("big", 'lora[r=40,init_weights=false,target_modules=["q_proj"]]')
    model.add_adapter("c", 'lora[r=2,init_weights=false,target_modules=["k_proj"]]')
    model.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")
    model.add_adapter("e", 'lora[r=4,init_weights=false,target_modules=["embed_tokens"]]')
    return model


def _lora_delta(layer, name, x):
    a, b, scale = layer.adapters[name].low_rank()
    return (x.float() @ a.T) @ b.T * scale


ENTRIES = ["big", "a", "__base__", "c", "a", "big"]


def _expected_rows(layer, x, h):
    out = h.float().clone()
    for row, name in enumerate(ENTRIES):
        if name in ("a", "big"):
            out[row] += _lora_delta(layer, name, x[row:row + 1])[0]
    return out


def _site(model, dtype=torch.float32):
    layer = model.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    torch.manual_seed(5)
    x = torch.randn(len(ENTRIES), 3, 32)
    with torch.no_grad():
        h = layer.base_layer(x)
    return layer, x.to(dtype), h.to(dtype)


def test_routed_rows_of_low_rank_adapters_of_different_ranks_add_each_rows_own_change(routed):
    from peftkit.core.composition_exec import Routing

    layer, x, h = _site(routed)
    expected = _expected_rows(layer, x, h)
    with torch.no_grad():
        out = Routing(ENTRIES).run(layer, x, h.clone())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # recording gradients: the same values, and the site's output h is left as it was
    kept = h.clone()
    out = Routing(ENTRIES).run(layer, x, h)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(h, kept)
    # h not contiguous (a transposed buffer): the change is still added
    buffer = h.detach().permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not buffer.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(Routing(ENTRIES).run(layer, x, buffer), expected, atol=1e-5, rtol=1e-5)
    # generate() repeating each row twice in place
    with torch.no_grad():
        doubled = Routing(ENTRIES).run(layer, x.repeat_interleave(2, 0), h.repeat_interleave(2, 0))
    torch.testing.assert_close(doubled, expected.repeat_interleave(2, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routed_rows_in_half_precision_add_the_float32_change_cast_to_the_output_dtype(routed, dtype):
    from peftkit.core.composition_exec import Routing

    layer, x, h = _site(routed, dtype)
    with torch.no_grad():
        out = Routing(ENTRIES).run(layer, x, h.clone())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), _expected_rows(layer, x, h).to(dtype).float(), atol=3e-2, rtol=1e-2)


def _seq_bn_site(model, seed: int):
    """down_proj of layer 0, an input of 3 rows, its output h, and h with the seq_bn's branch added by hand
    (seq_bn reads the output: h + up(relu(down(h))) * scaling)."""
    layer = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    torch.manual_seed(seed)
    x = torch.randn(3, 2, 64)
    with torch.no_grad():
        h = layer.base_layer(x)
        bn = layer.adapters["bn"]
        branch = bn.adapter_up(torch.relu(bn.adapter_down(h))) * bn.scaling
    assert branch.abs().mean() > 1e-3
    return layer, x, h, h + branch


def test_routed_rows_of_an_adapter_without_factors_take_the_general_path(routed):
    from peftkit.core.composition_exec import Routing

    layer, x, h, with_bn = _seq_bn_site(routed, seed=6)
    with torch.no_grad():
        out = Routing(["bn", "__base__", "a"]).run(layer, x, h.clone())
    torch.testing.assert_close(out[0], with_bn[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], h[1])
    torch.testing.assert_close(out[2], h[2] + _lora_delta(layer, "a", x[2:3])[0], atol=1e-5, rtol=1e-5)


def test_routed_token_ids_of_an_embedding_lora_and_inputs_that_are_not_batch_first(routed):
    from peftkit.core.composition_exec import Routing

    layer = routed.base_model.get_submodule("model.embed_tokens")
    ids = torch.tensor([3, 7, 11])  # one token per row: a 1-D input
    with torch.no_grad():
        h = layer.base_layer(ids)
        out = Routing(["e", "__base__", "e"]).run(layer, ids, h.clone())
    lora = layer.adapters["e"]
    delta = lora.lora_embedding_A.t()[ids] @ lora.lora_embedding_B.T * lora.scale
    torch.testing.assert_close(out, h + delta * torch.tensor([1.0, 0.0, 1.0])[:, None], atol=1e-5, rtol=1e-5)
    q_proj = routed.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    with pytest.raises(CompositionError, match=r"input has leading dimension \(3,\) but its output has 2 rows"):
        Routing(["a", "big"]).run(q_proj, torch.randn(3, 32), torch.randn(2, 32))


def test_rows_all_of_one_node_or_of_adapters_without_factors_and_inputs_that_are_not_tensors(routed):
    from peftkit.core.composition_exec import Routing

    layer, x, h, with_bn = _seq_bn_site(routed, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(Routing(["bn"] * 3).run(layer, x, h.clone()), with_bn, atol=1e-5, rtol=1e-5)
        out = Routing(["bn", "__base__", "bn"]).run(layer, x, h.clone())
        torch.testing.assert_close(out, torch.stack([with_bn[0], h[1], with_bn[2]]), atol=1e-5, rtol=1e-5)
        # a site input that is not a tensor reaches the adapters as it is (seq_bn reads only the output)
        out = Routing(["bn", "__base__", "bn"]).run(layer, None, h.clone())
        torch.testing.assert_close(out, torch.stack([with_bn[0], h[1], with_bn[2]]), atol=1e-5, rtol=1e-5)
        q_proj = routed.base_model.get_submodule("model.layers.0.self_attn.q_proj")
        xq = torch.randn(2, 3, 32)
        hq = q_proj.base_layer(xq)
        both = Stack("a", "big")
        expected = hq + _lora_delta(q_proj, "a", xq) + _lora_delta(q_proj, "big", xq)
        torch.testing.assert_close(Routing([both, both]).run(q_proj, xq, hq.clone()), expected, atol=1e-5, rtol=1e-5)


def test_captured_inputs_must_have_the_rows_of_the_output():
    """An adapter reading another module's input (par_bn) gets that input's rows: its leading dimension is
    checked against the output's rows (1-D captured values with the right rows pass)."""
    from peftkit.core.composition_exec import Routing

    from .composition_util import lora_model

    model = lora_model(("a",))
    torch.manual_seed(8)
    model.add_adapter("pbn", "par_bn[init_weights=false,reduction_factor=4]")
    layer = model.base_model.get_submodule("model.layers.0.mlp.down_proj")
    (source,) = layer.input_sources.values()
    x = torch.randn(3, 2, 64)
    with torch.no_grad():
        h = layer.base_layer(x)
        layer.captured[source] = torch.randn(5, 2, 32)
        try:
            with pytest.raises(CompositionError, match=rf"the input of '{source}', which an adapter reads, has "
                                                       r"leading dimension \(5,\) but the layer's output has 3"):
                Routing(["a", "pbn", "a"]).run(layer, x, h)
            layer.captured[source] = torch.randn(3)
            out = Routing(["a", "__base__", "a"]).run(layer, x, h.clone())
        finally:
            layer.captured.clear()
    expected = h.clone()
    expected[[0, 2]] += _lora_delta(layer, "a", x[[0, 2]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
