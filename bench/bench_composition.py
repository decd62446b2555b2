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

Timings alternate between the contenders round by round and report the median
(and min) over rounds; "overhead" subtracts the bare base model's median.
The machine is shared: run it more than once.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore")

HIDDEN, LAYERS, HEADS, INTER, VOCAB, SEQ, BATCH, N_ADAPTERS, RANK = 512, 4, 8, 1376, 8000, 128, 32, 8, 16


def build_base() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                         max_position_embeddings=2 * SEQ)
    return LlamaForCausalLM(config).eval()


def build_pair(base: Any, folder: Path) -> tuple[Any, Any]:
    """peftkit and PEFT models holding the same N_ADAPTERS adapters (a0..a7)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["routing", "sites", "blocks", "merging"], action="append")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.only or ["routing", "sites", "blocks", "merging"]
    base = build_base()
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_pair(base, Path(tmp))
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
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
