"""The HiRA modules for one Linear (or GPT-2 Conv1D), Embedding or Conv1d/2d/3d layer.

The update multiplies the frozen weight W0 elementwise by a rank-r product M = B A (A: r x in, B: out x r):

    h' = h + x (W0 ⊙ M)^T            (Linear; M in the (out, in) layout, dropout on x while training)
    h' = h + (W0 ⊙ M^T)[ids]         (Embedding; A: r x num_embeddings, B: embedding_dim x r)

Linear cost: PEFT builds M and W0 ⊙ M (out x in) every forward and runs a second product beside the base one,
keeping the input and W0 ⊙ M for the backward. Here, alone at a plain layer without dropout, the base product
and the update's are one product with W0 ⊙ (1 + M) (built in one ``addcmul`` pass), and :class:`_HadamardLinear`
keeps only the input for the backward (A, B and W0 are parameters), building W0 ⊙ (1 + M) again there: the
(out x in) tensor PEFT keeps per layer is not kept. x (W0 ⊙ B A)^T = sum_i ((x ⊙ a_i) W0^T) ⊙ b_i avoids M
but runs r + 1 rows through W0 per input row, so it wins for one row only (decoding one token: W0 is read once
instead of building two out x in tensors), where :func:`few_rows_output` takes it (docs/methods/hira.md has the
measurements).

Embedding cost: PEFT builds the whole (num_embeddings x embedding_dim) W0 ⊙ M^T every forward to look up a
few rows; here the rows of W0 and the columns of A at the ids are gathered and multiplied, (tokens x r) by
B^T, the same numbers per looked-up row.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, is_conv1d, kept_while_unchanged, LayerAdapter, linear_features,
                                MergeError, plain_linear, to_dtype, weight_out_in)


def hadamard_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, with_base: bool) -> torch.Tensor:
    """W ⊙ (1 + B A) with the base (one ``addcmul`` pass), else W ⊙ (B A); (out, in) like ``weight``. Written
    into B A's own storage: one (out, in) tensor is made, not two (for a large layer making it, page faults
    included, costs as much as the pass). Not for autograd: B A is overwritten."""
    modulation = b @ a
    if with_base:
        return torch.addcmul(weight, weight, modulation, out=modulation)
    return modulation.mul_(weight)


class _HadamardLinear(torch.autograd.Function):
    """``x (W ⊙ (c + B A))^T + bias`` (c 1 with the base, else 0) for a frozen W, keeping x alone for the
    backward: the (out, in) weight is built again there instead of kept from the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None, with_base: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight, a, b)
        ctx.with_base = with_base
        return F.linear(x, hadamard_weight(weight, a, b, with_base), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, a, b = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x:
            grad_x = grad @ hadamard_weight(weight, a, b, ctx.with_base)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        if need_a or need_b:
            grad_m = (grad_2d.t() @ x.reshape(-1, x.shape[-1])).mul_(weight)  # d loss / d (B A), (out, in)
            grad_a = b.t() @ grad_m if need_a else None
            grad_b = grad_m @ a.t() if need_b else None
        if need_bias:
            grad_bias = grad_2d.sum(0)
        return grad_x, None, grad_a, grad_b, grad_bias, None


def few_rows_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """x (W ⊙ (1 + B A))^T + bias for a few input rows (decoding), as x W^T + sum_i ((x ⊙ a_i) W^T) ⊙ b_i:
    the rows and their r products with A's rows go through W in one (rows * (r + 1))-row product, reading W
    once, instead of building B A and W ⊙ (1 + B A) (out x in each)."""
    rows = x.reshape(-1, x.shape[-1])
    count, r = rows.shape[0], a.shape[0]
    products = F.linear(torch.cat((rows, (rows[:, None, :] * a).reshape(count * r, -1))), weight)
    out = products[:count] + (products[count:].view(count, r, -1) * b.t()).sum(1)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], -1)


def _fits_function(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether :class:`_HadamardLinear` computes what autograd's composition computes here: one float dtype for
    input, weight and factors, a frozen weight, and autocast off (it would cast inside the function only)."""
    return x.dtype == weight.dtype == a.dtype and not weight.requires_grad \
        and not torch.is_autocast_enabled(x.device.type)


class _WeightScaling(LayerAdapter):
    """Merging shared by HiRA's modules: the weight times 1 + :meth:`modulation` (B A in the weight's layout)."""

    merge_reads_weight = True  # merging multiplies the weight by 1 + B A
    _zero_backup: torch.Tensor | None = None

    def modulation(self, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """W0 ⊙ B A, the change to ``base.weight`` (read from the unmerged weight)."""
        return base.weight * self.modulation(base)

    def merge(self, base: nn.Module) -> None:
        self._zero_backup = merge_scale(base, self.modulation(base))

    def unmerge(self, base: nn.Module) -> None:
        unmerge_scale(base, self.modulation(base), self._zero_backup)
        self._zero_backup = None


class HiraLinear(_WeightScaling):
    """hira_A (r, in) and hira_B (out, r) at a Linear or Conv1D layer."""

    def __init__(self, base: nn.Module, *, r: int, dropout: float = 0.0, init_weights: bool | str = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base)
        self.r = r
        # PEFT's draws from torch's global generator, float32 on the CPU: A, then B, from N(0, 1); then A again
        # unless init_weights is false, and B set to zero.
        a, b = torch.randn(r, self.in_features), torch.randn(self.out_features, r)
        if init_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init_weights == "gaussian":
            nn.init.normal_(a, std=1 / r)
        if init_weights is not False:
            nn.init.zeros_(b)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.hira_A = nn.Parameter(a.to(**factory))
        self.hira_B = nn.Parameter(b.to(**factory))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def _drops(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.training

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        weight, a, b = weight_out_in(base), self.hira_A, self.hira_B
        x = self.dropout(to_dtype(x, a.dtype))
        if _fits_function(x, weight, a):
            return _HadamardLinear.apply(x, weight, a, b, None, False).to(h.dtype)
        return F.linear(x, weight * (b @ a)).to(h.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's whole output as one product with W0 ⊙ (1 + B A) (and the bias), at a plain layer without
        dropout in effect, in one dtype; None (the base product, then :meth:`delta`) otherwise."""
        if self._drops() or not plain_linear(base) or x.dim() < 1 or x.device != base.weight.device:
            return None
        weight, a, b = weight_out_in(base), self.hira_A, self.hira_B
        if not _fits_function(x, weight, a):
            return None
        if x.numel() == x.shape[-1]:  # one row (decoding one token): W read once, no (out x in) tensor made
            return few_rows_output(x, weight, base.bias, a, b)
        trains = torch.is_grad_enabled() and any(t.requires_grad for t in (weight, a, b))
        if not trains and not torch.compiler.is_compiling():  # inference: W0 ⊙ (1 + B A) built once, then kept
            changed = kept_while_unchanged(self, "_kept_changed_weight", (weight, a, b),
                                           lambda: hadamard_weight(weight, a, b, True))
            return F.linear(x, changed, base.bias)
        self.__dict__.pop("_kept_changed_weight", None)  # training keeps nothing between steps
        return _HadamardLinear.apply(x, weight, a, b, base.bias, True)

    # -- merging -----------------------------------------------------------------------------------------------------

    def modulation(self, base: nn.Module) -> torch.Tensor:
        """B A in ``base.weight``'s layout ((in, out) for Conv1D)."""
        product = self.hira_B @ self.hira_A
        return product.t() if is_conv1d(base) else product

    # -- files -------------------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hira_A": self.hira_A, "hira_B": self.hira_B}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}"


class HiraEmbedding(_WeightScaling):
    """hira_embedding_A (r, num_embeddings) and hira_embedding_B (embedding_dim, r) at an Embedding layer."""

    def __init__(self, base: nn.Embedding, *, r: int, init_weights: bool | str = True) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.r = r
        # PEFT's draws: A, then B, from N(0, 1); unless init_weights is false, A = 0 and B drawn again from N(0, 1)
        # (for "gaussian" too).
        a, b = torch.randn(r, self.num_embeddings), torch.randn(self.embedding_dim, r)
        if init_weights is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.hira_embedding_A = nn.Parameter(a.to(**factory))
        self.hira_embedding_B = nn.Parameter(b.to(**factory))

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The looked-up rows of W0 times the same rows of (B A)^T: (..., embedding_dim). PEFT looks them up in
        the whole W0 ⊙ (B A)^T, without the base layer's padding_idx, max_norm or scale."""
        rows = F.embedding(x, base.weight)
        modulation = F.embedding(x, self.hira_embedding_A.t()) @ self.hira_embedding_B.t()
        return (rows * modulation).to(h.dtype)

    def modulation(self, base: nn.Module) -> torch.Tensor:
        """(B A)^T, shaped like the weight (num_embeddings, embedding_dim)."""
        return (self.hira_embedding_B @ self.hira_embedding_A).t()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hira_embedding_A": self.hira_embedding_A, "hira_embedding_B": self.hira_embedding_B}

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}"


def merge_scale(base: nn.Module, modulation: torch.Tensor) -> torch.Tensor | None:
    """W0 ⊙ (1 + M) into ``base.weight`` in place (PEFT's W0 + W0 ⊙ M up to rounding). Returns the weight's
    values where 1 + M is 0, which :func:`unmerge_scale` cannot divide back (None when there are none)."""
    with torch.no_grad():
        factor = 1 + modulation.detach()
        if not torch.isfinite(factor).all():
            raise MergeError("a hira adapter holds NaN or infinite values (B A); it cannot be merged")
        weight = base.weight
        zeros = factor == 0
        backup = weight.detach()[zeros].clone() if bool(zeros.any()) else None
        weight.data = (weight.data * factor).to(weight.dtype)
        return backup


def unmerge_scale(base: nn.Module, modulation: torch.Tensor, zero_backup: torch.Tensor | None) -> None:
    """Undo :func:`merge_scale`: divide by the same 1 + M (exact up to two roundings), putting back the values
    kept where it is 0."""
    with torch.no_grad():
        factor = 1 + modulation.detach()
        weight = base.weight
        zeros = factor == 0
        weight.data = (weight.data / torch.where(zeros, torch.ones_like(factor), factor)).to(weight.dtype)
        if zero_backup is not None:
            weight.data[zeros] = zero_backup.to(weight.dtype)


_CONVOLUTIONS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class HiraConv(_WeightScaling):
    """hira_A (r, in, *kernel) and hira_B (out, r, 1, ...) at a Conv1d/2d/3d layer (groups = 1): B A, a 1 x 1
    convolution of A by B, is (out, in, *kernel) like the weight."""

    def __init__(self, base: nn.Module, *, r: int, dropout: float = 0.0, init_weights: bool | str = True) -> None:
        super().__init__()
        self.r = r
        weight = base.weight
        ones = (1,) * (weight.dim() - 2)
        # PEFT's draws: A, then B, from N(0, 1); unless init_weights is false, A kaiming uniform ("gaussian" too)
        # and B = 0.
        a, b = torch.randn(r, base.in_channels, *base.kernel_size), torch.randn(base.out_channels, r, *ones)
        if init_weights is not False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        factory = {"dtype": adapter_dtype(base), "device": weight.device}
        self.hira_A = nn.Parameter(a.to(**factory))
        self.hira_B = nn.Parameter(b.to(**factory))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def modulation(self, base: nn.Module) -> torch.Tensor:
        """B A, shaped like the weight (out, in, *kernel)."""
        a = self.hira_A
        return (self.hira_B.flatten(1) @ a.flatten(1)).view(self.hira_B.shape[0], *a.shape[1:])

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor, base: nn.Module,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's convolution with another weight, zero-padded (PEFT's, whatever padding_mode says)."""
        return _CONVOLUTIONS[weight.dim()](x, weight, bias, base.stride, base.padding, base.dilation, base.groups)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        x = self.dropout(to_dtype(x, self.hira_A.dtype))
        return self._convolve(x, base.weight * self.modulation(base), base).to(h.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """One convolution with W0 ⊙ (1 + B A) and the bias, for a zero-padded layer with frozen weights in the
        adapters' dtype, without dropout in effect; None (base, then :meth:`delta`) otherwise."""
        weight, bias = base.weight, base.bias
        if (isinstance(self.dropout, nn.Dropout) and self.training) or base.padding_mode != "zeros" \
                or weight.requires_grad or (bias is not None and bias.requires_grad) \
                or not x.dtype == weight.dtype == self.hira_A.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        return self._convolve(x, torch.addcmul(weight, weight, self.modulation(base)), base, bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hira_A": self.hira_A, "hira_B": self.hira_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, kernel={tuple(self.hira_A.shape[2:])}"
