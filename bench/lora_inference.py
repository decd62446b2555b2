"""Unmerged LoRA inference on the benchmark Llama: peftkit, peftkit with the products forced, and PEFT.

Times an inference forward (``torch.inference_mode``) of the float32 Llama of bench/perf_table.py with a
LoRA on every linear layer, against the base model's forward, in paired rounds (bench/timing.py). Three
models: peftkit as it runs (from enough tokens a layer adds ``s B A`` to a temporary weight copy and runs
one product: ``dense_is_cheaper`` in core/fused_lora.py), peftkit with the copy turned off (the
products at every layer) and PEFT with the same adapter. Prints each ratio with its interval, and the
logits' largest difference from PEFT's.

Run: .venv/bin/python bench/lora_inference.py [--batch 4] [--seq 512] [--ranks 8,64] [--budget 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from typing import Any, Callable

import torch

import peftkit
import peftkit.core.fused_lora as lora_fused
from bench_lora import build_base
from perf_table import peft_model
from timing import lm_forward, paired_ratios


def products_only(run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with the weight copy turned off: every adapted layer runs the products."""
    def without_copy() -> None:
        chosen = lora_fused.dense_is_cheaper
        lora_fused.dense_is_cheaper = lambda *shape: False
        try:
            run()
        finally:
            lora_fused.dense_is_cheaper = chosen
    return without_copy


def compare(base: Any, ids: torch.Tensor, rank: int, budget_s: float) -> str:
    spec = f"lora[r={rank},alpha={2 * rank},init_weights=false,target_modules=all-linear]"
    ours = peftkit.adapt(copy.deepcopy(base), spec)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_adapter(folder)
        theirs = peft_model(base, folder)
    for model in (ours, theirs, base):
        model.eval()
    with torch.inference_mode():
        difference = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    runs = {"base": lm_forward(base, ids), "peftkit": lm_forward(ours, ids),
            "peftkit, products only": products_only(lm_forward(ours, ids)), "peft": lm_forward(theirs, ids)}
    ratios, base_s = paired_ratios(runs, "base", budget_s)
    figures = ", ".join(f"{name} {ratio.text(3)}" for name, ratio in ratios.items() if name != "base")
    return (f"r={rank}, {ids.numel()} tokens: forward x base ({base_s * 1000:.0f} ms): {figures}; "
            f"logits max diff from peft {difference:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ranks", default="8,64", help="comma-separated LoRA ranks")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of paired rounds per rank")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build_base(positions=max(256, args.seq))
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for rank in (int(r) for r in args.ranks.split(",")):
        print(compare(base, ids, rank, args.budget), flush=True)


if __name__ == "__main__":
    main()
