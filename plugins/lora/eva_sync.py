"""EVA in a data-parallel run (torchrun, DDP): every process reads its own shard of the batches, so each
would find different components and ranks (and factors of different shapes across processes). Instead the
processes step together: each runs the model on its batch, the main process gathers every process's layer
inputs and feeds their concatenation to the incremental SVD (one step over the union of the batches), decides
when to stop, and at the end sends the resulting rows of A to every process, so all apply the same factors."""

from __future__ import annotations

from typing import Any

import torch


class EvaSync:
    """The collective steps EVA needs; in a single process each is the identity."""

    def __init__(self) -> None:
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.leader = not self.distributed or dist.get_rank() == 0

    def share(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if not self.distributed:
            return value
        box = [value if self.leader else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def first_failure(self, failure: str | None) -> str | None:
        """The first process's error message of those that have one (each process passes its own or
        None), on every process, so that all raise it and none waits for the others forever."""
        if not self.distributed:
            return failure
        every: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, failure)
        return next((f for f in every if f is not None), None)

    def gather_rows(self, rows: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        """Site -> the rows of every process, concatenated (on the main process; ``{}`` elsewhere)."""
        if not self.distributed:
            return rows
        mine = {site: None if r is None else r.detach().to("cpu") for site, r in rows.items()}
        parts: list[Any] = [None] * torch.distributed.get_world_size() if self.leader else []
        torch.distributed.gather_object(mine, parts if self.leader else None, dst=0)
        if not self.leader:
            return {}
        out: dict[str, torch.Tensor | None] = {}
        for site, own in rows.items():
            found = [part[site] for part in parts if part.get(site) is not None]
            out[site] = torch.cat(found).to(own.device if own is not None else "cpu") if found else None
        return out
