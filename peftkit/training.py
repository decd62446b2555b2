"""``peftkit.train``: fine-tune one adapter on a local dataset with ``transformers.Trainer``.

The run goes through the Trainer, so ``accelerate launch`` and ``torchrun``
start data-parallel runs of the same code unchanged, or sharded ones with
``fsdp=True`` (:mod:`peftkit.training_fsdp`); only the main process writes
files. The output folder::

    OUT/adapter_config.json, adapter_model.safetensors, README.md   the adapter (PEFT's format where PEFT has the method)
    OUT/labels.json                                                  classification: label names in id order
    OUT/train_results.json                                           options, metrics, log history
    OUT/checkpoints/checkpoint-N/                                    resumable checkpoints

This module is the entry point and imports no torch: :mod:`peftkit.training_plan`
checks a run (options, method, output folder, checkpoint, data) so mistakes fail
fast, then :mod:`peftkit.training_run` runs it (:mod:`peftkit.adapter_trainer`
holds the Trainer subclass, :mod:`peftkit.training_data` the data side and
:mod:`peftkit.cli_train` the command). Neither imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import PeftkitError
from peftkit.core.model_source import model_source_options
from peftkit.training_plan import (TrainOptions, TrainResult, is_main_process, make_plan, stops_early,
                                   train_options)

__all__ = ["TrainOptions", "TrainResult", "is_main_process", "train"]


def train(model: Any, method: str | AdapterConfig, data: str | os.PathLike, *,
          task: str, out: str | os.PathLike, eval_data: str | os.PathLike | None = None, tokenizer: Any = None,
          callbacks: Sequence[Any] = (), **options: Any) -> TrainResult:
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
    plan = make_plan(model, method, data, eval_data, task, Path(out), train_options(options))
    _check_callbacks(callbacks, plan.eval_data is not None)
    for source, what in ((model, "the model"), (tokenizer, "the tokenizer")):
        if isinstance(source, (str, os.PathLike)):
            model_source_options(source, what)  # offline or unreachable: fail now, before the slow imports
    with _bitsandbytes_notes_hidden(not plan.opts.quantize):
        from peftkit.training_run import run

        return run(plan, tokenizer, list(callbacks))


def _check_callbacks(callbacks: Sequence[Any], has_eval: bool) -> None:
    """transformers' EarlyStoppingCallback stops on evaluations: without eval data it would fail an
    assertion after the model loaded."""
    if not has_eval and stops_early(callbacks):
        raise PeftkitError("EarlyStoppingCallback stops training when the evaluation stops improving, and this run "
                           "has no evaluation data; give eval_data= (and eval_steps= to evaluate more often than "
                           "once an epoch)")


@contextlib.contextmanager
def _bitsandbytes_notes_hidden(hide: bool) -> Iterator[None]:
    """Hide bitsandbytes' warnings while a run that quantizes nothing imports it: transformers' Trainer
    imports peft when it is installed, peft imports bitsandbytes, and on some CPUs that logs a note about
    an optional 4-bit kernel ("Failed to load CPU gemm_4bit_forward ...") that has nothing to do with the run.
    bitsandbytes fetches that kernel through the ``kernels`` package (a dependency of transformers 5.25),
    which logs its own note offline ("Skipping publisher trust check ..."): hidden too."""
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in loggers]
    if hide:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
