"""The OFT module for one Linear, GPT-2 Conv1D or Conv2d layer.

The layer runs on a rotated input: ``y = W (R x) + b`` with R block-diagonal,
each block the Cayley transform ``(I - Q)(I + Q)^-1`` of a skew-symmetric Q
whose upper triangle is trained (PEFT's ``oft_R.weight``, one row per block).
Row vectors are rotated as ``x @ R_i`` block by block, PEFT's convention, so
the same tensors give the same outputs in both libraries; merging replaces W
with ``W R^T`` (PEFT's merge), unmerging multiplies back by the inverse.

Alone at its site the adapter hands the TunerLayer the rotated input
(:meth:`base_input`): the base layer then runs once, as in PEFT. Inside a
composition its output change is ``W (R - I) x``, additive in the output.

On a Conv2d the rotation acts on each output channel's flattened filter
(in_channels * kh * kw values, PEFT's layout), and the layer runs with the
rotated weight ``W R^T``: the convolution of the rotated filters, which is
also what merging writes (see docs/methods/oft.md for PEFT's unmerged form).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, adapter_precision, is_conv1d, kept_while_unchanged, LayerAdapter,
                                MergeError, quantization_of, rotate_blocks, weight_out_in)

from .blocks import OftBlocks
from .neumann import flat_indices, neumann_rotations, skew_symmetric


class OftLayer(LayerAdapter):
    def __init__(self, base: nn.Module, blocks: OftBlocks, *, coft: bool = False, eps: float = 6e-5,
                 use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5,
                 module_dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        self.blocks = blocks
        self.coft, self.eps = coft, float(eps)
        self.use_cayley_neumann, self.neumann_terms = use_cayley_neumann, num_cayley_neumann_terms
        self.module_dropout = module_dropout
        # A quantized layer's weight cannot be read as a matrix: the delta then runs the layer itself.
        self.quantized = quantization_of(base) is not None
        self.conv = isinstance(base, nn.Conv2d)
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        self.weight = nn.Parameter(torch.zeros(blocks.stored, blocks.entries, **factory))
        if not init_weights:
            with torch.no_grad():
                self.weight.normal_(0.0, 0.1)
        upper, lower = flat_indices(blocks.size, base.weight.device)
        self.register_buffer("upper", upper, persistent=False)
        self.register_buffer("lower", lower, persistent=False)

    # -- the rotation ----------------------------------------------------------------

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        return skew_symmetric(vec, self.upper, self.lower, self.blocks.size)

    def _constrain(self) -> None:
        """COFT: pull each block's skew-symmetric matrix back to norm eps / sqrt(blocks) when it is larger
        (in place, as PEFT does before every use)."""
        with torch.no_grad():
            skew = self._skew(self.weight)
            limit = self.eps / (skew.shape[0] ** 0.5)
            norms = torch.linalg.matrix_norm(skew).reshape(-1, 1, 1)
            scaled = torch.where(norms <= limit, skew, skew * (limit / norms))
            self.weight.copy_(scaled.reshape(scaled.shape[0], -1)[:, self.upper])

    def rotations(self) -> torch.Tensor:
        """The trained rotations, (stored, size, size).

        In float32 when the parameters are half precision (a model cast with ``model.to(torch.bfloat16)``
        after adapting): torch has no half-precision solve on the CPU, and float32 is the precision an
        adapter made on a half model trains and runs in anyway (``adapter_precision``)."""
        if self.coft:
            self._constrain()
        entries = self.weight.to(adapter_precision(self.weight.dtype))
        if self.use_cayley_neumann and self.neumann_terms >= 3:  # one autograd node (neumann.py)
            top_power = max(self.neumann_terms, 4) - 1  # PEFT's series (below)
            return neumann_rotations(entries, self.upper, self.lower, self.blocks.size, top_power)
        q = self._skew(entries)
        eye = torch.eye(self.blocks.size, device=q.device, dtype=q.dtype)
        if not self.use_cayley_neumann:
            # R (I + Q) = I - Q
            return torch.linalg.solve(eye + q, (eye - q).expand_as(q), left=False)
        # PEFT's truncated Neumann series with n terms (a rotation of the opposite sense to the exact form):
        # I + 2Q (n = 2), and for n >= 3
        # I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m with m = max(n, 4) - 1 (PEFT gives 3 and 4 terms alike).
        rotation = eye.expand_as(q).clone()
        if self.neumann_terms == 1:
            return rotation
        if self.neumann_terms == 2:
            return rotation + 2 * q
        power = q
        for _ in range(1, max(self.neumann_terms, 4) - 1):
            rotation = rotation + 2 * power
            power = torch.bmm(power, q)
        return rotation + power

    def _rotations_for_use(self) -> torch.Tensor:
        """The rotations for this forward: built anew when it records gradients for the entries, else the
        ones built last for the same entries (``kept_while_unchanged``: decoding does not rebuild them at every
        token); with module dropout in training, some blocks set to the identity."""
        rotations = kept_while_unchanged(self, "_kept_rotations", (self.weight,), self.rotations)
        if self.blocks.shared:
            rotations = rotations.expand(self.blocks.count, -1, -1)
        if self.training and self.module_dropout and self.blocks.count > 1:
            dropped = torch.randperm(self.blocks.count, device=rotations.device)
            dropped = dropped[:int(self.module_dropout * self.blocks.count)]
            eye = torch.eye(self.blocks.size, device=rotations.device, dtype=rotations.dtype)
            rotations = rotations.clone()
            rotations[dropped] = eye
        return rotations

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x with each block of its last dimension multiplied by its rotation (row vectors: x_i @ R_i)."""
        return rotate_blocks(x, self._rotations_for_use())

    # -- forward -------------------------------------------------------------------

    def base_input(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.conv else self.rotate(x).to(x.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """On a Conv2d: the convolution with the rotated filters (bias kept); None on other layers."""
        if not self.conv:
            return None
        weight = self._rotated_filters(base, self._rotations_for_use())
        bias = base.bias.to(weight.dtype) if base.bias is not None else None  # a half layer's bias
        return base._conv_forward(x.to(weight.dtype), weight, bias).to(x.dtype)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.conv:
            change = self._rotated_filters(base, self._rotations_for_use()) - base.weight  # a half weight promotes
            return base._conv_forward(x.to(change.dtype), change, None).to(h.dtype)
        rotated = self.rotate(x)
        shifted = rotated - x.to(rotated.dtype)
        if self.quantized:  # W (R x - x) through the layer itself, without its bias
            bias = getattr(base, "bias", None)
            out = base(shifted.to(x.dtype))
            return (out - bias if bias is not None else out).to(h.dtype)
        weight = weight_out_in(base)
        return F.linear(shifted.to(weight.dtype), weight).to(h.dtype)

    # -- merging -------------------------------------------------------------------

    #: Merging multiplies the weight it finds, so an OFT adapter is merged first into its layer.
    merge_reads_weight = True

    def block_matrix(self) -> torch.Tensor:
        """R as one (in, in) block-diagonal matrix."""
        rotations = self.rotations()
        if self.blocks.shared:
            rotations = rotations.expand(self.blocks.count, -1, -1)
        return torch.block_diag(*rotations.unbind(0))

    def _rotated(self, w: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """``w`` (out, in) with each column block multiplied on the right by rotations[i]^T."""
        w_blocks = w.to(rotations.dtype).reshape(w.shape[0], self.blocks.count, self.blocks.size)
        return torch.einsum("obj,bij->obi", w_blocks, rotations).reshape(w.shape)

    def _rotated_filters(self, base: nn.Module, rotations: torch.Tensor) -> torch.Tensor:
        """A Conv2d's weight with each output channel's flattened filter rotated, in the layer's shape."""
        weight = base.weight
        return self._rotated(weight.reshape(weight.shape[0], -1), rotations).reshape(weight.shape)

    def _apply_on_right(self, base: nn.Module, rotations: torch.Tensor) -> None:
        """W (out, in) <- W with each column block multiplied on the right by rotations[i]^T."""
        weight = base.weight
        if self.conv:
            new = self._rotated_filters(base, rotations)
        else:
            new = self._rotated(weight_out_in(base), rotations)
            new = new.t() if is_conv1d(base) else new
        weight.data = new.to(weight.dtype).contiguous()

    def merge(self, base: nn.Module) -> None:
        if self.quantized:
            raise MergeError("an oft adapter on a quantized layer cannot be merged: the rotated weight would have "
                             "to be quantized again; keep it unmerged, or load the base in float to merge")
        with torch.no_grad():
            # In float64 on a float64 base, float32 on any other (the adapter's own precision).
            rotations = self.rotations().to(adapter_dtype(base))
            if not torch.isfinite(rotations).all():
                raise MergeError("an oft rotation holds NaN or infinite values; it cannot be merged")
            if self.blocks.shared:
                rotations = rotations.expand(self.blocks.count, -1, -1)
            self._apply_on_right(base, rotations)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            rotations = torch.linalg.inv(self.rotations().to(adapter_dtype(base)))
            if self.blocks.shared:
                rotations = rotations.expand(self.blocks.count, -1, -1)
            self._apply_on_right(base, rotations)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change merging makes to ``base.weight`` as it is now, in the layout the layer stores."""
        if self.conv:
            weight = base.weight
            w = weight.reshape(weight.shape[0], -1)
            return (w @ self.block_matrix().to(w.dtype).t() - w).reshape(weight.shape)
        w = weight_out_in(base)
        rotation = self.block_matrix().to(w.dtype)
        delta = w @ rotation.t() - w
        return delta.t() if is_conv1d(base) else delta

    # -- files -------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.weight}

    def extra_repr(self) -> str:
        b = self.blocks
        kind = "cayley-neumann" if self.use_cayley_neumann else "cayley"
        return (f"blocks={b.count}x{b.size}{' shared' if b.shared else ''}, {kind}"
                f"{f', coft eps={self.eps:g}' if self.coft else ''}")
