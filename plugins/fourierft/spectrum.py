"""FourierFT's weight change from its coefficients as one autograd node, through real FFTs.

``dW = s Re(ifft2(S))`` for an (out, in) spectrum S that is real and zero outside the coefficients' positions.
The real part of the inverse transform of a real S is the inverse transform of its Hermitian part
``H = (S + S')/2``, ``S'[u, v] = S[-u, -v]`` (indices modulo the sides), and the inverse transform of a Hermitian
spectrum is real: torch's ``irfft2`` computes it from the half ``v <= in / 2`` alone, about half the work of
the complex ``ifft2`` of all of S (and no complex (out, in) result whose real part is then copied out). Each
coefficient puts half its value at its position and half at the mirror image, where those fall in the half.

Backward needs the coefficients' gradient only: for G the gradient of dW, that of the coefficient at (u, v)
is ``s / (out in) Re(fft2(G)[u, v])``, and for a real G the real part at (u, v) equals the one at (-u, -v),
so ``rfft2(G)`` (the half spectrum, again about half of ``fft2``) holds every coefficient's, read at its
position or, beyond the half, at its mirror image. Autograd's path through ``ifft2`` ran a complex ``fft2``
of G and copies between real and complex tensors.

On the Llama of docs/performance.md (layers 512x512, 512x1376, 1376x512, 1000 coefficients, 2 threads), a
layer's dW and its gradient took 1.6, 7.2 and 6.9 ms through autograd and 1.0, 3.3 and 3.5 ms as this node;
the values equal the complex form's up to float rounding (tests/test_method_fourierft.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: The complex dtype of each real dtype the transforms run in.
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


@dataclass(frozen=True)
class HalfSpectrumSites:
    """Where a layer's coefficients sit in the (out, in // 2 + 1) half spectrum, as flat indices, one entry per
    coefficient (static shapes: a torch.compile'd forward builds them in its graph, where picking the
    coefficients that fall in the half would give tensors of data-dependent length and break it).

    ``direct_at`` is the site of each coefficient whose position falls in the half (``in_half``) and
    ``mirrored_at`` that of each whose mirror image does (``mirror_in_half``); a coefficient outside adds
    zero at site 0 there. ``read_at`` is, for every coefficient, the site its gradient is read at (its
    position where it falls in the half, else its mirror image)."""

    shape: tuple[int, int]
    direct_at: torch.Tensor
    in_half: torch.Tensor
    mirrored_at: torch.Tensor
    mirror_in_half: torch.Tensor
    read_at: torch.Tensor

    @classmethod
    def of(cls, positions: torch.Tensor, shape: tuple[int, int]) -> "HalfSpectrumSites":
        """The sites of the coefficients at ``positions`` (row-major flat indices of the (out, in) spectrum)."""
        out_features, in_features = shape
        half = in_features // 2 + 1
        rows, cols = positions // in_features, positions % in_features
        mirror_rows, mirror_cols = (-rows) % out_features, (-cols) % in_features
        in_half, mirror_in_half = cols < half, mirror_cols < half
        at, mirror_at = rows * half + cols, mirror_rows * half + mirror_cols
        return cls(shape, at.where(in_half, 0), in_half, mirror_at.where(mirror_in_half, 0), mirror_in_half,
                   at.where(in_half, mirror_at))

    def to(self, device: torch.device) -> "HalfSpectrumSites":
        if self.read_at.device == device:
            return self
        return HalfSpectrumSites(self.shape, *(t.to(device) for t in (self.direct_at, self.in_half, self.mirrored_at,
                                                                        self.mirror_in_half, self.read_at)))


class _InverseSpectrumFn(torch.autograd.Function):
    """dW = scaling Re(ifft2(S)) from the coefficients, by ``irfft2`` of S's Hermitian half; backward by
    ``rfft2`` of dW's gradient (module docstring). Computed in float32 (float64 for float64 coefficients)."""

    @staticmethod
    def forward(ctx: Any, coefficients: torch.Tensor, sites: HalfSpectrumSites, scaling: float) -> torch.Tensor:
        out_features, in_features = sites.shape
        compute = torch.promote_types(coefficients.dtype, torch.float32)
        halves = coefficients.to(compute) * 0.5
        spectrum = torch.zeros(out_features * (in_features // 2 + 1), dtype=COMPLEX[compute],
                               device=coefficients.device)
        real = torch.view_as_real(spectrum).select(1, 0)
        real.index_add_(0, sites.direct_at, halves.where(sites.in_half, 0.0))  # adding zero changes no value
        real.index_add_(0, sites.mirrored_at, halves.where(sites.mirror_in_half, 0.0))
        change = torch.fft.irfft2(spectrum.view(out_features, -1), s=sites.shape).mul_(scaling)
        ctx.sites, ctx.scaling, ctx.dtype = sites, scaling, coefficients.dtype
        return change.to(coefficients.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sites = ctx.sites
        compute = torch.promote_types(grad.dtype, torch.float32)
        half_spectrum = torch.fft.rfft2(grad.to(compute))
        real = torch.view_as_real(half_spectrum).reshape(-1, 2).select(1, 0)
        scale = ctx.scaling / (sites.shape[0] * sites.shape[1])
        return real[sites.read_at].mul_(scale).to(ctx.dtype), None, None


def inverse_spectrum_change(coefficients: torch.Tensor, sites: HalfSpectrumSites, scaling: float) -> torch.Tensor:
    """``scaling * Re(ifft2(S))`` (out, in) in the coefficients' dtype, S holding them at ``sites``' positions."""
    return _InverseSpectrumFn.apply(coefficients, sites.to(coefficients.device), scaling)
