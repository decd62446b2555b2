"""The SHiRA module for one Linear layer.

The weight change is sparse: dW (out, in) is zero except at the mask's positions, where it holds the trained
values, ``dW[rows[k], cols[k]] = shira_weight[k]`` (``shira_indices = [rows, cols]``, PEFT's layout: int32,
(2, count), count = r * (in + out)). PEFT's random mask takes the first count of a random permutation of the
out * in flat positions (row-major), drawn by a fresh CPU ``torch.Generator`` seeded with random_seed (left
unseeded when it is null, so at torch's fixed default seed), and lists the kept positions in row-major order.

Cost. PEFT adds dW to a copy of W and runs one product in every forward, and autograd then forms the dense
(out, in) gradient g^T x of that sum to read count numbers from it. peftkit's training forward
(:class:`_SparseSummedProduct`) also runs one product with W + dW, built by ``index_put`` (no sparse tensor),
keeping x and the values for backward, and computes only the gradient's values at the mask (a sampled product,
``torch.sparse.sampled_addmm`` on a CSR pattern built once per mask, in float32/float64; other dtypes read
them from g^T x). Merging adds the values into W in place. The figures are in docs/methods/shira.md.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, ConfigError, fusable_linear, kept_while_unchanged, LayerAdapter,
                                linear_features, to_dtype)

from .config import CUSTOM_MASK_FIX, RANDOM_MASK

#: The dtypes ``torch.sparse.sampled_addmm`` computes the values' gradient in; others read them from g^T x.
_SAMPLED_DTYPES = (torch.float32, torch.float64)


def random_indices(in_features: int, out_features: int, r: int, random_seed: Optional[int]) -> torch.Tensor:
    """PEFT's random mask as positions: (2, r * (in + out)) int32 rows and columns, in row-major order, from
    a random permutation of the out * in positions drawn by a fresh CPU generator (seeded with random_seed
    unless it is None)."""
    generator = torch.Generator()
    if random_seed is not None:
        generator.manual_seed(random_seed)
    count = r * (in_features + out_features)
    flat = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class MaskPositions:
    """A mask's positions in the forms the products need: long rows and columns, and (built on first use, by
    the values' gradient in eager training) a CSR pattern with the permutation from the mask's order to CSR's
    row-major order for sampled products. Building rows and columns alone keeps the shapes static, so a
    torch.compile'd forward builds them in its graph."""

    def __init__(self, indices: torch.Tensor, out_features: int, in_features: int) -> None:
        self.rows, self.cols = indices.long().unbind(0)
        self.shape = (out_features, in_features)
        self._csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._patterns: dict[torch.dtype, torch.Tensor] = {}

    def _csr_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(row offsets, columns in row-major order, the permutation to that order or None when the mask is
        in it already)."""
        if self._csr is None:
            flat = self.rows * self.shape[1] + self.cols
            order = torch.argsort(flat, stable=True)
            order = None if bool((flat[1:] >= flat[:-1]).all()) else order
            counts = torch.bincount(self.rows, minlength=self.shape[0])
            self._csr = (torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                         self.cols if order is None else self.cols[order], order)
        return self._csr

    def summed(self, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """weight + dW (a new tensor; differentiable in both)."""
        return weight.index_put((self.rows, self.cols), values.to(weight.dtype), accumulate=True)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """dW as a dense (out, in) tensor in the values' dtype."""
        return self.summed(values.new_zeros(self.shape), values)

    def sampled_product(self, grad: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """(grad^T x2)[rows, cols], in the mask's order: the values' gradient for output gradient ``grad``
        (tokens, out) and input ``x2`` (tokens, in), without forming the (out, in) product where torch's
        sampled product takes the dtype."""
        if grad.dtype not in _SAMPLED_DTYPES or x2.dtype != grad.dtype:
            return (grad.t() @ x2)[self.rows, self.cols]
        sampled = torch.sparse.sampled_addmm(self._pattern(grad), grad.t().contiguous(), x2.contiguous(),
                                             beta=0.0).values()
        order = self._csr_layout()[2]
        if order is None:
            return sampled
        return torch.empty_like(sampled).index_copy_(0, order, sampled)

    def _pattern(self, like: torch.Tensor) -> torch.Tensor:
        pattern = self._patterns.get(like.dtype)
        if pattern is None or pattern.device != like.device:
            crow, col, _ = self._csr_layout()
            with warnings.catch_warnings():  # torch's one-time notice that sparse CSR tensors are in beta
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
                pattern = torch.sparse_csr_tensor(crow.to(like.device), col.to(like.device),
                                                  torch.zeros(len(col), dtype=like.dtype, device=like.device),
                                                  size=self.shape)
            self._patterns[like.dtype] = pattern
        return pattern


class _SparseSummedProduct(torch.autograd.Function):
    """y = x (W + dW)^T + b, keeping for backward x and the values, not W + dW: backward builds W + dW again
    for the input's gradient and takes the values' gradient as a sampled product at the mask."""

    @staticmethod
    def forward(ctx: object, x2: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, positions: MaskPositions) -> torch.Tensor:
        ctx.save_for_backward(x2, values, weight)
        ctx.positions = positions
        return F.linear(x2, positions.summed(weight, values), bias)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, values, weight = ctx.saved_tensors
        positions = ctx.positions
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, positions.summed(weight, values))
        if ctx.needs_input_grad[1]:
            grad_values = positions.sampled_product(grad, x2).to(values.dtype)
        return grad_x, grad_values, None, None, None


class ShiraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, *, r: int, mask_type: str = RANDOM_MASK, random_seed: Optional[int] = None,
                 init_weights: bool = True) -> None:
        super().__init__()
        in_features, out_features = linear_features(base)
        self.in_features, self.out_features, self.r, self.mask_type = in_features, out_features, r, mask_type
        count = r * (in_features + out_features)
        if mask_type == RANDOM_MASK:
            indices = random_indices(in_features, out_features, r, random_seed)
        else:  # a mask PEFT computed with a Python function: only a folder can give its positions
            indices = torch.full((2, count), -1, dtype=torch.int32)
        self._awaits_mask = mask_type != RANDOM_MASK
        # Values drawn as PEFT draws them (float32 on the CPU, from torch's global generator), then kept in the
        # adapter's dtype on the weight's device.
        values = torch.zeros(count) if init_weights else torch.randn(count)
        device = base.weight.device
        self.shira_weight = nn.Parameter(values.to(device=device, dtype=adapter_dtype(base)))
        self.register_buffer("shira_indices", indices.to(device))

    # -- the mask ------------------------------------------------------------------

    def _positions(self) -> MaskPositions:
        """The mask's positions, built again when ``shira_indices`` changed (a load, a hot swap, a move)."""
        self._check_mask()
        indices = self.shira_indices
        return kept_while_unchanged(self, "_kept_positions", (indices,),
                                    lambda: MaskPositions(indices, self.out_features, self.in_features))

    def _check_mask(self) -> None:
        """Refuse to compute with an adapter whose mask_type names a mask peftkit cannot draw, until a folder
        has given its positions."""
        if not self._awaits_mask:
            return
        if bool((self.shira_indices < 0).any()):
            raise ConfigError(f"shira: mask_type={self.mask_type!r} names a mask peftkit cannot compute (PEFT's "
                              f"custom mask_fn, a Python function); use mask_type='random' (PEFT's random mask, "
                              f"seeded by random_seed), or {CUSTOM_MASK_FIX}")
        self._awaits_mask = False

    # -- outputs -----------------------------------------------------------------------

    def delta_out_in(self) -> torch.Tensor:
        """dW as a dense (out, in) tensor, in the values' dtype."""
        return self._positions().dense(self.shira_weight)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's output as one product with W + dW (PEFT's form); in training through
        :class:`_SparseSummedProduct`. None (the unfused path) under autocast or for a weight of another dtype
        than the values (a half-precision layer)."""
        values = self.shira_weight
        if torch.is_autocast_enabled(x.device.type) or not fusable_linear(base, x, values) \
                or base.weight.dtype != values.dtype:
            return None
        positions = self._positions()
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            x2 = x.reshape(-1, x.shape[-1])
            out = _SparseSummedProduct.apply(x2, values, base.weight, base.bias, positions)
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, positions.summed(base.weight, values), base.bias)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """dW x in the values' dtype (float32 beside a half-precision layer), added in h's dtype."""
        change = self.delta_out_in()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(to_dtype(x, change.dtype), change).to(h.dtype)

    # -- merging -----------------------------------------------------------------------

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight`` (out, in)."""
        return self.delta_out_in()

    def merge(self, base: nn.Module) -> None:
        """Add the values into the weight at the mask, in place (no dense dW)."""
        self._add_into(base.weight, self.shira_weight)

    def unmerge(self, base: nn.Module) -> None:
        self._add_into(base.weight, -self.shira_weight)

    def _add_into(self, weight: torch.Tensor, values: torch.Tensor) -> None:
        positions = self._positions()
        with torch.no_grad():
            weight.data.index_put_((positions.rows, positions.cols), values.to(weight.dtype), accumulate=True)

    # -- files -------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"shira_weight": self.shira_weight, "shira_indices": self.shira_indices}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        self._check_mask()  # never write a folder without the mask's positions
        return self.tensors()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, mask_type={self.mask_type!r}"
