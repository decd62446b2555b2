"""Every built-in method compiles as one graph: ``torch.compile(model)`` traces the adapted model's training step
(forward and backward, through AOTAutograd) and its inference forward into one graph, without a graph break, and
the compiled model gives eager's outputs and gradients. Compositions of two LoRA adapters (and per-row routing)
trace as one graph too.

A graph break makes a compiled model fall back to Python between graphs at every adapted layer (DoRA's kept
norms, SHiRA's kept mask, FourierFT's sites and trainable tokens' selected positions once broke the graph 4 to
34 times in a Llama's forward, GraLoRA's in-place update failed in AOTAutograd), and ``fullgraph=True`` refuses
such a model. The graphs are counted under the default settings: with ``fullgraph=True`` dynamo captures a
``nonzero()`` it otherwise breaks the graph at, so a model can pass fullgraph and still break by default.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import peftkit
from peftkit.testing import randomize
from peftkit.testing_models import build_tiny, output_tensor, sample_inputs, with_bias_noise
from tests.test_conformance import BUILTIN_SPECS

#: The built-in specs on the tiny Llama, with one decoder layer (bitfit without add_missing adapts biases, and the
#: Llama has none).
SPECS = {key: spec for key, spec in BUILTIN_SPECS.items() if key != "bitfit"}
#: Paths the conformance specs do not take: LoRA's node drawing its dropout, DoRA with dropout (unfused),
#: GraLoRA without the hybrid part (its own training node).
SPECS |= {"lora_dropout": "lora[dropout=0.1]", "dora_dropout": "lora[use_dora=true,dropout=0.1]",
          "gralora_blocks_only": "gralora[r=4,alpha=8]"}
#: Specs torch itself cannot trace whole: dynamo does not trace torch's LSTM module (PEFT's P-tuning with an
#: LSTM encoder breaks the graph alike); the model still compiles, in several graphs.
TORCH_BREAKS = {"p_tuning_lstm"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each model compiled from scratch: the tiny models share their forward's code, whose recompilations
    dynamo counts across tests (it falls back to eager past its limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _one_layer_llama() -> torch.nn.Module:
    """The tiny Llama with one decoder layer: dynamo's tracing time grows with the layers, and one layer holds
    every kind of adapted site."""
    tiny = build_tiny("llama")
    config = copy.deepcopy(tiny.config)
    config.num_hidden_layers = 1
    config.layer_types = config.layer_types[:1] if getattr(config, "layer_types", None) else None
    torch.manual_seed(0)
    return with_bias_noise(type(tiny)(config).eval())


class _OneGraph:
    """``torch.compile(model)`` with the default settings users run (no fullgraph: with ``fullgraph=True`` dynamo
    captures a ``nonzero()`` that it otherwise breaks the graph at), counting the graphs dynamo hands to
    ``aot_eager`` (which traces forward and backward with AOTAutograd and runs eager kernels: the test checks the
    tracing, not a compiler's code)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counter = CompileCounterWithBackend("aot_eager")
        self.compiled = torch.compile(model, backend=self.counter)

    def __call__(self, **inputs: Any) -> Any:
        return self.compiled(**inputs)

    def graphs(self) -> int:
        return self.counter.frame_count


def _adapted(spec: str) -> tuple[peftkit.AdaptedModel, dict[str, Any]]:
    torch.manual_seed(0)
    model = peftkit.adapt(_one_layer_llama(), spec)
    randomize(model, "default")
    return model, sample_inputs("llama")


def _loss_and_grads(model: Any, inputs: dict[str, Any], params: list[torch.nn.Parameter]
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout draws (ReFT's units drop out their new states in training)
    loss = output_tensor(model(**inputs)).float().pow(2).mean()
    return loss.detach(), list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("key", sorted(SPECS))
def test_a_training_step_compiles_as_one_graph_with_eagers_gradients(key):
    model, inputs = _adapted(SPECS[key])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    want_loss, want_grads = _loss_and_grads(model, inputs, params)
    compiled = _OneGraph(model)
    got_loss, got_grads = _loss_and_grads(compiled, inputs, params)
    assert (compiled.graphs() == 1) == (key not in TORCH_BREAKS), f"{key}: {compiled.graphs()} graphs"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for param, got, want in zip(params, got_grads, want_grads):
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{key}: {m}")
        assert got.shape == param.shape


@pytest.mark.parametrize("key", sorted(SPECS))
def test_an_inference_forward_compiles_as_one_graph_with_eagers_outputs(key):
    model, inputs = _adapted(SPECS[key])
    model.eval()
    compiled = _OneGraph(model)
    with torch.no_grad():
        want = output_tensor(model(**inputs))
        got = output_tensor(compiled(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (compiled.graphs() == 1) == (key not in TORCH_BREAKS), f"{key}: {compiled.graphs()} graphs"


def test_a_method_torch_cannot_trace_whole_breaks_the_graph_at_torchs_lstm():
    """TORCH_BREAKS holds only what torch itself breaks on: with fullgraph=True the LSTM encoder is refused (when
    torch learns to trace it, this fails and the spec joins the others)."""
    model, inputs = _adapted(SPECS["p_tuning_lstm"])
    model.train()
    with pytest.raises(Exception, match="(?i)lstm"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)


@pytest.mark.parametrize("composition", ["stack(a, b)", "average(a, b)", "parallel(a, b)",
                                         "batch_split(a, b, sizes=[1, 1])", "routed"])
def test_compositions_compile_as_one_graph_with_eagers_outputs(composition):
    """Two LoRA adapters composed (or routed per row with ``adapter_names=``) trace as one graph too: the
    kept products of their factors are built inside the graph under torch.compile."""
    torch.manual_seed(0)
    model = peftkit.adapt(_one_layer_llama(), "lora[r=4]", "a")
    model.add_adapter("b", "lora[r=4,target_modules=all-linear]")
    randomize(model, "a")
    randomize(model, "b", seed=1)
    model.eval()
    inputs = sample_inputs("llama")
    if composition == "routed":
        model.set_active("a")
        inputs = {**inputs, "adapter_names": ["b", "a"]}
    else:
        model.set_active(composition)
    compiled = _OneGraph(model)
    with torch.no_grad():
        want = output_tensor(model(**inputs))
        got = output_tensor(compiled(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert compiled.graphs() == 1
