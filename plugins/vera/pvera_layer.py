"""The PVeRA module for one Linear or GPT-2 Conv1D layer.

``(mu, logvar) = lambda_d * A[:, :in] x`` split in halves (A has 2r rows), and the
update is ``lambda_b * B[:out] z``: z is sampled from N(mu, exp(logvar)) in
training (``mu + eps * exp(logvar / 2)``, so gradients reach both halves), and is
mu in eval unless ``sample_at_inference``. File keys are PEFT's
(``pvera_lambda_b``, ``pvera_lambda_d``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, LayerAdapter

from .layer import projection_slices, scaled_delta_weight


class PveraLayer(LayerAdapter):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, *, dropout: float = 0.0,
                 d_initial: float = 0.1, init_weights: bool = True, sample_at_inference: bool = False,
                 generator_seed: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.sample_at_inference = sample_at_inference
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        if init_weights:  # lambda_b = 0: the adapter starts as the identity
            self.pvera_lambda_b = nn.Parameter(torch.zeros(out_features, **factory))
            self.pvera_lambda_d = nn.Parameter(torch.full((2 * r,), float(d_initial), **factory))
        else:
            self.pvera_lambda_b = nn.Parameter(torch.ones(out_features, **factory))
            self.pvera_lambda_d = nn.Parameter(torch.randn(2 * r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # PEFT's choice: each layer draws its noise from its own CPU generator, seeded alike; a torch.Generator
        # is bound to its device, so the noise is drawn on the CPU and moved.
        self.noise_generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)

    def _projections(self, a_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return projection_slices(self, ("pvera_A", "pvera_B"), a_rows, self.r, self.in_features,
                                 self.out_features, self.pvera_lambda_d)

    def _sample(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        if self.noise_generator is None:
            eps = torch.randn_like(std)
        else:
            eps = torch.randn(std.shape, dtype=std.dtype, generator=self.noise_generator).to(std.device)
        return mu + eps * std

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        dtype = self.pvera_lambda_d.dtype
        x = self.dropout(x if x.dtype == dtype else x.to(dtype))
        if self.training or self.sample_at_inference:
            a, b = self._projections(2 * self.r)
            mu, logvar = (self.pvera_lambda_d * F.linear(x, a)).chunk(2, dim=-1)
            z = self._sample(mu, logvar)
        else:  # the mean alone: the log-variance half of A is not needed
            a, b = self._projections(self.r)
            z = self.pvera_lambda_d[: self.r] * F.linear(x, a)
        return (self.pvera_lambda_b * F.linear(z, b)).to(h.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The mean's change to ``base.weight`` (what eval computes without sampling), in the layout the layer
        stores (GPT-2's Conv1D: (in, out))."""
        a, b = self._projections(self.r)
        return scaled_delta_weight(self.pvera_lambda_b, b, self.pvera_lambda_d[: self.r], a, base)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pvera_lambda_b": self.pvera_lambda_b, "pvera_lambda_d": self.pvera_lambda_d}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"sample_at_inference={self.sample_at_inference}")
