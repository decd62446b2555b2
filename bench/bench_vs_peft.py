"""One method's adapter in peftkit vs Hugging Face peft, side by side in one process.

The Llama of bench_lora.py (hidden 512, 4 layers, intermediate 1376, vocab
8000), seq 128, batch 4, fp32, 2 threads; the adapter (random weights) is
saved by peftkit and loaded by peft, so both run the same weights. Reports
medians and the ratio peftkit/peft (lower is better), and the largest logit
difference.

Run: .venv/bin/python bench/bench_vs_peft.py --spec "oft[oft_block_size=32,init_weights=false]" [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_lora import build_base  # noqa: E402
from scratch import scratch_folder  # noqa: E402
from timing import interleaved, lm_forward, lm_train_step, table  # noqa: E402


def main(default_spec: str | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default=default_spec, required=default_spec is None,
                        help="the peftkit spec of the adapter, with init_weights=false so that it is not the identity")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import peft

    import peftkit

    base = build_base()
    ids = torch.randint(0, 8000, (4, 128))
    ours = peftkit.adapt(copy.deepcopy(base), args.spec)
    folder = scratch_folder()
    ours.save_adapter(folder)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    with torch.no_grad():
        difference = (ours(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()

    for model in (ours, peft_model):
        model.train()
    train = interleaved({"peftkit": lm_train_step(ours, ids), "peft": lm_train_step(peft_model, ids)},
                        repeats=args.repeats)
    for model in (ours, peft_model, base):
        model.eval()
    unmerged = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(peft_model, ids),
                            "base": lm_forward(base, ids)}, repeats=args.repeats)
    ours.merge_adapter()
    peft_model.merge_adapter()
    merged = interleaved({"peftkit": lm_forward(ours, ids), "peft": lm_forward(peft_model, ids)},
                         repeats=args.repeats)

    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [[label, ms(times["peftkit"]), ms(times["peft"]), f"{times['peftkit'] / times['peft']:.3f}"]
            for label, times in (("train step (fwd+bwd)", train), ("unmerged forward", unmerged),
                                 ("merged forward", merged))]
    rows.insert(2, ["  overhead vs base forward", f"{unmerged['peftkit'] / unmerged['base'] - 1:+.1%}",
                    f"{unmerged['peft'] / unmerged['base'] - 1:+.1%}", ""])
    print(f"{args.spec}: torch {torch.__version__}, peft {peft.__version__}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (medians); base forward {ms(unmerged['base'])}; "
          f"largest logit difference {difference:.2g}; trainable parameters {ours.trainable_parameters()[0]:,}")
    print(table(rows, ["measure", "peftkit", "peft", "ratio peftkit/peft"]))


if __name__ == "__main__":
    main()
