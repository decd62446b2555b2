"""Sharded training (``peftkit train --fsdp``): the frozen base model is sharded with PyTorch FSDP2
(``torch.distributed.fsdp.fully_shard``), the adapter is replicated.

Each transformer block of the base (the model's ``_no_split_modules`` classes) becomes one FSDP2
unit and the root takes the rest (embeddings, head), so every process holds ``1/N`` of the base
weights and gathers one block at a time. The adapter's parameters (and a trained task head) stay
whole, ordinary tensors on every process: they are a small fraction of the model, and keeping
them whole lets checkpoints, optimizer state, resuming and the saved adapter work exactly as in a
data-parallel run. Their gradients are averaged over the processes before clipping and the
optimizer step, which is what DDP does, so a sharded run trains the adapter a single-process run
trains on the same global batch. On CPUs the processes talk over gloo, on GPUs over NCCL.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from peftkit.core.errors import PeftkitError
from peftkit.core.model import AdaptedModel
from peftkit.training_plan import ACCELERATE_FSDP_VARIABLE, accelerate_fsdp_launch


def take_over_accelerate_fsdp() -> str | None:
    """Keep accelerate from sharding the model itself when ``accelerate launch`` ran with an FSDP config:
    peftkit shards the base and keeps the adapter whole (see the module docstring), where accelerate's
    FSDP would shard the adapter too and write checkpoints in its own format. accelerate reads the
    variable when the Trainer creates its state. Returns a note for the user, or None."""
    if not accelerate_fsdp_launch():
        return None
    os.environ[ACCELERATE_FSDP_VARIABLE] = "false"
    return ("note: accelerate's FSDP config: peftkit shards the base model itself with FSDP2, one unit per "
            "transformer block; of the config it uses the processes and mixed_precision, not the fsdp_* settings")


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: transformers lists them in ``_no_split_modules``
    (the modules it never splits across devices), which is what FSDP wraps one by one."""
    return set(getattr(model, "_no_split_modules", None) or ())


def kept_whole(adapted: AdaptedModel) -> set[nn.Parameter]:
    """Parameters that are not sharded: every adapter's, and anything trainable (BitFit's biases)."""
    params = {p for name in adapted.adapters for p in adapted.adapter_parameters(name)}
    return params | {p for p in adapted.parameters() if p.requires_grad}


def shard_base(adapted: AdaptedModel, device: torch.device, *, mixed_precision: str = "no") -> int:
    """Shard ``adapted``'s base model over the processes of the initialized process group with FSDP2;
    returns the number of FSDP units (blocks, plus the root). Every process must call it, with the
    same model. With ``mixed_precision`` "bf16" (or "fp16") the units gather and compute their weights
    in that dtype, half the traffic; the adapter stays float32 and the Trainer's autocast does the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise PeftkitError("--fsdp shards the base model over several processes; launch the command with "
                           "torchrun --nproc_per_node N (N >= 2) or accelerate launch")
    whole = kept_whole(adapted)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=low) if low is not None else MixedPrecisionPolicy()
    base = adapted.base_model
    names = block_classes(base)
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params={p for p in block.parameters() if p in whole})
    # The root unit is the AdaptedModel, not the base: fully_shard renames the class of what it wraps
    # (FSDPLlamaForCausalLM), and the saved adapter records the base model's class.
    fully_shard(adapted, mesh=mesh, mp_policy=policy, ignored_params={p for p in adapted.parameters() if p in whole})
    # fully_shard moved each unit to the device as it sharded it (on a GPU, one unit is whole there at a
    # time, never the whole base); now the parts kept whole follow.
    adapted.to(device)
    _broadcast_from_main(p for p in adapted.parameters() if p in whole)
    return len(blocks) + 1


def _broadcast_from_main(params: Any) -> None:
    """Every process starts from the main process's adapter (the same seed already makes them equal;
    this makes it so whatever the method's initialization does)."""
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def average_gradients(adapted: AdaptedModel, at_step: Callable[[], bool]) -> None:
    """Average the gradients of the trainable (whole, not sharded) parameters over the processes once
    they are accumulated for an optimizer step (``at_step()`` says whether this backward ends one)."""
    world = dist.get_world_size()

    def average(param: torch.Tensor) -> None:
        if param.grad is not None and at_step():
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
            param.grad.div_(world)

    for param in adapted.parameters():
        if param.requires_grad and not getattr(param, "_peftkit_grad_averaged", False):
            param.register_post_accumulate_grad_hook(average)
            param._peftkit_grad_averaged = True

