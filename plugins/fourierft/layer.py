"""The FourierFT module for one Linear or GPT-2 Conv1D layer.

The weight change (out, in) is

    dW = scaling * Re(ifft2(S)),

S zero except at n_frequency positions, which hold the trained coefficients ``fourierft_spectrum``.
The positions are the first n_frequency of ``torch.randperm(out * in)`` drawn from a CPU generator
seeded with ``random_loc_seed``, read as row-major flat indices of S: PEFT's draw, so a PEFT folder
(which holds only the coefficients) gives PEFT's outputs.

Cost: the positions are drawn once per layer shape and seed (PEFT draws them once per layer and
copies them to the spectrum's device in every forward); they live on the layer's device as a
buffer. A forward that records gradients for the coefficients builds dW once (a scatter and a real
inverse FFT of the spectrum's Hermitian half, one autograd node: spectrum.py; PEFT runs a complex one of all
of it in every forward); a forward without them (inference, or the
adapter frozen) reuses the dW it built last until the coefficients, their storage or dtype change,
at the memory of one (out, in) matrix per layer: ``merge_adapter()`` folds it into the weight instead. A
training forward drops it, so an evaluation between training steps leaves nothing behind.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import (adapter_dtype, fusable_linear, is_conv1d, kept_while_unchanged, LayerAdapter, to_dtype,
                                weight_out_in)

from .spectrum import HalfSpectrumSites, inverse_spectrum_change

#: From how many tokens an adapter alone at a plain layer runs one product with W + dW instead of the base
#: product and x dW^T: the sum costs about three passes over the weight, the second product one pass over it
#: per token block (2 threads, float32: equal near 30 tokens on 512x512 to 1376x512 layers).
FUSED_FROM_TOKENS = 32


@functools.lru_cache(maxsize=16)
def spectral_positions(seed: int, out_features: int, in_features: int, n_frequency: int) -> torch.Tensor:
    """The flat (row-major) positions in the (out, in) spectrum of the trained coefficients, on the CPU.

    PEFT's draw: ``randperm(out * in)`` from a fresh CPU generator seeded with ``seed``, first
    ``n_frequency`` entries (PEFT keeps them as (row, column) = divmod(position, in)). Kept for the
    layers of one shape; callers copy the result before changing it.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(out_features * in_features, generator=generator)[:n_frequency]


class FourierFTLayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, n_frequency: int, *,
                 scaling: float, random_loc_seed: int, init_weights: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n_frequency = in_features, out_features, n_frequency
        self.scaling, self.random_loc_seed = float(scaling), random_loc_seed
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        # Drawn on the CPU in float32 whatever the device (PEFT's draw), zero for init_weights=True.
        values = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency)
        self.fourierft_spectrum = nn.Parameter(values.to(**factory))
        positions = spectral_positions(random_loc_seed, out_features, in_features, n_frequency)
        self.register_buffer("spectral_positions", positions.to(base.weight.device, copy=True), persistent=False)

    def delta_out_in(self) -> torch.Tensor:
        """dW as (out, in), built from the coefficients now (one autograd node: spectrum.py)."""
        return inverse_spectrum_change(self.fourierft_spectrum, self._sites(), self.scaling)

    def _sites(self) -> HalfSpectrumSites:
        """The coefficients' sites in the half spectrum, kept while the positions buffer stays (a move
        to another device makes a new one)."""
        positions = self.spectral_positions
        return kept_while_unchanged(self, "_kept_sites", (positions,),
                                    lambda: HalfSpectrumSites.of(positions, (self.out_features, self.in_features)))

    def _weight_change(self) -> torch.Tensor:
        """dW for this forward: built anew when it records gradients for the coefficients, else the one built
        last for the same coefficients (version counter, storage, device and dtype), positions and scaling."""
        return kept_while_unchanged(self, "_kept_weight_change", (self.fourierft_spectrum, self.spectral_positions),
                                    self.delta_out_in, self.scaling)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The layer's whole output as one product with W + dW, from ``FUSED_FROM_TOKENS`` tokens on: dW is a
        dense (out, in) matrix (built anyway), so adding it to W replaces a second full product over the tokens
        (PEFT runs two). The same numbers up to float rounding; None (the two products) under autocast, for a
        weight of another dtype than dW, or for few tokens (decoding)."""
        if x.numel() < FUSED_FROM_TOKENS * x.shape[-1] or torch.is_autocast_enabled(x.device.type) \
                or not fusable_linear(base, x, self.fourierft_spectrum):
            return None
        change, weight = self._weight_change(), weight_out_in(base)
        if change.dtype != weight.dtype:
            return None
        return F.linear(x, weight + change, base.bias)

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        change = self._weight_change()
        return F.linear(to_dtype(x, change.dtype), change).to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The change to ``base.weight``, in the layout the layer stores (GPT-2's Conv1D: (in, out))."""
        change = self.delta_out_in()
        return change.t() if is_conv1d(base) else change

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"fourierft_spectrum": self.fourierft_spectrum}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, n_frequency={self.n_frequency}, "
                f"scaling={self.scaling}, random_loc_seed={self.random_loc_seed}")
