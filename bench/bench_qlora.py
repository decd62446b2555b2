"""QLoRA: LoRA on a 4-bit (NF4) bitsandbytes base, peftkit vs Hugging Face peft in one process.

The Llama of bench_lora.py but with intermediate 1408 (bitsandbytes' packed CPU inference kernel needs
input widths that are multiples of 64; 1376 is not): hidden 512, 4 layers, 8 heads, vocab 8000, saved
and loaded twice by transformers with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double
quantization, float32 compute)`` on the CPU; LoRA r=8 on all linear layers with the same weights in
both (peftkit saves, peft loads); seq 128, batch 4, 2 threads. Reports medians of interleaved runs
and ratios peftkit/peft (lower is better), and the largest logit difference between the two.

Run: .venv/bin/python bench/bench_qlora.py [--repeats 7]   (needs bitsandbytes: pip install -e .[test])
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from scratch import scratch_folder  # noqa: E402
from timing import interleaved, lm_forward, lm_train_step, table  # noqa: E402


def build_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def load_quantized(folder: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map={"": "cpu"},
                                                dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import peft

    import peftkit

    tmp = scratch_folder()
    build_base().save_pretrained(f"{tmp}/base")
    ids = torch.randint(0, 8000, (4, 128), generator=torch.Generator().manual_seed(0))

    ours = peftkit.adapt(load_quantized(f"{tmp}/base"), "lora[r=8,alpha=16,target_modules=all-linear]")
    with torch.no_grad():
        for p in ours.adapter_parameters("default"):
            p.normal_(0, 0.02)
    ours.save_adapter(f"{tmp}/adapter")
    theirs = peft.PeftModel.from_pretrained(load_quantized(f"{tmp}/base"), f"{tmp}/adapter", is_trainable=True)
    for m in (ours, theirs):
        m.train()  # no dropout in this model: training mode only keeps bitsandbytes' trainable kernel
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()

    train = interleaved({"peftkit": lm_train_step(ours, ids), "peft": lm_train_step(theirs, ids)},
                        repeats=args.repeats)

    for m in (ours, theirs):
        m.eval()  # bitsandbytes' packed CPU inference kernel, where the CPU has it
    infer = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(theirs, ids)}, repeats=args.repeats)

    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [
        ["train step (fwd+bwd)", ms(train["peftkit"]), ms(train["peft"]), f"{train['peftkit'] / train['peft']:.3f}"],
        ["inference forward (eval)", ms(infer["peftkit"]), ms(infer["peft"]),
         f"{infer['peftkit'] / infer['peft']:.3f}"],
    ]
    import bitsandbytes

    print(f"torch {torch.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats} (medians); "
          f"max |logits peftkit - peft| = {diff:.2e}")
    print(table(rows, ["measure", "peftkit", "peft", "ratio peftkit/peft"]))


if __name__ == "__main__":
    main()
