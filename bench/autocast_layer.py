"""One LoRA layer's training step under bfloat16 autocast: the fused path over the unfused one.

A float32 nn.Linear with LoRA r8 (factors random), 512 tokens, run under ``torch.autocast("cpu",
bfloat16)``: forward and backward, the fused node (core/fused_lora.py) against the unfused path
(what the layer runs when ``fusable_linear`` refuses it), in interleaved rounds of 5 steps each,
timing the process's CPU time. Prints the median ratio and its quartiles per layer shape.

Run: .venv/bin/python bench/autocast_layer.py [--threads 1] [--rounds 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import peftkit
import peftkit.plugins.lora.layer as lora_layer
from peftkit.plugin_api import fusable_linear

SHAPES = [(512, 1376), (1376, 512), (512, 512)]


def unfused_only(base: nn.Module, x: torch.Tensor, factor: torch.Tensor) -> bool:
    """``fusable_linear`` as it was before the fused path took autocast: refused under autocast."""
    return not torch.is_autocast_enabled(x.device.type) and fusable_linear(base, x, factor)


def layer_step(in_features: int, out_features: int, tokens: int):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(in_features, out_features, bias=False))
    adapted = peftkit.adapt(model, "lora[r=8,alpha=16,init_weights=false,target_modules=proj]")
    adapted.train()
    layer = adapted.base_model.proj
    x = torch.randn(tokens, in_features, requires_grad=True)
    seed = torch.randn(tokens, out_features, dtype=torch.bfloat16)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.backward(seed)
        x.grad = None
        for p in adapted.parameters():
            p.grad = None
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for in_features, out_features in SHAPES:
        step = layer_step(in_features, out_features, args.tokens)
        ratios = []
        for index in range(args.rounds):
            seconds = {}
            for mode in (("fused", "unfused") if index % 2 else ("unfused", "fused")):
                lora_layer.fusable_linear = fusable_linear if mode == "fused" else unfused_only
                step()
                start = time.process_time()
                for _ in range(5):
                    step()
                seconds[mode] = time.process_time() - start
            ratios.append(seconds["fused"] / seconds["unfused"])
        lora_layer.fusable_linear = fusable_linear
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"{in_features} -> {out_features}: fused / unfused step, CPU time: median "
              f"{statistics.median(ratios):.3f} (quartiles {low:.3f}-{high:.3f}), {args.threads} threads")


if __name__ == "__main__":
    main()
