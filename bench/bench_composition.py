"""Composition and merging speed, peftkit beside Hugging Face PEFT on the same adapters.

Run by hand (never from the tests)::

    .venv/bin/python bench/bench_composition.py              # everything
    .venv/bin/python bench/bench_composition.py --only routing --rounds 9

Model: a Llama with hidden 512, 4 layers, 8 heads, intermediate 1376, vocab
8000; fp32; torch.set_num_threads(2). Adapters: LoRA r=16 on all linear layers,
random (non-zero) weights, saved once by peftkit and loaded into PEFT from the
same folders, so both libraries run identical weights.

- routing: a batch of 32 rows x 128 tokens, each row routed to one of 8
  adapters (row i -> adapter i % 8), ``model(..., adapter_names=...)`` in both.
- sites: the same routing at single layers (q_proj 512->512, up_proj
  512->1376, down_proj 1376->512), many rounds: the adapter overhead without
  the rest of the model's time, which hides it in noise on a shared machine;
  ``per_model_estimate`` weights them as one Llama layer (4 x q, 2 x up,
  1 x down) times 4 layers.
- blocks: one adapter, stack() and average() of 2 and 4 adapters (PEFT:
  several active adapters, its equivalent of stack).
- merging: 4 adapters, every strategy, ``merge_adapters`` against PEFT's
  ``add_weighted_adapter``.
- guard: the two figures a speed change must not make worse, as multiples of
  the bare base model's forward in paired rounds (timing.paired_ratios): the
  routed batch above (peftkit only) and the forward with adapter a0 merged.
  ``--against REV`` measures them for the committed code of git revision REV
  too (``git archive`` into a temporary folder laid out as the installed
  package, run in a subprocess), alternating with the current checkout, so a
  change is compared with the code before it::

      .venv/bin/python bench/bench_composition.py --against HEAD~3 --threads 1 --clock cpu

Timings alternate between the contenders round by round and report the median
(and min) over rounds; "overhead" subtracts the bare base model's median.
The machine is shared: run it more than once.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

warnings.filterwarnings("ignore")

HIDDEN, LAYERS, HEADS, INTER, VOCAB, SEQ, BATCH, N_ADAPTERS, RANK = 512, 4, 8, 1376, 8000, 128, 32, 8, 16


def build_base() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                         max_position_embeddings=2 * SEQ)
    return LlamaForCausalLM(config).eval()


def build_pair(base: Any, folder: Path, with_peft: bool = True) -> tuple[Any, Any]:
    """peftkit and PEFT models holding the same N_ADAPTERS adapters (a0..a7); PEFT's None unless
    ``with_peft``."""
    import peftkit
    from peft import PeftModel

    ours = peftkit.AdaptedModel(copy.deepcopy(base))
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        ours.add_adapter(f"a{i}", f'lora[r={RANK},alpha={2 * RANK},init_weights=false,target_modules="all-linear"]')
        with torch.no_grad():  # B ~ N(0, 0.1) is large; keep outputs in a sane range
            for p in ours.adapter_parameters(f"a{i}"):
                p.mul_(0.2)
        ours.save_adapter(str(folder / f"a{i}"), f"a{i}")
    ours.eval()
    if not with_peft:
        return ours, None
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(folder / "a0"), adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        theirs.load_adapter(str(folder / f"a{i}"), adapter_name=f"a{i}")
    theirs.eval()
    return ours, theirs


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(contenders: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    for fn in contenders.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


def summary(times: dict[str, list[float]], base: str | None = None) -> dict[str, dict[str, float]]:
    out = {}
    ref = statistics.median(times[base]) if base else 0.0
    for name, values in times.items():
        med = statistics.median(values)
        row = {"median_s": round(med, 4), "min_s": round(min(values), 4)}
        if base and name != base:
            row["overhead_s"] = round(med - ref, 4)
        out[name] = row
    return out


def bench_routing(ours: Any, theirs: Any, rounds: int) -> dict[str, Any]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    names = [f"a{i % N_ADAPTERS}" for i in range(BATCH)]
    sorted_names = sorted(names)
    with torch.no_grad():
        diff = (ours(input_ids=ids, adapter_names=names).logits
                - theirs(input_ids=ids, adapter_names=names).logits).abs().max().item()

        def base() -> None:
            with ours.disable_adapters():
                ours(input_ids=ids)

        times = alternate({
            "base": base,
            "peft": lambda: theirs(input_ids=ids, adapter_names=names),
            "peftkit": lambda: ours(input_ids=ids, adapter_names=names),
            "peft_sorted_rows": lambda: theirs(input_ids=ids, adapter_names=sorted_names),
            "peftkit_sorted_rows": lambda: ours(input_ids=ids, adapter_names=sorted_names),
        }, rounds)
    result = summary(times, "base")
    for kind in ("", "_sorted_rows"):
        ours_o, theirs_o = result[f"peftkit{kind}"]["overhead_s"], result[f"peft{kind}"]["overhead_s"]
        result[f"ratio{kind}"] = {
            "total": round(result[f"peftkit{kind}"]["median_s"] / result[f"peft{kind}"]["median_s"], 3),
            "overhead": round(ours_o / theirs_o, 3) if theirs_o > 0 else None}
    result["max_abs_diff_vs_peft"] = diff
    return result


def bench_sites(ours: Any, theirs: Any, rounds: int) -> dict[str, Any]:
    names = [f"a{i % N_ADAPTERS}" for i in range(BATCH)]
    gen = torch.Generator().manual_seed(3)
    result: dict[str, Any] = {}
    estimate = {"base": 0.0, "peft": 0.0, "peftkit": 0.0}
    for short, count in (("self_attn.q_proj", 4), ("mlp.up_proj", 2), ("mlp.down_proj", 1)):
        site = f"model.layers.0.{short}"
        layer = ours.base_model.get_submodule(site)
        peft_layer = theirs.base_model.model.get_submodule(site)
        x = torch.randn(BATCH, SEQ, layer.base_layer.in_features, generator=gen)

        with torch.no_grad():
            assert torch.allclose(peft_layer(x, adapter_names=names), _routed(ours, layer, x, names), atol=1e-4)
            # The routing of a forward is built once and serves every site: build it outside the timing.
            with ours._routing(names, BATCH):
                times = alternate({"base": lambda layer=layer, x=x: layer.base_layer(x),
                                   "peft": lambda peft_layer=peft_layer, x=x: peft_layer(x, adapter_names=names),
                                   "peftkit": lambda layer=layer, x=x: layer(x)}, rounds)
        row = summary(times, "base")
        row["overhead_ratio"] = round(row["peftkit"]["overhead_s"] / row["peft"]["overhead_s"], 3) \
            if row["peft"]["overhead_s"] > 0 else None
        result[short] = row
        for key in estimate:
            estimate[key] += count * LAYERS * statistics.median(times[key])
    result["per_model_estimate"] = {
        "base_s": round(estimate["base"], 4),
        "peft_overhead_s": round(estimate["peft"] - estimate["base"], 4),
        "peftkit_overhead_s": round(estimate["peftkit"] - estimate["base"], 4),
        "overhead_ratio": round((estimate["peftkit"] - estimate["base"]) / (estimate["peft"] - estimate["base"]), 3)}
    return result


def _routed(ours: Any, layer: Any, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    with ours._routing(names, x.shape[0]):
        return layer(x)


def bench_blocks(ours: Any, theirs: Any, rounds: int) -> dict[str, Any]:
    from peftkit import Average, Stack

    ids = torch.randint(0, VOCAB, (BATCH // 4, SEQ), generator=torch.Generator().manual_seed(2))

    def run_ours(node: Any) -> Callable[[], Any]:
        def fn() -> None:
            ours.set_active(node)
            ours(input_ids=ids)
        return fn

    def run_peft(active: list[str]) -> Callable[[], Any]:
        def fn() -> None:
            theirs.base_model.set_adapter(active)
            theirs(input_ids=ids)
        return fn

    def base() -> None:
        with ours.disable_adapters():
            ours(input_ids=ids)

    with torch.no_grad():
        times = alternate({
            "base": base,
            "one": run_ours("a0"),
            "stack2": run_ours(Stack("a0", "a1")),
            "stack4": run_ours(Stack("a0", "a1", "a2", "a3")),
            "average2": run_ours(Average("a0", "a1")),
            "average4": run_ours(Average("a0", "a1", "a2", "a3")),
            "peft_one": run_peft(["a0"]),
            "peft_active2": run_peft(["a0", "a1"]),
            "peft_active4": run_peft(["a0", "a1", "a2", "a3"]),
        }, rounds)
    result = summary(times, "base")
    one = result["one"]["overhead_s"]
    for key in ("stack2", "stack4", "average2", "average4"):
        result[key]["overhead_vs_one_adapter"] = round(result[key]["overhead_s"] / one, 2) if one > 0 else None
    result["batch"] = list(ids.shape)
    ours.set_active(None)
    return result


MERGES = [  # (peftkit strategy, PEFT combination_type, options)
    ("svd", "svd", {}),
    ("cat", "cat", {}),
    ("linear", "linear", {}),
    ("ties", "ties_svd", {"density": 0.5}),
    ("dare_linear", "dare_linear_svd", {"density": 0.5}),
    ("dare_ties", "dare_ties_svd", {"density": 0.5}),
    ("magnitude_prune", "magnitude_prune_svd", {"density": 0.5}),
    ("ties", "ties", {"density": 0.5}),
]


def bench_merging(ours: Any, theirs: Any, rounds: int) -> dict[str, Any]:
    members = ["a0", "a1", "a2", "a3"]
    weights = [0.4, 0.3, 0.2, 0.1]
    result: dict[str, Any] = {}
    for ours_name, peft_name, options in MERGES:
        def run_ours(ours_name: str = ours_name, options: dict[str, Any] = options) -> None:
            ours.merge_adapters(members, weights, "m", ours_name, **options)
            ours.delete_adapter("m")

        def run_peft(peft_name: str = peft_name, options: dict[str, Any] = options) -> None:
            theirs.add_weighted_adapter(members, weights, "m", combination_type=peft_name, **options)
            theirs.delete_adapter("m")

        times = alternate({"peftkit": run_ours, "peft": run_peft}, rounds)
        row = summary(times)
        row["ratio"] = round(row["peftkit"]["median_s"] / row["peft"]["median_s"], 3)
        result[f"{ours_name} vs peft {peft_name}"] = row
    return result


def bench_guard(ours: Any, budget_s: float, clock: str) -> dict[str, Any]:
    """The routed batch (row i -> adapter i % 8) and the forward with a0 merged, each over the bare
    base forward in paired rounds; leaves a0 unmerged."""
    from timing import paired_ratios

    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    names = [f"a{i % N_ADAPTERS}" for i in range(BATCH)]

    def base() -> None:
        with torch.no_grad(), ours.disable_adapters():
            ours(input_ids=ids)

    def routed() -> None:
        with torch.no_grad():
            ours(input_ids=ids, adapter_names=names)

    def merged_forward() -> None:
        with torch.no_grad():
            ours(input_ids=ids)

    result: dict[str, Any] = {}
    ratios, base_s = paired_ratios({"base": base, "routed": routed}, "base", budget_s / 2, clock=clock)
    result["routed_over_base"] = ratios["routed"].__dict__
    ours.set_active("a0")
    ours.merge_adapter(["a0"])
    try:
        ratios, _ = paired_ratios({"base": base, "merged": merged_forward}, "base", budget_s / 2, clock=clock)
    finally:
        ours.unmerge_adapter()
    result["merged_over_base"] = ratios["merged"].__dict__
    result["base_forward_s"] = round(base_s, 4)
    result["peftkit"] = str(Path(sys.modules["peftkit"].__file__).parent.resolve())
    return result


def package_tree(revision: str, folder: Path) -> Path:
    """Revision ``revision`` of this repository, laid out under ``folder`` as the installed package
    (pyproject.toml's package-dir: ``peftkit.core`` from ``core/``...), for ``sys.path``."""
    source = folder / "source"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package_dirs = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tree = folder / "tree"
    for package, directory in sorted(package_dirs.items()):
        target = tree.joinpath(*package.split("."))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source / directory, target_is_directory=True)
    return tree


def _guard_in(tree: Path | None, budget_s: float, threads: int, clock: str) -> dict[str, Any]:
    """bench_guard in a subprocess whose peftkit is the one under ``tree`` (None: this checkout's)."""
    code = ("import sys, runpy; tree = sys.argv[1]\n"
            "if tree: sys.path.insert(0, tree)\n"
            "import peftkit; print('peftkit from', peftkit.__file__, file=sys.stderr)\n"
            "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    command = [sys.executable, "-c", code, str(tree or ""), __file__, "--only", "guard", "--budget", str(budget_s),
               "--threads", str(threads), "--clock", clock, "--json-only"]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(done.stdout)["guard"]


def compare_with(revision: str, passes: int, budget_s: float, threads: int, clock: str) -> dict[str, Any]:
    """The guard figures of ``revision`` and of this checkout, measured in alternating subprocesses
    (``passes`` each), and the medians over the passes."""
    runs: dict[str, list[dict[str, Any]]] = {revision: [], "checkout": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = package_tree(revision, Path(tmp))
        for _ in range(passes):
            runs[revision].append(_guard_in(tree, budget_s, threads, clock))
            runs["checkout"].append(_guard_in(None, budget_s, threads, clock))
    summary = {name: {key: round(statistics.median(run[key]["median"] for run in results), 4)
                      for key in ("routed_over_base", "merged_over_base")} for name, results in runs.items()}
    return {"passes": runs, "medians": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["routing", "sites", "blocks", "merging", "guard"], action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of paired rounds for the guard part")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="the guard part's clock")
    parser.add_argument("--against", metavar="REV", help="compare the guard figures with git revision REV's code")
    parser.add_argument("--passes", type=int, default=2, help="alternating subprocesses per side for --against")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against:
        print(json.dumps(compare_with(args.against, args.passes, args.budget, args.threads, args.clock), indent=1))
        return
    torch.set_num_threads(args.threads)
    parts = args.only or ["routing", "sites", "blocks", "merging", "guard"]
    base = build_base()
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_pair(base, Path(tmp), with_peft=parts != ["guard"])
    if args.json_only:
        print(json.dumps({"guard": bench_guard(ours, args.budget, args.clock)}))
        return
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds}
    if "routing" in parts:
        report["routing_32_rows_8_adapters"] = bench_routing(ours, theirs, args.rounds)
        print(json.dumps({"routing": report["routing_32_rows_8_adapters"]}, indent=1), flush=True)
    if "sites" in parts:
        report["sites_32_rows_8_adapters"] = bench_sites(ours, theirs, max(20, 4 * args.rounds))
        print(json.dumps({"sites": report["sites_32_rows_8_adapters"]}, indent=1), flush=True)
    if "blocks" in parts:
        report["blocks"] = bench_blocks(ours, theirs, args.rounds)
        print(json.dumps({"blocks": report["blocks"]}, indent=1), flush=True)
    if "merging" in parts:
        report["merging_4_adapters"] = bench_merging(ours, theirs, max(3, args.rounds // 2))
        print(json.dumps({"merging": report["merging_4_adapters"]}, indent=1), flush=True)
    if "guard" in parts:
        report["guard"] = bench_guard(ours, args.budget, args.clock)
        print(json.dumps({"guard": report["guard"]}, indent=1), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
