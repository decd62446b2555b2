"""The RoAd module for one Linear layer (PEFT's ``road_theta`` and ``road_alpha``, two vectors per site).

The layer's output h (..., out) is cut into groups of g = group_size; in a group, element a of the first half
is paired with element b = a + g / 2 of the second half, and the pair becomes

    y_a = f_a h_a + c_a h_b,    y_b = c_b h_a + f_b h_b,

with f = alpha cos(theta) and c = -alpha sin(theta) on first halves, +alpha sin(theta) on second halves: a 2D
rotation scaled, R h with R block-diagonal. The coefficients are kept as (groups, 2, g / 2) tensors, so both
halves of every group are strided views of the output and the rotation is three elementwise passes over it
(one product writing y, two multiply-adds into its halves) where PEFT's builds the rotated copy of h and
three more full-size tensors. In training, one autograd node (:class:`_Rotation`) keeps h alone for
backward (PEFT keeps h and its rotated copy); without gradients, alone at a plain Linear layer, the base output
is rotated in place (:meth:`RoadLayer.forward_alone`).

Merging writes R W and R b into the layer (PEFT's merge, computed elementwise rather than as a dense
(out, out) product); unmerging applies R's inverse, pair by pair (a 2 x 2 inverse per pair).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from peftkit.plugin_api import adapter_dtype, LayerAdapter, linear_features, MergeError, plain_linear, \
    quantization_of

#: Tensor sizes per output feature for each variant (road_theta and road_alpha have the same size).
_SIZE_PER_OUTPUT = {"road_1": (1, 2), "road_2": (1, 1), "road_4": (2, 1)}  # (numerator, denominator)


def rotate(h: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``R h`` along h's last dimension, a new tensor in the coefficients' dtype: h (..., out) with out a
    multiple of the group size; f and c (groups, 2, half) as :meth:`RoadLayer.coefficients` gives them."""
    groups, _, half = f.shape
    hv = h.reshape(-1, groups, 2, half)
    y = hv * f
    y[:, :, 0].addcmul_(hv[:, :, 1], c[:, 0])
    y[:, :, 1].addcmul_(hv[:, :, 0], c[:, 1])
    return y.view(h.shape)


def rotate_in_place(h: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` written into ``h`` itself (contiguous, of the coefficients' dtype), keeping a copy of one
    half: the same numbers, half a new tensor instead of a whole one."""
    groups, _, half = f.shape
    hv = h.view(-1, groups, 2, half)
    first, second = hv[:, :, 0], hv[:, :, 1]
    first_before = first.clone()
    first.mul_(f[:, 0]).addcmul_(second, c[:, 0])
    second.mul_(f[:, 1]).addcmul_(first_before, c[:, 1])
    return h


def swapped_halves(c: torch.Tensor) -> torch.Tensor:
    """c with its two halves exchanged: the coefficients of R transposed (c_b on a's side and c_a on b's)."""
    return c.flip(1)


def _column_sums(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum over rows of g * h, for (rows, groups, half) views: (groups, half). A product and a sum over the rows:
    einsum's route for these strided views ran 40x slower on the CPU."""
    return (g * h).sum(0)


class _Rotation(torch.autograd.Function):
    """``R h`` as one autograd node that keeps h (not its rotated copy) for the coefficients' gradients."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None, f, c)
        return rotate(h, f, c)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, f, c = ctx.saved_tensors
        grad_h = grad_f = grad_c = None
        if ctx.needs_input_grad[0]:  # R^T g: the same pairs, c's halves exchanged
            grad_h = rotate(grad, f, swapped_halves(c))
        if h is not None:
            groups, _, half = f.shape
            gv, hv = grad.reshape(-1, groups, 2, half), h.reshape(-1, groups, 2, half)
            if ctx.needs_input_grad[1]:
                grad_f = torch.stack((_column_sums(gv[:, :, 0], hv[:, :, 0]),
                                      _column_sums(gv[:, :, 1], hv[:, :, 1])), dim=1)
            if ctx.needs_input_grad[2]:
                grad_c = torch.stack((_column_sums(gv[:, :, 0], hv[:, :, 1]),
                                      _column_sums(gv[:, :, 1], hv[:, :, 0])), dim=1)
        return grad_h, grad_f, grad_c


def inverse_coefficients(f: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, c) of R's inverse: per pair, [[f_a, c_a], [c_b, f_b]]^-1 = [[f_b, -c_a], [-c_b, f_a]] / det."""
    det = f[:, 0] * f[:, 1] - c[:, 0] * c[:, 1]
    det = det.unsqueeze(1)
    return f.flip(1) / det, -c / det


class RoadLayer(LayerAdapter):
    """road_theta and road_alpha, each (out / 2,) for road_1, (out,) for road_2, (2 * out,) for road_4."""

    additive = False  # the output is R h, not h plus a change computed from x
    merge_reads_weight = True  # merging multiplies the weight by R

    def __init__(self, base: nn.Module, *, variant: str = "road_1", group_size: int = 64,
                 init_weights: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_features(base)
        self.variant, self.group_size = variant, group_size
        self.quantized = quantization_of(base)
        numerator, denominator = _SIZE_PER_OUTPUT[variant]
        size = self.out_features * numerator // denominator
        # drawn as PEFT draws them (float32 on the CPU, theta first), then given the layer's device and precision
        theta, alpha = torch.zeros(size), torch.ones(size)
        if not init_weights:
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.road_theta = nn.Parameter(theta.to(**factory))
        self.road_alpha = nn.Parameter(alpha.to(**factory))
        self._kept: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._singular_backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- the rotation ------------------------------------------------------------------------------------------------

    def _grouped(self, values: torch.Tensor) -> torch.Tensor:
        """A road_theta/road_alpha vector viewed as (groups, k, half) (k = 1, 2 or 4 by variant)."""
        half = self.group_size // 2
        return values.view(self.out_features // self.group_size, -1, half)

    def _build_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta, alpha = self._grouped(self.road_theta), self._grouped(self.road_alpha)
        if self.variant == "road_4":  # per group: g angles and scales for f, then g for the sines
            groups, _, half = theta.shape
            theta, alpha = theta.view(groups, 2, 2, half), alpha.view(groups, 2, 2, half)
            f, s = alpha[:, 0] * theta[:, 0].cos(), alpha[:, 1] * theta[:, 1].sin()
        else:  # road_1: one (theta, alpha) per pair, broadcast over both halves; road_2: one per element
            f, s = alpha * theta.cos(), alpha * theta.sin()
            f, s = f.expand(f.shape[0], 2, f.shape[2]), s.expand(s.shape[0], 2, s.shape[2])
        c = torch.stack((-s[:, 0], s[:, 1]), dim=1)
        return f, c

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """f and c, each (groups, 2, half): ``y = f h + c h_partner`` per element. Without gradients they are kept
        until road_theta or road_alpha change (a decoding step then builds nothing)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._build_coefficients()
        theta, alpha = self.road_theta, self.road_alpha
        key = (theta.data_ptr(), theta._version, theta.dtype, alpha.data_ptr(), alpha._version, alpha.dtype)
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self._build_coefficients())
        return self._kept[1]

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        f, c = self.coefficients()
        rotated = _Rotation.apply(h if h.dtype == f.dtype else h.to(f.dtype), f, c)
        return rotated if rotated.dtype == h.dtype else rotated.to(h.dtype)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.forward(x, h, base) - h

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """Without gradients, at a plain Linear layer computing in the adapter's dtype (autocast off): the base
        output rotated in place. None (base output, then :meth:`forward`) otherwise."""
        if torch.is_grad_enabled() or not plain_linear(base) or torch.is_autocast_enabled(x.device.type):
            return None
        dtype = self.road_theta.dtype
        if x.dtype != dtype or base.weight.dtype != dtype:
            return None
        f, c = self.coefficients()
        return rotate_in_place(base(x), f, c)

    # -- merging -----------------------------------------------------------------------------------------------------

    def check_mergeable(self) -> None:
        if self.quantized is not None:
            raise MergeError(f"a road adapter cannot be merged into a quantized layer ({self.quantized}): R W would "
                             f"have to be quantized again; keep it unmerged, or load the base in float to merge")

    def _rows_rotated(self, tensor: torch.Tensor, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """R applied to a weight (out, in) or bias (out,) along its output dimension, in the coefficients' dtype."""
        values = tensor.to(f.dtype)
        if values.dim() == 1:
            return rotate(values, f, c)
        return rotate(values.t(), f, c).t()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """R W - W, the whole change only for a layer without a bias (R rotates the bias too)."""
        self.check_mergeable()
        if getattr(base, "bias", None) is not None:
            raise MergeError("a road adapter also rotates the layer's bias, which a weight change cannot hold; "
                             "merge it with merge_adapter() / merge_and_unload() instead")
        with torch.no_grad():
            f, c = self._build_coefficients()
            return self._rows_rotated(base.weight, f, c) - base.weight.to(f.dtype)

    def merge(self, base: nn.Module) -> None:
        self.check_mergeable()
        with torch.no_grad():
            f, c = self._build_coefficients()
            if not (torch.isfinite(f).all() and torch.isfinite(c).all()):
                raise MergeError("a road adapter holds NaN or infinite values; it cannot be merged")
            bias = getattr(base, "bias", None)
            det = f[:, 0] * f[:, 1] - c[:, 0] * c[:, 1]
            if not bool((det != 0).all()):  # R has no inverse: keep what unmerge cannot compute back
                self._singular_backup = (base.weight.detach().clone(),
                                         None if bias is None else bias.detach().clone())
            self._write(base, f, c)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            if self._singular_backup is not None:
                weight, bias = self._singular_backup
                base.weight.data = weight
                if bias is not None:
                    base.bias.data = bias
                self._singular_backup = None
                return
            self._write(base, *inverse_coefficients(*self._build_coefficients()))

    def _write(self, base: nn.Module, f: torch.Tensor, c: torch.Tensor) -> None:
        """Replace the layer's weight and bias by (f, c)'s rotation of them."""
        weight = base.weight
        weight.data = self._rows_rotated(weight, f, c).to(weight.dtype).contiguous()
        bias = getattr(base, "bias", None)
        if bias is not None:
            bias.data = self._rows_rotated(bias, f, c).to(bias.dtype)

    # -- files -------------------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"road_theta": self.road_theta, "road_alpha": self.road_alpha}

    def extra_repr(self) -> str:
        return f"out={self.out_features}, {self.variant}, group_size={self.group_size}"
