"""LoRA: peftkit vs Hugging Face peft, side by side in one process.

Llama built from a config (hidden 512, 4 layers, 8 heads, intermediate 1376,
vocab 8000), seq 128, batch 4, fp32, 2 threads; LoRA r=8 on all linear
layers. Reports times as ratios peftkit/peft (lower is better) and the step
time as a multiple of a frozen-base forward+backward (the FLOP floor).

Run: .venv/bin/python bench/bench_lora.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scratch import scratch_folder  # noqa: E402
from timing import interleaved, lm_forward, lm_train_step, table  # noqa: E402


def build_base(hidden: int = 512, intermediate: int = 1376, layers: int = 4, heads: int = 8, vocab: int = 8000,
               positions: int = 256):
    """The benchmarks' Llama from a config (seeded: the same weights every call); the defaults are the
    CPU size, perf_table.py's --size large the GPU one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=positions)
    return LlamaForCausalLM(config).eval()


def saved_activation_bytes(step) -> int:
    """Bytes of tensors autograd keeps for the backward pass during ``step``'s forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import peft

    import peftkit

    base = build_base()
    ids = torch.randint(0, 8000, (4, 128))

    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16,
                                                                          target_modules="all-linear"))
    ours = peftkit.adapt(copy.deepcopy(base), "lora[r=8,alpha=16,target_modules=all-linear]")
    # identical, non-trivial adapter weights in both
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.normal_(0, 0.02)
    tmp = scratch_folder()
    ours.save_adapter(f"{tmp}/ours")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/ours", is_trainable=True)
    peft_model.save_pretrained(f"{tmp}/peft")

    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    for m in (peft_model, ours, frozen):
        m.train()

    steps = {"peftkit": lm_train_step(ours, ids), "peft": lm_train_step(peft_model, ids),
             "frozen base": lm_train_step(frozen, ids)}
    train = interleaved(steps, repeats=args.repeats)

    for m in (peft_model, ours):
        m.eval()

    base.eval()
    unmerged = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(peft_model, ids),
                            "base": lm_forward(base, ids)}, repeats=args.repeats)
    ours.merge_adapter()
    peft_model.merge_adapter()
    merged = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(peft_model, ids)},
                         repeats=args.repeats)
    ours.unmerge_adapter()
    peft_model.unmerge_adapter()

    fresh = [copy.deepcopy(base) for _ in range(2 * (args.repeats + 2))]
    load = interleaved({
        "peftkit": lambda: peftkit.from_pretrained(fresh.pop(), f"{tmp}/peft"),
        "peft": lambda: peft.PeftModel.from_pretrained(fresh.pop(), f"{tmp}/peft"),
    }, repeats=args.repeats)

    memory = {"peftkit": saved_activation_bytes(steps["peftkit"]), "peft": saved_activation_bytes(steps["peft"]),
              "frozen base": saved_activation_bytes(steps["frozen base"])}
    params = {"peftkit": ours.trainable_parameters()[0],
              "peft": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
    size = os.path.getsize(f"{tmp}/ours/adapter_model.safetensors")

    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [
        ["train step (fwd+bwd)", ms(train["peftkit"]), ms(train["peft"]), f"{train['peftkit'] / train['peft']:.3f}"],
        ["  x frozen-base fwd+bwd", f"{train['peftkit'] / train['frozen base']:.3f}x",
         f"{train['peft'] / train['frozen base']:.3f}x", ""],
        ["unmerged forward", ms(unmerged["peftkit"]), ms(unmerged["peft"]),
         f"{unmerged['peftkit'] / unmerged['peft']:.3f}"],
        ["  overhead vs base forward", f"{unmerged['peftkit'] / unmerged['base'] - 1:+.1%}",
         f"{unmerged['peft'] / unmerged['base'] - 1:+.1%}", ""],
        ["merged forward", ms(merged["peftkit"]), ms(merged["peft"]), f"{merged['peftkit'] / merged['peft']:.3f}"],
        [f"adapter load ({size / 1e6:.2f} MB)", ms(load["peftkit"]), ms(load["peft"]),
         f"{load['peftkit'] / load['peft']:.3f}"],
        ["activations kept for backward", f"{memory['peftkit'] / 2**20:.1f} MiB", f"{memory['peft'] / 2**20:.1f} MiB",
         f"{memory['peftkit'] / memory['peft']:.3f}"],
        ["trainable parameters", f"{params['peftkit']:,}", f"{params['peft']:,}",
         f"{params['peftkit'] / params['peft']:.3f}"],
    ]
    print(f"torch {torch.__version__}, peft {peft.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (medians); frozen base fwd+bwd {ms(train['frozen base'])}, "
          f"base forward {ms(unmerged['base'])}")
    print(table(rows, ["measure", "peftkit", "peft", "ratio peftkit/peft"]))


if __name__ == "__main__":
    main()
