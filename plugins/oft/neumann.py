"""OFT's rotations from their trained entries as one autograd node (PEFT's truncated Neumann series).

Each block's rotation is ``I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m`` for a skew-symmetric Q whose upper
triangle is trained (m = 4 for PEFT's default 5 terms, 3 for 3 or 4 terms). Built op by op under
autograd, Q (a zero tensor, an index_put, a transpose, a difference) and the powers make about fifteen
nodes a step and as many in backward, each on a (blocks, size, size) tensor of a few KiB: their fixed cost
per call, not their arithmetic, is what a layer pays (a 512-wide layer with blocks of 32, 2 threads:
0.39 ms a step for its rotations against 2.7 ms for its frozen base's product). This node writes Q with
two index copies and runs the polynomial in Horner's form, ``I + Q (2I + Q (2I + ... Q (2I + Q)))``, m
products; its backward is the polynomial's derivative: for G the gradient of R and
``D_j = sum_{a+b=j} (Q^T)^a G (Q^T)^b`` (``D_0 = G``, ``D_j = D_(j-1) Q^T + (Q^T)^j G``), the gradient of Q
is ``2 (D_0 + ... + D_(m-2)) + D_(m-1)``, 2 (m - 1) products, and that of an upper entry (i, j) is
``M[i, j] - M[j, i]``. The values equal the op-by-op form up to float rounding (tests/test_values_oft.py
checks the rotations against float64 and the gradient with gradcheck).
"""

from __future__ import annotations

from typing import Any

import torch


def flat_indices(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions of the entries above the diagonal, of their mirror images below it) in a flattened
    (size, size) matrix, in ``torch.triu_indices`` order (PEFT's order of ``oft_R.weight``'s columns)."""
    rows, cols = torch.triu_indices(size, size, 1, device=device)
    return rows * size + cols, cols * size + rows


def skew_symmetric(entries: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor, size: int) -> torch.Tensor:
    """Each row of ``entries`` (blocks, size (size - 1) / 2) as the skew-symmetric (size, size) matrix whose upper
    triangle it holds (:func:`flat_indices`' positions), written by two index copies; differentiable."""
    flat = entries.new_zeros(entries.shape[0], size * size)
    flat.index_copy_(1, upper, entries)
    flat.index_copy_(1, lower, -entries)
    return flat.view(-1, size, size)


class SkewNeumannFn(torch.autograd.Function):
    """R = I + 2Q + ... + 2Q^(m-1) + Q^m (m = ``top_power``, at least 2) for each block's Q, its upper entries
    the rows of ``entries`` (blocks, size (size - 1) / 2)."""

    @staticmethod
    def forward(ctx: Any, entries: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor, size: int,
                top_power: int) -> torch.Tensor:
        q = skew_symmetric(entries, upper, lower, size)
        eye = torch.eye(size, dtype=q.dtype, device=q.device)
        horner = torch.add(q, eye, alpha=2)  # 2I + Q
        for _ in range(top_power - 2):
            horner = torch.baddbmm(eye, q, horner, beta=2)
        ctx.save_for_backward(q, upper, lower)
        ctx.top_power = top_power
        return torch.baddbmm(eye, q, horner)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, upper, lower = ctx.saved_tensors
        q_t = q.transpose(1, 2)
        power_g = sym = g = g.contiguous()  # (Q^T)^j G and D_j, j = 0
        twice = g.clone()  # D_0 + ... + D_(m-2)
        for j in range(1, ctx.top_power):
            power_g = torch.bmm(q_t, power_g)
            sym = torch.baddbmm(power_g, sym, q_t)
            if j < ctx.top_power - 1:
                twice.add_(sym)
        grad_q = sym.add_(twice, alpha=2)
        flat = grad_q.view(q.shape[0], -1)
        grad_entries = flat.index_select(1, upper).sub_(flat.index_select(1, lower))
        return grad_entries, None, None, None, None


def neumann_rotations(entries: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor, size: int,
                      top_power: int) -> torch.Tensor:
    """The blocks' rotations (blocks, size, size) for a ``top_power`` m of at least 2."""
    return SkewNeumannFn.apply(entries, upper, lower, size, top_power)
