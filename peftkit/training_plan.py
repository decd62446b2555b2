"""Checking a ``peftkit train`` run before anything heavy loads: options, method, output folder,
checkpoint to resume, hub target and data, into a :class:`TrainPlan`.

Imports no torch, so mistakes fail fast. :mod:`peftkit.training` holds the entry point
(``peftkit.train``), :mod:`peftkit.training_run` runs a plan, :mod:`peftkit.adapter_trainer` holds
the Trainer subclass, :mod:`peftkit.training_data` the data side and :mod:`peftkit.cli_train` the command.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError, PushAfterTrainingError
from peftkit.core.model_source import looks_local
from peftkit.core.plugins import parse_spec
from peftkit.core.own_metadata import read_own_metadata
from peftkit.hub_client.errors import BaseModelWarning
from peftkit.hub_client.upload import TRAINABLE_STATE_FILE
from peftkit.training_data import CLASSIFICATION_TASKS, LABELS_FILE, TASKS, Fields, LabelMap, load_examples

RESULTS_FILE = "train_results.json"
CHECKPOINT_PREFIX = "checkpoint-"
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: How ``quantize`` loads the base model (bitsandbytes): None keeps it unquantized.
QUANTIZE = (None, "4bit", "8bit")


@dataclass
class TrainOptions:
    """Everything about a run besides model, method and data. The CLI flags have the same names."""

    # data
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str = "label"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    labels: list[str] | None = None
    max_length: int = 512
    # optimization
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    warmup_steps: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    lora_plus_ratio: float | None = None  # LoRA+: LoRA's B factors train at lr * ratio (peftkit.lora_plus)
    seed: int = 42
    bf16: bool = False
    cpu: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the base model over the processes with FSDP2 (peftkit.training_fsdp)
    dtype: str = "float32"
    quantize: str | None = None  # "4bit" (NF4, QLoRA) or "8bit": load the base model quantized with bitsandbytes
    # evaluation, logging, checkpoints
    eval_steps: int | None = None
    # the evaluation metric that ranks checkpoints and early stopping (None: "loss" where one is needed)
    metric_for_best_model: str | None = None
    load_best_model_at_end: bool = False  # the saved adapter is the best evaluation's (a checkpoint per evaluation)
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    checkpoint_dir: str | None = None
    resume: str | bool | None = None
    overwrite: bool = False
    quiet: bool = False
    report_to: str = "none"
    # what is recorded, and where it is published
    adapter_name: str = "default"
    dataset_name: str | None = None
    push: str | None = None
    hub: str | None = None
    private: bool | None = None
    base_model: str | None = None

    def check(self) -> None:
        self._check_number_types()
        positive = {"max_length": self.max_length, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "logging_steps": self.logging_steps}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PeftkitError(f"{name} must be a whole number >= 1, not {value!r}")
        for name in ("max_steps", "eval_steps", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PeftkitError(f"{name} must be a whole number >= 1 (or unset), not {value!r}")
        if self.save_steps < 0:
            raise PeftkitError(f"save_steps must be >= 0 (0 saves no checkpoints), not {self.save_steps!r}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise PeftkitError(f"save_total_limit must be >= 1 (or unset to keep all), not {self.save_total_limit}")
        if not self.lr > 0:
            raise PeftkitError(f"lr must be > 0, not {self.lr!r}")
        if self.lora_plus_ratio is not None and not self.lora_plus_ratio > 0:
            raise PeftkitError(f"lora_plus_ratio must be > 0 (B's lr is lr * ratio; LoRA+ uses 2 to 16), "
                               f"not {self.lora_plus_ratio!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise PeftkitError(f"epochs must be > 0 (or give max_steps), not {self.epochs!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise PeftkitError("warmup_steps and weight_decay must be >= 0")
        if self.dtype not in DTYPES:
            raise PeftkitError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise PeftkitError(f"quantize must be one of {', '.join(q for q in QUANTIZE if q)} (or unset), "
                               f"not {self.quantize!r}")
        if self.quantize:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise PeftkitError(f"quantize={self.quantize!r} loads the base model with bitsandbytes, which is not "
                                   f"installed: pip install bitsandbytes")

    def check_scheduler(self) -> None:
        """An unknown lr_scheduler fails naming the option and the close names, before the model loads (not
        after it, in transformers' words). Not part of check(): transformers' list imports torch, and bad
        options and data are refused without it."""
        import difflib

        from transformers.trainer_utils import SchedulerType

        names = [kind.value for kind in SchedulerType]
        if self.lr_scheduler not in names:
            close = difflib.get_close_matches(str(self.lr_scheduler), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PeftkitError(f"lr_scheduler (--lr-scheduler) {self.lr_scheduler!r} is not one of transformers' "
                               f"schedulers; {hint}choose one of {', '.join(names)}")

    def _check_number_types(self) -> None:
        """Numbers given as strings (read from a config file) fail here naming the option, not as a
        TypeError from a comparison."""
        numbers = ("epochs", "lr", "warmup_steps", "weight_decay", "lora_plus_ratio")
        whole = ("max_length", "max_steps", "batch_size", "eval_batch_size", "grad_accum", "seed", "eval_steps",
                 "logging_steps", "save_steps", "save_total_limit")
        for name in numbers + whole:
            value = getattr(self, name)
            kinds = (int,) if name in whole else (int, float)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                kind = "a whole number" if name in whole else "a number"
                raise PeftkitError(f"{name} must be {kind}, not {type(value).__name__} {value!r}")

    def fields(self) -> Fields:
        return Fields(text=self.text_field, text_pair=self.text_pair_field, label=self.label_field,
                      prompt=self.prompt_field, completion=self.completion_field, tokens=self.tokens_field,
                      tags=self.tags_field)


@dataclass
class TrainResult:
    """What a run produced. ``to_dict()`` is what ``train_results.json`` holds."""

    output_dir: str
    task: str
    method: str
    metrics: dict[str, float]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    labels: list[str] | None
    global_step: int
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    eval_examples: int
    resumed_from: str | None = None
    #: load_best_model_at_end: the step of the checkpoint whose adapter was saved, and its metric_for_best_model
    best_step: int | None = None
    best_metric: float | None = None
    skipped: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    pushed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: transformers ``TrainingArguments`` names a Trainer user writes first -> the training option meaning the same.
TRAINING_ARGUMENT_NAMES = {
    "num_train_epochs": "epochs", "learning_rate": "lr", "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_scheduler", "output_dir": "out", "max_seq_length": "max_length",
    "push_to_hub": "push", "hub_model_id": "push", "hub_private_repo": "private", "use_cpu": "cpu",
}


def option_fix(name: str, names: set[str]) -> str:
    """What to write instead of the unknown training option ``name``: the option a transformers
    ``TrainingArguments`` name means, or the closest spelling; empty when nothing is close."""
    meant = TRAINING_ARGUMENT_NAMES.get(name)
    if meant == "out":
        return "write the argument out="
    if meant is not None:
        return f"write {meant!r}"
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def train_options(options: dict[str, Any]) -> TrainOptions:
    """The options of a run, checked: unknown names and bad values are refused with the fix."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        named_fixes = [(name, option_fix(name, names)) for name in unknown]
        fixes = "; ".join((fix if len(unknown) == 1 else f"{name!r}: {fix}") for name, fix in named_fixes if fix)
        raise PeftkitError(f"unknown training option(s) {', '.join(map(repr, unknown))}"
                           + (f" ({fixes})" if fixes else "") + f"; options: {', '.join(sorted(names))}")
    opts = TrainOptions(**options)
    opts.check()
    return opts


@dataclass
class TrainPlan:
    """A checked run: everything that can be validated before a model is loaded."""

    model: Any
    method: Any
    config: AdapterConfig
    spec: Any
    task: str
    out: Path
    checkpoint_dir: Path
    resume_from: Path | None
    opts: TrainOptions
    data: str
    eval_data: str | None
    train_examples: list
    eval_examples: list
    labels: LabelMap | None


def make_plan(model: Any, method: str | AdapterConfig, data: Any, eval_data: Any, task: str, out: Path,
              opts: TrainOptions) -> TrainPlan:
    """Check a run without loading a model (or torch): options, method, output folder,
    checkpoint to resume, push target, and every record of the data."""
    if task not in TASKS:
        raise PeftkitError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    adapted_module = sys.modules.get("peftkit.core.model")  # loaded if the caller holds an AdaptedModel
    if adapted_module is not None and isinstance(model, adapted_module.AdaptedModel):
        raise PeftkitError("pass the base model: train() adds the adapter itself (it got an AdaptedModel)")
    _check_model_source(model)
    if opts.quantize and not isinstance(model, (str, os.PathLike)):
        raise PeftkitError(f"quantize={opts.quantize!r} applies when train() loads the model from a folder or hub id; "
                           f"a model object is used as it is (quantize it when you load it)")
    method_obj, config = parse_spec(method)
    _check_fsdp(opts, config)
    _check_best_model(opts, task, eval_data is not None)
    checkpoint_dir = checkpoint_folder(out, opts.checkpoint_dir)
    if opts.resume and opts.overwrite:
        raise PeftkitError("--resume (resume=) continues the run in the output folder and --overwrite "
                           "(overwrite=True) starts it over; give one of them")
    resume_from = _resolve_resume(opts.resume, checkpoint_dir)
    if resume_from is None:
        _check_output_dir(out, checkpoint_dir, opts.overwrite)
    # Data before the model: a bad file fails here, in well under a second, naming the line.
    train_examples = load_examples(data, task, opts.fields())
    eval_examples = load_examples(eval_data, task, opts.fields()) if eval_data is not None else []
    labels: LabelMap | None = None
    if task in CLASSIFICATION_TASKS:
        labels = LabelMap.build(train_examples, opts.labels)
        if eval_examples:
            labels.check(eval_examples, f"the training data ({data})")
    if resume_from is not None:
        _check_checkpoint_matches(resume_from, method_obj.name, config, labels)
    if opts.push is not None:
        _check_push_target(opts.push, opts.hub)
    _check_base_model(model, opts)
    return TrainPlan(model=model, method=method_obj, config=config, spec=method, task=task, out=out,
                     checkpoint_dir=checkpoint_dir, resume_from=resume_from, opts=opts, data=str(data),
                     eval_data=str(eval_data) if eval_data is not None else None, train_examples=train_examples,
                     eval_examples=eval_examples, labels=labels)


#: The evaluation metrics of each task (the Trainer's names without ``eval_``) that can rank checkpoints.
EVAL_METRICS = {"seq-cls": ("loss", "accuracy", "f1_macro"), "token-cls": ("loss", "accuracy"),
                "causal-lm": ("loss",), "seq2seq": ("loss",)}


def stops_early(callbacks: Sequence[Any]) -> bool:
    """Whether a callback is (or derives from) transformers' ``EarlyStoppingCallback``, which needs a metric
    to rank evaluations by (checked by class name: transformers is not imported here)."""
    return any(kind.__name__ == "EarlyStoppingCallback" for callback in callbacks for kind in type(callback).__mro__)


def best_model_metric(opts: TrainOptions, has_eval: bool, early_stopping: bool = False) -> str | None:
    """The metric the Trainer ranks evaluations by (``metric_for_best_model``): the option; else ``loss`` when
    the run evaluates and something ranks evaluations (``load_best_model_at_end``, as transformers defaults it,
    or an early-stopping callback); else None, as in transformers."""
    if opts.metric_for_best_model:
        return opts.metric_for_best_model
    return "loss" if has_eval and (opts.load_best_model_at_end or early_stopping) else None


def _check_best_model(opts: TrainOptions, task: str, has_eval: bool) -> None:
    """``metric_for_best_model`` and ``load_best_model_at_end`` compare evaluations: they need eval data,
    a metric the task's evaluation computes, and (to load the best) checkpoints."""
    wanted = [name for name, on in (("metric_for_best_model", opts.metric_for_best_model is not None),
                                    ("load_best_model_at_end", opts.load_best_model_at_end)) if on]
    if wanted and not has_eval:
        raise PeftkitError(f"{' and '.join(wanted)} {'compare' if len(wanted) > 1 else 'compares'} evaluations, "
                           f"and this run has no evaluation data; give eval_data (--eval FILE)")
    metric = opts.metric_for_best_model
    names = EVAL_METRICS[task]
    if metric is not None and (not isinstance(metric, str) or metric.removeprefix("eval_") not in names):
        raise PeftkitError(f"metric_for_best_model {metric!r} is not an evaluation metric of task {task}; "
                           f"choose one of {', '.join(names)}")
    if opts.load_best_model_at_end and opts.save_steps == 0:
        raise PeftkitError("load_best_model_at_end loads the best evaluation's checkpoint (one is written at every "
                           "evaluation), and save_steps=0 writes none; drop save_steps=0")


#: What ``accelerate launch`` sets in the environment for a config with ``distributed_type: FSDP``.
ACCELERATE_FSDP_VARIABLE = "ACCELERATE_USE_FSDP"


def accelerate_fsdp_launch() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config."""
    return os.environ.get(ACCELERATE_FSDP_VARIABLE, "false").lower() == "true"


def _check_fsdp(opts: TrainOptions, config: AdapterConfig) -> None:
    """``accelerate launch`` with an FSDP config means --fsdp; a sharded run needs several processes;
    DeepSpeed is refused here, before anything loads (the Trainer would find it only after the model)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise PeftkitError("peftkit train does not run under DeepSpeed (accelerate launch with a DeepSpeed config); "
                           "to shard the base model, launch with an FSDP config (examples/accelerate/fsdp.yaml) "
                           "or torchrun ... peftkit train --fsdp")
    if accelerate_fsdp_launch():
        opts.fsdp = True
    if opts.fsdp and opts.quantize:
        raise PeftkitError(f"fsdp and quantize={opts.quantize!r} do not go together: FSDP2 shards float weights, "
                           f"not bitsandbytes' quantized ones; drop one of them")
    if opts.fsdp and getattr(config, "init_weights", None) == "eva":
        raise PeftkitError("fsdp and init_weights='eva' do not go together: EVA initialises the adapter from each "
                           "process's own batches, for as many batches as each needs, where the processes of a "
                           "sharded run must run every forward pass together; choose another init_weights")
    if opts.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise PeftkitError("fsdp shards the base model over several processes, and this is a single one; launch "
                           "the command with torchrun --nproc_per_node N (N >= 2) or accelerate launch, or drop --fsdp")


def _check_push_target(repo_id: str, hub: str | None) -> None:
    """What would make the push fail fails now, not after training: a misspelt repo id or hub address,
    offline mode, a remote hub that does not answer, a missing, invalid or read-only token, a namespace
    the token's user may not write to (:meth:`~peftkit.hub_client.backend.HubBackend.check_push_access`:
    one request). Rights can still change while training runs: the push at the end says so if they do."""
    from peftkit.hub_client import open_hub, parse_ref
    from peftkit.hub_client.api import refuse_offline
    from peftkit.hub_client.auth import missing_token_message
    from peftkit.hub_client.errors import HubAuthError

    ref = parse_ref(repo_id)
    if ref.revision is not None:
        raise PeftkitError(f"--push {repo_id!r}: name the repo without '@{ref.revision}' (a push goes to main)")
    with open_hub(hub) as backend:
        if backend.remote and not getattr(backend, "token", None):
            raise HubAuthError(missing_token_message(backend.address, f"--push {repo_id}"))
        refuse_offline(backend, f"--push {repo_id}: pushing to", "push")
        backend.check_push_access(ref.repo_id)


def recorded_base_model(model: Any, opts: TrainOptions) -> str | None:
    """The base model id the adapter records: ``opts.base_model`` when ``model`` is a local folder, else
    the model's own name (a hub id, a local path, or None for a model object without one)."""
    if isinstance(model, (str, os.PathLike)):
        name: str | None = os.fspath(model)
    else:
        name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return opts.base_model if opts.base_model and (not name or looks_local(name)) else name


def _check_base_model(model: Any, opts: TrainOptions) -> None:
    """The recorded base model decides who finds the adapter (``peftkit hub search --base-model``): say now,
    before training rather than at the push, when it would be only a local folder or nothing."""
    recorded = recorded_base_model(model, opts)
    if opts.base_model and recorded != opts.base_model:
        no_folder = isinstance(model, (str, os.PathLike)) and not Path(model).exists()
        raise PeftkitError(f"base_model {opts.base_model!r} differs from the hub id being trained ({recorded!r}); "
                           f"drop --base-model: a hub id is recorded as it is"
                           + (f". If {recorded!r} is meant to be a model folder, there is no folder at that path "
                              f"(check it)" if no_folder else ""))
    if not is_main_process() or (recorded and not looks_local(recorded)):
        return
    what = f"the local folder {recorded!r}" if recorded else "no base model"
    warnings.warn(f"the adapter will record {what} as its base model, so nobody finds it by base model "
                  f"(peftkit hub search --base-model); pass --base-model ORG/NAME (base_model= in Python), "
                  f"the hub id of the model you train on", BaseModelWarning, stacklevel=4)


def push_adapter(out: Path, opts: TrainOptions, task_tag: str, dataset: str | None, metrics: dict[str, float]) -> dict:
    """Publish the adapter in ``out`` as ``opts.push`` with the hub client; returns the push result.

    The push leaves the run's checkpoints and ``train_results.json`` (which
    records local paths) behind, as any push of a training output folder does.
    """
    from peftkit.hub_client import push

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseModelWarning)  # said when the run started
            result = push(out, opts.push, hub=opts.hub, private=opts.private, task=task_tag, dataset=dataset,
                          metrics=metrics, base_model=opts.base_model, progress=not opts.quiet)
    except PeftkitError as exc:
        again = shlex.join(["peftkit", "hub", "push", str(out), opts.push]
                           + (["--hub", opts.hub] if opts.hub else []) + (["--private"] if opts.private else []))
        raise PushAfterTrainingError(f"the adapter is trained and saved in {out}, but pushing it to {opts.push} "
                                     f"failed: {exc}. Once that is fixed, publish it without training again: "
                                     f"{again}") from None
    return result.to_json()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def _check_model_source(model: Any) -> None:
    """A model string is a local folder, or else must look like a hub id (``org/name``)."""
    if not isinstance(model, (str, os.PathLike)):
        return
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise PeftkitError(f"model {str(model)!r} is a file; give a transformers model folder or a hub id")
        return
    if not _HUB_ID.fullmatch(str(model)):
        raise PeftkitError(f"model folder {str(model)!r} does not exist (and it is not a hub id like org/name)")


def _resolve_resume(resume: str | bool | None, checkpoint_dir: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True or resume == "latest":
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise PeftkitError(f"nothing to resume: no {CHECKPOINT_PREFIX}N folder in {checkpoint_dir}; "
                               f"name one with --resume DIR (resume=DIR), or start without --resume")
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() or not (path / TRAINABLE_STATE_FILE).is_file():
        latest = latest_checkpoint(path) if path.is_dir() else None
        if latest is not None:
            return latest  # a checkpoints folder: take its newest checkpoint
        if not path.exists():
            raise PeftkitError(f"--resume {str(path)!r}: no such folder; give a {CHECKPOINT_PREFIX}N folder, or "
                               f"--resume alone (resume=True) for the newest checkpoint in {checkpoint_dir}")
        raise PeftkitError(f"{str(path)!r} is not a peftkit training checkpoint (it needs trainer_state.json and "
                           f"{TRAINABLE_STATE_FILE}); give a {CHECKPOINT_PREFIX}N folder written by peftkit train")
    return path


def checkpoint_folder(out: str | os.PathLike, checkpoint_dir: str | os.PathLike | None) -> Path:
    """Where a run's checkpoints go: ``checkpoint_dir``, else ``OUT/checkpoints``."""
    return Path(checkpoint_dir) if checkpoint_dir else Path(out) / "checkpoints"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``folder`` (one a run wrote to the end: a run stopped while
    writing one leaves it without ``trainer_state.json``, which the Trainer writes last), or None."""
    if not folder.is_dir():
        return None
    steps = []
    for child in folder.iterdir():
        suffix = child.name[len(CHECKPOINT_PREFIX):]
        if child.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and \
                (child / "trainer_state.json").is_file() and (child / TRAINABLE_STATE_FILE).is_file():
            steps.append((int(suffix), child))
    return max(steps)[1] if steps else None


def _check_output_dir(out: Path, checkpoint_dir: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into an old one; with ``overwrite``, drop the old checkpoints."""
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"--out (out=) {str(out)!r} is a file; give a folder")
    leftovers = [p for p in out.iterdir() if not (p == checkpoint_dir and not any(p.iterdir()))] \
        if out.is_dir() else []
    used = bool(leftovers) or latest_checkpoint(checkpoint_dir) is not None
    if not used:
        return
    if not overwrite:
        raise PeftkitError(f"{str(out)!r} already holds files from an earlier run; continue it with --resume "
                           f"(resume=True), replace it with --overwrite (overwrite=True), or choose another --out "
                           f"(out=)")
    if is_main_process() and checkpoint_dir.is_dir():
        for child in checkpoint_dir.iterdir():
            if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
                shutil.rmtree(child)


def is_main_process() -> bool:
    """True unless torchrun / accelerate launch started this process as another than rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def _fits(run: Any, saved: Any) -> bool:
    """Whether a checkpoint's option value is what this run asks for: options this run leaves unset
    (None) were filled in from the model, also inside nested values (a union's parts)."""
    if run is None:
        return True
    if isinstance(run, dict) and isinstance(saved, dict):
        return all(_fits(value, saved[key]) for key, value in run.items() if key in saved)
    if isinstance(run, list) and isinstance(saved, list):
        return len(run) == len(saved) and all(_fits(a, b) for a, b in zip(run, saved))
    return run == saved


def _check_checkpoint_matches(checkpoint: Path, method: str, config: AdapterConfig, labels: LabelMap | None) -> None:
    try:
        saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PeftkitError(f"checkpoint {checkpoint} has no readable adapter_config.json ({exc})") from None
    own = read_own_metadata(checkpoint, saved)
    saved_config = own.get("config") or {}
    # Unset (None) options are filled in from the model when the adapter is added, the same way again.
    current = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if v is not None}
    diff = sorted(k for k in current if k in saved_config and not _fits(current[k], saved_config[k]))
    if own.get("method") != method or diff:
        what = ", ".join(f"{k}={saved_config[k]!r} (this run: {current[k]!r})" for k in diff)
        raise PeftkitError(f"checkpoint {checkpoint} was trained with method {own.get('method')!r}"
                           + (f" and {what}" if what else f", this run asks for {method!r}")
                           + "; resume with the --method the checkpoint was trained with")
    labels_file = checkpoint / LABELS_FILE
    if labels is not None and labels_file.is_file():
        saved_labels = json.loads(labels_file.read_text(encoding="utf-8")).get("labels")
        if saved_labels != labels.names:
            raise PeftkitError(f"checkpoint {checkpoint} was trained with labels {saved_labels}, but this data has "
                               f"{labels.names}; resume with the same data (or --labels)")


