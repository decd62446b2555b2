"""EVA in a ``transformers.Trainer`` run: ``peftkit train --method 'lora[init=eva]'`` (and a Trainer given
``peftkit.training_callbacks(model)``) initialises the adapter from the training batches when training
begins, before the first step."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from .eva import eva_pending, initialize_eva

log = logging.getLogger(__name__)


class EvaCallback(TrainerCallback):
    """Runs :func:`~.eva.initialize_eva` on the Trainer's training DataLoader at ``on_train_begin``. The
    factors keep their Parameter objects (resized in place), so the optimizer made before still holds them."""

    def __init__(self, model: Any, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not eva_pending(self.model, self.adapter_name):
            return  # resumed, or initialised already
        batches = kwargs.get("train_dataloader")
        if batches is None:
            raise RuntimeError("EVA needs the training batches, and the Trainer passed no train_dataloader to its "
                               "callbacks; call peftkit.initialize_eva(model, batches) before training")
        ranks = initialize_eva(self.model, batches, self.adapter_name)
        log.info("EVA initialised adapter %r: ranks %s", self.adapter_name, sorted(set(ranks.values())))
