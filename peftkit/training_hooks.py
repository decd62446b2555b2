"""What tuning methods add to a ``transformers.Trainer`` run: their callbacks and loss terms.

A method may need more than gradient steps: AdaLoRA re-allocates its rank budget after each
optimizer step (a ``TrainerCallback``) and adds a regularizer to the loss. ``peftkit train`` and
:class:`~peftkit.adapter_trainer.AdapterTrainer` apply both by themselves; with a plain
``transformers.Trainer`` pass ``callbacks=peftkit.training_callbacks(model)``. See
docs/plugins.md ("Training hooks") for the method side.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import TrainerCallback

from peftkit.core.method_training import adds_training_loss, training_callbacks as method_callbacks, \
    with_training_loss


class LossTermCallback(TrainerCallback):
    """While training, adds the training adapters' loss terms to the loss ``model`` returns
    (``outputs.loss``: a model given labels, as ``transformers.Trainer`` runs it)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is None:
            self.handle = self.model.register_forward_hook(lambda module, _args, output:
                                                           with_training_loss(module, output))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def training_callbacks(model: Any, adapter_names: Sequence[str] | None = None) -> list[TrainerCallback]:
    """The callbacks that training adapters ``adapter_names`` of ``model`` (an AdaptedModel; default:
    every adapter with a trainable parameter) needs from a ``transformers.Trainer``: the methods'
    own (AdaLoRA's rank allocation) and, when a method adds a loss term, one that adds it to the
    loss the model returns. ``peftkit train`` and ``AdapterTrainer`` add them by themselves."""
    callbacks = method_callbacks(model, adapter_names)
    if adds_training_loss(model):
        callbacks.append(LossTermCallback(model))
    return callbacks
