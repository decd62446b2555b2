"""LoRA on ``nn.Parameter``s (PEFT's ``target_parameters``): weights that no Linear layer holds, such as
the stacked expert weights of mixture-of-experts blocks (``experts.gate_up_proj``, shape (experts, out, in)).

The site is the module holding the parameters; its adapter computes ``W + scale * B A`` per expert and
runs the module on it (``torch.func.functional_call``), so the module's own code, routing included, runs
unchanged. The factors follow PEFT's ``lora.ParamWrapper`` layout, so files load both ways: ``lora_A``
is (r * experts, in) with expert e's rows at ``e*r:(e+1)*r``; ``lora_B`` is (out, r * experts) with expert
e's columns at ``e::experts``. A 2-D parameter is one (out, in) weight. Several parameters of one module
nest in PEFT's files in the module's parameter order, the last outermost: its keys are ``lora_A.weight``,
the one before ``base_layer.lora_A.weight``, and so on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.func import functional_call

from peftkit.plugin_api import base_of, ConfigError, iter_candidate_modules, LayerAdapter, layer_index, name_matches

from .sites import ParameterSite

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraConfig


def parameter_sites(model: nn.Module, config: "LoraConfig", arch: Any) -> list[ParameterSite]:
    """The modules holding parameters that ``config.target_parameters`` names (full names, or dotted
    suffixes such as ``"experts.gate_up_proj"``), less excluded modules and unselected layers."""
    wanted = list(config.target_parameters or [])
    keep_layers = config.layers_to_transform
    if isinstance(keep_layers, int):
        keep_layers = [keep_layers]
    sites = []
    for name, module in iter_candidate_modules(model):
        if not name:
            continue
        held = base_of(module).named_parameters(recurse=False)  # under peftkit's wrapper when adapted already
        params = tuple(p for p, _ in held if name_matches(f"{name}.{p}", wanted))
        if not params:
            continue
        if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
            continue
        if keep_layers is not None and layer_index(name, arch) not in keep_layers:
            continue
        sites.append(ParameterSite(name, role="parameters", parameters=params))
    if not sites:
        raise ConfigError(f"lora: target_parameters={wanted!r} matched no parameter of this model; name "
                          f"parameters by their full name or a dotted suffix, e.g. "
                          f"[\"experts.gate_up_proj\", \"experts.down_proj\"]. Parameters held by modules "
                          f"directly: {', '.join(_sample_parameters(model))}")
    return sites


def _sample_parameters(model: nn.Module, limit: int = 12) -> list[str]:
    import re

    names: list[str] = []
    for name, module in iter_candidate_modules(model):
        for p, _ in base_of(module).named_parameters(recurse=False):
            short = re.sub(r"\.\d+\.", ".N.", f"{name}.{p}")
            if short not in names:
                names.append(short)
    return names[:limit] or ["(none)"]


def check_parameter_config(config: "LoraConfig", site: str) -> None:
    """Refuse what LoRA on a parameter cannot do (PEFT refuses the same)."""
    refused = [(config.dropout, "dropout=0 (dropout cannot act on a weight)"),
               (config.use_dora, "use_dora=false"),
               (isinstance(config.init_weights, str) and config.init_weights not in ("gaussian", "eva"),
                "init_weights true, false, \"gaussian\" or \"eva\" (EVA leaves parameters at the default init)")]
    for value, fix in refused:
        if value:
            raise ConfigError(f"lora: {site} is adapted through target_parameters, which needs {fix}; "
                              f"change the setting or adapt these parameters in another adapter")


class ParameterFactors(nn.Module):
    """LoRA factors of one parameter: ``lora_A`` (r * experts, in), ``lora_B`` (out, r * experts)."""

    def __init__(self, param: torch.Tensor, r: int, scale: float, init: bool | str, transposed: bool) -> None:
        super().__init__()
        if param.dim() == 3:
            experts, first, second = param.shape
            in_f, out_f = (first, second) if transposed else (second, first)
        elif param.dim() == 2:
            experts, (out_f, in_f) = 1, param.shape
        else:
            raise ConfigError(f"lora: target_parameters adapts 2-D and 3-D parameters, not shape {tuple(param.shape)}")
        self.experts, self.r, self.scale = experts, r, float(scale)
        self.transposed = transposed and param.dim() == 3
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r * experts, in_f, dtype=dtype, device=param.device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r * experts, dtype=dtype, device=param.device))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.normal_(self.lora_B, std=0.1)

    def per_expert(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_e, A_e) stacked over experts: (experts, out, r) and (experts, r, in)."""
        a = self.lora_A.reshape(self.experts, self.r, -1)
        b = self.lora_B.reshape(self.lora_B.shape[0], self.r, self.experts).permute(2, 0, 1)
        return b, a

    def adapted(self, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """``weight`` plus (``sign`` -1: minus) this update, in the parameter's layout and dtype."""
        scale = sign * self.scale
        b, a = self.per_expert()
        b, a = b.to(weight.dtype), a.to(weight.dtype)
        if weight.dim() == 2:
            return torch.addmm(weight, b[0], a[0], alpha=scale)
        if self.transposed:  # (experts, in, out)
            return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=scale)
        return torch.baddbmm(weight, b, a, alpha=scale)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, r={self.r}, scale={self.scale:g}"


class LoraParameters(LayerAdapter):
    """LoRA on the parameters ``names`` of one module (rank and scale per parameter); the module runs
    with the adapted weights."""

    changes_parameters = True

    def __init__(self, base: nn.Module, names: tuple[str, ...], ranks: list[int], scales: list[float],
                 init: bool | str) -> None:
        super().__init__()
        self.names = names
        transposed = bool(getattr(base, "is_transposed", False))
        self.factors = nn.ModuleList(ParameterFactors(getattr(base, n), r, scale, init, transposed)
                                     for n, r, scale in zip(names, ranks, scales))

    def adapted_parameters(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {name: f.adapted(getattr(base, name)) for name, f in zip(self.names, self.factors)}

    def call_base(self, base: nn.Module, x: Any, args: tuple, kwargs: dict) -> Any:
        return functional_call(base, self.adapted_parameters(base), (x, *args), kwargs, strict=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise ConfigError("lora: an adapter on target_parameters changes the module's weights, so it runs alone "
                          "at its module (one active adapter, or merged); it takes part in no composition there")

    # -- merging -------------------------------------------------------------------

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, f in zip(self.names, self.factors):
                param = getattr(base, name)
                param.data = f.adapted(param.data)

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, f in zip(self.names, self.factors):
                param = getattr(base, name)
                param.data = f.adapted(param.data, -1.0)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        from peftkit.plugin_api import MergeError

        raise MergeError("lora: an adapter on target_parameters changes several stacked weights, not one "
                         "weight matrix; merge it (merge_adapter) instead of combining it by weight")

    # -- files ---------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        last = len(self.names) - 1
        for i, f in enumerate(self.factors):
            prefix = "base_layer." * (last - i)
            out[f"{prefix}lora_A.weight"] = f.lora_A
            out[f"{prefix}lora_B.weight"] = f.lora_B
        return out

    def extra_repr(self) -> str:
        return f"parameters={list(self.names)}"
