"""Token-by-token generation with an unmerged adapter: peftkit and PEFT against the base model.

Decoding runs every adapted layer once a token on a single row, so a layer's fixed cost (Python, kernel
launches, small allocations) is most of what an adapter adds. Times ``generate`` (greedy, batch 1, a
16-token prompt, ``--new-tokens`` new tokens) of the float32 Llama of bench/perf_table.py with each method of
perf_table.py asked for (its spec there), peftkit and PEFT with the same weights, against the base model, in
paired rounds (bench/timing.py), and checks that both generate the same tokens.

Run: .venv/bin/python bench/decode_speed.py [--only lora_r8,dora_r8,lokr_r8,ia3] [--new-tokens 32] [--budget 40]
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch

import peftkit
from perf_table import METHODS, SIZES, Setup, models_and_input, peft_model
from scratch import scratch_folder
from timing import paired_ratios


def generating(model: Any, prompt: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
    return run


def compare(base: Any, prompt: torch.Tensor, key: str, new_tokens: int, budget_s: float) -> str:
    label, spec = METHODS[key]
    torch.manual_seed(0)
    ours = peftkit.adapt(copy.deepcopy(base), spec).eval()
    folder = scratch_folder()
    ours.save_adapter(folder)
    theirs = peft_model(base, folder).eval()
    runs = {name: generating(model, prompt, new_tokens)
            for name, model in (("base", base), ("peftkit", ours), ("peft", theirs))}
    same = torch.equal(runs["peftkit"](), runs["peft"]())
    ratios, base_s = paired_ratios(runs, "base", budget_s)
    return (f"{label}: base {base_s * 1e3:.1f} ms; x base: peftkit {ratios['peftkit'].text(3)}, "
            f"peft {ratios['peft'].text(3)}; same tokens: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="lora_r8,dora_r8,lokr_r8,ia3", help=f"keys of {', '.join(METHODS)}")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of paired rounds per method")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, ids, _ = models_and_input(Setup("cpu", torch.float32, SIZES["small"]))
    base.eval()
    print(f"generate {args.new_tokens} tokens, batch 1, {args.threads} threads")
    for key in args.only.split(","):
        print(compare(base, ids[:1, :16], key, args.new_tokens, args.budget), flush=True)


if __name__ == "__main__":
    main()
