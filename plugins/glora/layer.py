"""The GLoRA module for one Linear layer.

``W' = W + W * A + B`` and ``b' = b + b * D + E + W C`` (``*`` element-wise, broadcast). Each of A to E is a
path module holding PEFT's tensors under PEFT's names (``glora_A.Xd`` / ``.Xu`` for a rank-r product,
``glora_A.X`` for a vector or a constant). Alone at a plain Linear layer the adapter runs one product with the
changed weight and bias (PEFT runs the layer and then the product again); in a composition its change is
``x (W * A + B)^T + b * D + E + W C``. Merging writes W' and b' into the layer (the change reads W and b, so
the adapter must be merged first at its layer), and unmerging solves for W and b again.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.plugin_api import adapter_dtype, kept_while_unchanged, LayerAdapter, PeftkitError, plain_linear


class GloraPath(nn.Module):
    """One of A to E: ``kind`` "lora" (Xd (rows, r) @ Xu (r, cols)), "vector" (X (rows, 1), or (rows,) with
    ``column=False``), "constant" (X (1,)) or "none" (no tensor). Drawn as PEFT draws it."""

    def __init__(self, kind: str, rows: int, cols: int, r: int, *, init_weights: bool, column: bool = True,
                 factory: dict | None = None) -> None:
        super().__init__()
        self.kind = kind
        #: the shape of the zeros PEFT saves for a "none" path (``glora_C.zeros``): (rows, cols), or (rows,)
        self.empty_shape = (rows, cols) if column else (rows,)
        factory = factory or {}
        with torch.no_grad():
            if kind == "lora":
                self.Xd = nn.Parameter(torch.zeros(rows, r, **factory))
                self.Xu = nn.Parameter(torch.zeros(r, cols, **factory))
                nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
                if not init_weights:
                    nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))
            elif kind == "vector":
                self.X = nn.Parameter(torch.zeros((rows, 1) if column else (rows,), **factory))
                if not init_weights:
                    nn.init.kaiming_uniform_(self.X if column else self.X.unsqueeze(0), a=math.sqrt(5))
            elif kind == "constant":
                self.X = nn.Parameter(torch.zeros(1, **factory))
                if not init_weights:
                    nn.init.normal_(self.X, mean=0.0, std=0.02)

    def value(self) -> torch.Tensor | None:
        """The path's matrix (or what broadcasts to it); None for "none"."""
        if self.kind == "lora":
            return self.Xd @ self.Xu
        return self.X if self.kind in ("vector", "constant") else None

    def extra_repr(self) -> str:
        return self.kind


#: The last name of the zero tensors PEFT saves for its "none" paths (a buffer of its empty path module).
EMPTY_KEY = "zeros"


class GloraLayer(LayerAdapter):
    #: the change reads the layer's weight and bias, so the adapter merges first at its layer
    merge_reads_weight = True

    def __init__(self, base: nn.Module, r: int, *, config_A_B: str, config_C: str, config_D_E: str,
                 init_weights: bool = True) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        self.has_bias = base.bias is not None
        factory = {"dtype": adapter_dtype(base), "device": base.weight.device}
        path = dict(r=r, init_weights=init_weights, factory=factory)
        # PEFT's order of draws: A, B, then C, D, E (which a layer without a bias has none of)
        self.glora_A = GloraPath(config_A_B, out_features, in_features, **path)
        self.glora_B = GloraPath(config_A_B, out_features, in_features, **path)
        self.glora_C = GloraPath(config_C if self.has_bias else "none", in_features, 1, **path)
        self.glora_D = GloraPath(config_D_E if self.has_bias else "none", out_features, 1, column=False, **path)
        self.glora_E = GloraPath(config_D_E if self.has_bias else "none", out_features, 1, column=False, **path)

    def changes(self, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(W * A + B, b * D + E + W C) for the layer's ``weight`` and ``bias`` in the adapter's dtype; None
        for a part all of whose paths are "none"."""
        a, b = self.glora_A.value(), self.glora_B.value()
        weight_change = None if a is None else weight * a
        if b is not None:
            weight_change = b.expand_as(weight) if weight_change is None else weight_change + b
        if bias is None:
            return weight_change, None
        c, d, e = self.glora_C.value(), self.glora_D.value(), self.glora_E.value()
        parts = [bias * d if d is not None else None, e, (weight @ c).squeeze(-1) if c is not None else None]
        present = [p.expand_as(bias) for p in parts if p is not None]
        return weight_change, (sum(present[1:], present[0]) if present else None)

    def _base_tensors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias in the adapter's dtype (its tensors', or the weight's without any)."""
        dtype = next((p.dtype for p in self.parameters()), base.weight.dtype)
        bias = base.bias.to(dtype) if self.has_bias else None
        return base.weight.to(dtype), bias

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        weight, bias = self._base_tensors(base)
        weight_change, bias_change = self.changes(weight, bias)
        x = x if x.dtype == weight.dtype else x.to(weight.dtype)
        if weight_change is None:
            out = torch.zeros_like(h, dtype=weight.dtype) if bias_change is None else bias_change.expand(h.shape)
        else:
            out = F.linear(x, weight_change, bias_change)
        return out.to(h.dtype)

    def forward_alone(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """``x W'^T + b'`` in one product, for a plain Linear layer whose input and weight have the adapter's
        dtype, outside autocast; None elsewhere (the layer's output and :meth:`delta` are then added)."""
        weight = base.weight
        if not plain_linear(base) or torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype \
                or any(p.dtype != weight.dtype for p in self.parameters()):
            return None
        bias = base.bias
        layer_tensors = (weight,) if bias is None else (weight, bias)
        new_weight, new_bias = kept_while_unchanged(self, "_kept_changed_layer", (*self.parameters(), *layer_tensors),
                                                    lambda: self._changed_layer(weight, bias))
        return F.linear(x, new_weight, new_bias)

    def _changed_layer(self, weight: torch.Tensor, bias: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b'): built at every training forward; an inference forward reuses the pair built last while
        neither the adapter's tensors nor the layer's change (``kept_while_unchanged``), so it runs the one
        product alone, at the memory of a second (out, in) weight per layer (``merge_adapter()`` writes W'
        into the layer instead)."""
        weight_change, bias_change = self.changes(weight, bias)
        new_weight = weight if weight_change is None else weight + weight_change
        new_bias = bias if bias_change is None else bias + bias_change  # no bias: no bias change
        return new_weight, new_bias

    # -- merging -------------------------------------------------------------------

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            weight, bias = self._base_tensors(base)
            weight_change, bias_change = self.changes(weight, bias)
            if weight_change is not None:
                base.weight.add_(weight_change.to(base.weight.dtype))
            if bias_change is not None:
                base.bias.add_(bias_change.to(base.bias.dtype))

    def unmerge(self, base: nn.Module) -> None:
        """W = (W' - B) / (1 + A) and b = (b' - E - W C) / (1 + D), as PEFT undoes its merge."""
        with torch.no_grad():
            merged_weight, merged_bias = self._base_tensors(base)
            a, b = self.glora_A.value(), self.glora_B.value()
            weight = merged_weight if b is None else merged_weight - b
            weight = weight if a is None else weight / (1 + a)
            base.weight.copy_(weight.to(base.weight.dtype))
            if merged_bias is None:
                return
            c, d, e = self.glora_C.value(), self.glora_D.value(), self.glora_E.value()
            bias = merged_bias if e is None else merged_bias - e
            bias = bias if c is None else bias - (weight @ c).squeeze(-1)
            bias = bias if d is None else bias / (1 + d)
            base.bias.copy_(bias.to(base.bias.dtype))

    # -- files -----------------------------------------------------------------------

    def _paths(self) -> dict[str, GloraPath]:
        """glora_A to glora_E by name (the module's only children)."""
        return dict(self.named_children())

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors, and the zeros PEFT saves for each "none" path (``glora_C.zeros``: PEFT's
        empty path holds them as a buffer and reads them when it loads the folder)."""
        out = self.tensors()
        like = next(iter(out.values()), None)
        factory = {"dtype": torch.float32} if like is None else {"dtype": like.dtype, "device": like.device}
        for name, path in self._paths().items():
            if path.kind == "none":
                out[f"{name}.{EMPTY_KEY}"] = torch.zeros(path.empty_shape, **factory)
        return out

    def tensors_from_file(self, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``saved`` less the zeros of the "none" paths, which must be zeros of PEFT's shape (PEFT adds them in
        its forward)."""
        out = dict(saved)
        for name, path in self._paths().items():
            key = f"{name}.{EMPTY_KEY}"
            if key not in out:
                continue
            if path.kind != "none":
                raise PeftkitError(f"{key} is PEFT's tensor for a path set to 'none', but this adapter's {name} is "
                                   f"{path.kind!r}: the file's config and weights disagree")
            tensor = out.pop(key)
            if tuple(tensor.shape) != path.empty_shape or bool(tensor.any()):
                raise PeftkitError(f"{key} should be zeros of shape {path.empty_shape} (a path set to 'none'), "
                                   f"but has shape {tuple(tensor.shape)} and {int(tensor.count_nonzero())} nonzero "
                                   f"entries; PEFT would add them to the layer, peftkit does not load such a file")
        return out

    def extra_repr(self) -> str:
        return "" if self.has_bias else "base without bias (no C, D, E)"
