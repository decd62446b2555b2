"""Where an adapter's training step and forward spend time beyond the frozen base (issue #14).

Three views, for the methods of perf_table.py (``--only lora_r8,lokr_r8``):

- counts per training step of perf_table's Llama (deterministic, load does not
  matter): autograd nodes, top-level aten calls, matrix products, copies;
- per adapted layer shape of that Llama (q/o 512x512, gate/up 512x1376, down
  1376x512), tokens 512, for the all-linear methods (LoRA, DoRA, LoKr): the
  adapted layer alone against its bare base layer,
  step (forward + backward, input gradient only for the base) and inference
  forward, in CPU time of paired rounds (timing.paired_ratios);
- the fixed cost per adapted layer on a tiny layer (64x64, 4 tokens), where the
  products cost next to nothing: Python, autograd nodes and kernel launches.

Run: .venv/bin/python bench/profile_step.py [--only lora_r8,lokr_r8] [--threads 1] [--budget 8]
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from perf_table import METHODS, models_and_input, Setup, SIZES  # noqa: E402
from timing import lm_train_step, paired_ratios, table  # noqa: E402

#: (in, out) of the Llama's adapted linear layers, and how many of each a decoder layer has.
SHAPES = {(512, 512): 4, (512, 1376): 2, (1376, 512): 1}
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear", "aten::matmul"}
COPIES = {"aten::copy_", "aten::clone", "aten::contiguous"}
#: Calls that only make views or read metadata: not counted as work.
VIEWS = {"aten::view", "aten::t", "aten::transpose", "aten::reshape", "aten::as_strided", "aten::_unsafe_view",
         "aten::expand", "aten::detach", "aten::empty", "aten::empty_strided", "aten::unsqueeze", "aten::slice",
         "aten::select", "aten::alias", "aten::permute", "aten::squeeze", "aten::lift_fresh", "aten::resolve_conj",
         "aten::resolve_neg", "aten::result_type"}


def autograd_nodes(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return len(seen)


def step_counts(model: Any, ids: torch.Tensor) -> dict[str, int]:
    """Autograd nodes and the aten calls of one training step that no other aten call made."""
    from torch.profiler import ProfilerActivity, profile

    step = lm_train_step(model, ids)
    step()
    nodes = autograd_nodes(model(input_ids=ids, labels=ids).loss)
    with profile(activities=[ProfilerActivity.CPU]) as run:
        step()
    calls = collections.Counter(e.name for e in run.events() if e.name.startswith("aten::")
                                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    work = sum(n for name, n in calls.items() if name not in VIEWS)
    return {"autograd nodes": nodes, "aten calls": work, "products": sum(calls[n] for n in PRODUCTS),
            "copies": sum(calls[n] for n in COPIES)}


def adapted_layer(spec: str, in_f: int, out_f: int) -> tuple[nn.Module, nn.Module]:
    """(the adapted layer, its base layer) for ``spec`` on one bias-free linear layer."""
    import peftkit

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_f, out_f, bias=False))
    spec = spec.replace("target_modules=all-linear", "target_modules=proj")
    layer = peftkit.adapt(model, spec).base_model.proj
    return layer, layer.base_layer


def layer_calls(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(a step: forward and backward of ``g``; an inference forward)."""
    def step() -> None:
        layer(x).backward(g)
        for p in [x, *layer.parameters()]:
            p.grad = None

    def forward() -> None:
        with torch.inference_mode():
            layer(x)
    return step, forward


def layer_ratios(spec: str, in_f: int, out_f: int, tokens: int, budget: float) -> tuple[float, float, float]:
    """(step ratio, forward ratio, base step seconds) of the adapted layer over its base layer."""
    layer, base = adapted_layer(spec, in_f, out_f)
    layer.train()
    x = torch.randn(tokens, in_f, requires_grad=True)
    g = torch.randn(tokens, out_f)
    ours_step, ours_forward = layer_calls(layer, x, g)
    base_step, base_forward = layer_calls(base, x, g)
    step, base_s = paired_ratios({"ours": ours_step, "base": base_step}, "base", budget, clock="cpu", unit_s=0.05)
    forward, _ = paired_ratios({"ours": ours_forward, "base": base_forward}, "base", budget, clock="cpu",
                               unit_s=0.05)
    return step["ours"].median, forward["ours"].median, base_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="lora_r8,lora_r64,lokr_r8", help=f"keys of {', '.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of paired rounds per layer figure")
    args = parser.parse_args()
    keys = [k for k in args.only.split(",") if k]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        parser.error(f"unknown method key(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    from transformers import logging

    import peftkit

    logging.set_verbosity_error()
    size = SIZES["small"]
    base, ids, frozen = models_and_input(Setup("cpu", torch.float32, size))
    rows = [["frozen base", *map(str, step_counts(frozen, ids).values())]]
    for key in keys:
        torch.manual_seed(0)
        model = peftkit.adapt(copy.deepcopy(base), METHODS[key][1]).train()
        rows.append([METHODS[key][0], *map(str, step_counts(model, ids).values())])
    print(f"Counts per training step (batch {size.batch}, sequence {size.seq}):")
    print(table(rows, ["model", "autograd nodes", "aten calls (work)", "matrix products", "copies"]))

    # The layer view puts the spec on every linear layer of one shape; IA3 (its own targets, some scaling the
    # input) and prompt or prefix tuning (no layers adapted) are measured on the whole model alone.
    layer_keys = [key for key in keys if "target_modules=all-linear" in METHODS[key][1]]
    if len(layer_keys) < len(keys):
        print(f"\n(no layer view for {', '.join(k for k in keys if k not in layer_keys)}: not all-linear methods)")
    if not layer_keys:
        return
    rows = []
    for key in layer_keys:
        for (in_f, out_f), per_layer in SHAPES.items():
            step, forward, base_s = layer_ratios(METHODS[key][1], in_f, out_f, size.batch * size.seq, args.budget)
            rows.append([METHODS[key][0], f"{in_f}x{out_f} (x{per_layer})", f"{base_s * 1e3:.2f} ms", f"{step:.3f}",
                         f"{forward:.3f}"])
        tiny_step, tiny_forward, tiny_s = layer_ratios(METHODS[key][1], 64, 64, 4, args.budget / 2)
        rows.append([METHODS[key][0], "64x64, 4 tokens", f"{tiny_s * 1e6:.0f} us", f"{tiny_step:.3f}",
                     f"{tiny_forward:.3f}"])
    print(f"\nOne adapted layer over its base layer, CPU time, {torch.get_num_threads()} thread(s), paired rounds "
          f"(a decoder layer has the count in brackets):")
    print(table(rows, ["method", "layer", "base step", "step x base", "fwd x base"]))


if __name__ == "__main__":
    main()
