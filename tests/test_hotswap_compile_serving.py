"""A server's first requests to a torch.compile'd adapted model: the guide's hot-swap recipe
(load, prepare_for_hotswap, compile, serve, hotswap_adapter) in a fresh process.

Runs in a subprocess because what is checked depends on process-wide state that every earlier
forward of an adapter class fills in (a fresh server has run none): the compiled model must not
recompile on its second call, and under ``torch.no_grad()`` (inference) it must be as many graphs
as the compiled base model, not one graph per adapted layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_SERVER = r"""
import json, sys, torch
from torch._dynamo.testing import CompileCounterWithBackend
import peftkit
from tests.method_helpers import randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

folder = sys.argv[1]
torch.manual_seed(0)
for i, spec in enumerate(["lora[r=4,alpha=8]", "lora[r=8,alpha=3]"]):
    trained = peftkit.adapt(build_tiny("llama"), spec)
    randomize(trained, seed=i + 1)
    trained.save_adapter(f"{folder}/{i}")   # no forward has run in this process

inputs = sample_inputs("llama")
base_counter = CompileCounterWithBackend("aot_eager")
compiled_base = torch.compile(build_tiny("llama"), backend=base_counter)
with torch.no_grad():
    compiled_base(**inputs)

def serve(eager_first):
    model = peftkit.from_pretrained(build_tiny("llama"), f"{folder}/0")
    model.prepare_for_hotswap(target_rank=8)
    if eager_first:   # e.g. a check of the loaded model before compiling it
        with torch.no_grad():
            model(**inputs)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    counts = []
    with torch.no_grad():
        for _ in range(3):
            compiled(**inputs)
            counts.append(counter.frame_count)
        model.hotswap_adapter(f"{folder}/1")
        swapped = output_tensor(compiled(**inputs))
        counts.append(counter.frame_count)
    return counts, swapped


fresh = peftkit.from_pretrained(build_tiny("llama"), f"{folder}/1").eval()
report = {"base": base_counter.frame_count}
for eager_first in (False, True):   # the first: before any forward of a LoRA layer in this process
    counts, swapped = serve(eager_first)
    with torch.no_grad():
        expected = output_tensor(fresh(**inputs))
    report[str(eager_first)] = {"counts": counts, "error": (swapped - expected).abs().max().item()}
print(json.dumps(report))
"""


def test_compiled_server_neither_recompiles_nor_breaks_graphs(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _SERVER, str(tmp_path)], cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for eager_first in ("False", "True"):
        counts, error = report[eager_first]["counts"], report[eager_first]["error"]
        where = "after an eager forward" if eager_first == "True" else "compiled first"
        assert counts == [counts[0]] * 4, f"{where}: graphs after each call {counts} (a later call recompiled)"
        assert counts[0] == report["base"], f"{where}: {counts[0]} graphs against the base model's {report['base']}"
        assert error < 1e-5
