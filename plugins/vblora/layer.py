"""The VB-LoRA module for one Linear or GPT-2 Conv1D layer.

The update is ``B (A x)``. A (r, in) is cut into pieces of vector_length entries along its rows and B
(out, r) along its columns; each piece is the softmax-weighted sum of the topk vectors of the adapter's
bank (``self.shared.vblora_vector_bank``, shared by all its layers) whose logits are largest. The layer
trains the logits: ``vblora_logits_A`` (r, in / vector_length, num_vectors) and ``vblora_logits_B``
(out / vector_length, r, num_vectors), PEFT's names, shapes and initialization.

Cost: a forward that records gradients builds A and B anew, as PEFT does in every forward (they are
r x in and out x r, plus the topk bank vectors gathered for each piece while they are built). A forward
without them (inference, or the adapter frozen) reuses the A and B it built last until the logits or the
bank change (version counter, storage, device, dtype): two small matrices per layer. A training forward
drops them.

Folders saved with ``save_only_topk_weights`` hold each piece's topk indices and the softmax weights of
all but the last (PEFT's ``*_topk_indices`` / ``*_topk_weights`` keys); loading rebuilds logits that are
minus infinity outside the topk, which give the same A and B but cannot be trained further.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, fusable_linear, fused_lora, is_conv1d, kept_while_unchanged,
                                LayerAdapter, PeftkitError, to_dtype)

from .config import VBLoRAConfig

#: The trained logits' names (PEFT's), each saved as itself or as its topk indices and weights.
LOGITS = ("vblora_logits_A", "vblora_logits_B")
INDICES_SUFFIX, WEIGHTS_SUFFIX = "_topk_indices", "_topk_weights"


class TopkOnlyAdapterError(PeftkitError):
    """Training was asked of an adapter loaded from a folder saved with save_only_topk_weights."""


def mix_bank_vectors(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """For each piece (the last axis of ``logits`` scores the bank's vectors), the softmax-weighted sum of the
    ``topk`` vectors with the largest logits: shape ``logits.shape[:-1] + (vector_length,)``."""
    top_logits, indices = logits.topk(topk, dim=-1)
    weights = F.softmax(top_logits, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype PEFT saves topk indices in for a bank of ``num_vectors`` vectors."""
    if num_vectors < 2 ** 8:
        return torch.uint8
    if num_vectors < 2 ** 15:
        return torch.int16
    return torch.int32 if num_vectors < 2 ** 31 else torch.int64


class VBLoRALayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, config: VBLoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.topk, self.num_vectors = config.r, config.topk, config.num_vectors
        self.vector_length = config.vector_length
        self._topk_only_files = config.save_only_topk_weights  # how file_tensors() writes; not a setting to swap
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        # PEFT's draws from torch's global generator, in its order: a bank, then this layer's logits.
        self.__dict__["_drawn_bank"] = torch.zeros(config.num_vectors, config.vector_length).uniform_(
            -config.init_vector_bank_bound, config.init_vector_bank_bound)
        logits_a = torch.zeros(config.r, in_features // config.vector_length, config.num_vectors)
        logits_b = torch.zeros(out_features // config.vector_length, config.r, config.num_vectors)
        logits_a.normal_(0.0, config.init_logits_std)
        logits_b.normal_(0.0, config.init_logits_std)
        self.vblora_logits_A = nn.Parameter(logits_a.to(**factory))
        self.vblora_logits_B = nn.Parameter(logits_b.to(**factory))
        self.dropout = nn.Dropout(config.vblora_dropout) if config.vblora_dropout else nn.Identity()

    def bind_shared(self, shared: nn.Module | None) -> None:
        """Hand the bank drawn with this layer's logits to the adapter's bank: each layer's overwrites the
        previous one's, so the last layer's stays, as in PEFT (which draws a bank per layer and keeps the last)."""
        super().bind_shared(shared)
        drawn = self.__dict__.pop("_drawn_bank", None)
        if drawn is not None and shared is not None:
            with torch.no_grad():
                shared.vblora_vector_bank.copy_(drawn)

    def _bank(self) -> torch.Tensor:
        shared = self.shared
        if shared is None:
            raise RuntimeError("this VB-LoRA layer is not bound to its adapter's vector bank; create VB-LoRA "
                               "adapters through AdaptedModel.add_adapter or load_adapter")
        return shared.vblora_vector_bank

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r) built from the logits and the bank now (in ``dtype`` when given)."""
        logits_a, logits_b = self.vblora_logits_A, self.vblora_logits_B
        bank = self._bank().to(device=logits_a.device)
        if dtype is not None:
            logits_a, logits_b, bank = logits_a.to(dtype), logits_b.to(dtype), bank.to(dtype)
        a = mix_bank_vectors(logits_a, bank, self.topk).reshape(self.r, -1)
        b = mix_bank_vectors(logits_b, bank, self.topk).transpose(1, 2).reshape(-1, self.r)
        return a, b

    def _forward_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B for this forward: built anew when it records gradients, else the pair built last for the
        same logits and bank."""
        tensors = (self.vblora_logits_A, self.vblora_logits_B, self._bank())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and not torch.compiler.is_compiling():
            self._refuse_topk_only_training()
        return kept_while_unchanged(self, "_kept_factors", tensors, self.factors)

    def _refuse_topk_only_training(self) -> None:
        """Logits loaded from a save_only_topk_weights folder are minus infinity outside the topk (PEFT's check:
        the first piece of A)."""
        if self.vblora_logits_A[0, 0].isinf().any():
            raise TopkOnlyAdapterError(
                "this VB-LoRA adapter was loaded from a folder saved with save_only_topk_weights=true, which keeps "
                "only each piece's top-k weights: it serves inference and merging, not training (PEFT refuses "
                "too). Train from a folder saved with save_only_topk_weights=false, or add a new adapter")

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b = self._forward_factors()
        x = to_dtype(x, self._bank().dtype)
        return F.linear(F.linear(self.dropout(x), a), b).to(h.dtype)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """h + (x A^T) B^T, the second product adding into h in one ``addmm`` where the dtypes agree (no
        separate (tokens, out) update tensor and sum)."""
        a, b = self._forward_factors()
        xa = F.linear(self.dropout(to_dtype(x, self._bank().dtype)), a)
        if h.dtype != xa.dtype or h.dim() < 2:
            return h + F.linear(xa, b).to(h.dtype)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t())
        return out.view(h.shape)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's whole output through the fused LoRA node (``fused_lora``) with this forward's A and B
        (their gradients flow back to the logits and the bank); the node drops out the LoRA input itself as
        ``nn.Dropout`` would. None on a layer ``fusable_linear`` refuses (the unfused path runs)."""
        if not fusable_linear(base, x, self._bank()):  # A and B come in the bank's dtype
            return None
        a, b = self._forward_factors()
        dropout = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.training else 0.0
        return fused_lora(x, None, a, b, base, 1.0, dropout=dropout)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """B @ A, in the layout the layer stores (GPT-2's Conv1D: (in, out)); half-precision logits on the CPU
        are mixed in float32, as PEFT does."""
        logits = self.vblora_logits_A
        upcast = logits.device.type == "cpu" and logits.dtype in (torch.float16, torch.bfloat16)
        a, b = self.factors(torch.float32 if upcast else None)
        delta = (b @ a).to(logits.dtype)
        return delta.t() if is_conv1d(base) else delta

    # -- files -----------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in LOGITS}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The logits, or with save_only_topk_weights each piece's topk indices (the smallest integer dtype
        for num_vectors) and the softmax weights of all but the last of them (they sum to one): PEFT's keys."""
        if not self._topk_only_files:
            return self.tensors()
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in LOGITS:
                top_logits, indices = getattr(self, name).topk(self.topk)
                out[name + INDICES_SUFFIX] = indices.to(index_dtype(self.num_vectors))
                out[name + WEIGHTS_SUFFIX] = F.softmax(top_logits, dim=-1)[..., :-1].contiguous()
        return out

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits rebuilt from topk indices and weights where the file holds those (PEFT's rule: log of the
        weights at the indices, minus infinity elsewhere); other keys pass unchanged."""
        out = dict(saved)
        for name in LOGITS:
            if name + INDICES_SUFFIX in out or name + WEIGHTS_SUFFIX in out:
                indices = out.pop(name + INDICES_SUFFIX, None)
                weights = out.pop(name + WEIGHTS_SUFFIX, None)
                out[name] = self._logits_from_topk(name, indices, weights)
        return out

    def _logits_from_topk(self, name: str, indices: torch.Tensor | None,
                          weights: torch.Tensor | None) -> torch.Tensor:
        if indices is None or weights is None:
            missing = name + (INDICES_SUFFIX if indices is None else WEIGHTS_SUFFIX)
            raise PeftkitError(f"the file holds half of {name}'s top-k form: {missing} is missing; save the "
                               f"adapter again")
        if indices.shape[:-1] != weights.shape[:-1] or weights.shape[-1] != indices.shape[-1] - 1 \
                or indices.shape[-1] != self.topk:
            raise PeftkitError(f"{name}{INDICES_SUFFIX} {tuple(indices.shape)} and {name}{WEIGHTS_SUFFIX} "
                               f"{tuple(weights.shape)} do not fit topk={self.topk} (indices end in topk, weights "
                               f"in topk - 1); the folder's config names another topk or the file is damaged")
        indices = indices.long()
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < self.num_vectors:
            raise PeftkitError(f"{name}{INDICES_SUFFIX} holds indices outside the bank of num_vectors="
                               f"{self.num_vectors}; the file is damaged or was saved for another num_vectors")
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        logits = torch.full((*indices.shape[:-1], self.num_vectors), float("-inf"), dtype=weights.dtype)
        return logits.scatter(-1, indices, torch.log(weights))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, topk={self.topk}, "
                f"num_vectors={self.num_vectors}, vector_length={self.vector_length}")
