"""PiSSA and OLoRA: initial LoRA factors taken from the base weight, as PEFT computes them.

PiSSA (arXiv 2404.02948) starts the factors at the weight's top-r singular triplets (``pissa``: exact SVD;
``pissa_niter_N``: torch's randomized low-rank SVD with N subspace iterations, much faster on large
weights). OLoRA (arXiv 2406.01775) starts them at the first r columns of the weight's QR decomposition.
In both, the base weight keeps the residual W - scale * B A.
"""

from __future__ import annotations

import torch

from .config import pissa_iterations


def residual_split(w: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``r`` for the float32 (out, in) weight ``w`` such that ``scale * B @ A`` is the part
    of ``w`` the adapter takes over."""
    if init == "olora":
        q, upper = torch.linalg.qr(w)
        return upper[:r], q[:, :r]
    niter = pissa_iterations(init)
    if niter is not None:
        u, s, v = torch.svd_lowrank(w, r, niter=niter)
        vh = v.t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]
