"""The performance table of every built-in method next to Hugging Face peft, in one process.

The Llama of bench_lora.py (hidden 512, 4 layers, intermediate 1376, vocab 8000),
seq 128, batch 4, fp32, 2 threads. For each method the adapter (random weights,
not the identity) is saved by peftkit and loaded by peft, so both run the same
weights; their logits are compared. Timings are medians of interleaved rounds
(peftkit, peft and the frozen base take turns, so load changes on the machine
hit all alike), reported as multiples of the frozen base:

- step: a training step (forward + backward) over a frozen-base forward+backward
  that computes input gradients only (the least any adapter's step can cost);
- fwd: an unmerged inference forward over the base model's forward;
- merged: the forward with the adapter merged into the weights (mergeable methods);
- floor: the step's matrix-multiply FLOPs over the frozen base's (torch's
  FlopCounterMode, the fewer of peftkit's and peft's): the step ratio if every
  added operation ran as fast as the base's own products.

Memory: the activations autograd keeps for backward during the forward (distinct
storages, model weights not counted) and the peak of memory allocated during a
training step above what was allocated before it (torch.profiler's memory events).

Writes docs/performance.md with the machine, versions, load and command.

Run: .venv/bin/python bench/perf_table.py [--repeats 7] [--only lora_r8,dora_r8] [--output docs/performance.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_lora import build_base  # noqa: E402
from timing import interleaved, lm_forward, lm_train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ, VOCAB = 4, 128, 8000

#: key -> (label in the table, peftkit spec; init_weights=false where the identity would be trivial)
METHODS: dict[str, tuple[str, str]] = {
    "lora_r8": ("LoRA r8 all-linear", "lora[r=8,alpha=16,init_weights=false,target_modules=all-linear]"),
    "lora_r64": ("LoRA r64 all-linear", "lora[r=64,alpha=128,init_weights=false,target_modules=all-linear]"),
    "dora_r8": ("DoRA r8 all-linear",
                "lora[r=8,alpha=16,init_weights=false,use_dora=true,target_modules=all-linear]"),
    "lokr_r8": ("LoKr r8 all-linear", "lokr[r=8,alpha=16,init_weights=false,target_modules=all-linear]"),
    "ia3": ("IA3", "ia3[init_weights=false]"),
    "prefix": ("prefix tuning (20)", "prefix_tuning[num_virtual_tokens=20]"),
    "prompt": ("prompt tuning (20)", "prompt_tuning[num_virtual_tokens=20]"),
}


def saved_activation_bytes(step: Callable[..., None], weights: set[int]) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``step``'s forward,
    the model's weights (``weights``: their data pointers) left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(seen.values())


def peak_step_bytes(step: Callable[..., None]) -> int:
    """The peak of bytes allocated during one training step above the level before it (the
    allocation events torch.profiler records with profile_memory=True)."""
    import json

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def step_flops(step: Callable[..., None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def weight_pointers(model: Any) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def peft_model(base: Any, folder: str) -> Any:
    """peft's model with the saved adapter, trainable (peft refuses is_trainable=True for prompt
    learning methods: their prompt encoder is made trainable after loading)."""
    import peft

    config = peft.PeftConfig.from_pretrained(folder)
    if not config.is_prompt_learning:
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model.prompt_encoder.requires_grad_(True)
    return model


def measure(key: str, base: Any, ids: torch.Tensor, frozen: Any, repeats: int) -> dict[str, Any]:

    import peftkit

    label, spec = METHODS[key]
    torch.manual_seed(0)
    ours = peftkit.adapt(copy.deepcopy(base), spec)
    folder = tempfile.mkdtemp()
    ours.save_adapter(folder)
    theirs = peft_model(base, folder)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        difference = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()

    for model in (ours, theirs):
        model.train()
    steps = {"peftkit": lm_train_step(ours, ids), "peft": lm_train_step(theirs, ids),
             "base": lm_train_step(frozen, ids)}
    train = interleaved(steps, repeats=repeats)
    flops = {name: step_flops(step) for name, step in steps.items()}
    saved = {name: saved_activation_bytes(step, weight_pointers(model))
             for (name, step), model in zip(steps.items(), (ours, theirs, frozen))}
    peak = {name: peak_step_bytes(step) for name, step in steps.items()}

    for model in (ours, theirs, base):
        model.eval()
    forward = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(theirs, ids),
                           "base": lm_forward(base, ids)}, repeats=repeats)
    merged: dict[str, float] = {}
    if key not in ("prefix", "prompt"):  # the methods that merge into weights
        ours.merge_adapter()
        theirs.merge_adapter()
        merged = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(theirs, ids),
                              "base": lm_forward(base, ids)}, repeats=repeats)
    return {"key": key, "label": label, "spec": spec, "difference": difference, "train": train,
            "forward": forward, "merged": merged, "floor": min(flops["peftkit"], flops["peft"]) / flops["base"],
            "saved": saved, "peak": peak}


def _ratio(times: dict[str, float], name: str) -> str:
    return f"{times[name] / times['base']:.3f}" if times else "-"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def render(results: list[dict[str, Any]], repeats: int, command: str, loads: tuple[float, float]) -> str:
    import peft
    import transformers

    import peftkit

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    busy = max(loads) > torch.get_num_threads()
    lines = [
        "# Performance",
        "",
        "Every built-in method's training step and inference forward next to Hugging Face `peft`,",
        "measured in one process by `bench/perf_table.py` (written by it; do not edit by hand).",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"{torch.get_num_threads()} torch threads",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, peftkit {peftkit.__version__}",
        f"- Model: Llama from a config (hidden 512, 4 layers, intermediate 1376, vocab {VOCAB}), "
        f"batch {BATCH}, sequence {SEQ}, float32",
        f"- Timings: medians of {repeats} interleaved rounds (peftkit, peft and the base model take turns)",
        f"- Load average at start / end: {loads[0]:.2f} / {loads[1]:.2f}"
        + (" — the machine was busy with other work during this run, so these figures are noisier than "
           "on a quiet machine; rerun the command on a quiet one for the reference table" if busy else ""),
        "",
        "Columns: *step* is a training step (forward + backward) over a frozen-base forward+backward that",
        "computes input gradients only; *fwd* an unmerged inference forward over the base forward;",
        "*merged* the forward with the adapter merged into the weights over the base forward; *floor* the",
        "step's matrix-multiply FLOPs over the frozen base's (the step ratio if every added operation ran",
        "as fast as the base's products; the fewer of the two libraries' FLOPs). A floor below 1 means the",
        "adapted model needs no gradient for the first layer's input, which the frozen base computes;",
        "prompt tuning lengthens the sequence, so its floor is above 1. Lower is better everywhere.",
        "",
        "| method | peftkit step | peft step | floor | peftkit fwd | peft fwd | peftkit merged | peft merged "
        "| logits max diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {_ratio(r['train'], 'peftkit')} | {_ratio(r['train'], 'peft')} "
                     f"| {r['floor']:.3f} | {_ratio(r['forward'], 'peftkit')} | {_ratio(r['forward'], 'peft')} "
                     f"| {_ratio(r['merged'], 'peftkit')} | {_ratio(r['merged'], 'peft')} "
                     f"| {r['difference']:.1e} |")
    lines += [
        "",
        "Memory of a training step, MiB: activations kept for backward (distinct storages, weights not",
        "counted) and the peak allocated during the step above the level before it.",
        "",
        "| method | peftkit saved | peft saved | base saved | peftkit peak | peft peak | base peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, p = r["saved"], r["peak"]
        lines.append(f"| {r['label']} | {_mib(s['peftkit'])} | {_mib(s['peft'])} | {_mib(s['base'])} "
                     f"| {_mib(p['peftkit'])} | {_mib(p['peft'])} | {_mib(p['base'])} |")
    lines += ["", "Absolute times of the base model: "
              + ", ".join(f"{r['label']}: step {r['train']['base'] * 1000:.0f} ms, fwd "
                          f"{r['forward']['base'] * 1000:.0f} ms" for r in results[:1]) + ".", ""]
    return "\n".join(lines)


def measured_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that change what is measured (``--output`` only says where it goes)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif not arg.startswith("--output="):
            kept.append(arg)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help=f"comma-separated keys of {', '.join(METHODS)}")
    parser.add_argument("--output", default=str(ROOT / "docs" / "performance.md"),
                        help="the Markdown file to write ('-' prints it only)")
    args = parser.parse_args()
    keys = [k for k in args.only.split(",") if k] or list(METHODS)
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        parser.error(f"unknown method key(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    from transformers import logging

    logging.set_verbosity_error()
    loads = os.getloadavg()[0]
    base = build_base()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    frozen.train()
    results = []
    for key in keys:
        results.append(measure(key, base, ids, frozen, args.repeats))
        print(f"measured {key}", file=sys.stderr)
    command = "python bench/perf_table.py " + " ".join(shlex.quote(a) for a in measured_arguments(sys.argv[1:]))
    text = render(results, args.repeats, command.strip(), (loads, os.getloadavg()[0]))
    if args.output == "-":
        print(text)
        return
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
