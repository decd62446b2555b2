"""The performance table of every built-in method next to Hugging Face peft, in one process.

The Llama of bench_lora.py (hidden 512, 4 layers, intermediate 1376, vocab 8000),
seq 128, batch 4, fp32, 2 threads. For each method the adapter (random weights,
not the identity) is saved by peftkit and loaded by peft, so both run the same
weights; their logits are compared. Times are taken in paired rounds
(timing.paired_ratios): each round times the frozen base, peftkit and peft back
to back in a shuffled order and takes the ratios within the round; the table
gives the median of the per-round ratios and half the width of its 95%
bootstrap interval (``1.081 ± 0.012``), so a load burst moves one round, not
the figure, and the spread says what is noise. Rounds run for a time budget per
method (``--budget``), after a warm-up until two calls agree, with the garbage
collector off while a round runs. Ratios are multiples of the frozen base:

- step: a training step (forward + backward) over a frozen-base forward+backward
  that computes input gradients only (the least any adapter's step can cost);
- fwd: an unmerged inference forward over the base model's forward;
- merged: the forward with the adapter merged into the weights (mergeable methods);
- floor: the matrix-multiply FLOPs over the frozen base's (torch's FlopCounterMode,
  the fewer of peftkit's and peft's), for the step and for the forward (1 for a
  merged forward): the ratio if every added operation ran as fast as the base's
  own products. A ratio below its floor is flagged: it is noise or a measurement
  artefact, not a result.

Memory: the activations autograd keeps for backward during the forward (distinct
storages, model weights not counted) and the peak of memory allocated during a
training step above what was allocated before it (torch.profiler's memory events).

Subnormal floats: each training step's share of subnormal results is counted (a CPU computes them
many times slower), and the table names any step where it passes 0.01%: its figure times denormal
arithmetic, not the method. An adapter start that drives activations to overflow does that, so a
method whose ``init_weights=false`` does is given another non-identity start (``REDRAWN``).

Writes docs/performance.md with the machine, versions, load and command. On a
busy machine, ``--threads 1 --clock cpu`` times CPU time instead of wall time
(time spent waiting for a core then does not count).

On a GPU, ``--device cuda --dtype bfloat16 --size large`` measures the same
table at a size that keeps the GPU busy (hidden 2048, 8 layers, intermediate
5504, vocab 32000, batch 8, sequence 512) and writes docs/performance-gpu.md:
every timed call ends with ``torch.cuda.synchronize()``, and the peak is
``torch.cuda.max_memory_allocated`` above the level before the step.

``--autocast bfloat16`` measures the float32 model trained and run under ``torch.autocast`` (mixed
precision as a Trainer with ``bf16=True`` runs it) and writes docs/performance-autocast.md on the CPU.

``--compile`` times every model (peftkit's, peft's and the base) as ``torch.compile(model)`` builds it with
its default compiler (inductor: C++ kernels on the CPU, Triton on a GPU) and writes docs/performance-compile.md
(docs/performance-gpu-compile.md on a GPU). The ratios stay multiples of the base, the compiled base there;
each model is compiled and run twice before the rounds; the FLOP floors and the memory columns come from the
eager models (autograd's hooks do not see inside a compiled graph).

Run: .venv/bin/python bench/perf_table.py [--budget 45] [--only lora_r8,dora_r8] [--output docs/performance.md]
     .venv/bin/python bench/perf_table.py --autocast bfloat16
     .venv/bin/python bench/perf_table.py --compile [--only lora_r8,dora_r8]
     .venv/bin/python bench/perf_table.py --device cuda --dtype bfloat16 --size large [--budget 20]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_lora import build_base  # noqa: E402
from scratch import scratch_folder  # noqa: E402
from timing import CLOCKS, lm_forward, lm_train_step, paired_ratios, Ratio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """The Llama (built from a config) and the batch of token ids a table measures."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.layers} layers, intermediate {self.intermediate}, vocab {self.vocab}), "
                f"batch {self.batch}, sequence {self.seq}")


#: small: the CPU table (2 cores); large: the GPU table (bf16, a size that keeps the GPU busy).
SIZES = {"small": Size(512, 1376, 4, 8, 8000, 4, 128), "large": Size(2048, 5504, 8, 16, 32000, 8, 512)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Setup:
    """Where and at what size the table is measured; ``autocast``: the dtype every step and forward runs
    under ``torch.autocast`` in (a float32 model trained as a Trainer with ``bf16=True`` trains it), or None."""

    device: str
    dtype: torch.dtype
    size: Size
    autocast: torch.dtype | None = None
    compiled: bool = False

    def describe(self) -> str:
        text = f"{self.size.describe()}, {str(self.dtype).removeprefix('torch.')}"
        if self.autocast is not None:
            text += f" under {str(self.autocast).removeprefix('torch.')} autocast"
        if self.compiled:
            text += ", every model torch.compile'd (inductor)"
        return text + ("" if self.device == "cpu" else ", on the GPU")

    def timed(self, model: Any) -> Any:
        """The model the rounds time: ``torch.compile(model)`` with ``--compile``, else the model itself."""
        return torch.compile(model) if self.compiled else model

    def run(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` run under this setup's autocast (``fn`` itself without one)."""
        if self.autocast is None:
            return fn

        def under_autocast(*args: Any, **kwargs: Any) -> None:
            with torch.autocast(self.device, dtype=self.autocast):
                fn(*args, **kwargs)
        return under_autocast

#: key -> (label in the table, peftkit spec; init_weights=false where the identity would be trivial)
METHODS: dict[str, tuple[str, str]] = {
    "lora_r8": ("LoRA r8 all-linear", "lora[r=8,alpha=16,init_weights=false,target_modules=all-linear]"),
    "lora_r8_dropout": ("LoRA r8 all-linear, dropout 0.1",
                        "lora[r=8,alpha=16,dropout=0.1,init_weights=false,target_modules=all-linear]"),
    "lora_r64": ("LoRA r64 all-linear", "lora[r=64,alpha=128,init_weights=false,target_modules=all-linear]"),
    "dora_r8": ("DoRA r8 all-linear",
                "lora[r=8,alpha=16,init_weights=false,use_dora=true,target_modules=all-linear]"),
    "lokr_r8": ("LoKr r8 all-linear", "lokr[r=8,alpha=16,init_weights=false,target_modules=all-linear]"),
    "oft": ("OFT block 32 all-linear", "oft[oft_block_size=32,init_weights=false,target_modules=all-linear]"),
    "boft": ("BOFT block 8 all-linear", "boft[boft_block_size=8,init_weights=false,target_modules=all-linear]"),
    "vera": ("VeRA r256 all-linear", "vera[r=256,init_weights=false,target_modules=all-linear]"),
    "adalora": ("AdaLoRA r12 all-linear", "adalora[init_r=12,target_r=8,total_step=100,target_modules=all-linear]"),
    "ia3": ("IA3", "ia3[init_weights=false]"),
    "prefix": ("prefix tuning (20)", "prefix_tuning[num_virtual_tokens=20]"),
    "prompt": ("prompt tuning (20)", "prompt_tuning[num_virtual_tokens=20]"),
    "p_tuning": ("P-tuning (20), MLP encoder", "p_tuning[num_virtual_tokens=20]"),
    "tokens": ("trainable tokens (16 rows)",
               f"trainable_tokens[token_indices=[{','.join(map(str, range(100, 116)))}],init_weights=false]"),
    "ln_tuning": ("LN tuning", "ln_tuning"),
    "fourierft": ("FourierFT 1000 all-linear", "fourierft[n_frequency=1000,scaling=150,target_modules=all-linear]"),
    "hra": ("HRA r8 all-linear", "hra[r=8,init_weights=false,target_modules=all-linear]"),
    "miss": ("MiSS r64 all-linear", "miss[r=64,init_weights=false,target_modules=all-linear]"),
    "vblora": ("VB-LoRA r4 all-linear", "vblora[r=4,vector_length=32,target_modules=all-linear]"),
    "randlora": ("RandLoRA r32 all-linear", "randlora[r=32,target_modules=all-linear]"),
    "c3a": ("C3A block 32 all-linear", "c3a[block_size=32,target_modules=all-linear]"),
    "shira": ("SHiRA r8 all-linear", "shira[r=8,init_weights=false,target_modules=all-linear]"),
    "road": ("RoAd road_1 group 32 all-linear", "road[group_size=32,init_weights=false,target_modules=all-linear]"),
    "delora": ("DeLoRA r8 all-linear", "delora[r=8,init_weights=false,target_modules=all-linear]"),
    "gralora": ("GraLoRA r8 k2 all-linear", "gralora[r=8,alpha=16,init_weights=false,target_modules=all-linear]"),
    "hira": ("HiRA r8 all-linear", "hira[r=8,init_weights=false,target_modules=all-linear]"),
    "beft": ("BEFT all-linear", "beft[init_weights=false,target_modules=all-linear]"),
    "glora": ("GLoRA r8 all-linear", "glora[r=8,init_weights=false,target_modules=all-linear]"),
    "pvera": ("PVeRA r256 all-linear", "pvera[r=256,init_weights=false,target_modules=all-linear]"),
    "adaption_prompt": ("adaption prompts (10) every layer", "adaption_prompt[adapter_len=10]"),
}
#: The methods whose adapters do not merge into this Llama's weights (no merged column): neither library merges
#: the first four; BEFT merges into a layer's bias, and the Llama's layers have none (PEFT refuses it too).
UNMERGED = ("prefix", "prompt", "p_tuning", "adaption_prompt", "beft")
#: Parameters drawn again after ``peftkit.adapt``, before the adapter is saved for peft: key -> (the parameters'
#: name suffix, the standard deviation of a seeded normal draw). AdaLoRA's ``init_weights=false`` draws every
#: factor from N(0, 1), as PEFT's does: the update then dwarfs the base's outputs, the norms saturate, and 0.2%
#: of a step's results are subnormal floats, which made the step twice as slow on a CPU, peft's as much as
#: peftkit's. PEFT's own start (A and B from N(0, 0.02), E zero) with E drawn from N(0, 1) changes the outputs
#: at the scale of a trained adapter.
REDRAWN = {"adalora": ("lora_E", 1.0)}
#: A step whose share of subnormal results exceeds this is flagged in the table (see ``subnormal_share``).
SUBNORMAL_LIMIT = 1e-4


def redrawn(model: Any, key: str) -> Any:
    """``model`` with the parameters ``REDRAWN`` names for ``key`` drawn again (the same draw in every run)."""
    if key in REDRAWN:
        suffix, std = REDRAWN[key]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(suffix):
                    drawn = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                    param.copy_(drawn.to(param.dtype))
    return model


def subnormal_share(step: Callable[..., None]) -> float:
    """The share of the floating-point values that every aten call of one run of ``step`` returned (forward
    and backward) that are subnormal: nonzero and below the dtype's smallest normal number. A CPU computes
    these many times slower than normal floats, so a step with many of them times that arithmetic instead of
    the method (an adapter start that drives activations or gradients to underflow)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts = [0, 0]  # subnormal values, all values

    class SubnormalCount(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for value in tree_leaves(out):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.layout == torch.strided:
                    size = value.detach().abs()
                    counts[0] += int(((size > 0) & (size < torch.finfo(value.dtype).tiny)).sum())
                    counts[1] += value.numel()
            return out

    with SubnormalCount():
        step()
    return counts[0] / max(counts[1], 1)


def saved_activation_bytes(step: Callable[..., None], weights: set[int]) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``step``'s forward,
    the model's weights (``weights``: their data pointers) left out."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided:  # a sparse tensor (PEFT's SHiRA): its indices' and values' storages
            for part in (t._indices(), t._values()) if t.layout == torch.sparse_coo else ():
                seen[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(seen.values())


def peak_step_bytes(step: Callable[..., None], device: str = "cpu") -> int:
    """The peak of bytes allocated during one training step above the level before it: on the CPU from
    the allocation events torch.profiler records with profile_memory=True, on a GPU from CUDA's
    allocator statistics."""
    import json

    from torch.profiler import ProfilerActivity, profile

    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def _product_flops(_accumulated: Any, left: Any, right: Any, *_: Any, **__: Any) -> int:
    """FLOPs of ``left @ right`` (shapes (..., m, k) and (..., k, n)), one multiply and one add each."""
    batch = left[0] if len(left) == 3 else 1
    return 2 * batch * left[-2] * left[-1] * right[-1]


def step_flops(step: Callable[..., None]) -> int:
    """Matrix-multiply FLOPs of one call of ``step`` (a training step or an inference forward).

    torch's counter has no formula for the in-place products (``addmm_``, ``baddbmm_``: DeLoRA's training
    forward accumulates its base product with ``addmm_``, since ``addmm(out=)`` takes no autograd); they
    cost what their out-of-place forms cost, so they are counted with those forms' formulas."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={aten.addmm_: _product_flops,
                                                             aten.baddbmm_: _product_flops})
    with counter:
        step()
    return counter.get_total_flops()


def weight_pointers(model: Any) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def peft_model(base: Any, folder: str) -> Any:
    """peft's model with the saved adapter, trainable (peft refuses is_trainable=True for prompt
    learning methods: their prompt encoder is made trainable after loading)."""
    import peft

    config = peft.PeftConfig.from_pretrained(folder)
    if config.peft_type == "P_TUNING":  # its folder holds the encoder's output only: the encoder is made again,
        config.inference_mode = False  # after the seed peftkit's adapter was made with (the same start)
        torch.manual_seed(0)
        return peft.get_peft_model(copy.deepcopy(base), config)
    if not config.is_prompt_learning:
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model.prompt_encoder.requires_grad_(True)
    return model


@dataclass(frozen=True)
class Timing:
    """How the rounds are run: seconds of rounds per method (split between the training step, the
    forward and the merged forward), the clock (timing.CLOCKS) and the least seconds per timed unit."""

    budget_s: float
    clock: str
    unit_s: float
    device: str = "cpu"

    def ratios(self, fns: dict[str, Callable[[], object]], share: float) -> tuple[dict[str, Ratio], float]:
        return paired_ratios(fns, "base", self.budget_s * share, clock=self.read, unit_s=self.unit_s)

    def read(self) -> float:
        """The clock's seconds; on a GPU once the work queued so far has run (kernels run asynchronously)."""
        if self.device != "cpu":
            torch.cuda.synchronize()
        return CLOCKS[self.clock]()


#: The budget's shares: training step, unmerged forward, merged forward.
SHARES = {"train": 0.5, "forward": 0.25, "merged": 0.25}


def models_and_input(setup: Setup) -> tuple[Any, torch.Tensor, Any]:
    """(the Llama, the batch of token ids, the frozen base: a copy taking no parameter gradients
    that computes its input's gradient, in training mode), the same in every run."""
    size = setup.size
    base = build_base(hidden=size.hidden, intermediate=size.intermediate, layers=size.layers, heads=size.heads,
                      vocab=size.vocab, positions=max(256, size.seq)).to(device=setup.device, dtype=setup.dtype)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(setup.device)
    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    frozen.train()
    return base, ids, frozen


def compiled_and_run(setup: Setup, models: dict[str, Any], make: Callable[[Any, torch.Tensor], Callable[..., None]],
                     ids: torch.Tensor) -> dict[str, Callable[..., None]]:
    """The timed calls (``make(model, ids)`` under the setup's autocast) of each model as ``setup.timed`` gives
    it; compiled ones run twice first, so that no round times a compilation."""
    calls = {name: setup.run(make(setup.timed(model), ids)) for name, model in models.items()}
    compiled_before_rounds(setup, calls)
    return calls


def compiled_before_rounds(setup: Setup, calls: dict[str, Callable[..., None]]) -> None:
    """With ``--compile``, each call run twice (compiling, then once compiled), so that no round times a
    compilation; nothing otherwise."""
    if setup.compiled:
        for call in calls.values():
            call()
            call()


def measure(key: str, base: Any, ids: torch.Tensor, frozen: Any, timing: Timing, setup: Setup) -> dict[str, Any]:
    import peftkit

    label, spec = METHODS[key]
    torch.manual_seed(0)
    ours = redrawn(peftkit.adapt(copy.deepcopy(base), spec), key)
    folder = scratch_folder()
    ours.save_adapter(folder)
    theirs = peft_model(base, folder)
    ours.eval()
    theirs.eval()
    with torch.no_grad(), torch.autocast(setup.device, dtype=setup.autocast or torch.bfloat16,
                                         enabled=setup.autocast is not None):
        difference = (ours(input_ids=ids).logits.float() - theirs(input_ids=ids).logits.float()).abs().max().item()

    for model in (ours, theirs):
        model.train()
    trained = {"peftkit": ours, "peft": theirs, "base": frozen}
    steps = {name: setup.run(lm_train_step(model, ids)) for name, model in trained.items()}
    train, base_step = timing.ratios(compiled_and_run(setup, trained, lm_train_step, ids), SHARES["train"])
    flops = {name: step_flops(step) for name, step in steps.items()}
    saved = {name: saved_activation_bytes(step, weight_pointers(trained[name])) for name, step in steps.items()}
    peak = {name: peak_step_bytes(step, timing.device) for name, step in steps.items()}
    subnormal = {name: subnormal_share(step) for name, step in steps.items()}

    for model in (ours, theirs, base):
        model.eval()
    inferring = {"peftkit": ours, "peft": theirs, "base": base}
    forwards = compiled_and_run(setup, inferring, lm_forward, ids)
    forward, base_forward = timing.ratios(forwards, SHARES["forward"])
    forward_flops = {name: step_flops(setup.run(lm_forward(model, ids, inference_mode=False)))
                     for name, model in inferring.items()}
    merged: dict[str, Ratio] = {}
    if key not in UNMERGED:
        ours.merge_adapter()
        theirs.merge_adapter()
        compiled_before_rounds(setup, forwards)  # the merged models recompile: not in a timed round
        merged, _ = timing.ratios(forwards, SHARES["merged"])
    return {"key": key, "label": label, "spec": spec, "difference": difference, "train": train,
            "forward": forward, "merged": merged,
            "floor": min(flops["peftkit"], flops["peft"]) / flops["base"],
            "forward_floor": min(forward_flops["peftkit"], forward_flops["peft"]) / forward_flops["base"],
            "saved": saved, "peak": peak, "subnormal": subnormal, "base_step_s": base_step,
            "base_forward_s": base_forward}


#: The mark of a ratio below its floor.
BELOW_FLOOR = "↓"


def _ratio(ratios: dict[str, Ratio], name: str, floor: float) -> str:
    """``median ± spread`` of ``name``'s ratio, flagged when the median is below ``floor``."""
    if not ratios:
        return "-"
    ratio = ratios[name]
    return ratio.text(3) + (f" {BELOW_FLOOR}" if ratio.median < floor else "")


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


@dataclass(frozen=True)
class Conditions:
    """What else the machine did while the table was measured."""

    loads: tuple[float, float]  # load average at the start and at the end
    steal: float | None  # share of the CPUs' time the hypervisor gave to other machines (/proc/stat); None: unknown


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs so far, from Linux's /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (ticks[7] if len(ticks) == 8 else 0), sum(ticks)


def steal_share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def machine(device: str) -> str:
    """The CPU's model name and core count, and on a GPU its name and CUDA version too."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    host = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    if device == "cpu":
        return f"{host}; {torch.get_num_threads()} torch threads"
    return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}) on {host}"


def subnormal_note(results: list[dict[str, Any]]) -> str:
    """The table's word on subnormal floats: the steps where more than ``SUBNORMAL_LIMIT`` of the results were
    subnormal (their figures time denormal arithmetic), or that none was."""
    flagged = [f"{r['label']} (peftkit {r['subnormal']['peftkit']:.2%}, peft {r['subnormal']['peft']:.2%})"
               for r in results if max(r["subnormal"].values()) > SUBNORMAL_LIMIT]
    if not flagged:
        return (f"Subnormal floats: no training step had more than {SUBNORMAL_LIMIT:.2%} of its results subnormal "
                "(a CPU computes those many times slower), so no figure above times denormal arithmetic.")
    return (f"Subnormal floats: more than {SUBNORMAL_LIMIT:.2%} of the training step's results were subnormal in "
            f"{'; '.join(flagged)}. A CPU computes those many times slower, so these step figures time denormal "
            "arithmetic as much as the method: the adapter's start drives activations or gradients to underflow.")


def table_title(setup: Setup) -> str:
    """The page's heading: what sets this table apart from the others (a GPU, a dtype other than the reference,
    autocast, torch.compile), as its file name does (:func:`default_output_name`)."""
    reference = torch.float32 if setup.device == "cpu" else torch.bfloat16
    return ("# Performance" + ("" if setup.device == "cpu" else " on a GPU")
            + (f" in {str(setup.dtype).removeprefix('torch.')}" if setup.autocast is None
               and setup.dtype != reference else "")
            + ("" if setup.autocast is None else f" under {str(setup.autocast).removeprefix('torch.')} autocast")
            + (" with torch.compile" if setup.compiled else ""))


def render(results: list[dict[str, Any]], timing: Timing, setup: Setup, command: str, conditions: Conditions,
           wall_s: float) -> str:
    import peft
    import transformers

    import peftkit

    loads, steal = conditions.loads, conditions.steal
    busy = setup.device == "cpu" and (max(loads) > torch.get_num_threads() or (steal or 0) > 0.05)
    clock = "wall time" if timing.clock == "wall" else "CPU time of the process"
    lines = [
        table_title(setup),
        "",
        "Every built-in method's training step and inference forward next to Hugging Face `peft`,",
        "measured in one process by `bench/perf_table.py` (written by it; do not edit by hand).",
        "",
        f"- Command: `{command}` ({wall_s / 60:.1f} min)",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine(setup.device)}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, peftkit {peftkit.__version__}",
        f"- Model: Llama from a config ({setup.describe()}",
        f"- Timings ({clock}): paired rounds, {timing.budget_s:g} s of them per method; each round times the "
        "base model, peftkit and peft back to back in a shuffled order and takes the ratios within the round. "
        "A figure is the median of the per-round ratios ± half the width of its 95% bootstrap interval",
        f"- Load average at start / end: {loads[0]:.2f} / {loads[1]:.2f}"
        + ("" if steal is None else f"; CPU time taken by other virtual machines (steal): {steal:.1%}")
        + (" — the machine was busy with other work during this run, so these figures are noisier than "
           "on a quiet machine; rerun the command on a quiet one for the reference table" if busy else ""),
        "",
        "Columns: *step* is a training step (forward + backward) over a frozen-base forward+backward that",
        "computes input gradients only; *fwd* an unmerged inference forward over the base forward;",
        "*merged* the forward with the adapter merged into the weights over the base forward. The *floor*",
        "columns give the matrix-multiply FLOPs over the frozen base's (the ratio if every added operation",
        "ran as fast as the base's products; the fewer of the two libraries' FLOPs); a merged forward's",
        "floor is 1. A step floor below 1 means the adapted model needs no gradient for the first layer's",
        "input, which the frozen base computes; prompt tuning lengthens the sequence, so its floors are",
        f"above 1. {BELOW_FLOOR} marks a ratio below its floor: that is noise (or a kernel that happened to run",
        "faster), not a result. Lower is better everywhere. `bench/profile_step.py` breaks a method's time",
        "beyond the base down (counts per step; each layer shape against its bare base layer).",
        "",
        "| method | peftkit step | peft step | step floor | peftkit fwd | peft fwd | fwd floor | peftkit merged "
        "| peft merged | logits max diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        train, forward, merged = r["train"], r["forward"], r["merged"]
        lines.append(f"| {r['label']} | {_ratio(train, 'peftkit', r['floor'])} | {_ratio(train, 'peft', r['floor'])} "
                     f"| {r['floor']:.3f} | {_ratio(forward, 'peftkit', r['forward_floor'])} "
                     f"| {_ratio(forward, 'peft', r['forward_floor'])} | {r['forward_floor']:.3f} "
                     f"| {_ratio(merged, 'peftkit', 1.0)} | {_ratio(merged, 'peft', 1.0)} "
                     f"| {r['difference']:.1e} |")
    lines += ["", subnormal_note(results)]
    lines += [
        "",
        "Memory of a training step, MiB: activations kept for backward (distinct storages, weights not",
        "counted) and the peak allocated during the step above the level before it."
        + ("" if not setup.compiled else " Measured on the eager models: autograd's hooks do not see inside a "
           "compiled graph.")
        + ("" if setup.autocast is None else " Under autocast the tensors kept include the half-precision "
           "copies of frozen weights that autocast's own linear layers keep for backward (the base's and "
           "PEFT's; peftkit's fused layers cast the weight again in backward instead)."),
        "",
        "| method | peftkit saved | peft saved | base saved | peftkit peak | peft peak | base peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, p = r["saved"], r["peak"]
        lines.append(f"| {r['label']} | {_mib(s['peftkit'])} | {_mib(s['peft'])} | {_mib(s['base'])} "
                     f"| {_mib(p['peftkit'])} | {_mib(p['peft'])} | {_mib(p['base'])} |")
    lines += ["", "Medians of the base model's time per call and the rounds behind each figure (step / fwd / "
              "merged):", ""]
    lines += [f"- {r['label']}: step {r['base_step_s'] * 1000:.0f} ms, fwd {r['base_forward_s'] * 1000:.0f} ms; "
              f"{' / '.join(str(r[part]['base'].rounds) if r[part] else '-' for part in SHARES)} rounds"
              for r in results]
    lines.append("")
    return "\n".join(lines)


def default_output_name(device: str, dtype: str, autocast: str | None, compiled: bool = False) -> str:
    """The file a table is written to unless ``--output`` names one: performance.md for the CPU table
    (float32), performance-gpu.md for the GPU table (bfloat16); any other dtype, autocast or compilation adds
    its name, so no run overwrites another's table (``--dtype bfloat16`` on the CPU: performance-bfloat16.md;
    ``--autocast bfloat16``: performance-autocast.md, on a GPU performance-gpu-autocast.md; ``--compile``:
    performance-compile.md)."""
    name = "performance" + ("" if device == "cpu" else "-gpu")
    reference_dtype = "bfloat16" if device != "cpu" and autocast is None else "float32"
    if dtype != reference_dtype:
        name += f"-{dtype}"
    return name + ("-autocast" if autocast else "") + ("-compile" if compiled else "") + ".md"


def measured_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that change what is measured (``--output`` only says where it goes)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif not arg.startswith("--output="):
            kept.append(arg)
    return kept


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=45.0,
                        help="seconds of timed rounds per method (default 45: about 8 minutes in all, quiet 2 cores)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default) or the process's CPU time (a busy machine, --threads 1)")
    parser.add_argument("--unit", type=float, default=0.25,
                        help="least seconds per timed unit: a function is called this long back to back")
    parser.add_argument("--only", default="", help=f"comma-separated keys of {', '.join(METHODS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the model's dtype (the GPU table: bfloat16)")
    parser.add_argument("--autocast", choices=sorted(DTYPES.keys() - {"float32"}), default=None,
                        help="run every step and forward under torch.autocast in this dtype (with the default "
                             "--dtype float32: mixed-precision training as a Trainer with bf16=True runs it)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: hidden 512 x 4 layers, batch 4 x 128 (the CPU table); large: hidden 2048 x "
                             "8 layers, batch 8 x 512 (the GPU table)")
    parser.add_argument("--compile", action="store_true",
                        help="time every model as torch.compile(model) builds it (inductor); writes "
                             "docs/performance-compile.md")
    parser.add_argument("--output", default=None,
                        help="the Markdown file to write ('-' prints it only; default docs/performance.md, "
                             "with --device cuda docs/performance-gpu.md; another dtype or --autocast adds "
                             "its name: docs/performance-bfloat16.md, docs/performance-autocast.md, "
                             "docs/performance-gpu-autocast.md)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu times the host process, not the GPU; use the wall clock with --device cuda")
    output = args.output or str(ROOT / "docs" / default_output_name(args.device, args.dtype, args.autocast,
                                                                    args.compile))
    keys = [k for k in args.only.split(",") if k] or list(METHODS)
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        parser.error(f"unknown method key(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.budget <= 0 or args.unit <= 0:
        parser.error("--budget and --unit take a positive number of seconds")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from transformers import logging

    logging.set_verbosity_error()
    loads, ticks = os.getloadavg()[0], cpu_times()
    timing = Timing(args.budget, args.clock, args.unit, args.device)
    setup = Setup(args.device, DTYPES[args.dtype], SIZES[args.size], args.autocast and DTYPES[args.autocast],
                  args.compile)
    base, ids, frozen = models_and_input(setup)
    results = []
    for key in keys:
        r = measure(key, base, ids, frozen, timing, setup)
        results.append(r)
        print(f"measured {key} ({time.perf_counter() - started:.0f} s): step peftkit "
              f"{_ratio(r['train'], 'peftkit', r['floor'])}, peft {_ratio(r['train'], 'peft', r['floor'])}; "
              f"fwd peftkit {_ratio(r['forward'], 'peftkit', r['forward_floor'])}, "
              f"peft {_ratio(r['forward'], 'peft', r['forward_floor'])}", file=sys.stderr, flush=True)
    command = "python bench/perf_table.py " + " ".join(shlex.quote(a) for a in measured_arguments(sys.argv[1:]))
    conditions = Conditions((loads, os.getloadavg()[0]), steal_share(ticks, cpu_times()))
    text = render(results, timing, setup, command.strip(), conditions, time.perf_counter() - started)
    if output != "-":
        Path(output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
