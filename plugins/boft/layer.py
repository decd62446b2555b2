"""The BOFT module for one Linear, GPT-2 Conv1D or Conv2d layer.

The layer computes ``y = s * (W (M x)) + b``: M is the product of the
butterfly factors ``P_i B_i P_i^T`` (butterfly.py), each B_i block-diagonal
with the Cayley transform ``(I - S)(I + S)^-1`` of the skew-symmetric part S of
a trained matrix per block (PEFT's ``boft_R``, all zero at init), and ``s`` a
trained scale per output feature (PEFT's ``boft_s``, ones at init).

Row vectors are rotated as ``x @ M`` (PEFT's convention). The permutations
are index gathers, never dense matrices: ``x @ P_i`` is ``x[..., inverse_i]``
and ``z @ P_i^T`` is ``z[..., perm_i]``. Merging replaces W with
``s * (W M^T)`` (PEFT's merge); unmerging multiplies back by M (M is
orthogonal) and divides by s.

On a Conv2d, M acts on each output channel's flattened filter
(in_channels * kh * kw values, PEFT's layout) and the layer runs with the
rotated, scaled filters. Inside a composition the adapter's change to the
output is ``s * (W M^T) x - W x``, additive.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, adapter_precision, ConfigError, is_conv1d, kept_while_unchanged,
                                LayerAdapter, MergeError, quantization_of, rotate_blocks, weight_out_in)

from .butterfly import Butterfly


class BoftLayer(LayerAdapter):
    def __init__(self, base: nn.Module, butterfly: Butterfly, out_features: int, *, dropout: float = 0.0,
                 init_weights: bool = True) -> None:
        super().__init__()
        self.butterfly = butterfly
        self.dropout = dropout
        self.conv = isinstance(base, nn.Conv2d)
        # A quantized layer's weight cannot be read as a matrix: the rotated input then runs the layer itself.
        self.quantized = quantization_of(base) is not None
        device = base.weight.device
        factory = {"dtype": adapter_dtype(base), "device": device}
        self.boft_R = nn.Parameter(torch.zeros(butterfly.rotation_shape(), **factory))
        # PEFT's layouts: (out, 1) on a linear layer, (1, out) on a Conv2d.
        self.boft_s = nn.Parameter(torch.ones((1, out_features) if self.conv else (out_features, 1), **factory))
        if not init_weights:
            with torch.no_grad():
                self.boft_R.normal_(0.0, 0.1)
                self.boft_s.normal_(1.0, 0.1)
        perms = torch.tensor([butterfly.permutation(i) for i in range(butterfly.factors)], device=device)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inverses", torch.argsort(perms, dim=1), persistent=False)

    # -- the rotation ----------------------------------------------------------------

    def blocks(self) -> torch.Tensor:
        """The orthogonal blocks, (factors, block_num, size, size): Cayley transforms of each trained
        matrix's skew-symmetric part.

        In float32 when the parameters are half precision (a model cast with ``model.to(torch.bfloat16)``
        after adapting): torch has no half-precision solve on the CPU, and float32 is the precision an
        adapter made on a half model trains and runs in anyway (``adapter_precision``)."""
        r = self.boft_R.to(adapter_precision(self.boft_R.dtype))
        skew = 0.5 * (r - r.transpose(-2, -1))
        eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype).expand_as(skew)
        return torch.linalg.solve(eye + skew, eye - skew, left=False)  # B (I + S) = I - S

    def _blocks_for_use(self) -> torch.Tensor:
        """The blocks, with PEFT's multiplicative dropout in training: in one factor drawn at random,
        that share of the blocks (rounded down) is the identity. Without gradients for ``boft_R`` the blocks
        built last for the same values are reused (``kept_while_unchanged``: the Cayley solves do not run at
        every decoded token)."""
        blocks = kept_while_unchanged(self, "_kept_blocks", (self.boft_R,), self.blocks)
        count = int(self.dropout * self.butterfly.block_num)
        if not (self.training and count):
            return blocks
        factor = int(torch.randint(0, self.butterfly.factors, ()))
        dropped = torch.randperm(self.butterfly.block_num, device=blocks.device)[:count]
        eye = torch.eye(self.butterfly.block_size, device=blocks.device, dtype=blocks.dtype)
        blocks = blocks.clone()
        blocks[factor, dropped] = eye
        return blocks

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ M`` over the last dimension: the factors from the last to the first, each a gather,
        a batched product per block, and a gather back."""
        blocks = self._blocks_for_use() if blocks is None else blocks
        b = self.butterfly
        out = x.to(blocks.dtype)
        for i in reversed(range(b.factors)):
            gathered = out[..., self.inverses[i]] if b.factors > 1 else out
            rotated = rotate_blocks(gathered, blocks[i])
            out = rotated[..., self.perms[i]] if b.factors > 1 else rotated
        return out

    def matrix(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """M as one (features, features) matrix (the rows of the identity, rotated)."""
        blocks = self.blocks() if blocks is None else blocks
        eye = torch.eye(self.butterfly.features, device=blocks.device, dtype=blocks.dtype)
        return self.rotate(eye, blocks)

    def _scale_column(self) -> torch.Tensor:
        """s as an (out, 1) column."""
        return self.boft_s.reshape(-1, 1)

    # -- the weight, as (out, features) ----------------------------------------------

    def _weight_matrix(self, base: nn.Module) -> torch.Tensor:
        weight = base.weight
        return weight.reshape(weight.shape[0], -1) if self.conv else weight_out_in(base)

    def _to_layout(self, base: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """An (out, features) matrix in the layout ``base.weight`` stores."""
        if self.conv:
            return matrix.reshape(base.weight.shape)
        return matrix.t() if is_conv1d(base) else matrix

    def _adapted_weight(self, base: nn.Module, blocks: torch.Tensor) -> torch.Tensor:
        """s * (W M^T), in the layer's layout."""
        w = self._weight_matrix(base).to(blocks.dtype)
        return self._to_layout(base, w @ self.matrix(blocks).t() * self._scale_column())

    # -- forward -------------------------------------------------------------------

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer with this adapter: the convolution with the adapted filters on a Conv2d; on a linear
        layer the layer itself on the rotated input, its output less its bias scaled by s (PEFT's forward)."""
        blocks = self._blocks_for_use()
        if self.conv:
            weight = self._adapted_weight(base, blocks)
            bias = base.bias.to(weight.dtype) if base.bias is not None else None  # a half layer's bias
            return base._conv_forward(x.to(weight.dtype), weight, bias).to(x.dtype)
        out = base(self.rotate(x, blocks).to(x.dtype))
        bias = getattr(base, "bias", None)
        scale = self.boft_s.reshape(-1)
        if bias is None:
            return (out * scale).to(x.dtype)
        return ((out - bias) * scale + bias).to(x.dtype)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        blocks = self._blocks_for_use()
        if self.conv:
            change = self._adapted_weight(base, blocks) - base.weight.to(blocks.dtype)
            return base._conv_forward(x.to(change.dtype), change, None).to(h.dtype)
        rotated = self.rotate(x, blocks)
        scale = self.boft_s.reshape(-1)
        if self.quantized:  # the layer itself, without its bias, on the rotated and on the plain input
            bias = getattr(base, "bias", None)
            turned, plain = base(rotated.to(x.dtype)), base(x)
            if bias is not None:
                turned, plain = turned - bias, plain - bias
            return (turned * scale - plain).to(h.dtype)
        weight = weight_out_in(base)
        turned = F.linear(rotated.to(weight.dtype), weight) * scale
        return (turned - F.linear(x.to(weight.dtype), weight)).to(h.dtype)

    # -- merging -------------------------------------------------------------------

    #: Merging multiplies the weight it finds, so a BOFT adapter is merged first into its layer.
    merge_reads_weight = True

    def merge(self, base: nn.Module) -> None:
        if self.quantized:
            raise MergeError("a boft adapter on a quantized layer cannot be merged: the rotated weight would have "
                             "to be quantized again; keep it unmerged, or load the base in float to merge")
        with torch.no_grad():
            # In float64 on a float64 base, float32 on any other (the adapter's own precision).
            blocks = self.blocks().to(adapter_dtype(base))
            if not (torch.isfinite(blocks).all() and torch.isfinite(self.boft_s).all()):
                raise MergeError("a boft rotation or scale holds NaN or infinite values; it cannot be merged")
            weight = base.weight
            weight.data = self._adapted_weight(base, blocks).to(weight.dtype).contiguous()

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            dtype = adapter_dtype(base)
            blocks = self.blocks().to(dtype)
            w = self._weight_matrix(base).to(dtype)
            restored = (w @ self.matrix(blocks)) / self._scale_column().to(dtype)
            weight = base.weight
            weight.data = self._to_layout(base, restored).to(weight.dtype).contiguous()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change merging makes to ``base.weight`` as it is now, in the layout the layer stores."""
        weight = base.weight
        return self._adapted_weight(base, self.blocks()).to(weight.dtype) - weight

    # -- files -------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Name the likely cause of a file with one butterfly factor where the config asks for more: PEFT writes
        one whatever ``boft_n_butterfly_factor`` says when its CUDA extension does not build (docs/methods/boft.md)."""
        rotations = saved.get("boft_R")
        factors = self.butterfly.factors
        if rotations is not None and rotations.dim() == 4 and rotations.shape[0] == 1 < factors \
                and tuple(rotations.shape[1:]) == tuple(self.boft_R.shape[1:]):
            raise ConfigError(f"boft_R holds 1 butterfly factor, but the config asks for boft_n_butterfly_factor="
                              f"{factors}: PEFT saves one factor whatever the config says where its CUDA "
                              f"extension (fbd_cuda) does not build; set \"boft_n_butterfly_factor\": 1 in the "
                              f"folder's adapter_config.json, which is what it trained")
        return saved

    def extra_repr(self) -> str:
        b = self.butterfly
        return f"factors={b.factors}, blocks={b.block_num}x{b.block_size}, features={b.features}"
