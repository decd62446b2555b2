"""Running compositions: stack/average semantics, and row splits (per-example routing,
batch_split, parallel) equal to separate runs, in inference and in training."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import Average, BatchSplit, CompositionError, Fuse, Parallel, Stack
from peftkit.core.composition_exec import run_node
from tests.composition_util import copy_adapter, inputs, logits, lora_model
from tests.tiny_models import build_tiny, sample_inputs

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    adapted = lora_model(("a", "b", "c"))
    torch.manual_seed(7)
    adapted.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")
    return adapted


@pytest.fixture(scope="module")
def batch():
    return inputs(batch=5)


@pytest.fixture(scope="module")
def single(model, batch):
    """Each adapter (and the base) alone on the whole batch."""
    out = {name: logits(model, batch, name) for name in ("a", "b", "c", "bn")}
    out["stack(a, bn)"] = logits(model, batch, Stack("a", "bn"))
    with model.disable_adapters():
        out["__base__"] = logits(model, batch, "a")
    model.set_active(None)
    return out


# -- stack and average ---------------------------------------------------------------------------


def test_average_of_two_identical_adapters_equals_one():
    model = lora_model(("a", "b"))
    copy_adapter(model, "a", "b")
    batch = inputs()
    one = logits(model, batch, "a")
    assert torch.allclose(logits(model, batch, Average("a", "b")), one, atol=ATOL)
    assert torch.allclose(logits(model, batch, Average("a", "b", weights=[3.0, 1.0])), one, atol=ATOL)


def test_average_weights_are_normalized_once():
    model = lora_model(("a", "halved"))
    copy_adapter(model, "a", "halved", scale_b=0.5)  # half's change is exactly half of a's
    batch = inputs()
    expected = logits(model, batch, "halved")
    assert torch.allclose(logits(model, batch, Average("a", "__base__")), expected, atol=ATOL)
    assert torch.allclose(logits(model, batch, Average("a", "__base__", weights=[5, 5])), expected, atol=ATOL)
    quarter = logits(model, batch, Average("a", "__base__", weights=[1, 3]))
    assert not torch.allclose(quarter, expected, atol=1e-4)


def test_stack_of_loras_equals_both_merged_into_the_base():
    model = lora_model(("a", "b"))
    batch = inputs()
    stacked = logits(model, batch, Stack("a", "b"))
    model.merge_adapter(["a", "b"])
    with model.disable_adapters():
        merged = logits(model, batch)
    model.unmerge_adapter()
    assert torch.allclose(stacked, merged, atol=ATOL)


def test_site_semantics_of_stack_and_average(model):
    """At one site: stack feeds each adapter the previous output; average mixes outputs."""
    site, layer = next((s, layer) for s, layer in model.tuner_layers() if "bn" in layer.adapters)
    torch.manual_seed(0)
    x = torch.randn(2, 3, layer.adapters["a"].in_features)
    h = layer.base_layer(x)
    base = layer.base_layer
    with torch.no_grad():
        after_a = layer.adapters["a"](x, h, base)
        stacked = layer.adapters["bn"](x, after_a, base)
        assert torch.allclose(run_node(Stack("a", "bn"), layer, x, h), stacked, atol=ATOL)
        mixed = 0.25 * layer.adapters["a"](x, h, base) + 0.75 * layer.adapters["bn"](x, h, base)
        assert torch.allclose(run_node(Average("a", "bn", weights=[1, 3]), layer, x, h), mixed, atol=ATOL)
        # the batched low-rank path equals adapter-by-adapter
        two = layer.adapters["b"](x, layer.adapters["a"](x, h, base), base)
        assert torch.allclose(run_node(Stack("a", "b"), layer, x, h), two, atol=ATOL)
        avg = 0.5 * layer.adapters["a"](x, h, base) + 0.5 * layer.adapters["b"](x, h, base)
        assert torch.allclose(run_node(Average("a", "b"), layer, x, h), avg, atol=ATOL)


# -- per-example routing --------------------------------------------------------------------------


@pytest.mark.parametrize("names", [
    ["a", "b", "__base__", "a", "c"],                 # interleaved: batched per-row factors
    ["a", "a", "b", "b", "__base__"],                 # contiguous: views in place
    ["a", "bn", "stack(a, bn)", "__base__", "b"],     # other methods and compositions per row
])
def test_routing_rows_equal_separate_runs(model, batch, single, names):
    out = logits(model, batch, None, adapter_names=names)
    for row, name in enumerate(names):
        assert torch.allclose(out[row], single[name][row], atol=ATOL), (row, name)


def test_routing_works_with_nothing_active_and_leaves_the_active_composition(model, batch, single):
    model.set_active(None)
    out = logits(model, batch, None, adapter_names=["b", "a", "a", "b", "a"])
    assert torch.allclose(out[0], single["b"][0], atol=ATOL)
    model.set_active("c")
    logits(model, batch, None, adapter_names=["a"] * 5)
    assert torch.allclose(logits(model, batch), single["c"], atol=ATOL)
    model.set_active(None)


def test_routing_errors(model, batch):
    with pytest.raises(peftkit.AdapterError, match="'zz', not on this model"):
        model(**batch, adapter_names=["zz"] * 5)
    with pytest.raises(CompositionError, match="4 entries for a batch of 5"):
        model(**batch, adapter_names=["a"] * 4)
    model.merge_adapter(["c"])
    try:
        with pytest.raises(CompositionError, match="merged into the base weights"):
            model(**batch, adapter_names=["a"] * 5)
    finally:
        model.unmerge_adapter()


def _row_weights(shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def _grads(model, names) -> dict[str, torch.Tensor]:
    return {f"{n}:{i}": p.grad.clone() for n in names for i, p in enumerate(model.adapter_parameters(n))
            if p.grad is not None}


@pytest.mark.parametrize("order", [["a", "b", "a", "b"], ["a", "a", "b", "b"]])
def test_routing_in_training_sends_each_adapter_only_its_rows_gradients(order):
    model = lora_model(("a", "b"))
    model.train_adapter(Stack("a", "b"))
    batch = inputs(batch=4)
    w = _row_weights(torch.Size([4, 6, 128]))
    model.zero_grad()
    (model(**batch, adapter_names=order).logits * w).sum().backward()
    routed = _grads(model, ["a", "b"])
    model.zero_grad()
    for name in ("a", "b"):
        rows = [i for i, n in enumerate(order) if n == name]
        model.set_active(name)
        sub = {k: v[rows] for k, v in batch.items()}
        (model(**sub).logits * w[rows]).sum().backward()
    separate = _grads(model, ["a", "b"])
    assert routed.keys() == separate.keys() and routed
    for key in routed:
        assert torch.allclose(routed[key], separate[key], atol=1e-4), key


# -- batch_split -------------------------------------------------------------------------------------


def test_batch_split_rows_equal_separate_runs(model, batch, single):
    out = logits(model, batch, BatchSplit("a", Stack("a", "bn"), "__base__", sizes=[2, 2, 1]))
    assert torch.allclose(out[:2], single["a"][:2], atol=ATOL)
    assert torch.allclose(out[2:4], single["stack(a, bn)"][2:4], atol=ATOL)
    assert torch.allclose(out[4:], single["__base__"][4:], atol=ATOL)


def test_batch_split_sizes_are_checked_before_the_forward(model, batch):
    model.set_active(BatchSplit("a", "b", sizes=[2, 2]))
    with pytest.raises(CompositionError, match="splits 4 rows but the batch has 5"):
        model(**batch)
    model.set_active(None)


def test_batch_split_training_gradients():
    model = lora_model(("a", "b"))
    model.train_adapter(BatchSplit("a", "b", sizes=[1, 2]))
    batch = inputs(batch=3)
    w = _row_weights(torch.Size([3, 6, 128]))
    model.zero_grad()
    (model(**batch).logits * w).sum().backward()
    split = _grads(model, ["a", "b"])
    model.zero_grad()
    for name, rows in (("a", [0]), ("b", [1, 2])):
        model.set_active(name)
        (model(**{k: v[rows] for k, v in batch.items()}).logits * w[rows]).sum().backward()
    separate = _grads(model, ["a", "b"])
    for key in split:
        assert torch.allclose(split[key], separate[key], atol=1e-4), key


# -- parallel ---------------------------------------------------------------------------------------------


def test_parallel_outputs_equal_separate_runs(model, batch, single):
    model.set_active(Parallel("a", "bn", Stack("a", "bn"), "__base__"))
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape[0] == 4 * 5
    parts = model.split_parallel(output)
    for part, name in zip(parts, ("a", "bn", "stack(a, bn)", "__base__")):
        assert torch.allclose(part.logits, single[name], atol=ATOL), name
    assert torch.equal(peftkit.split_parallel(output.logits, 4)[1], parts[1].logits)
    model.set_active(None)


def test_parallel_with_labels_trains_every_child():
    model = lora_model(("a", "b"))
    model.train_adapter(Parallel("a", "b"))
    batch = inputs(batch=2)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n in "ab" for p in model.adapter_parameters(n))


def test_parallel_needs_the_adapted_model_call(model, batch):
    model.set_active(Parallel("a", "b"))
    with pytest.raises(CompositionError, match="runs only through the AdaptedModel"):
        with torch.no_grad():
            model.base_model(**batch)
    model.set_active(None)


def test_parallel_and_routing_generate_like_separate_runs():
    model = lora_model(("a", "b"))
    prompt = sample_inputs("llama", batch=2, seq=4)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.set_active("a")
    alone_a = model.generate(**prompt, **kwargs)
    model.set_active("b")
    alone_b = model.generate(**prompt, **kwargs)
    model.set_active(Parallel("a", "b"))
    both = model.generate(**prompt, **kwargs)
    gen_a, gen_b = model.split_parallel(both)
    assert torch.equal(gen_a, alone_a) and torch.equal(gen_b, alone_b)
    model.set_active(None)
    routed = model.generate(**prompt, adapter_names=["b", "a"], **kwargs)
    assert torch.equal(routed[0], alone_b[0]) and torch.equal(routed[1], alone_a[1])


# -- task heads (modules_to_save) follow the rows ------------------------------------------------------------


def test_rows_use_their_own_adapter_head():
    model = peftkit.AdaptedModel(build_tiny("bert"))
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        model.add_adapter(name, 'lora[r=2,init_weights=false,target_modules=["query","value"]]')
        with torch.no_grad():
            for p in model.base_model.classifier.copies[name].parameters():
                p.add_(torch.randn_like(p))
    model.eval()
    batch = sample_inputs("bert", batch=4)
    a, b = logits(model, batch, "a"), logits(model, batch, "b")
    out = logits(model, batch, None, adapter_names=["b", "a", "a", "b"])
    assert torch.allclose(out[[1, 2]], a[[1, 2]], atol=ATOL) and torch.allclose(out[[0, 3]], b[[0, 3]], atol=ATOL)
    split = logits(model, batch, BatchSplit("a", "b", sizes=[1, 3]))
    assert torch.allclose(split[:1], a[:1], atol=ATOL) and torch.allclose(split[1:], b[1:], atol=ATOL)
    model.set_active(Parallel("a", "b"))
    with torch.no_grad():
        pa, pb = model.split_parallel(model(**batch).logits)
    assert torch.allclose(pa, a, atol=ATOL) and torch.allclose(pb, b, atol=ATOL)


def test_fused_rows(model, batch):
    model.add_fusion(Fuse("a", "bn", name="a_bn"))
    try:
        fused = logits(model, batch, Fuse("a", "bn", name="a_bn"))
        out = logits(model, batch, None, adapter_names=["a", 'fuse(a, bn, name="a_bn")'] * 2 + ["b"])
        assert torch.allclose(out[1], fused[1], atol=ATOL) and torch.allclose(out[3], fused[3], atol=ATOL)
    finally:
        model.set_active(None)
        model.delete_fusion("a_bn")


def test_routing_and_parallel_survive_activation_checkpointing():
    """Checkpointed layers run again inside backward(): they must see the same row split."""
    batch = inputs(batch=4)
    w = _row_weights(torch.Size([4, 6, 128]))
    results = []
    for checkpointing in (False, True):
        model = lora_model(("a", "b"))
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.train_adapter(Stack("a", "b"))
        (model(**batch, adapter_names=["a", "b", "b", "a"]).logits * w).sum().backward()
        routed = _grads(model, ["a", "b"])
        model.zero_grad()
        model.set_active(Parallel("a", "b"))
        (model(**batch).logits[:4] * w).sum().backward()  # only copy 0 (adapter a) has a loss
        parallel = _grads(model, ["a", "b"])
        results.append((routed, parallel))
        assert all(p.abs().sum() == 0 for k, p in parallel.items() if k.startswith("b:"))
    for before, after in zip(*results):
        assert before.keys() == after.keys()
        for key in before:
            assert torch.allclose(before[key], after[key], atol=1e-5), key
