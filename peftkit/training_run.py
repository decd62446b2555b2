"""Run a checked :class:`~peftkit.training.TrainPlan`: load tokenizer and model, tokenize,
add the adapter, train with :class:`~peftkit.adapter_trainer.AdapterTrainer`, evaluate
and save. Imports torch and transformers (``peftkit.training`` does not)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from transformers import TrainerCallback, TrainingArguments

from peftkit.adapter_trainer import AdapterTrainer, argmax_predictions, classification_metrics, \
    save_adapter_files, token_loss
from peftkit.core.base_layers import quantized_part
from peftkit.core.errors import PeftkitError
from peftkit.core.fileio import write_text_atomic
from peftkit.core.model_source import model_source_options
from peftkit.core.model import AdaptedModel
from peftkit.training_fsdp import shard_base, take_over_accelerate_fsdp
from peftkit.training_plan import (RESULTS_FILE, TrainOptions, TrainPlan, TrainResult, best_model_metric,
                                   is_main_process, push_adapter, stops_early)
from peftkit.training_data import (CLASSIFICATION_TASKS, LABELS_FILE, PIPELINE_TAGS, DataError, Encoded, LabelMap,
                                   data_collator, encode)

_AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
                 "token-cls": "AutoModelForTokenClassification", "seq2seq": "AutoModelForSeq2SeqLM"}


def run(plan: TrainPlan, tokenizer: Any, callbacks: list[TrainerCallback]) -> TrainResult:
    with _transformers_output(plan.opts.quiet):
        return _run(plan, tokenizer, callbacks)


def _run(plan: TrainPlan, tokenizer: Any, callbacks: list[TrainerCallback]) -> TrainResult:
    from transformers import PrinterCallback, set_seed

    from peftkit.api import adapt

    opts, task, labels = plan.opts, plan.task, plan.labels
    opts.check_scheduler()
    say = _Reporter(opts.quiet or not is_main_process())  # the Trainer confirms the rank below
    set_seed(opts.seed)  # before the model: a new task head and the adapter start the same in every run
    tok = _load_tokenizer(tokenizer, plan.model, task)
    base, fresh = _load_model(plan.model, task, labels, opts.dtype, opts.quantize)
    if opts.base_model and isinstance(plan.model, (str, os.PathLike)):
        base.config.name_or_path = opts.base_model  # the saved adapter records the hub id, not the local folder
    _align_pad_token(tok, base)
    max_length = _effective_max_length(opts.max_length, tok, base)
    train_set = _encode(task, tok, plan.train_examples, max_length, labels, base, plan.data, say)
    eval_set = _encode(task, tok, plan.eval_examples, max_length, labels, base, str(plan.eval_data), say) \
        if plan.eval_examples else None

    adapted = adapt(base, plan.config, opts.adapter_name)
    _report_fresh_weights(fresh, adapted.adapter_record(opts.adapter_name).modules_to_save, say)
    trainable, total = adapted.trainable_parameters()
    # The card's `datasets` names a dataset on a hub (what --dataset-name is for); a local file's name
    # there would read as a hub dataset id that does not exist, so it goes in the description only.
    dataset_name = opts.dataset_name
    card = {"task": PIPELINE_TAGS[task], "dataset": dataset_name,
            "description": _card_description(plan.method.name, adapted, task, dataset_name,
                                             Path(plan.data).name, len(train_set.features), labels)}
    note = take_over_accelerate_fsdp()  # before the Trainer makes accelerate's state
    if note:
        say(note)
    args = _training_arguments(opts, plan.checkpoint_dir, task, eval_set is not None, stops_early(callbacks))
    if opts.fsdp:
        precision = getattr(args, "mixed_precision", "bf16" if args.bf16 else "no")  # transformers >= 5 has it
        units = shard_base(adapted, args.device, mixed_precision=precision)
        say(f"FSDP2: the base model is sharded over {args.world_size} processes in {units} units; "
            f"the adapter is kept whole on each")
    trainer = AdapterTrainer(
        model=adapted, args=args, train_dataset=train_set.features,
        eval_dataset=eval_set.features if eval_set is not None else None, data_collator=data_collator(task, tok, base),
        processing_class=tok, compute_loss_func=token_loss(task),
        compute_metrics=classification_metrics(task) if task in CLASSIFICATION_TASKS else None,
        preprocess_logits_for_metrics=argmax_predictions if task in CLASSIFICATION_TASKS else None,
        callbacks=callbacks, adapter_names=[opts.adapter_name], card=card, labels=labels, sharded=opts.fsdp,
        optimizers=(_lora_plus(adapted, opts), None))
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

    # Read before training: the checkpoint may be rotated away (--save-total-limit) while the run goes on.
    resumed_step = _checkpoint_step(plan.resume_from) if plan.resume_from is not None else None
    output = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    best_step = _best_step(trainer)
    if best_step is not None:
        say(f"the best evaluation ({args.metric_for_best_model} {trainer.state.best_metric:.4g}) was at step "
            f"{best_step}: its checkpoint's adapter is the result")
    eval_metrics = _final_evaluation(trainer, task, best_step) if eval_set is not None else {}
    train_metrics = {k: v for k, v in output.metrics.items() if _is_number(v)}
    if resumed_step is not None and output.global_step <= resumed_step:
        # The checkpoint is the run's last step: the Trainer's train_loss of no steps would read 0.
        train_metrics.pop("train_loss", None)
        say(f"nothing left to train: {plan.resume_from} is the run's last step ({output.global_step}); "
            f"its adapter is the result")
    metrics = _card_metrics(train_metrics, eval_metrics)
    result = TrainResult(
        output_dir=str(plan.out), task=task, method=plan.method.name, metrics=metrics,
        train_metrics=train_metrics, eval_metrics=eval_metrics, labels=labels.names if labels else None,
        global_step=output.global_step, trainable_parameters=trainable, total_parameters=total,
        best_step=best_step, best_metric=trainer.state.best_metric if best_step is not None else None,
        train_examples=len(train_set.features), eval_examples=len(eval_set.features) if eval_set else 0,
        resumed_from=str(plan.resume_from) if plan.resume_from is not None else None,
        skipped=train_set.skipped + (eval_set.skipped if eval_set is not None else []),
        log_history=list(trainer.state.log_history),
        run={"model": _model_name(plan.model, base), "adapter_config": plan.config.to_dict(),
             "method": plan.spec if isinstance(plan.spec, str) else plan.config.to_dict(), "data": plan.data,
             "eval_data": plan.eval_data, "dataset": dataset_name, "options": dataclasses.asdict(opts),
             "world_size": args.world_size, "peftkit_version": _version()})
    if main:
        with contextlib.suppress(OSError):
            plan.checkpoint_dir.rmdir()  # the Trainer creates it; keep it only if it holds checkpoints
        _save_final(trainer, plan.out, card, metrics, labels, result)
        say(f"saved the adapter to {plan.out}")
        if opts.push is not None:
            result.pushed = push_adapter(plan.out, opts, card["task"], dataset_name, metrics)
            write_text_atomic(plan.out / RESULTS_FILE, _results_json(result))
            say(f"pushed it to {opts.push} (commit {result.pushed['commit'][:12]} on {result.pushed['hub']})")
    return result


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
        options = model_source_options(str(source), "the tokenizer")  # fails fast offline
        try:
            tok = AutoTokenizer.from_pretrained(str(source), **options)
            if task == "token-cls" and getattr(tok, "add_prefix_space", None) is False:
                # Byte-level BPE (GPT-2, RoBERTa) needs add_prefix_space=True for words given one by one.
                tok = AutoTokenizer.from_pretrained(str(source), add_prefix_space=True, **options)
        except (OSError, ValueError) as exc:
            raise PeftkitError(f"cannot load a tokenizer from {str(source)!r}: {exc}") from None
    tok.padding_side = "right"
    return tok


def _load_model(model: Any, task: str, labels: LabelMap | None, dtype: str,
                quantize: str | None = None) -> tuple[nn.Module, list[str]]:
    """The model for ``task``, and the names of its weights that the checkpoint did not hold."""
    if isinstance(model, nn.Module):
        if labels is not None:
            config = getattr(model, "config", None)
            have = getattr(config, "num_labels", None)
            if have != len(labels.names):
                raise PeftkitError(f"the model has {have} labels but the data has {len(labels.names)} "
                                   f"({', '.join(labels.names)}); load it with num_labels={len(labels.names)} or "
                                   f"pass its folder and let train() do it")
            config.id2label, config.label2id = labels.config_kwargs()["id2label"], labels.config_kwargs()["label2id"]
            _refuse_quantized_head(model)
        return model, []
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, _AUTO_CLASSES[task])
    kwargs: dict[str, Any] = dict(labels.config_kwargs()) if labels is not None else {}
    kwargs[_dtype_argument()] = getattr(torch, dtype) if dtype != "auto" else "auto"
    if labels is not None:
        kwargs["ignore_mismatched_sizes"] = True  # a head for other labels is replaced, and trained with the adapter
    kwargs.update(model_source_options(str(model), "the model"))
    verbosity = hf_logging.get_verbosity()
    if labels is not None:
        hf_logging.set_verbosity_error()  # a new head is expected here: _report_fresh_weights says what is new
    try:
        if quantize:
            heads = _task_head_modules(auto, str(model), kwargs) if labels is not None else None
            kwargs.update(_quantized_loading(quantize, dtype, heads))
        loaded, info = auto.from_pretrained(str(model), output_loading_info=True, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise PeftkitError(f"{str(model)!r} has no model class for task {task}: {str(exc).splitlines()[0]}") \
                from None
        raise PeftkitError(f"cannot load model {str(model)!r}: {exc}") from None
    except OSError as exc:
        raise PeftkitError(f"cannot load model {str(model)!r}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    fresh = sorted(set(info.get("missing_keys") or ()) |
                   {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()})
    return loaded, fresh if labels is not None else []


def _report_fresh_weights(fresh: list[str], modules_to_save: list[str], say: _Reporter) -> None:
    """A new classification head is expected (the adapter trains and saves it); say so, and
    warn about any other weight the checkpoint lacked, which stays random."""
    head = [k for k in fresh if any(k == m or k.startswith(m + ".") for m in modules_to_save)]
    other = [k for k in fresh if k not in head]
    if head:
        say(f"note: new task head ({', '.join(head)}): trained and saved with the adapter")
    if other:
        say(f"warning: {len(other)} weight(s) are not in the checkpoint and stay random (not trained): "
            f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}")


def _quantized_loading(quantize: str, dtype: str, skip: list[str] | None = None) -> dict[str, Any]:
    """from_pretrained arguments for a bitsandbytes-quantized base (QLoRA: NF4 with double quantization,
    computing in the run's dtype), on this process's device. ``skip``: modules that stay in float (a task
    head); None keeps transformers' own choice (a causal LM's lm_head stays in float)."""
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, dtype) if dtype != "auto" else torch.float32
    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


#: Task heads by their usual names, for a model whose base model is not one of its top-level modules.
_HEAD_NAMES = ("pre_classifier", "classifier", "score", "qa_outputs")


def _task_head_modules(auto: Any, model: str, kwargs: dict[str, Any]) -> list[str]:
    """The task head of ``auto``'s model for ``model`` (``classifier``, ``score``, DistilBERT's
    ``pre_classifier`` ...), found on an empty (meta) model built from its config before the weights load.
    It stays in float: as a bitsandbytes layer (a new one holds a float weight it never quantized) its copy
    for the adapter can neither train nor run."""
    from transformers import AutoConfig

    config_keys = ("num_labels", "id2label", "label2id", "revision", "token", "local_files_only", "cache_dir")
    config = AutoConfig.from_pretrained(model, **{k: v for k, v in kwargs.items() if k in config_keys})
    with torch.device("meta"):
        empty = auto.from_config(config)
    return _task_head_names(empty)


def _refuse_quantized_head(model: nn.Module) -> None:
    """A classifier given as an object must have its task head in float: the adapter trains a copy of it."""
    heads = _task_head_names(model)
    quantized = next((found for head in heads if (found := quantized_part(model.get_submodule(head), head))), None)
    if quantized:
        raise PeftkitError(f"the model's task head is quantized ({quantized[0]}: {quantized[1]}), and the "
                           f"adapter trains a float copy of it; load the model with its head in float, e.g. "
                           f"BitsAndBytesConfig(..., llm_int8_skip_modules={heads!r}), or pass its folder with "
                           f"quantize= and let train() do it")


def _task_head_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s top-level modules with weights outside its base model
    (``base_model_prefix``): a transformers task model's head."""
    children = {name: child for name, child in model.named_children() if any(True for _ in child.parameters())}
    prefix = getattr(model, "base_model_prefix", "")
    if prefix not in children:
        return [name for name in _HEAD_NAMES if name in children]
    return [name for name in children if name != prefix]


def _dtype_argument() -> str:
    """transformers 4.56 renamed from_pretrained's torch_dtype to dtype."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


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


def _training_arguments(opts: TrainOptions, checkpoint_dir: Path, task: str, has_eval: bool,
                        early_stopping: bool = False) -> TrainingArguments:
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    evaluation = ("steps" if opts.eval_steps else "epoch") if has_eval else "no"
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
        **_save_schedule(opts, evaluation),
        save_total_limit=opts.save_total_limit,
        eval_strategy=evaluation,
        eval_steps=opts.eval_steps,
        metric_for_best_model=best_model_metric(opts, has_eval, early_stopping),
        load_best_model_at_end=opts.load_best_model_at_end,
        prediction_loss_only=task not in CLASSIFICATION_TASKS,
        # The AdaptedModel's forward takes **kwargs: keep every column, name the labels.
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=opts.quiet,
        dataloader_pin_memory=torch.cuda.is_available() and not opts.cpu,
        # Without an accelerator, say so: accelerate then runs data-parallel on CPUs (gloo) and allows bf16.
        use_cpu=opts.cpu or not _has_accelerator(),
        report_to=[name.strip() for name in opts.report_to.split(",") if name.strip()] or "none",
        log_level="error" if opts.quiet else "passive",
        # The other processes' transformers warnings repeat the main one's (and would break --quiet).
        log_level_replica="error",
        # Every trainable parameter of an adapter takes part in each forward: transformers' default (True, without
        # gradient checkpointing) walks the autograd graph once more each step looking for unused ones, and
        # torch's DDP warns about it on every process, also under --quiet.
        ddp_find_unused_parameters=False,
    )
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[checkpointing] = opts.gradient_checkpointing
    try:
        return TrainingArguments(**kwargs)
    except ValueError as exc:  # e.g. bf16 on hardware without it, an unknown scheduler name
        raise PeftkitError(f"invalid training options: {exc}") from None


def _save_schedule(opts: TrainOptions, evaluation: str) -> dict[str, Any]:
    """When checkpoints are written: every ``save_steps`` steps, or, to load the best one at the end, at every
    evaluation (transformers requires the same schedule for both)."""
    if opts.load_best_model_at_end:
        return {"save_strategy": evaluation, "save_steps": opts.eval_steps or 500}
    return {"save_strategy": "steps" if opts.save_steps > 0 else "no",
            "save_steps": opts.save_steps if opts.save_steps > 0 else 500}


def _lora_plus(adapted: AdaptedModel, opts: TrainOptions) -> Any:
    """The LoRA+ optimizer for --lora-plus-ratio, else None (the Trainer's AdamW)."""
    if opts.lora_plus_ratio is None:
        return None
    from peftkit.lora_plus import lora_plus_optimizer

    return lora_plus_optimizer(adapted, lr=opts.lr, ratio=opts.lora_plus_ratio, weight_decay=opts.weight_decay)


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu, mps = getattr(torch, "xpu", None), getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))


def _checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was written at (its ``trainer_state.json``)."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("global_step", 0))


def _final_evaluation(trainer: AdapterTrainer, task: str, best_step: int | None) -> dict[str, float]:
    """The evaluation of the adapter the run ends with: reuse the one the Trainer ran at its step (the last
    step, or ``best_step`` when it loaded the best checkpoint), else run one."""
    step = best_step if best_step is not None else trainer.state.global_step
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry
                 and entry.get("step") == step), None)
    if last is not None:
        metrics = dict(last)
    else:
        metrics = trainer.evaluate()
    metrics = {k: v for k, v in metrics.items() if k.startswith("eval_") and _is_number(v)}
    if task not in CLASSIFICATION_TASKS and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else math.inf
    return metrics


def _best_step(trainer: AdapterTrainer) -> int | None:
    """The step of the checkpoint that ``load_best_model_at_end`` loaded at the end, or None."""
    best = trainer.state.best_model_checkpoint
    if not trainer.args.load_best_model_at_end or best is None:
        return None
    return _checkpoint_step(Path(best))


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


def _save_final(trainer: AdapterTrainer, out: Path, card: dict[str, Any], metrics: dict[str, float],
                labels: LabelMap | None, result: TrainResult) -> None:
    save_adapter_files(trainer.adapted(), trainer.adapter_names[0], out, card, labels, metrics)
    tokenizer = trainer.processing_class
    if hasattr(tokenizer, "save_pretrained"):
        # beside the adapter, as transformers' Trainer saves it: a pipeline given the folder loads it from there
        # (the adapter's own files do not depend on it; added tokens in particular travel with it)
        tokenizer.save_pretrained(str(out))
    if labels is None:
        with contextlib.suppress(FileNotFoundError):
            (out / LABELS_FILE).unlink()  # left by an earlier classification run (--overwrite)
    write_text_atomic(out / RESULTS_FILE, _results_json(result))


def _results_json(result: TrainResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else repr(value)


def _card_description(method: str, adapted: AdaptedModel, task: str, dataset: str | None, data_file: str,
                      examples: int, labels: LabelMap | None) -> str:
    from peftkit.core.serialization import base_model_id

    base = base_model_id(adapted) or type(adapted.base_model).__name__
    source = f"the dataset `{dataset}` (local file `{data_file}`)" if dataset else f"the local file `{data_file}`"
    text = (f"A {method} adapter for `{base}`, trained with `peftkit train` for {PIPELINE_TAGS[task]} on "
            f"{source} ({examples} examples).")
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
