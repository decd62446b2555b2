"""``peftkit.train``: fine-tune one adapter on a local dataset with ``transformers.Trainer``.

The run goes through the Trainer, so ``accelerate launch`` and ``torchrun``
start data-parallel runs of the same code unchanged; only the main process
writes files. What the output folder holds::

    OUT/adapter_config.json, adapter_model.safetensors, README.md   the adapter (PEFT's format where PEFT has the method)
    OUT/labels.json                                                  classification: label names in id order
    OUT/train_results.json                                           options, metrics, log history
    OUT/checkpoints/checkpoint-N/                                    resumable checkpoints (see AdapterTrainer)

The data side (reading, checking, labels, tokenization) is
:mod:`peftkit.training_data`; the command line is :mod:`peftkit.cli_train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.fileio import write_bytes_atomic, write_text_atomic
from peftkit.core.method import parse_spec
from peftkit.core.model import AdaptedModel
from peftkit.training_data import (CLASSIFICATION_TASKS, LABELS_FILE, PIPELINE_TAGS, TASKS, DataError, Encoded,
                                   Fields, LabelMap, data_collator, encode, load_examples)

RESULTS_FILE = "train_results.json"
#: Every trainable tensor of the run, by parameter name. The adapter folder of a
#: checkpoint is the portable result; this file restores training exactly, also
#: for methods whose trained form differs from the saved one (prefix tuning's MLP).
TRAINABLE_STATE_FILE = "trainable_state.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
DTYPES = ("float32", "bfloat16", "float16", "auto")
_AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
                 "token-cls": "AutoModelForTokenClassification", "seq2seq": "AutoModelForSeq2SeqLM"}


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
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    # evaluation, logging, checkpoints
    eval_steps: int | None = None
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    checkpoint_dir: str | None = None
    resume: str | bool | None = None
    overwrite: bool = False
    quiet: bool = False
    report_to: str = "none"
    # what is recorded
    adapter_name: str = "default"
    dataset_name: str | None = None

    def check(self) -> None:
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
        if self.max_steps is None and not self.epochs > 0:
            raise PeftkitError(f"epochs must be > 0 (or give max_steps), not {self.epochs!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise PeftkitError("warmup_steps and weight_decay must be >= 0")
        if self.dtype not in DTYPES:
            raise PeftkitError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

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
    skipped: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def adapter_dir(self) -> str:
        return self.output_dir


def train(model: str | os.PathLike | nn.Module, method: str | AdapterConfig, data: str | os.PathLike, *,
          task: str, out: str | os.PathLike, eval_data: str | os.PathLike | None = None, tokenizer: Any = None,
          callbacks: Sequence[TrainerCallback] = (), **options: Any) -> TrainResult:
    """Train one adapter of ``method`` on ``model`` with the examples in ``data``.

    ``model`` is a transformers model folder, a hub id, or a loaded
    ``PreTrainedModel`` (then give ``tokenizer`` unless its config names a
    folder that has one). ``method`` is a shorthand (``"lora[r=8]"``) or a
    config. ``task`` is one of ``causal-lm``, ``seq-cls``, ``token-cls``,
    ``seq2seq``. ``options`` are the fields of :class:`TrainOptions`
    (``epochs=``, ``lr=``, ``text_field=``, ...); ``callbacks`` are extra
    ``TrainerCallback`` objects. Bad data raises
    :class:`~peftkit.training_data.DataError` naming the file and line, before
    any model is loaded.
    """
    plan = _plan(model, method, data, eval_data, task, Path(out), _options(options))
    with _transformers_output(plan.opts.quiet):
        return _run(plan, tokenizer, list(callbacks))


def _options(options: dict[str, Any]) -> TrainOptions:
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise PeftkitError(f"unknown training option(s) {', '.join(map(repr, unknown))}; options: "
                           f"{', '.join(sorted(names))}")
    opts = TrainOptions(**options)
    opts.check()
    return opts


@dataclass
class _Plan:
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


def _plan(model: Any, method: str | AdapterConfig, data: Any, eval_data: Any, task: str, out: Path,
          opts: TrainOptions) -> _Plan:
    if task not in TASKS:
        raise PeftkitError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if isinstance(model, AdaptedModel):
        raise PeftkitError("pass the base model: train() adds the adapter itself (it got an AdaptedModel)")
    method_obj, config = parse_spec(method)
    checkpoint_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else out / "checkpoints"
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
    return _Plan(model=model, method=method_obj, config=config, spec=method, task=task, out=out,
                 checkpoint_dir=checkpoint_dir, resume_from=resume_from, opts=opts, data=str(data),
                 eval_data=str(eval_data) if eval_data is not None else None, train_examples=train_examples,
                 eval_examples=eval_examples, labels=labels)


def _run(plan: _Plan, tokenizer: Any, callbacks: list[TrainerCallback]) -> TrainResult:
    from transformers import PrinterCallback, set_seed

    from peftkit.api import adapt

    opts, task, labels = plan.opts, plan.task, plan.labels
    say = _Reporter(opts.quiet)
    set_seed(opts.seed)  # before the model: a new task head and the adapter start the same in every run
    tok = _load_tokenizer(tokenizer, plan.model, task)
    base = _load_model(plan.model, task, labels, opts.dtype)
    _align_pad_token(tok, base)
    max_length = _effective_max_length(opts.max_length, tok, base)
    train_set = _encode(task, tok, plan.train_examples, max_length, labels, base, plan.data, say)
    eval_set = _encode(task, tok, plan.eval_examples, max_length, labels, base, str(plan.eval_data), say) \
        if plan.eval_examples else None

    adapted = adapt(base, plan.config, opts.adapter_name)
    trainable, total = adapted.trainable_parameters()
    dataset_name = opts.dataset_name or Path(plan.data).name
    card = {"task": PIPELINE_TAGS[task], "dataset": dataset_name,
            "description": _card_description(plan.method.name, adapted, task, dataset_name,
                                             len(train_set.features), labels)}
    args = _training_arguments(opts, plan.checkpoint_dir, task, eval_set is not None)
    trainer = AdapterTrainer(
        model=adapted, args=args, train_dataset=train_set.features,
        eval_dataset=eval_set.features if eval_set is not None else None, data_collator=data_collator(task, tok),
        processing_class=tok, compute_metrics=_compute_metrics(task),
        preprocess_logits_for_metrics=_predictions if task in CLASSIFICATION_TASKS else None,
        callbacks=callbacks, adapter_name=opts.adapter_name, card=card, labels=labels)
    if opts.quiet:
        trainer.remove_callback(PrinterCallback)
    main = trainer.is_world_process_zero()
    say.enabled = say.enabled and main
    say(f"peftkit train: {task}, {plan.method.name} adapter {opts.adapter_name!r} on {type(base).__name__}: "
        f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / max(total, 1):.3f}%); "
        f"{len(train_set.features)} training examples"
        + (f", {len(eval_set.features)} evaluation examples" if eval_set is not None else "")
        + (f"; labels: {', '.join(labels.names)}" if labels else "")
        + (f"; {args.world_size} processes" if args.world_size > 1 else ""))
    if plan.resume_from is not None:
        say(f"resuming from {plan.resume_from}")

    output = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    eval_metrics = _final_evaluation(trainer, task) if eval_set is not None else {}
    train_metrics = {k: v for k, v in output.metrics.items() if _is_number(v)}
    metrics = _card_metrics(train_metrics, eval_metrics)
    result = TrainResult(
        output_dir=str(plan.out), task=task, method=plan.method.name, metrics=metrics,
        train_metrics=train_metrics, eval_metrics=eval_metrics, labels=labels.names if labels else None,
        global_step=output.global_step, trainable_parameters=trainable, total_parameters=total,
        train_examples=len(train_set.features), eval_examples=len(eval_set.features) if eval_set else 0,
        resumed_from=str(plan.resume_from) if plan.resume_from is not None else None,
        skipped=train_set.skipped + (eval_set.skipped if eval_set is not None else []),
        log_history=list(trainer.state.log_history),
        run={"model": _model_name(plan.model, base), "adapter_config": plan.config.to_dict(),
             "method": plan.spec if isinstance(plan.spec, str) else plan.config.to_dict(), "data": plan.data,
             "eval_data": plan.eval_data, "dataset": dataset_name, "options": dataclasses.asdict(opts),
             "world_size": args.world_size, "peftkit_version": _version()})
    if main:
        _save_final(trainer, plan.out, card, metrics, labels, result)
        say(f"saved the adapter to {plan.out}")
    return result


# -- the Trainer ------------------------------------------------------------------------------


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints are adapter folders.

    ``_save`` (called for every checkpoint and by ``save_model``) writes the
    adapter folder, ``labels.json`` and :data:`TRAINABLE_STATE_FILE`, all
    safetensors; the Trainer adds its optimizer, scheduler and RNG states and
    ``trainer_state.json`` beside them (it loads those with ``weights_only=True``).
    ``_load_from_checkpoint`` copies the trainable state back into the live
    parameters, so the optimizer state that is loaded next fits them.
    """

    def __init__(self, *args: Any, adapter_name: str, card: dict[str, Any], labels: LabelMap | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise PeftkitError("peftkit train supports data-parallel runs (accelerate launch / torchrun, DDP); "
                               "FSDP and DeepSpeed are not supported yet: launch without them")
        self.adapter_name = adapter_name
        self.card = card
        self.labels = labels
        # Decide as the Trainer would for the bare model: AdaptedModel.forward takes **kwargs,
        # which would otherwise claim every model normalizes its loss by num_items_in_batch.
        self.model_accepts_loss_kwargs = _accepts_loss_kwargs(self.adapted().base_model)

    def adapted(self, model: nn.Module | None = None) -> AdaptedModel:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, AdaptedModel):
            raise PeftkitError(f"AdapterTrainer trains an AdaptedModel, not {type(unwrapped).__name__}")
        return unwrapped

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        save_adapter_files(self.adapted(), self.adapter_name, folder, self.card, self.labels)
        write_trainable_state(self.adapted(), folder / TRAINABLE_STATE_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trainable_state(self.adapted(model), Path(resume_from_checkpoint) / TRAINABLE_STATE_FILE)


def save_adapter_files(adapted: AdaptedModel, adapter_name: str, folder: Path, card: dict[str, Any],
                       labels: LabelMap | None, metrics: dict[str, float] | None = None) -> None:
    """The adapter folder plus ``labels.json``; the config is written last, so a folder
    with a config is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        write_text_atomic(folder / LABELS_FILE, json.dumps(labels.to_json(), indent=2) + "\n")
    adapted.save_adapter(str(folder), adapter_name, **card, **({"metrics": metrics} if metrics else {}))


def write_trainable_state(adapted: AdaptedModel, path: Path) -> None:
    from safetensors.torch import save

    state = {name: p.detach().to("cpu").contiguous() for name, p in adapted.named_parameters() if p.requires_grad}
    write_bytes_atomic(path, save(state, metadata={"format": "pt"}))


def load_trainable_state(adapted: AdaptedModel, path: Path) -> None:
    """Copy a checkpoint's trainable tensors into the model, in place; names and shapes must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    if not path.is_file():
        raise PeftkitError(f"{path.parent} is not a peftkit training checkpoint (it has no {path.name}); "
                           f"resume from a checkpoint-N folder that peftkit train wrote")
    try:
        saved = load_bytes(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise PeftkitError(f"{path} is truncated or corrupted ({exc}); resume from an earlier checkpoint") from None
    live = {name: p for name, p in adapted.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    bad = [n for n in live if n in saved and tuple(saved[n].shape) != tuple(live[n].shape)]
    if missing or unexpected or bad:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"other shape {', '.join(bad[:3])}" if bad else "") if part)
        raise PeftkitError(f"checkpoint {path.parent} does not fit this run's adapter ({detail}); resume with the "
                           f"model, method and options the checkpoint was trained with")
    with torch.no_grad():
        for name, param in live.items():
            param.copy_(saved[name].to(device=param.device, dtype=param.dtype))


# -- setup --------------------------------------------------------------------------------------


def _resolve_resume(resume: str | bool | None, checkpoint_dir: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume is True or resume == "latest":
        found = _latest_checkpoint(checkpoint_dir)
        if found is None:
            raise PeftkitError(f"nothing to resume: no {CHECKPOINT_PREFIX}N folder in {checkpoint_dir}; "
                               f"name one with --resume DIR, or start without --resume")
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() or not (path / TRAINABLE_STATE_FILE).is_file():
        latest = _latest_checkpoint(path) if path.is_dir() else None
        if latest is not None:
            return latest  # a checkpoints folder: take its newest checkpoint
        raise PeftkitError(f"{str(path)!r} is not a peftkit training checkpoint (it needs trainer_state.json and "
                           f"{TRAINABLE_STATE_FILE}); give a {CHECKPOINT_PREFIX}N folder written by peftkit train")
    return path


def _latest_checkpoint(folder: Path) -> Path | None:
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
        raise PeftkitError(f"--out {str(out)!r} is a file; give a folder")
    used = (out.is_dir() and any(out.iterdir())) or _latest_checkpoint(checkpoint_dir) is not None
    if not used:
        return
    if not overwrite:
        raise PeftkitError(f"{str(out)!r} already holds files from an earlier run; continue it with --resume, "
                           f"replace it with --overwrite, or choose another --out")
    if _is_main_process() and checkpoint_dir.is_dir():
        for child in checkpoint_dir.iterdir():
            if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX):
                shutil.rmtree(child)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _check_checkpoint_matches(checkpoint: Path, method: str, config: AdapterConfig, labels: LabelMap | None) -> None:
    try:
        saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PeftkitError(f"checkpoint {checkpoint} has no readable adapter_config.json ({exc})") from None
    own = saved.get("peftkit") or {}
    saved_config = own.get("config")
    current = json.loads(json.dumps(config.to_dict()))
    if own.get("method") != method or (saved_config is not None and saved_config != current):
        diff = sorted(k for k in set(current) | set(saved_config or {})
                      if (saved_config or {}).get(k) != current.get(k))
        raise PeftkitError(f"checkpoint {checkpoint} was trained with {own.get('method')} "
                           f"{ {k: (saved_config or {}).get(k) for k in diff} }, but this run asks for {method} "
                           f"{ {k: current.get(k) for k in diff} }; resume with the same --method")
    labels_file = checkpoint / LABELS_FILE
    if labels is not None and labels_file.is_file():
        saved_labels = json.loads(labels_file.read_text(encoding="utf-8")).get("labels")
        if saved_labels != labels.names:
            raise PeftkitError(f"checkpoint {checkpoint} was trained with labels {saved_labels}, but this data has "
                               f"{labels.names}; resume with the same data (or --labels)")


class _Reporter:
    """One-line notes on stderr from the main process (never with quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _transformers_output(quiet: bool) -> Iterator[None]:
    """With ``quiet``, transformers logs errors only and shows no progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_tokenizer(tokenizer: Any, model: Any, task: str) -> Any:
    """The given tokenizer object, or one loaded from ``tokenizer`` / the model's folder or hub id."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        tok = tokenizer
    else:
        source = tokenizer if tokenizer is not None else model
        if isinstance(source, nn.Module):
            source = getattr(getattr(source, "config", None), "_name_or_path", None)
            if not source:
                raise PeftkitError("the model object names no folder to load a tokenizer from; pass tokenizer=")
        try:
            tok = AutoTokenizer.from_pretrained(str(source))
            if task == "token-cls" and getattr(tok, "add_prefix_space", None) is False:
                # Byte-level BPE (GPT-2, RoBERTa) needs add_prefix_space=True for words given one by one.
                tok = AutoTokenizer.from_pretrained(str(source), add_prefix_space=True)
        except (OSError, ValueError) as exc:
            raise PeftkitError(f"cannot load a tokenizer from {str(source)!r}: {exc}") from None
    tok.padding_side = "right"
    return tok


def _load_model(model: Any, task: str, labels: LabelMap | None, dtype: str) -> nn.Module:
    if isinstance(model, nn.Module):
        if labels is not None:
            config = getattr(model, "config", None)
            have = getattr(config, "num_labels", None)
            if have != len(labels.names):
                raise PeftkitError(f"the model has {have} labels but the data has {len(labels.names)} "
                                   f"({', '.join(labels.names)}); load it with num_labels={len(labels.names)} or "
                                   f"pass its folder and let train() do it")
            config.id2label, config.label2id = labels.config_kwargs()["id2label"], labels.config_kwargs()["label2id"]
        return model
    import transformers

    auto = getattr(transformers, _AUTO_CLASSES[task])
    kwargs: dict[str, Any] = dict(labels.config_kwargs()) if labels is not None else {}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = "auto"
    if labels is not None:
        kwargs["ignore_mismatched_sizes"] = True  # a head for other labels is replaced, and trained with the adapter
    try:
        loaded = auto.from_pretrained(str(model), **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise PeftkitError(f"{str(model)!r} has no model class for task {task}: {str(exc).splitlines()[0]}") \
                from None
        raise PeftkitError(f"cannot load model {str(model)!r}: {exc}") from None
    except OSError as exc:
        raise PeftkitError(f"cannot load model {str(model)!r}: {exc}") from None
    return loaded


def _align_pad_token(tok: Any, model: nn.Module) -> None:
    """Batches need a pad token: fall back to EOS (or UNK) like most causal-LM recipes."""
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise PeftkitError(f"the tokenizer ({type(tok).__name__}) has no pad, eos or unk token to pad batches "
                               f"with; add one (tokenizer.add_special_tokens) and save it with the model")
        tok.pad_token = fallback
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        # Sequence classifiers of decoder models find each row's last token through pad_token_id.
        config.pad_token_id = tok.pad_token_id


def _effective_max_length(wanted: int, tok: Any, model: nn.Module) -> int:
    limits = [wanted]
    model_max = getattr(tok, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:
        limits.append(model_max)
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    return min(limits)


def _encode(task: str, tok: Any, examples: list, max_length: int, labels: LabelMap | None, model: nn.Module,
            source: str, say: _Reporter) -> Encoded:
    encoded = encode(task, tok, examples, max_length, labels)
    if encoded.skipped:
        say(f"note: {len(encoded.skipped)} example(s) of {source} have no completion token within "
            f"--max-length {max_length} and were left out (first: {encoded.skipped[0]})")
    if not encoded.features:
        raise DataError(f"{source}: no example is left to train on; raise --max-length or shorten the prompts")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None:
        top = max(max(row["input_ids"]) for row in encoded.features)
        if top >= vocab:
            raise PeftkitError(f"the tokenizer produces token id {top}, but the model's vocabulary has {vocab} "
                               f"entries; use the tokenizer that belongs to the model")
    return encoded


def _training_arguments(opts: TrainOptions, checkpoint_dir: Path, task: str, has_eval: bool) -> TrainingArguments:
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.eval_batch_size or opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps if opts.max_steps is not None else -1,
        warmup_steps=opts.warmup_steps,
        weight_decay=opts.weight_decay,
        lr_scheduler_type=opts.lr_scheduler,
        seed=opts.seed,
        bf16=opts.bf16,
        logging_steps=opts.logging_steps,
        save_strategy="steps" if opts.save_steps > 0 else "no",
        save_steps=opts.save_steps if opts.save_steps > 0 else 500,
        save_total_limit=opts.save_total_limit,
        eval_strategy=("steps" if opts.eval_steps else "epoch") if has_eval else "no",
        eval_steps=opts.eval_steps,
        prediction_loss_only=task not in CLASSIFICATION_TASKS,
        # The AdaptedModel's forward takes **kwargs: keep every column, name the labels.
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=opts.quiet,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=opts.report_to if opts.report_to != "none" else "none",
        log_level="error" if opts.quiet else "passive",
    )
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[checkpointing] = opts.gradient_checkpointing
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:  # e.g. bf16 on hardware without it, an unknown scheduler name
        raise PeftkitError(f"invalid training options: {exc}") from None


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


# -- metrics --------------------------------------------------------------------------------------


def _predictions(logits: Any, labels: Any) -> torch.Tensor:
    """Keep only the arg-max class, so evaluation never gathers whole logit tensors."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(dim=-1)


def _compute_metrics(task: str) -> Callable[[Any], dict[str, float]] | None:
    if task not in CLASSIFICATION_TASKS:
        return None

    def compute(prediction: Any) -> dict[str, float]:
        preds = np.asarray(prediction.predictions)
        labels = np.asarray(prediction.label_ids)
        mask = labels != -100
        preds, labels = preds[mask], labels[mask]
        if labels.size == 0:
            return {}
        metrics = {"accuracy": float((preds == labels).mean())}
        if task == "seq-cls":
            metrics["f1_macro"] = _macro_f1(preds, labels)
        return metrics

    return compute


def _macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for cls in np.unique(labels):
        tp = float(((preds == cls) & (labels == cls)).sum())
        fp = float(((preds == cls) & (labels != cls)).sum())
        fn = float(((preds != cls) & (labels == cls)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def _final_evaluation(trainer: AdapterTrainer, task: str) -> dict[str, float]:
    """The evaluation at the last step: reuse the one the Trainer just ran there, else run one."""
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        metrics = dict(last)
    else:
        metrics = trainer.evaluate()
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and _is_number(v)}
    if task not in CLASSIFICATION_TASKS and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else math.inf
    return metrics


_RUNTIME_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def _card_metrics(train_metrics: dict[str, float], eval_metrics: dict[str, float]) -> dict[str, float]:
    """What the model card records: evaluation results by plain name (loss, accuracy,
    ...), and the training loss."""
    out = {k[len("eval_"):]: float(v) for k, v in eval_metrics.items()
           if not k.endswith(_RUNTIME_KEYS) and math.isfinite(v)}
    if "train_loss" in train_metrics and math.isfinite(train_metrics["train_loss"]):
        out["train_loss"] = float(train_metrics["train_loss"])
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- saving ---------------------------------------------------------------------------------------


def _save_final(trainer: AdapterTrainer, out: Path, card: dict[str, Any], metrics: dict[str, float],
                labels: LabelMap | None, result: TrainResult) -> None:
    save_adapter_files(trainer.adapted(), trainer.adapter_name, out, card, labels, metrics)
    write_text_atomic(out / RESULTS_FILE, json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _card_description(method: str, adapted: AdaptedModel, task: str, dataset: str, examples: int,
                      labels: LabelMap | None) -> str:
    from peftkit.core.serialization import base_model_id

    base = base_model_id(adapted) or type(adapted.base_model).__name__
    text = (f"A {method} adapter for `{base}`, trained with `peftkit train` for {PIPELINE_TAGS[task]} on "
            f"`{dataset}` ({examples} examples).")
    if labels is not None:
        text += (" Labels (id: name): " + ", ".join(f"{i}: {n}" for i, n in enumerate(labels.names))
                 + f"; `{LABELS_FILE}` holds the same mapping.")
    return text


def _model_name(model: Any, loaded: nn.Module) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(getattr(loaded, "config", None), "_name_or_path", None) or type(loaded).__name__


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("peftkit")
    except metadata.PackageNotFoundError:
        return None
