"""A serving engineer's compiled model running compositions and mixed batches under torch.no_grad():
one graph as for the base model (products of factors kept between eager calls are not looked up
inside a compiled graph), the same outputs as eager."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import Average, Stack
from tests.method_helpers import randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

ROWS = ["a", "c", "__base__", "a"]


def _served() -> peftkit.AdaptedModel:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]", "a")
    model.add_adapter("c", "lora[r=2,target_modules=[q_proj,v_proj,o_proj]]")
    for seed, name in enumerate(("a", "c")):
        randomize(model, name, seed=seed + 1)
    return model.eval()


def _graphs(module: torch.nn.Module, runs: list[dict]) -> tuple[int, list[torch.Tensor]]:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter)
    with torch.no_grad():
        outputs = [output_tensor(compiled(**kwargs)) for kwargs in runs]
    return counter.frame_count, outputs


@pytest.mark.parametrize("active,rows", [(Stack("a", "c"), None), (Average("a", "c"), None), ("a", ROWS)])
def test_compiled_compositions_are_one_graph(active, rows) -> None:
    inputs = sample_inputs("llama", batch=len(ROWS))
    base_graphs, _ = _graphs(build_tiny("llama"), [inputs])
    model = _served()
    model.set_active(active)
    kwargs = dict(inputs, adapter_names=rows) if rows else inputs
    with torch.no_grad():
        expected = output_tensor(model(**kwargs))   # an eager call first keeps its products on the layers
    graphs, outputs = _graphs(model, [kwargs, kwargs])
    assert graphs == base_graphs
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_each_new_list_of_names_compiles_one_graph_and_a_known_list_reuses_it() -> None:
    inputs = sample_inputs("llama", batch=len(ROWS))
    model = _served()
    lists = [ROWS, ["c", "c", "a", "__base__"], ROWS, ["c", "c", "a", "__base__"]]
    runs = [dict(inputs, adapter_names=rows) for rows in lists]
    with torch.no_grad():
        expected = [output_tensor(model(**kwargs)) for kwargs in runs]
    graphs, outputs = _graphs(model, runs)
    assert graphs == 2
    for output, wanted in zip(outputs, expected):
        torch.testing.assert_close(output, wanted, atol=1e-5, rtol=1e-5)
