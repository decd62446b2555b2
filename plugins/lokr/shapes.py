"""How LoKr splits one layer's weight into Kronecker factors (torch-free).

A weight of shape (out, in, *kernel) is written as kron(w1, w2) with w1 of
shape (out_l, in_m) and w2 of shape (out_k, in_n, *kernel), where
out = out_l * out_k and in = in_m * in_n come from :func:`factorization`.
Which factors are stored as full matrices and which as rank-r products
follows Hugging Face PEFT (and LyCORIS) exactly, so the tensors in a file
have the same names and shapes in both libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into two factors ``(m, n)`` with ``m * n == dimension`` (LyCORIS's rule).

    With ``factor`` > 0 dividing ``dimension``: ``(factor, dimension // factor)``, in that order.
    Otherwise the divisors of ``dimension`` are tried in increasing order, up to ``factor``
    (-1: no limit), until the pair is balanced, and the pair is returned smaller first:
    ``factorization(128) == (8, 16)``, ``factorization(127) == (1, 127)``,
    ``factorization(128, 5) == (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    small, large = 1, dimension
    candidate = 1
    while small < large:
        candidate += 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        small, large = candidate, dimension // candidate
    return min(small, large), max(small, large)


@dataclass(frozen=True)
class LokrShapes:
    """The factors of one layer's LoKr update and their stored form.

    ``kernel`` is () for a linear layer. ``full_w1``/``full_w2``: the factor is
    one trained matrix (``lokr_w1``/``lokr_w2``) rather than two rank-r ones
    (``lokr_w1_a @ lokr_w1_b``...). ``tucker``: w2 is built from a core
    ``lokr_t2`` (r, r, *kernel) and two (r, side) matrices (use_effective_conv2d).
    """

    out_l: int
    out_k: int
    in_m: int
    in_n: int
    kernel: tuple[int, ...]
    r: int
    full_w1: bool
    full_w2: bool
    tucker: bool

    @classmethod
    def plan(cls, out_features: int, in_features: int, kernel: tuple[int, ...], r: int, *,
             decompose_both: bool, decompose_factor: int, use_effective_conv2d: bool) -> "LokrShapes":
        """PEFT's plan for a layer with this (out, in per group, kernel) weight."""
        out_l, out_k = factorization(out_features, decompose_factor)
        in_m, in_n = factorization(in_features, decompose_factor)
        full_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = r >= max(out_k, in_n) / 2
        tucker = use_effective_conv2d and not full_w2 and math.prod(kernel) > 1
        return cls(out_l, out_k, in_m, in_n, tuple(kernel), r, full_w1, full_w2, tucker)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """File key -> shape, PEFT's names."""
        r, kernel = self.r, self.kernel
        shapes: dict[str, tuple[int, ...]] = {}
        if self.full_w1:
            shapes["lokr_w1"] = (self.out_l, self.in_m)
        else:
            shapes["lokr_w1_a"] = (self.out_l, r)
            shapes["lokr_w1_b"] = (r, self.in_m)
        if self.full_w2:
            shapes["lokr_w2"] = (self.out_k, self.in_n, *kernel)
        elif self.tucker:
            # A Conv1d's core gets a trailing 1, as a 2-d kernel (PEFT's layout).
            shapes["lokr_t2"] = (r, r, *kernel) if len(kernel) == 2 else (r, r, *kernel, 1)
            shapes["lokr_w2_a"] = (r, self.out_k)
            shapes["lokr_w2_b"] = (r, self.in_n)
        else:
            shapes["lokr_w2_a"] = (self.out_k, r)
            shapes["lokr_w2_b"] = (r, self.in_n * math.prod(kernel))
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())
