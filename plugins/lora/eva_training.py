"""EVA in a ``transformers.Trainer`` run: ``peftkit train --method 'lora[init=eva]'`` (and a Trainer given
``peftkit.training_callbacks(model)``) initialises the adapter from the training batches when training
begins, before the first step."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from transformers import TrainerCallback

from peftkit.plugin_api import ConfigError

from .eva import eva_layers, eva_pending, initialize_eva

log = logging.getLogger(__name__)


def _data_parallel() -> bool:
    """Whether this process is one of several in a torch.distributed group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class EvaCallback(TrainerCallback):
    """Runs :func:`~.eva.initialize_eva` on the Trainer's training DataLoader: before the model is wrapped
    (peftkit's AdapterTrainer), else at ``on_train_begin``. The factors keep their Parameter objects (resized
    in place), so an optimizer made before still holds them; DDP does not allow that, so with a plain
    Trainer under torchrun call initialize_eva in every process before training."""

    def __init__(self, model: Any, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name

    def before_wrapping(self, train_dataloader: Any) -> None:
        """Under ``peftkit train`` / AdapterTrainer: before DDP wraps the model, which fixes the shapes of
        the parameters it holds (EVA resizes factors); every process runs EVA together (eva_sync.py)."""
        self.initialize(train_dataloader)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if eva_pending(self.model, self.adapter_name) and _data_parallel():
            # A plain Trainer wrapped the model in DDP before this hook: resizing factors now would leave
            # DDP's buckets on the old shapes (a wrong or failing first backward), so stop with the fix.
            raise ConfigError(
                f"lora: EVA of adapter {self.adapter_name!r} would run after transformers.Trainer wrapped the "
                "model for data-parallel training, and EVA resizes the factors DDP holds; call "
                "peftkit.initialize_eva(model, batches) in every process before trainer.train(), or train with "
                "`peftkit train` (which runs EVA before wrapping)")
        self.initialize(kwargs.get("train_dataloader"))

    def initialize(self, batches: Any) -> None:
        if not eva_pending(self.model, self.adapter_name):
            return  # resumed, or initialised already
        if batches is None:
            raise RuntimeError("EVA needs the training batches, and the Trainer passed no train_dataloader to its "
                               "callbacks; call peftkit.initialize_eva(model, batches) before training")
        ranks = initialize_eva(self.model, batches, self.adapter_name)
        # the digest lets a data-parallel run show that every process holds the same factors
        digest = hashlib.sha256()
        for site, layer in sorted(eva_layers(self.model, self.adapter_name).items()):
            digest.update(site.encode() + layer.lora_A.detach().to("cpu", torch.float32).numpy().tobytes())
        log.info("EVA initialised adapter %r: ranks %s, factors sha256 %s", self.adapter_name,
                 sorted(set(ranks.values())), digest.hexdigest())
