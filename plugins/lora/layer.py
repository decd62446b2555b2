"""LoRA modules: Linear (and GPT-2's Conv1D) with optional DoRA, and Embedding; ``LoraFactors`` is
shared with the convolution module (conv.py).

The unmerged forward is written for speed: the low-rank product is added to
the base output with one fused ``addmm`` (scale folded in), and DoRA's
weight norm is computed from small factors instead of a dense W + s*B@A,
and cached while the weights do not change (inference).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, ConfigError, dora_norm, fused_lora, fusable_linear, is_conv1d,
                                kept_while_unchanged, LayerAdapter, linear_features, MergeError,
                                norm_joins_base_product, quantization_of, weight_out_in)

#: Where a DoRA layer keeps its row norms of W + s B A, and the squared row norms of W, between forwards
#: (``kept_while_unchanged``).
KEPT_NORM = "_kept_dora_norm"
KEPT_WEIGHT_SQ = "_kept_weight_sq"


class LoraFactors(LayerAdapter):
    """What LoRA's modules on linear and convolution layers share: the factors ``lora_A`` / ``lora_B``
    with PEFT's init, dropout on the LoRA input, DoRA's magnitude (starting at the weight's norms,
    whose merge-time value unmerging needs), B's optional bias (``lora_bias``: the update is
    ``scale * (B A x + b)``, merged into the base layer's bias) and PEFT's file keys."""

    r: int
    scale: float
    use_dora: bool

    def _set_factors(self, base: nn.Module, a_shape: tuple[int, ...], b_shape: tuple[int, ...], dropout: float,
                     init: bool | str, magnitude_shape: tuple[int, ...] | None = None, lora_bias: bool = False
                     ) -> None:
        """lora_A (``a_shape``): Kaiming-uniform, or Gaussian with std 1/r for init="gaussian"; lora_B
        (``b_shape``) and, with ``lora_bias``, its bias (one per output): zeros (random for init=False, for
        tests); with DoRA the magnitude is the norm from ``_weight_norm``, shaped ``magnitude_shape``."""
        dtype, device = adapter_dtype(base), base.weight.device
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.normal_(self.lora_B, std=0.1)
        # registered even when absent, so that it is a parameter slot rather than a setting (hot-swapping)
        self.register_parameter("lora_bias", nn.Parameter(torch.zeros(b_shape[0], dtype=dtype, device=device))
                                if lora_bias else None)
        if lora_bias and init is False:
            nn.init.normal_(self.lora_bias, std=0.1)
        self._base_has_bias = getattr(base, "bias", None) is not None
        self.lora_magnitude_vector: nn.Parameter | None = None
        self._merged_norm: torch.Tensor | None = None
        if self.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(base)
            self.lora_magnitude_vector = nn.Parameter(norm.reshape(magnitude_shape or norm.shape).clone())

    def _weight_norm(self, base: nn.Module) -> torch.Tensor:
        """DoRA's norms of W + s * (B A), one per output channel (detached)."""
        raise NotImplementedError

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """dropout(x) in the factors' dtype: what the factors see."""
        if self.dropout is not None:
            x = self.dropout(x)
        return x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)

    def _dropout_active(self) -> bool:
        """Whether dropout draws a mask now (training, dropout > 0): DoRA then follows PEFT, whose whole
        DoRA term (the base product too) runs on the dropped-out input."""
        return self.dropout is not None and self.training

    @property
    def merge_reads_weight(self) -> bool:  # type: ignore[override]
        return self.use_dora

    def base_changed(self) -> None:
        # A merge writes weight.data, which does not move weight._version: drop norms computed from it.
        self.__dict__.pop(KEPT_NORM, None)
        self.__dict__.pop(KEPT_WEIGHT_SQ, None)

    def check_mergeable(self) -> None:
        """Raise MergeError when B's bias (lora_bias) has no base bias to merge into (PEFT refuses too)."""
        if self.lora_bias is not None and not self._base_has_bias:
            raise MergeError("a LoRA with lora_bias=true merges B's bias into the layer's bias, and this layer has "
                             "none; keep the adapter unmerged (or train it with lora_bias=false)")

    def merge(self, base: nn.Module) -> None:
        self.check_mergeable()
        if self.use_dora:
            self._merged_norm = self._weight_norm(base).clone()
        super().merge(base)
        self._shift_base_bias(base, 1.0)

    def unmerge(self, base: nn.Module) -> None:
        super().unmerge(base)
        self._shift_base_bias(base, -1.0)

    def _shift_base_bias(self, base: nn.Module, sign: float) -> None:
        """Add (``sign`` 1) or take back (-1) ``scale * b`` in the base layer's bias, for lora_bias."""
        if self.lora_bias is not None:
            bias = base.bias
            bias.data += (self.lora_bias.detach() * (sign * self.scale)).to(bias.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.lora_bias is not None:
            out["lora_B.bias"] = self.lora_bias
        if self.lora_magnitude_vector is not None:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out

    def hotswap_plan(self, new: LayerAdapter) -> Callable[[], None]:
        """Plain LoRA swaps through low_rank() (other ranks too); DoRA and convolution LoRAs use B only as
        ``scale * B``, so another alpha folds into B as well, at the same rank. With lora_bias the update is
        ``scale * (B A x + b)``: another alpha folds into B and b, at the same rank."""
        from peftkit.plugin_api import scaled_swap_plan, swap_plan

        self._check_same_lora_bias(new)
        if self.lora_bias is not None:
            return self._biased_swap_plan(new)
        if self.low_rank() is not None:
            return swap_plan(self, new)
        return scaled_swap_plan(self, new, "lora_B.weight")

    def _check_same_lora_bias(self, new: LayerAdapter) -> None:
        """Refuse, by the option, a folder whose LoRA has B's bias where the loaded one has none, or the reverse."""
        from peftkit.plugin_api import AdapterLoadError

        ours, theirs = self.lora_bias is not None, getattr(new, "lora_bias", None) is not None
        if isinstance(new, LoraFactors) and ours != theirs:
            raise AdapterLoadError(f"the folder's LoRA has lora_bias={str(theirs).lower()} and the loaded adapter "
                                   f"lora_bias={str(ours).lower()}, so B's bias has no place on one side; swap in an "
                                   f"adapter trained with lora_bias={str(ours).lower()}, or load the folder as an "
                                   f"adapter of its own instead: load_adapter(path, 'another_name')")

    def _biased_swap_plan(self, new: LayerAdapter) -> Callable[[], None]:
        """The plan for two lora_bias LoRAs of one rank: B (by ``scaled_swap_plan``) and B's bias both take
        ``new scale / loaded scale``, so the loaded module's scale (a compiled graph's constant) stays."""
        from peftkit.plugin_api import scaled_swap_plan

        copy_scaled_b = scaled_swap_plan(self, new, "lora_B.weight")  # checks types, settings and shapes
        ratio = float(new.scale) / self.scale if self.scale != 0.0 else 1.0
        target, source = self.lora_bias, new.lora_bias

        def copy() -> None:
            copy_scaled_b()  # copies the bias unscaled, with the other tensors
            if ratio != 1.0:
                target.copy_(source.float() * ratio)
        return copy


def _check_float_weight(base: nn.Module, init: str, use: str) -> None:
    """An init computed from the base weight (``use``: what it does with it) needs an unquantized float32,
    float16 or bfloat16 weight."""
    if quantization_of(base):
        raise ConfigError(f"lora: init_weights={init!r} {use} the base weight, which is quantized "
                          f"({quantization_of(base)}); initialise on the unquantized model")
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"lora: init_weights={init!r} needs a float32/float16/bfloat16 base weight, "
                          f"not {base.weight.dtype}")


class LoraLinear(LoraFactors):
    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float, init: bool | str,
                 use_dora: bool, lora_bias: bool = False) -> None:
        super().__init__()
        in_f, out_f = linear_features(base)  # a quantized layer's packed weight has another shape
        self.r, self.scale, self.use_dora = r, float(scale), use_dora
        self.in_features, self.out_features = in_f, out_f
        self._set_factors(base, (r, in_f), (out_f, r), dropout, init, lora_bias=lora_bias)
        if init == "orthogonal":
            self._init_orthogonal()
        elif init == "mica":
            self._init_mica(base)
        elif isinstance(init, str) and init != "gaussian":
            self._init_from_base(base, init)

    def _init_orthogonal(self) -> None:
        """PEFT's "orthogonal" init: the odd and the even rows of one random r x r orthogonal matrix Q take
        A's and B's rank sides (A = (G1 Q_odd)^T / 10, B = G2^T Q_even / 10, G1 and G2 Gaussian), so
        B A = G2^T Q_even Q_odd^T G1^T / 100 = 0 and the model starts equal to the base, with both factors
        nonzero. Drawn from torch's generator in PEFT's order."""
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(self.r, self.r))
            a = torch.randn(self.in_features, self.r // 2).mm(q[0::2, :]).t() / 10.0
            b = torch.randn(self.r // 2, self.out_features).t().mm(q[1::2, :]) / 10.0
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)

    def _init_mica(self, base: nn.Module) -> None:
        """MiCA (PEFT's "mica"): B is the left singular vectors of W's r smallest singular values and A = 0,
        so B A = 0; B stays frozen (a buffer, saved with the adapter) and training moves A alone."""
        _check_float_weight(base, "mica", "takes an SVD of")
        if self.r > min(self.in_features, self.out_features):
            raise ConfigError(f"lora: init_weights=\"mica\" takes r singular vectors of a {self.out_features} x "
                              f"{self.in_features} weight, at most {min(self.in_features, self.out_features)}, "
                              f"not r={self.r}; choose a smaller r (rank_pattern for this layer)")
        with torch.no_grad():
            left, _, _ = torch.linalg.svd(weight_out_in(base).to(torch.float32), full_matrices=False)
            frozen_b = left[:, -self.r:].to(self.lora_B.dtype).contiguous()
            self.lora_A.zero_()
        del self.lora_B
        self.register_buffer("lora_B", frozen_b)

    def _init_from_base(self, base: nn.Module, init: str) -> None:
        """PiSSA / OLoRA: the factors take the principal part of the base weight (``residual_split``) and
        the base weight keeps the rest, so the model's output does not change. The initial factors stay
        (not saved) for :func:`~.convert.save_as_lora`, which expresses the trained change against the
        original weight."""
        from .residual import residual_split

        _check_float_weight(base, init, "rewrites")
        weight = base.weight
        with torch.no_grad():
            w = weight_out_in(base).to(torch.float32)
            a, b = residual_split(w, self.r, self.scale, init)
            residual = (w - self.scale * (b @ a)).to(weight.dtype)
            weight.data = (residual.t() if is_conv1d(base) else residual).contiguous()
            self.lora_A.data = a.to(self.lora_A.dtype).contiguous()
            self.lora_B.data = b.to(self.lora_B.dtype).contiguous()
        self.register_buffer("initial_lora_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("initial_lora_B", self.lora_B.detach().clone(), persistent=False)
        self.base_changed()

    def removed(self, base: nn.Module) -> None:
        """Deleting a PiSSA/OLoRA adapter gives the base weight back its principal part (within float
        rounding), so the model is the original one again."""
        initial_a = getattr(self, "initial_lora_A", None)
        if initial_a is None:
            return
        with torch.no_grad():
            part = self.scale * (self.initial_lora_B.float() @ initial_a.float())
            weight = base.weight
            weight.data = (weight.data.float() + (part.t() if is_conv1d(base) else part)).to(weight.dtype)

    # -- forward -------------------------------------------------------------------

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's output with this adapter, fused with the base product (core/fused_lora.py), when the
        base is a plain linear layer; None otherwise (the unfused forward runs)."""
        if not fusable_linear(base, x, self.lora_A) or (self.use_dora and self._dropout_active()):
            return None  # DoRA with dropout in training puts the dropped-out input through W too (forward)
        dropout = self.dropout.p if self._dropout_active() else 0.0  # drawn in the fused node
        if not self.use_dora:
            return fused_lora(x, None, self.lora_A, self.lora_B, base, self.scale, keep_on=self, dropout=dropout,
                              lora_bias=self.lora_bias)
        if norm_joins_base_product(x, self.lora_A, self.out_features):  # the node computes the norms
            return fused_lora(x, None, self.lora_A, self.lora_B, base, self.scale, self.lora_magnitude_vector,
                              weight_sq=self._weight_sq(base))
        return fused_lora(x, None, self.lora_A, self.lora_B, base, self.scale,
                          self.lora_magnitude_vector, self._weight_norm(base), keep_on=self)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.use_dora:
            return self.forward(x, h, base) - h
        out = F.linear(F.linear(self._lora_input(x), self.lora_A), self.lora_B, self.lora_bias) * self.scale
        return out.to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.use_dora and self._dropout_active():
            return self._dora_dropped(x, h, base)
        if self.lora_bias is not None:
            return h + self.delta(x, h, base)
        xa = F.linear(self._lora_input(x), self.lora_A)
        if self.use_dora:
            return self._dora(xa, h, base)
        if h.dtype == xa.dtype and h.dim() >= 2:
            # h + scale * (xa @ B^T) in one kernel, no intermediate (N, out) tensor.
            flat = torch.addmm(h.reshape(-1, self.out_features), xa.reshape(-1, self.r), self.lora_B.t(),
                               alpha=self.scale)
            return flat.view(h.shape)
        return h + (F.linear(xa, self.lora_B) * self.scale).to(h.dtype)

    def _dora(self, xa: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        # W' = m * (W + sBA) / ||W + sBA||_row  =>  y = (m/n) * (h - b + s*B A x) + b
        # The norm is treated as a constant (detached), as the DoRA paper does.
        mag_scale = self._magnitude_scale(base).to(h.dtype)
        lora = (F.linear(xa, self.lora_B) * self.scale).to(h.dtype)
        bias = getattr(base, "bias", None)
        if bias is None:
            return mag_scale * (h + lora)
        return mag_scale * (h - bias + lora) + bias

    def _magnitude_scale(self, base: nn.Module) -> torch.Tensor:
        """m / ||W + sBA||_row, the norms detached (DoRA's rule)."""
        return self.lora_magnitude_vector / self._weight_norm(base)

    def _dora_dropped(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """DoRA in training with dropout, as PEFT computes it: the dropped-out input x_d goes through the
        whole DoRA term, y = h + (m/n - 1) * W x_d + (m/n) * s * B A x_d (h the base output on x)."""
        dropped = self._lora_input(x)
        mag_scale = self._magnitude_scale(base).to(dropped.dtype)
        dropped_base = F.linear(dropped, weight_out_in(base).to(dropped.dtype))
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scale
        return h + ((mag_scale - 1) * dropped_base + mag_scale * lora).to(h.dtype)

    def _weight_norm(self, base: nn.Module) -> torch.Tensor:
        """Row norms of W + s*B@A without forming the dense matrix (``dora_norm``), kept for forwards
        without gradients while W, A and B do not change (``kept_while_unchanged``: under torch.compile
        computed in the graph, where reading version counters would break it at every layer)."""
        weight, A, B = base.weight, self.lora_A, self.lora_B

        def norm() -> torch.Tensor:
            # in float32 (the factors' dtype) under autocast too: the norms are detached constants, not products
            # autocast should round
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                cross = torch.mm(A, weight_out_in(base).to(A.dtype).t())
                return dora_norm(cross, A, B, self._weight_sq(base), self.scale)
        return kept_while_unchanged(self, KEPT_NORM, (weight, A, B), norm, self.scale)

    def _weight_sq(self, base: nn.Module) -> torch.Tensor:
        """``||w_i||^2`` for each row of W, in the factors' dtype, kept while W does not change."""
        weight = base.weight

        def squares() -> torch.Tensor:
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                w = weight_out_in(base).to(self.lora_A.dtype)
                return (w * w).sum(dim=1)
        return kept_while_unchanged(self, KEPT_WEIGHT_SQ, (weight,), squares, self.lora_A.dtype)

    # -- merging -------------------------------------------------------------------

    def lora_delta_out_in(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """Change to ``base.weight`` (in the layout the layer stores)."""
        delta = self.lora_delta_out_in()
        if self.use_dora:
            w = weight_out_in(base).to(delta.dtype)
            norm = self._weight_norm(base)
            delta = (self.lora_magnitude_vector / norm).unsqueeze(1) * (w + delta) - w
        return delta.t() if is_conv1d(base) else delta

    def unmerge(self, base: nn.Module) -> None:
        if not self.use_dora:
            super().unmerge(base)
            return
        # W = W' * n / m - s*B@A, with n the norm from merge time.
        weight = base.weight
        factor = (self._merged_norm / self.lora_magnitude_vector).to(weight.dtype)
        lora = self.lora_delta_out_in().to(weight.dtype)
        if is_conv1d(base):
            weight.data = weight.data * factor.unsqueeze(0) - lora.t()
        else:
            weight.data = weight.data * factor.unsqueeze(1) - lora
        self._merged_norm = None
        self.__dict__.pop(KEPT_NORM, None)

    def low_rank(self, forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, scale): the weight change is scale * B @ A, except with DoRA (which rescales rows) and with
        lora_bias (which changes the bias too)."""
        if self.use_dora or self.lora_bias is not None or (forward and self._dropout_active()):
            return None
        return self.lora_A, self.lora_B, self.scale

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"
                + (", dora" if self.use_dora else "") + (", lora_bias" if self.lora_bias is not None else ""))


class LoraEmbedding(LayerAdapter):
    """LoRA on an embedding table: E' = E + s * (B A)^T, A (r, vocab), B (dim, r)."""

    def __init__(self, base: nn.Embedding, r: int, scale: float, init: bool | str) -> None:
        super().__init__()
        self.r, self.scale = r, float(scale)
        weight = base.weight
        dtype = adapter_dtype(base)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, dtype=dtype, device=weight.device))
        self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, r, dtype=dtype, device=weight.device))
        nn.init.normal_(self.lora_embedding_B)
        if init is False:
            nn.init.normal_(self.lora_embedding_A, std=0.1)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        # Dense gradient even for a sparse=True table: the lookup reads A transposed, a view that
        # cannot take a sparse gradient, and A (r x vocab) is small.
        after_a = F.embedding(x, self.lora_embedding_A.t(), padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq)
        return (F.linear(after_a, self.lora_embedding_B) * self.scale).to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scale

    def low_rank(self, forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The table's change as a (dim, vocab) map: scale * B @ A. Inputs are token ids, so
        there is no batched forward form (forward=True gives None)."""
        if forward:
            return None
        return self.lora_embedding_A, self.lora_embedding_B, self.scale

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}
