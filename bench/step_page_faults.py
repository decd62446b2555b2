"""Page faults and time of a training step: the frozen base, and peftkit's methods over it (docs/train.md,
"Training on CPUs: the memory allocator").

Run it twice, as is and with glibc told to keep freed memory, and compare:

    python bench/step_page_faults.py
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python bench/step_page_faults.py

It prints each model's minor page faults per step (over 5 steps after 3 warm-up steps) and the step times over
the frozen base's in paired rounds (timing.paired_ratios), on perf_table.py's Llama.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from perf_table import METHODS, SIZES, Setup, models_and_input  # noqa: E402
from timing import lm_train_step, paired_ratios  # noqa: E402


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="lora_r8,dora_r8", help=f"keys of {', '.join(METHODS)}")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of paired rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import peftkit

    torch.set_num_threads(args.threads)
    base, ids, frozen = models_and_input(Setup("cpu", torch.float32, SIZES["small"]))
    steps = {"frozen base": lm_train_step(frozen, ids)}
    for key in args.only.split(","):
        torch.manual_seed(0)
        model = peftkit.adapt(copy.deepcopy(base), METHODS[key][1])
        model.train()
        steps[METHODS[key][0]] = lm_train_step(model, ids)
    allocator = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                         if k in os.environ) or "glibc defaults"
    print(f"allocator settings: {allocator}; {args.threads} threads")
    for name, step in steps.items():
        for _ in range(3):
            step()
        faults, start = minor_faults(), time.perf_counter()
        for _ in range(5):
            step()
        print(f"{name}: {(minor_faults() - faults) / 5:,.0f} page faults per step, "
              f"{(time.perf_counter() - start) / 5 * 1e3:.1f} ms per step")
    ratios, base_s = paired_ratios(steps, "frozen base", args.budget)
    print(f"frozen base step {base_s * 1e3:.1f} ms (median of paired rounds); over it: "
          + ", ".join(f"{name} {r.text(3)}" for name, r in ratios.items() if name != "frozen base"))


if __name__ == "__main__":
    main()
