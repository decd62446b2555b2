"""What the FSDP tests run in two processes (``torchrun ... tests/fsdp_runs.py RUNS.json``), so that they
start the processes and import torch once for several runs.

RUNS.json holds ``{"model": ..., "data": ..., "runs": [{"method": ..., "out": ..., "options": {...}}],
"composition": FILE or null}``: every run calls :func:`peftkit.train` on the causal-lm task with its
options; with ``composition``, the main process writes to FILE how far the outputs of composition
blocks and per-row routing on the sharded model are from those on the same model before sharding.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def train_runs(spec: dict) -> None:
    import peftkit

    for run in spec["runs"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the local-folder base model note, said once per run
            peftkit.train(spec["model"], run["method"], spec["data"], task="causal-lm", out=run["out"],
                          **run["options"])


def composition_distances(out: Path) -> None:
    """Three adapters on the tiny Llama, run as stack, parallel, average, batch split and routed rows,
    before and after :func:`peftkit.training_fsdp.shard_base`."""
    import torch
    import torch.distributed as dist

    import peftkit
    from peftkit.core import composition
    from peftkit.training_fsdp import shard_base
    from tests.tiny_models import build_tiny

    torch.manual_seed(0)
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,init_weights=false]", "a")
    model.add_adapter("b", "seq_bn")
    model.add_adapter("c", "lora[r=2,init_weights=false]")
    model.eval()
    ids = torch.randint(1, 128, (4, 6))
    blocks = {"stack": composition.Stack("a", "b"), "parallel": composition.Parallel("a", "c"),
              "average": composition.Average("a", "c"), "batch_split": composition.BatchSplit("a", "c", sizes=[2, 2])}

    def outputs() -> dict[str, torch.Tensor]:
        found = {}
        with torch.no_grad():
            for name, block in blocks.items():
                model.set_active(block)
                found[name] = model(input_ids=ids).logits
            model.set_active("a")
            found["routing"] = model(input_ids=ids, adapter_names=["a", "c", "b", "__base__"]).logits
        return found

    before = outputs()
    shard_base(model, torch.device("cpu"))
    after = outputs()
    if dist.get_rank() == 0:
        distances = {name: float((before[name] - after[name]).abs().max()) for name in before}
        out.write_text(json.dumps(distances), encoding="utf-8")


def end_process_group() -> None:
    """What docs/train.md tells a script calling peftkit.train() under torchrun to do: left to interpreter
    exit, a rank's gloo threads can be torn down while joinable (SIGABRT after all the work was saved)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    runs = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    train_runs(runs)
    if runs.get("composition"):
        composition_distances(Path(runs["composition"]))
    end_process_group()
