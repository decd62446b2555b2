"""What a method adds to training, collected for the adapters of an AdaptedModel.

Method declares two hooks with defaults that add nothing (docs/plugins.md, "Training hooks"):

* ``training_loss(model, adapter_name) -> Tensor | None``: a term added to the training loss
  while that adapter trains (AdaLoRA's orthogonality regularizer);
* ``training_callbacks(model, adapter_name) -> list``: ``transformers.TrainerCallback`` objects
  the adapter needs while it trains (AdaLoRA's rank allocation after each optimizer step).

Methods that keep the defaults cost nothing here.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from .layer import LayerAdapter, adapters_at
from .method import Method


def layer_adapters_of(model: Any, adapter_name: str) -> dict[str, LayerAdapter]:
    """Site name -> adapter ``adapter_name``'s module there, for an AdaptedModel ``model``."""
    record = model.adapter_record(adapter_name)
    found: dict[str, LayerAdapter] = {}
    for site in record.sites:
        adapter = adapters_at(model.base_model.get_submodule(site.name)).get(adapter_name)
        if adapter is not None:
            found[site.name] = adapter
    return found


def _adds_loss(method: Method) -> bool:
    return type(method).training_loss is not Method.training_loss


def adds_training_loss(model: Any) -> bool:
    """Whether some adapter of ``model`` belongs to a method with a training loss term."""
    return any(_adds_loss(model.adapter_record(name).method) for name in model.adapters)


def training_loss(model: Any) -> torch.Tensor | None:
    """The sum of the loss terms of the adapters of ``model`` that are training now (model in training
    mode, some parameter of the adapter requiring grad), or None when there is none."""
    if not getattr(model, "training", False):
        return None
    total = None
    for name in model.adapters:
        method = model.adapter_record(name).method
        if not _adds_loss(method) or not any(p.requires_grad for p in model.adapter_parameters(name)):
            continue
        term = method.training_loss(model, name)
        if term is not None:
            total = term if total is None else total + term
    return total


def with_training_loss(model: nn.Module, output: Any) -> Any:
    """``output`` with the adapters' loss terms added to the loss it carries (``output.loss`` of a
    transformers ModelOutput); unchanged when it carries none or no adapter adds a term."""
    if not getattr(model, "training", False) or not adds_training_loss(model):
        return output
    loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        return output
    term = training_loss(model)
    if term is not None:
        output.loss = loss + term.to(loss.dtype)
    return output


def training_adapter_names(model: Any) -> list[str]:
    """The adapters of ``model`` (an AdaptedModel) with a trainable parameter: those that train."""
    return [name for name in model.adapters if any(p.requires_grad for p in model.adapter_parameters(name))]


def training_callbacks(model: Any, adapter_names: Sequence[str] | None = None) -> list[Any]:
    """The ``TrainerCallback`` objects the methods of ``adapter_names`` (default: every adapter of
    ``model`` with a trainable parameter) need while training ``model`` (an AdaptedModel). Pass them
    to ``transformers.Trainer(callbacks=...)``; ``peftkit train`` and ``AdapterTrainer`` add them."""
    names = list(adapter_names) if adapter_names is not None else training_adapter_names(model)
    callbacks: list[Any] = []
    for name in names:
        callbacks.extend(model.adapter_record(name).method.training_callbacks(model, name))
    return callbacks
