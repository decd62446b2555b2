"""LoRA+ (arXiv 2402.12354): LoRA's B factors learn ``ratio`` times faster than the A factors.

The parameter groups follow PEFT's ``create_loraplus_optimizer``: A factors (and every other trainable
matrix) at ``lr``; B factors and trainable vectors (biases, norms, DoRA magnitudes) at ``lr * ratio``,
without weight decay for biases and norm weights; LoRA factors on embedding tables at ``embedding_lr``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

#: PEFT's default learning rate of LoRA factors on embedding tables under LoRA+.
EMBEDDING_LR = 1e-6


def lora_plus_groups(model: "nn.Module", *, lr: float, ratio: float, weight_decay: float = 0.0,
                     embedding_lr: float = EMBEDDING_LR) -> list[dict[str, Any]]:
    """The optimizer parameter groups of LoRA+ for the trainable parameters of ``model`` (empty groups
    left out), each with ``lr``, ``weight_decay`` and ``names`` (the parameters' names, for inspection)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    if not ratio > 0:
        raise ConfigError(f"LoRA+: ratio={ratio!r} must be > 0 (the paper uses 2 to 16; B's lr is lr * ratio)")
    if not lr > 0:
        raise ConfigError(f"LoRA+: lr={lr!r} must be > 0")
    decayed = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    groups: dict[str, tuple[float, float, list[tuple[str, Any]]]] = {
        "A": (lr, weight_decay, []), "embedding": (embedding_lr, weight_decay, []),
        "B": (lr * ratio, weight_decay, []), "B_no_decay": (lr * ratio, 0.0, [])}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rpartition(".")[2]
        if leaf.startswith("lora_embedding_"):
            key = "embedding"
        elif "lora_B" in leaf or param.ndim == 1:
            key = "B" if name in decayed else "B_no_decay"
        else:
            key = "A"
        groups[key][2].append((name, param))
    return [{"params": [p for _, p in members], "names": [n for n, _ in members], "lr": group_lr,
             "weight_decay": decay}
            for group_lr, decay, members in groups.values() if members]


def lora_plus_optimizer(model: "nn.Module", *, lr: float, ratio: float, weight_decay: float = 0.0,
                        embedding_lr: float = EMBEDDING_LR, optimizer_class: type | None = None,
                        **optimizer_options: Any) -> "torch.optim.Optimizer":
    """A LoRA+ optimizer for ``model`` (AdamW unless ``optimizer_class``), to pass to
    ``transformers.Trainer(..., optimizers=(optimizer, None))``; ``optimizer_options`` go to its
    constructor (betas, eps, ...). See :func:`lora_plus_groups` for the groups."""
    import torch

    groups = lora_plus_groups(model, lr=lr, ratio=ratio, weight_decay=weight_decay, embedding_lr=embedding_lr)
    if not any("lora_B" in name for group in groups for name in group["names"]):
        raise ConfigError("LoRA+ (lora_plus_ratio, --lora-plus-ratio) trains LoRA's B factors faster, and the model "
                          "has no trainable LoRA factors (lora_B): train a LoRA adapter (method 'lora[r=8]') or "
                          "leave LoRA+ out")
    for group in groups:
        del group["names"]
    return (optimizer_class or torch.optim.AdamW)(groups, lr=lr, **optimizer_options)
