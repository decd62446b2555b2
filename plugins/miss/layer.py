"""The MiSS module for one Linear layer (PEFT's ``miss_block``, one tensor per site).

The input features are cut into shards of r (the last one zero-padded when r does not divide them).

- balance (``init_weights`` true/false): D (r, out); the update is ``(sum of x's shards) @ D``. Summing the
  shards costs one pass over x and the product r * out per token, far less than the dense update
  ``x dW^T`` (in * out) it equals, where ``dW[o, i] = D[i mod r, o]``.
- mini: D (r, mini_r); the same sum, a product of width mini_r, and the result repeated over the outputs
  (added through a broadcast view of the layer's output, so no repeated tensor is built).
- bat: B (out / r, r, r); each (r, r) block of the weight (output block o) becomes ``W_blk (I + B_o) + B_o``.
  The change reads the weight, so alone at its layer the adapter runs the layer once with the changed
  weight (PEFT's forward: building it costs out * in * r once per call, one batched product over a view of
  the weight, then one product); merging writes that weight and unmerging solves it back,
  ``W_blk = (W' - B_o) (I + B_o)^-1``, as PEFT does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import accumulating_gemm_is_fast, adapter_dtype, adapter_precision, fusable_linear, \
    LayerAdapter, MergeError, quantization_of

from .shards import BalanceNode, shard_sum


class MissLayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, *, variant: str = "balance",
                 mini_r: int = 1, dropout: float = 0.0, random_init: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.variant, self.mini_r = variant, mini_r
        self.quantized = quantization_of(base) is not None
        self.merge_reads_weight = variant == "bat"
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        shape = {"balance": (r, out_features), "mini": (r, mini_r), "bat": (out_features // r, r, r)}[variant]
        self.miss_block = nn.Parameter(torch.zeros(shape, **factory))
        if random_init:  # PEFT's init_weights=False: the same draw from torch's generator
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        # PEFT's bat applies no dropout
        self.dropout = nn.Dropout(dropout) if dropout and variant != "bat" else nn.Identity()

    # -- balance and mini: the shared block on the summed shards ----------------------------------------------------

    def _shard_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x's shards of r features, (..., r), in the block's dtype (the last shard zero-padded)."""
        r, rest = self.r, x.shape[-1] % self.r
        if rest and self._dropping():  # padded before the dropout, as PEFT does, so that a seed drops its entries
            x = F.pad(x, (0, r - rest))
        return shard_sum(self.dropout(x.to(self.miss_block.dtype)), r)  # no padded copy of x otherwise

    def _dropping(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.training

    def _narrow_update(self, x: torch.Tensor) -> torch.Tensor:
        """balance: the update (..., out); mini: its repeated part (..., mini_r)."""
        return self._shard_sum(x) @ self.miss_block

    def _repeated(self, update: torch.Tensor) -> torch.Tensor:
        """mini's (..., mini_r) update repeated over the outputs, (..., out)."""
        copies = self.out_features // self.mini_r
        return update.unsqueeze(-2).expand(*update.shape[:-1], copies, self.mini_r).reshape(
            *update.shape[:-1], self.out_features)

    # -- bat: the block-wise change of the weight ------------------------------------------------------------------

    def _row_blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (out / r, r * in / r, r), a view: entry [o, a * (in / r) + i, b] is row o*r + a, column
        i*r + b, so every (r, r) block of output block o is multiplied by B_o in one batched product."""
        return weight.reshape(weight.shape[0] // self.r, -1, self.r)

    def _plus_blocks(self, products: torch.Tensor, block: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
        """``products`` (as _row_blocks lays them out) + B_o on every block of output block o, (out, in)."""
        r = self.r
        grouped = products.reshape(weight_shape[0] // r, r, weight_shape[1] // r, r)
        return (grouped + block[:, :, None, :]).reshape(weight_shape)

    def _bat_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The change ``W_blk B_o + B_o`` for an (out, in) weight, in the block's precision."""
        dtype = adapter_precision(self.miss_block.dtype)
        block = self.miss_block.to(dtype)
        return self._plus_blocks(torch.bmm(self._row_blocks(weight.to(dtype)), block), block, weight.shape)

    def _weight(self, base: nn.Module) -> torch.Tensor:
        if self.quantized:
            raise MergeError(f"miss with init_weights=\"bat\" reads the layer's weight, which is quantized "
                             f"({quantization_of(base)}); load the base in float, or use init_weights=true")
        return base.weight

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """On a plain float layer, outside autocast: bat's layer with the changed weight, one product (PEFT's
        forward); balance's ``(shard sum) @ D`` written first and the base product accumulated onto it in place,
        so that no pass copies or adds the (tokens, out) output (float32/64 and GPUs, where such a product is
        as fast as one writing a new output: ``accumulating_gemm_is_fast``), for a frozen layer and no dropout
        drawn. None otherwise (the unfused path)."""
        if self.variant == "mini" or not fusable_linear(base, x, self.miss_block) \
                or torch.is_autocast_enabled(x.device.type):
            return None
        if self.variant == "balance":
            frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            if self.miss_block.dtype != x.dtype or not accumulating_gemm_is_fast(x) or not frozen \
                    or self._dropping():
                return None
            # one node: backward spreads g D^T over g W's shards in place
            out = BalanceNode.apply(x.reshape(-1, self.in_features), self.miss_block, base.weight, base.bias, self.r)
            return out.view(*x.shape[:-1], self.out_features)
        change = self._bat_delta(base.weight)
        changed = base.weight.to(change.dtype) + change
        bias = base.bias.to(changed.dtype) if base.bias is not None else None
        return F.linear(x.to(changed.dtype), changed, bias).to(x.dtype)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.variant == "bat":
            change = self._bat_delta(self._weight(base))
            return F.linear(x.to(change.dtype), change).to(h.dtype)
        update = self._narrow_update(x)
        return (self._repeated(update) if self.variant == "mini" else update).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.variant == "bat" or h.dtype != self.miss_block.dtype or h.dim() < 2:
            return h + self.delta(x, h, base)
        if self.variant == "mini":  # added through a (..., copies, mini_r) view: nothing repeated is built
            update = self._narrow_update(x)
            copies = self.out_features // self.mini_r
            return (h.reshape(*h.shape[:-1], copies, self.mini_r) + update.unsqueeze(-2)).reshape(h.shape)
        # h + (shard sum) @ D in one kernel, no intermediate (N, out) tensor
        shard_sum = self._shard_sum(x)
        flat = torch.addmm(h.reshape(-1, self.out_features), shard_sum.reshape(-1, self.r), self.miss_block)
        return flat.view(h.shape)

    # -- merging -----------------------------------------------------------------------------------------------------

    def check_mergeable(self) -> None:
        if self.variant == "bat" and self.quantized:
            raise MergeError("a miss adapter with init_weights=\"bat\" on a quantized layer cannot be merged: the "
                             "changed weight would have to be quantized again; keep it unmerged, or load the base "
                             "in float to merge")

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change merging makes to ``base.weight`` as it is now, (out, in)."""
        if self.variant == "bat":
            return self._bat_delta(self._weight(base))
        block = self.miss_block
        if self.variant == "mini":
            block = block.repeat(1, self.out_features // self.mini_r)
        copies = -(-self.in_features // self.r)
        return block.t().repeat(1, copies)[:, : self.in_features]

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            weight = base.weight
            change = self.delta_weight(base)
            if not torch.isfinite(change).all():
                raise MergeError("a miss block holds NaN or infinite values; it cannot be merged")
            weight.data = (weight.to(change.dtype) + change).to(weight.dtype)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            weight = base.weight
            if self.variant != "bat":
                weight.data = (weight.to(self.miss_block.dtype) - self.delta_weight(base)).to(weight.dtype)
                return
            block = self.miss_block.to(adapter_precision(self.miss_block.dtype))
            eye = torch.eye(self.r, dtype=block.dtype, device=block.device)
            shifted = self._plus_blocks(weight.to(block.dtype), -block, weight.shape)  # W' - B_o
            restored = torch.bmm(self._row_blocks(shifted), torch.linalg.inv(eye + block))
            weight.data = restored.reshape(weight.shape).to(weight.dtype)

    # -- files -------------------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.miss_block}

    def extra_repr(self) -> str:
        mini = f", mini_r={self.mini_r}" if self.variant == "mini" else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, {self.variant}{mini}"
