"""One ReFT intervention on hidden states: ``h + R^T (act(W h + b) - R h)``.

``R`` (r x hidden) is a plain matrix, or with ``orthogonality`` a matrix with orthonormal rows
held in the form ``adapters`` (through ``torch.nn.utils.parametrizations.orthogonal``) saves:
``projection.parametrizations.weight.original`` (r x hidden) and
``projection.parametrizations.weight.0.base`` (hidden x hidden, orthogonal). The rows are those
of ``(base @ Q)^T``, with Q the product of the Householder reflections that the entries of
``original`` below its diagonal define, each column signed by ``original``'s diagonal. With the
same tensors, R is the one torch's parametrization gives (tested), except that a diagonal entry
is read by its sign rather than truncated to an integer: weight decay, which shrinks the
diagonal (it gets no gradient), cannot turn R's rows into zeros here. After every optimizer
step the diagonal is also set back to its signs (:func:`restore_signs`), so that a saved file
computes the same R in ``adapters``, which truncates.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize


class _RowMajorGradient(torch.autograd.Function):
    """The identity, whose backward gives the gradient in the parameter's own row-major strides. The frame reads
    ``original.mT``, so the gradient arrives transposed; at r = 1 that layout counts as contiguous and autograd
    keeps it, but DDP's bucket copy compares strides exactly and warns on every process, each step (also under
    ``peftkit train --quiet``)."""

    @staticmethod
    def forward(ctx: object, original: torch.Tensor) -> torch.Tensor:
        return original.view_as(original)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        if grad.dim() != 2 or grad.stride() == (grad.shape[1], 1):
            return grad
        return grad.clone(memory_format=torch.contiguous_format)


class HouseholderFrame(nn.Module):
    """The parametrization ``original`` (r x n) -> R (r x n) with orthonormal rows, given ``base`` (n x n)."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("base", base)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        tall = _RowMajorGradient.apply(original).mT  # n x r: column j holds reflector j below its diagonal, a sign on it
        reflectors = tall.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (reflectors * reflectors).sum(dim=-2))
        frame = torch.linalg.householder_product(reflectors, tau)
        signs = torch.where(tall.diagonal() < 0, -1.0, 1.0).to(frame.dtype)
        return (self.base @ (frame * signs)).mT


def orthonormal_projection(width: int, r: int, dtype: torch.dtype, frame_seed: int) -> nn.Linear:
    """A bias-free Linear (width -> r) whose weight has orthonormal rows, held as ``adapters`` holds it.

    ``base`` is a random orthogonal matrix drawn from ``frame_seed``, not from torch's global generator:
    ``base`` is a buffer, not a parameter, and two adapters of one config must compute the same
    function when given the same parameters (``original`` alone moves R within the frame)."""
    if r >= width:
        raise ValueError(f"an orthonormal projection needs r={r} below the hidden size {width}")
    generator = torch.Generator().manual_seed(frame_seed)
    gaussian = torch.randn(width, width, generator=generator, dtype=torch.float64)
    q, upper = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(upper))  # a uniformly random orthogonal matrix
    projection = nn.Linear(width, r, bias=False, dtype=dtype)
    with torch.no_grad():  # Householder reflectors of zero and a diagonal of -1: R is base's first r columns
        projection.weight.zero_()
        projection.weight.diagonal().fill_(-1.0)
    parametrize.register_parametrization(projection, "weight", HouseholderFrame(q.to(dtype)), unsafe=True)
    keep_signs(projection)
    return projection


#: Keys, relative to a unit, of the orthonormal projection's parametrization (``adapters``' names) and of
#: the rows R it gives, which is what peftkit's own format saves in their place.
ORIGINAL_KEY = "projection.parametrizations.weight.original"
BASE_KEY = "projection.parametrizations.weight.0.base"
ROWS_KEY = "projection.weight"
#: How far from orthonormal saved rows may be (float32 rounding of a trained R is ~1e-6).
ORTHONORMAL_TOLERANCE = 1e-4


def frame_for_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(original, base)`` for which :class:`HouseholderFrame` gives exactly ``rows`` (r x n, orthonormal).

    ``base`` is an orthogonal completion of ``rows^T`` whose first r columns are ``rows^T`` itself, and
    ``original`` holds reflectors of zero with a diagonal of -1 (as a new adapter's): each zero reflector
    flips its column and the diagonal's sign flips it back, so R is ``base``'s first r columns, bit for bit.
    Training then moves R from there as from a new adapter's frame. Raises ValueError for rows that are not
    orthonormal (``r`` below ``n``)."""
    if rows.dim() != 2 or rows.shape[0] >= rows.shape[1]:
        raise ValueError(f"an orthonormal R is r x hidden with r below hidden; got shape {tuple(rows.shape)}")
    r, width = rows.shape
    wide = rows.detach().to(torch.float64)
    error = float((wide @ wide.mT - torch.eye(r, dtype=torch.float64)).abs().max())
    if not error <= ORTHONORMAL_TOLERANCE:  # NaN too
        raise ValueError(f"R's rows are not orthonormal (|R R^T - I| up to {error:.3g}, allowed "
                         f"{ORTHONORMAL_TOLERANCE:g}): the file is damaged or was not saved with orthogonality=true")
    complete, _ = torch.linalg.qr(wide.mT, mode="complete")  # columns r.. span the complement of R's rows
    base = complete.to(rows.dtype)
    base[:, :r] = rows.detach().mT
    original = torch.zeros(r, width, dtype=rows.dtype)
    original.diagonal().fill_(-1.0)
    return original, base


#: The ``original`` parameters whose diagonals :func:`restore_signs` keeps at +-1.
SIGNED: "weakref.WeakSet[torch.nn.Parameter]" = weakref.WeakSet()
_HOOK: list = []


def keep_signs(projection: nn.Module) -> None:
    """Have every optimizer step end with :func:`restore_signs` (one hook for all optimizers)."""
    SIGNED.add(projection.parametrizations.weight.original)
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(restore_signs))


def restore_signs(optimizer: torch.optim.Optimizer, *_: object) -> None:
    """Set the diagonals of the orthogonal parametrizations' ``original`` that ``optimizer`` just stepped
    back to +-1 (their signs).

    The diagonal gets no gradient, but weight decay shrinks it; peftkit reads it by its sign and
    ``adapters`` (torch's parametrization) by its integer part, which would then be 0."""
    signed = {id(p) for p in SIGNED}
    if not signed:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for original in group["params"]:
                if id(original) not in signed:
                    continue
                diagonal = original.diagonal()
                if not bool(((diagonal == 1) | (diagonal == -1)).all()):
                    diagonal.copy_(torch.where(diagonal < 0, -1.0, 1.0).to(diagonal.dtype))


class ReftUnit(nn.Module):
    """``h + R^T (act(W h + b) - R h)`` (without ``- R h`` when not ``subtract_projection``), then dropout,
    on the hidden states of the positions it is given (rows, positions, width)."""

    def __init__(self, width: int, r: int, *, orthogonal: bool, subtract_projection: bool,
                 activation: str | None, dropout: float, dtype: torch.dtype,
                 generator: torch.Generator | None = None, frame_seed: int = 0) -> None:
        super().__init__()
        self.learned_source = nn.Linear(width, r, bias=True, dtype=dtype)
        bound = 1.0 / width ** 0.5  # nn.Linear's own initialization, drawn from the generator
        with torch.no_grad():
            self.learned_source.weight.uniform_(-bound, bound, generator=generator)
            self.learned_source.bias.uniform_(-bound, bound, generator=generator)
        if orthogonal:
            self.projection = orthonormal_projection(width, r, dtype, frame_seed)
        else:
            self.projection = nn.Linear(width, r, bias=False, dtype=dtype)
            with torch.no_grad():
                self.projection.weight.uniform_(-bound, bound, generator=generator)
        self.orthogonal, self.subtract_projection = orthogonal, subtract_projection
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        rows = self.projection.weight  # computed once per call when orthogonal
        source = activate(self.learned_source(states), self.activation)
        if self.subtract_projection:
            source = source - F.linear(states, rows)
        return self.dropout(states + source @ rows)


def activate(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """transformers' activation ``name`` (as ``adapters`` looks it up), torch's leaky_relu for "leakyrelu"."""
    if name is None:
        return x
    if name.lower() == "leakyrelu":
        return F.leaky_relu(x)
    from transformers.activations import get_activation

    return get_activation(name.lower())(x)
