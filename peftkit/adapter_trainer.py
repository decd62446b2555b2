"""``AdapterTrainer``: the ``transformers.Trainer`` for an AdaptedModel (``peftkit train`` runs it too),
its checkpoints, loss and metrics.

Checkpoints are adapter folders: ``_save`` (called for every checkpoint and by
``save_model``) writes the adapters that train (safetensors, config, card;
``labels.json`` under ``peftkit train``) and ``trainable_state.safetensors``,
never the base model's weights; the Trainer adds its optimizer, scheduler and
RNG states and ``trainer_state.json`` beside them (it reads those back with
``torch.load(weights_only=True)``, which runs no code). Resuming, and loading
the best checkpoint at the end, copy the trainable state into the live
parameters (before the optimizer state is loaded, when resuming).

transformers treats a PEFT ``PeftModel`` specially: it reads the dataset
columns and label names from the base model's class, and saves only the
adapter. It cannot recognize an AdaptedModel, whose ``forward(**kwargs)``
names nothing, so this subclass does the same from the base model itself.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from transformers import Trainer
from transformers.utils import can_return_loss, find_labels

from peftkit.core.errors import PeftkitError
from peftkit.core.fileio import write_bytes_atomic, write_text_atomic
from peftkit.core.method_training import training_adapter_names, training_loss
from peftkit.core.model import AdaptedModel
from peftkit.training_fsdp import average_gradients
from peftkit.training_hooks import training_callbacks
from peftkit.training_plan import TRAINABLE_STATE_FILE
from peftkit.training_data import LABELS_FILE, LabelMap


#: Where a checkpoint of several parts holds the fusions that train (one folder each, by name).
FUSIONS_FOLDER = "fusions"


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`~peftkit.AdaptedModel`, as it is for a PEFT model: checkpoints
    hold the adapters that train, not the base model; resuming and ``load_best_model_at_end`` restore them;
    ``remove_unused_columns`` and ``label_names`` work without setting (read from the base model's
    ``forward``); the methods' callbacks and loss terms are added (AdaLoRA's rank allocation and
    regularizer, EVA's initialisation), once even when ``callbacks=`` passes them too.

    ``adapter_names``: the adapters to train and save (default: every adapter with a trainable parameter,
    e.g. after ``model.train_adapter(name)``); the fusions that train (``model.train_fusion``) are saved too.
    One part is saved at a checkpoint's root; several, an adapter in a sub-folder each and a fusion in
    ``fusions/<name>``. ``card``: model-card fields written with each saved adapter (``task=``, ``dataset=``, ...).
    ``labels`` and ``sharded`` are ``peftkit train``'s (the label map written as ``labels.json``; the base
    model sharded by its FSDP2).

    ``_load_from_checkpoint`` runs before the optimizer exists (transformers
    5: ``Trainer.train`` loads the model, then ``_prepare_for_training`` makes
    the optimizer and loads its state), and copies in place, so the optimizer
    state fits the same parameter objects.
    """

    def __init__(self, *args: Any, adapter_names: Sequence[str] | None = None, card: dict[str, Any] | None = None,
                 labels: LabelMap | None = None, sharded: bool = False, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if not isinstance(model, AdaptedModel):
            given = "no model (model_init is not supported)" if model is None else type(model).__name__
            raise PeftkitError(f"AdapterTrainer trains an AdaptedModel: pass model=peftkit.adapt(...), not "
                               f"{given}; for another model use transformers.Trainer")
        names = _training_adapters(model, adapter_names)
        fusions = [name for name in model.fusions if any(p.requires_grad for p in model.fusion_parameters(name))]
        if not names and not fusions:
            raise PeftkitError("AdapterTrainer: nothing of the model trains (no adapter or fusion has a trainable "
                               "parameter); call model.train_adapter(name) or model.train_fusion(Fuse(...)) "
                               "before making the trainer (or pass adapter_names=[...])")
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise PeftkitError("AdapterTrainer and peftkit train run in one process or data-parallel (DDP); "
                               "accelerate's FSDP and DeepSpeed are not supported: launch without them "
                               "(peftkit train --fsdp shards the base model with FSDP2)")
        if sharded:
            # The base is sharded (peftkit.training_fsdp) and the adapter whole: accelerate must not wrap the
            # model in DDP (evaluation_mode skips only the wrapping), and the adapter's gradients are averaged here.
            self.accelerator.prepare_model = functools.partial(self.accelerator.prepare_model, evaluation_mode=True)
            average_gradients(self.adapted(), lambda: self.accelerator.sync_gradients)
        self.adapter_names = names
        self.fusion_names = fusions
        self.card = dict(card or {})
        self.labels = labels
        self._inspect_base_model()
        if self.compute_loss_func is not None:
            # The loss is compute_loss_func's (peftkit train's token_loss), normalized by the Trainer's count
            # of label tokens over all micro-batches and processes; the model never sees that count.
            self.model_accepts_loss_kwargs = False
        given = {_callback_key(callback) for callback in self.callback_handler.callbacks}
        for callback in training_callbacks(self.adapted(), names):  # the methods' (AdaLoRA's allocation)
            if _callback_key(callback) not in given:
                self.add_callback(callback)

    def _inspect_base_model(self) -> None:
        """What the Trainer reads from the model's class, read from the base model's (as for a PeftModel).
        What it reads from the model object (``loss_type``, ``config``, ``accepts_loss_kwargs``) the
        AdaptedModel already answers from the base model."""
        base = self.adapted().base_model
        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))

    def _set_signature_columns_if_needed(self) -> None:
        """The dataset columns kept: the base model's ``forward`` arguments and the label columns."""
        if self._signature_columns is None:
            arguments = inspect.signature(self.adapted().base_model.forward).parameters
            self._signature_columns = [*arguments, *sorted({"label", "label_ids", *self.label_names})]

    def _prepare_for_training(self, max_steps: Any, train_dataloader: Any, resume_from_checkpoint: Any) -> Any:
        """The callbacks' ``before_wrapping(train_dataloader)`` (docs/plugins.md) first: DDP (made here)
        fixes the parameters' shapes, and EVA resizes LoRA's factors from the training batches."""
        for callback in self.callback_handler.callbacks:
            before_wrapping = getattr(callback, "before_wrapping", None)
            if callable(before_wrapping):
                before_wrapping(train_dataloader)
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        """Nothing to train once the run's last step is done. transformers 5 resumes from a checkpoint of
        the last step that is not at an epoch's end (``max_steps``, fractional epochs) by running one step
        past ``max_steps``: the adapter changes (unless the schedule's rate has reached 0), ``global_step``
        says max_steps + 1 and a ``checkpoint-<max_steps + 1>`` is written. Stop before it instead."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's loss plus the training adapters' loss terms (a method's regularizer,
        ``training_loss`` in docs/plugins.md). With ``compute_loss_func`` the model sees no labels and
        returns no loss, so the terms are added here, scaled like it for gradient accumulation;
        without, the model's own loss carries them (``LossTermCallback``)."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        term = training_loss(self.adapted(model)) if self.compute_loss_func is not None else None
        if term is None:
            return result
        term = term / getattr(self, "current_gradient_accumulation_steps", 1)
        if return_outputs:
            loss, outputs = result
            return loss + term.to(loss.dtype), outputs
        return result + term.to(result.dtype)

    def adapted(self, model: nn.Module | None = None) -> AdaptedModel:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, AdaptedModel):
            raise PeftkitError(f"AdapterTrainer trains an AdaptedModel, not {type(unwrapped).__name__}")
        return unwrapped

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        adapted = self.adapted()
        single = len(self.adapter_names) + len(self.fusion_names) == 1
        for name in self.adapter_names:
            save_adapter_files(adapted, name, folder if single else folder / name, self.card, self.labels)
        for name in self.fusion_names:
            adapted.save_fusion(folder if single else folder / FUSIONS_FOLDER / name, name)
        write_trainable_state(adapted, folder / TRAINABLE_STATE_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trainable_state(self.adapted(model), Path(resume_from_checkpoint) / TRAINABLE_STATE_FILE)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's trainable state, copied in place."""
        load_trainable_state(self.adapted(), Path(self.state.best_model_checkpoint) / TRAINABLE_STATE_FILE)


def _training_adapters(model: AdaptedModel, adapter_names: Sequence[str] | None) -> list[str]:
    """The adapters an AdapterTrainer trains and saves: ``adapter_names``, else those with a trainable
    parameter; an unknown name is refused with the fix."""
    if adapter_names is None:
        return training_adapter_names(model)
    names = list(adapter_names)
    unknown = [name for name in names if name not in model.adapters]
    if unknown or not names:
        raise PeftkitError(f"AdapterTrainer: adapter_names={names!r} must name adapters of the model "
                           f"({', '.join(model.adapters) or 'it has none'})")
    return names


def _callback_key(callback: Any) -> tuple[type, Any]:
    """Callbacks of one kind for one adapter (or for the whole model) are one callback."""
    return type(callback), getattr(callback, "adapter_name", None)


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


def token_loss(task: str) -> Callable[..., torch.Tensor]:
    """Cross-entropy over the label tokens, summed and divided by ``num_items_in_batch``.

    The Trainer counts the label tokens of all micro-batches of an optimizer
    step on all processes, so the gradient is the mean over every labelled
    token of the step, whatever the model's own loss does with that count
    (many models ignore it, which would scale the loss by the number of
    processes). causal-lm predicts token t+1 at position t. When the logits are
    longer than the labels, the method put virtual tokens in front (prompt
    tuning): the trailing positions belong to the labels.
    """
    shift = task == "causal-lm"

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] > labels.shape[1]:
            logits = logits[:, -labels.shape[1]:]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        labels = labels.reshape(-1).to(logits.device)
        total = nn.functional.cross_entropy(logits.reshape(labels.shape[0], -1).float(), labels,
                                            ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
        if torch.is_tensor(count):
            count = count.to(total.device)
        return total / (count.clamp(min=1) if torch.is_tensor(count) else max(int(count), 1))

    return loss


def argmax_predictions(logits: Any, labels: Any) -> torch.Tensor:
    """Keep only the arg-max class, so evaluation never gathers whole logit tensors
    (aligned with the labels as in :func:`token_loss` when virtual tokens were put in front)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.dim() == 3 and labels is not None and labels.dim() == 2 and logits.shape[1] > labels.shape[1]:
        logits = logits[:, -labels.shape[1]:]
    return logits.argmax(dim=-1)


def classification_metrics(task: str) -> Callable[[Any], dict[str, float]]:
    """Accuracy over labelled positions (rows for seq-cls, first sub-tokens for token-cls);
    seq-cls adds macro-averaged F1."""

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
    """Mean F1 over the classes that occur in labels or predictions (as scikit-learn's average="macro")."""
    scores = []
    for cls in np.union1d(labels, preds):
        tp = float(((preds == cls) & (labels == cls)).sum())
        fp = float(((preds == cls) & (labels != cls)).sum())
        fn = float(((preds != cls) & (labels == cls)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


