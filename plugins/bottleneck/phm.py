"""Parameterized hypercomplex multiplication (PHM) projections: Compacter's down and up layers.

A PHM layer from ``in`` to ``out`` features computes ``y = x H + b`` with

    H = sum_i kron(A_i, W_i)        A_i: (n, n) "rule" matrices, W_i: (in/n, out/n), i = 1..n

(n = ``phm_dim``; Karimi Mahabadi et al., arXiv 2106.04647). Each W_i may be a product of two
rank-``phm_rank`` factors (``factorized_phm_W``), each A_i an outer product (``factorized_phm_rule``).
The rule matrices are shared by every projection of an adapter (``shared_phm_rule``) and the weight
factors by every layer (``shared_W_phm``): then they live in the adapter-wide state
(``Method.create_shared_state``) under the names :func:`shared_phm_tensors` gives them, and each
projection reads them at each forward.

Tensor names are AdapterHub's (``W_left``, ``W_right``, ``W``, ``phm_rule``, ``phm_rule_left``,
``phm_rule_right``, ``b``), so its files map onto these modules key for key.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def _draw_weight(tensor: torch.Tensor, how: str, std: float) -> None:
    """Draw each of the n slices of a weight factor (AdapterHub's ``hypercomplex_nonlinearity``)."""
    with torch.no_grad():
        for part in tensor:
            if how == "glorot-uniform":
                nn.init.xavier_uniform_(part)
            elif how == "normal":
                part.normal_(0.0, std)
            else:  # glorot-normal, phm
                nn.init.xavier_normal_(part)


def _draw_rule(tensor: torch.Tensor, how: str, scale: float) -> None:
    with torch.no_grad():
        if how == "uniform":
            tensor.uniform_(-scale, scale)
        else:
            tensor.normal_(0.0, scale)


def _tensor(shape: tuple[int, ...], trainable: bool, factory: dict[str, Any]) -> torch.Tensor:
    """A tensor for the adapter: an ``nn.Parameter`` when it trains, a plain tensor (frozen) otherwise."""
    data = torch.empty(shape, **factory)
    return nn.Parameter(data) if trainable else data


def weight_factor_shapes(config: Any, in_features: int, out_features: int, prefix: str = "") -> dict[str, tuple]:
    """Shapes of one projection's weight factors: ``W_left``/``W_right`` (factorized) or ``W``."""
    n, base = config.phm_dim, prefix or "W"
    if config.factorized_phm_W:
        return {f"{base}_left": (n, in_features // n, config.phm_rank),
                f"{base}_right": (n, config.phm_rank, out_features // n)}
    return {base: (n, in_features // n, out_features // n)}


def rule_shapes(config: Any) -> dict[str, tuple]:
    n = config.phm_dim
    if config.factorized_phm_rule:
        return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)}
    return {"phm_rule": (n, n, n)}


def shared_phm_tensors(config: Any, in_features: int, bottleneck: int, zero_up: bool,
                       factory: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter-wide PHM tensors: the rule matrices (``shared_phm_rule``, drawn as AdapterHub draws
    shared ones: normal with std phm_init_range, or uniform in [-1, 1]) and the down/up weight factors
    (``shared_W_phm``: ``W_down_left``, ``W_up_right``, ...; the up factor's right half is zero when
    ``zero_up``)."""
    out: dict[str, torch.Tensor] = {}
    if config.shared_phm_rule:
        for name, shape in rule_shapes(config).items():
            out[name] = _tensor(shape, config.learn_phm, factory)
            _draw_rule(out[name], config.phm_c_init, config.phm_init_range if config.phm_c_init == "normal" else 1.0)
    if config.shared_W_phm:
        for position, (i, o) in (("down", (in_features, bottleneck)), ("up", (bottleneck, in_features))):
            for name, shape in weight_factor_shapes(config, i, o, prefix=f"W_{position}").items():
                out[name] = _tensor(shape, True, factory)
                _draw_weight(out[name], config.hypercomplex_nonlinearity, config.phm_init_range)
        if zero_up:
            with torch.no_grad():
                out["W_up_right" if config.factorized_phm_W else "W_up"].zero_()
    return out


class PHMLinear(nn.Module):
    """One PHM projection. Its own tensors are those not shared; ``forward`` gets the adapter-wide
    state (or None) to read the shared ones from."""

    def __init__(self, in_features: int, out_features: int, position: str, config: Any, zero: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.position = in_features, out_features, position
        self.phm_dim = config.phm_dim
        self.shared_rule, self.shared_W = config.shared_phm_rule, config.shared_W_phm
        self.factorized_rule, self.factorized_W = config.factorized_phm_rule, config.factorized_phm_W
        factory = {"dtype": dtype, "device": device}
        if not self.shared_W:
            for name, shape in weight_factor_shapes(config, in_features, out_features).items():
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                _draw_weight(getattr(self, name), config.hypercomplex_nonlinearity, config.phm_init_range)
            if zero:  # the adapter starts as the identity; the other factor still gets gradients
                with torch.no_grad():
                    (self.W_right if self.factorized_W else self.W).zero_()
        if not self.shared_rule:  # AdapterHub draws a per-layer rule with std (or bound) 0.01
            for name, shape in rule_shapes(config).items():
                tensor = _tensor(shape, config.learn_phm, factory)
                _draw_rule(tensor, config.phm_c_init, 0.01)
                if isinstance(tensor, nn.Parameter):
                    self.register_parameter(name, tensor)
                else:
                    self.register_buffer(name, tensor)
        self.b = nn.Parameter(torch.zeros(out_features, **factory)) if config.phm_bias else None

    def _pair(self, source: Any, left: str, right: str, whole: str, factorized: bool) -> torch.Tensor:
        if factorized:
            return torch.bmm(getattr(source, left), getattr(source, right))
        return getattr(source, whole)

    def matrix(self, shared: nn.Module | None) -> torch.Tensor:
        """H = sum_i kron(A_i, W_i), shape (in, out)."""
        rule = self._pair(shared if self.shared_rule else self, "phm_rule_left", "phm_rule_right", "phm_rule",
                          self.factorized_rule)
        w_name = f"W_{self.position}" if self.shared_W else "W"
        weight = self._pair(shared if self.shared_W else self, f"{w_name}_left", f"{w_name}_right", w_name,
                            self.factorized_W)
        n = self.phm_dim
        # kron(A, W)[a*I + j, c*O + l] = A[a, c] * W[j, l]
        h = torch.einsum("iac,ijl->ajcl", rule, weight)
        return h.reshape(n * weight.shape[1], n * weight.shape[2])

    def forward(self, x: torch.Tensor, shared: nn.Module | None) -> torch.Tensor:
        y = torch.matmul(x, self.matrix(shared).to(x.dtype))
        return y + self.b if self.b is not None else y

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.phm_dim}"
