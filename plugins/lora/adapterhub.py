"""AdapterHub's LoRA (``adapters``' LoRAConfig) on BERT-family, Llama and GPT-2, at every place ``adapters`` puts it.

``adapters`` computes ``W x + (alpha / r) * B A x`` like peftkit, with ``lora_A`` (r, in) and
``lora_B`` (out, r) saved as bare parameters on the adapted layer. Where (per model family, :data:`FAMILIES`):

- ``selfattn_lora``: the self-attention projections named in ``attn_matrices`` (BERT ``query``/``key``/``value``,
  Llama ``q_proj``/``k_proj``/``v_proj``, GPT-2 the fused ``c_attn``, below);
- ``intermediate_lora``: BERT ``intermediate.dense``, Llama ``mlp.down_proj``, GPT-2 ``mlp.c_fc``;
- ``output_lora``: BERT ``layer.N.output.dense`` (target ``output.dense`` with ``exclude_modules``
  ``attention.output.dense``, which the suffix also matches and ``adapters`` leaves alone), Llama
  ``mlp.up_proj``, GPT-2 ``mlp.c_proj`` (not ``attn.c_proj``).

``leave_out`` (layers with no LoRA) is written as ``exclude_modules`` naming every adapted module of those layers
(``layer.0.attention.self.query``, ...): peftkit reads it without knowing the model's layer count, which
``layers_to_transform`` would need; saving reads that form back, and refuses ``layers_to_transform``. IA3
(composition_mode="scale") is the ia3 plugin's (it uses :meth:`LoraAdapterHub.placement_targets` and
:meth:`LoraAdapterHub.placement_options`); VeRA and DoRA are refused. UniPELT's gate (``use_gating``:
``gate.weight`` / ``gate.bias`` beside the factors) maps to ours, except on GPT-2's fused layer.

GPT-2's q, k and v come from one fused layer, ``c_attn`` (out = 3d). There ``adapters`` keeps one
rank-r pair per matrix named in ``attn_matrices`` (n of them): ``lora_A`` (n r, in) and ``lora_B``
(n d, r), applied as a grouped product (group g: ``B_g A_g x`` into matrix g's third of the output).
peftkit loads it as one LoRA on ``c_attn`` of rank 3r with ``alpha`` 3 alpha (the same scale): A
holds the groups' rows (zero rows for a matrix left out) and B is block diagonal (zero blocks off
it), so the output is the same. Saving writes ``attn_matrices`` q, k, v with r = rank / 3 and B's
diagonal blocks, and refuses a B with anything off them (a LoRA trained from peftkit's own init).
Beside ``intermediate_lora`` / ``output_lora`` (rank r there) the fused layer's rank 3r and alpha 3 alpha
go into ``rank_pattern`` / ``alpha_pattern``, and saving takes exactly that form back; the tensor hooks
rebuild only the fused layer's factors (they are told the module).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

#: Every option of ``adapters``' LoRAConfig with its default, as ``adapters`` 1.3 writes it.
LORA_DEFAULTS: dict[str, Any] = {
    "alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
    "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False,
    "leave_out": [], "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False,
    "use_gating": False, "vera_b": None, "vera_d": None,
}
REQUIRED = {"composition_mode": "add", "use_dora": False, "vera_b": None, "vera_d": None}
#: The self-attention matrices ``attn_matrices`` names, in order.
MATRICES = ("q", "k", "v")
#: The placement of GPT-2's fused q/k/v layer (``adapters``' LoRAMergedLinear).
FUSED = "qkv"
#: The feed-forward placements and the options that turn them on.
FFN_OPTIONS = {"intermediate": "intermediate_lora", "output": "output_lora"}


@dataclass(frozen=True)
class Family:
    """Where ``adapters`` puts LoRA and IA3 in one model family's transformer layers.

    ``layers``: the name of the list of layers (``encoder.layer.N``: ``layer``). ``places``: per placement
    (``q``, ``k``, ``v``, ``qkv``, ``intermediate``, ``output``) the target_modules entry written and the
    module's path inside a layer (both are read). ``clashes``: per placement, a module of the layer that its
    entry also matches as a suffix, which ``exclude_modules`` must name."""

    layers: str
    places: dict[str, tuple[str, str]]
    clashes: dict[str, str] = field(default_factory=dict)

    def names(self, placement: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.places[placement]))

    def path(self, placement: str) -> str:
        return self.places[placement][1]


_BERT = Family("layer", {"q": ("query", "attention.self.query"), "k": ("key", "attention.self.key"),
                         "v": ("value", "attention.self.value"),
                         "intermediate": ("intermediate.dense", "intermediate.dense"),
                         "output": ("output.dense", "output.dense")},
               clashes={"output": "attention.output.dense"})
FAMILIES = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "llama": Family("layers", {"q": ("q_proj", "self_attn.q_proj"), "k": ("k_proj", "self_attn.k_proj"),
                               "v": ("v_proj", "self_attn.v_proj"), "intermediate": ("down_proj", "mlp.down_proj"),
                               "output": ("up_proj", "mlp.up_proj")}),
    "gpt2": Family("h", {FUSED: ("c_attn", "attn.c_attn"), "intermediate": ("c_fc", "mlp.c_fc"),
                         "output": ("mlp.c_proj", "mlp.c_proj")}),
}


def family_of(model_type: str | None) -> Family:
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ConfigError(f"AdapterHub LoRA / IA3 on model_type={model_type!r} is not supported by peftkit yet "
                          f"({', '.join(FAMILIES)})")
    return family


def is_fused(options: Mapping[str, Any], model_type: str | None, module: str | None = None) -> bool:
    """Whether the options adapt GPT-2's fused ``c_attn`` (its tensors are rebuilt, see the module's text), and
    ``module`` (a module path; None: any) is that layer."""
    family = FAMILIES.get(model_type or "", _BERT)
    if FUSED not in family.places or not options.get("selfattn_lora", True):
        return False
    return module is None or f".{module}".endswith(f".{family.path(FUSED)}")


def placements_in(options: Mapping[str, Any], model_type: str | None, kind: str) -> list[str]:
    """The placements AdapterHub options turn on (``q``/``k``/``v`` or ``qkv``, ``intermediate``, ``output``)."""
    family = family_of(model_type)
    found: list[str] = []
    if options.get("selfattn_lora", True):
        matrices = list(options.get("attn_matrices", ["q", "v"]))
        fused = FUSED in family.places
        if any(m not in MATRICES for m in matrices) or (fused and not matrices):
            raise ConfigError(f"AdapterHub {kind} with attn_matrices={matrices} on model_type={model_type!r} is not "
                              f"supported by peftkit (q, k and v only)")
        found += [FUSED] if fused else [m for m in MATRICES if m in matrices]
    found += [place for place, key in FFN_OPTIONS.items() if options.get(key)]
    if not found:
        raise ConfigError(f"AdapterHub {kind} adapts no module (selfattn_lora, intermediate_lora and output_lora "
                          f"are all off)")
    return found


def leave_out_in(options: Mapping[str, Any], kind: str) -> list[int]:
    leave_out = options.get("leave_out") or []
    if not isinstance(leave_out, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                              for i in leave_out):
        raise ConfigError(f"AdapterHub {kind} option leave_out={leave_out!r} is not supported by peftkit (a list of "
                          f"layer indices, 0 or more)")
    return sorted(set(leave_out))


def exclusions(family: Family, placements: list[str], leave_out: list[int]) -> list[str]:
    """``exclude_modules`` for the placements: the modules their entries also match, and every placement's module
    in the layers left out."""
    clashes = [family.clashes[p] for p in placements if p in family.clashes]
    return clashes + [f"{family.layers}.{i}.{family.path(p)}" for i in leave_out for p in placements]


def _fused_matrices(options: Mapping[str, Any]) -> list[str]:
    """The matrices of GPT-2's fused layer that ``attn_matrices`` names (checked by :func:`placements_in`)."""
    return [m for m in MATRICES if m in options.get("attn_matrices", ["q", "v"])]


def _refuse_fused_gating(use_gating: bool) -> None:
    if use_gating:
        raise ConfigError("AdapterHub LoRA option use_gating=true on GPT-2's fused c_attn (one gate per q/k/v "
                          "third) is not supported by peftkit; gated LoRA maps on separate projections only")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def placements_out(config: Any, model_type: str | None, kind: str,
                   targets: list[str] | None = None) -> tuple[list[str], list[int]]:
    """The placements and ``leave_out`` of a peftkit config's ``target_modules`` (or ``targets``) and
    ``exclude_modules`` (lists)."""
    family = family_of(model_type)
    if getattr(config, "layers_to_transform", None) is not None:
        example = f"{family.layers}.0.{family.path(next(iter(family.places)))}"
        raise ConfigError(f"layers_to_transform={config.layers_to_transform!r}: AdapterHub's leave_out lists the "
                          f"layers left out, which peftkit cannot count here; leave them out with exclude_modules "
                          f"naming each adapted module of those layers instead (e.g. {example!r})")
    by_name = {name: place for place in family.places for name in family.names(place)}
    targets = config.target_modules if targets is None else targets
    if not isinstance(targets, list) or not targets or any(t not in by_name for t in targets):
        names = ", ".join("/".join(family.names(place)) for place in family.places)
        raise ConfigError(f"target_modules={targets!r}; AdapterHub's {kind} on {model_type} adapts {names} only "
                          f"(a list of those names)")
    placements = [place for place in family.places if place in {by_name[t] for t in targets}]
    return placements, _left_out(family, placements, config.exclude_modules, kind)


def _left_out(family: Family, placements: list[str], exclude: Any, kind: str) -> list[int]:
    """``leave_out`` for ``exclude_modules``, which must be exactly :func:`exclusions` for some layers."""
    entries = [] if exclude in (None, "") else exclude
    layer = re.compile(rf"{re.escape(family.layers)}\.(\d+)\..+")
    matches = [layer.fullmatch(e) for e in entries] if isinstance(entries, list) else []
    indices = sorted({int(m.group(1)) for m in matches if m})
    expected = exclusions(family, placements, indices)
    if not isinstance(entries, list) or set(entries) != set(expected):
        raise ConfigError(f"exclude_modules={exclude!r}; AdapterHub's {kind} leaves whole layers out (leave_out), so "
                          f"exclude_modules must be a list naming the modules target_modules also matches that "
                          f"AdapterHub leaves alone and every adapted module of the layers left out: here "
                          f"{expected!r}")
    return indices


def placement_values(placements: list[str], leave_out: list[int]) -> dict[str, Any]:
    """AdapterHub's options saying where a LoRA / IA3 is: ``selfattn_lora``, ``attn_matrices``,
    ``intermediate_lora``, ``output_lora``, ``leave_out``."""
    matrices = list(MATRICES) if FUSED in placements else [m for m in MATRICES if m in placements]
    return {"selfattn_lora": bool(matrices), "attn_matrices": matrices, "leave_out": leave_out,
            **{key: place in placements for place, key in FFN_OPTIONS.items()}}


def _default_targets(config: Any, model_type: str | None) -> list[str] | None:
    """peftkit's default targets where target_modules is None (the query and value projections), else None."""
    places = FAMILIES[model_type].places if config.target_modules is None and model_type in FAMILIES else {}
    return [places["q"][0], places["v"][0]] if "q" in places else None


def _with_ffn(options: Mapping[str, Any]) -> bool:
    """Whether AdapterHub options put LoRA on a feed-forward layer too."""
    return any(options.get(key) for key in FFN_OPTIONS.values())


def _fused_patterns(model_type: str | None, r: int, alpha: float) -> dict[str, Any]:
    """rank_pattern / alpha_pattern giving GPT-2's fused layer rank 3r and alpha 3 alpha (the scale of the other
    layers), as a fused LoRA beside feed-forward ones loads."""
    fused = family_of(model_type).places[FUSED][0]
    return {"rank_pattern": {fused: 3 * r}, "alpha_pattern": {fused: _number(3 * alpha)}}


class LoraAdapterHub(AdapterHubFormat):
    module_dict = "loras"
    on_site = True

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "lora" and options.get("composition_mode", "add") == "add"

    @staticmethod
    def placement_targets(options: Mapping[str, Any], model_type: str | None, kind: str) -> dict[str, Any]:
        """``target_modules`` and ``exclude_modules`` for where AdapterHub options put a LoRA or IA3 (``kind``);
        ConfigError naming an option peftkit cannot place."""
        family, placements = family_of(model_type), placements_in(options, model_type, kind)
        exclude = exclusions(family, placements, leave_out_in(options, kind))
        return {"target_modules": [family.places[p][0] for p in placements], "exclude_modules": exclude or None}

    @staticmethod
    def placement_options(config: Any, model_type: str | None, kind: str) -> dict[str, Any]:
        """AdapterHub's options for where a peftkit LoRA or IA3 config (``kind``) is: the inverse of
        :meth:`placement_targets`; ConfigError naming what the format cannot hold."""
        return placement_values(*placements_out(config, model_type, kind))

    @staticmethod
    def spread_over_thirds(tensor: Any, matrices: list[str], fill: float) -> Any:
        """``tensor``'s rows, one equal group per matrix of ``matrices`` (q, k, v in that order, some left out),
        each placed at its matrix's third of a tensor for all three (GPT-2's fused layer); ``fill`` elsewhere."""
        rows = tensor.shape[0] // len(matrices)
        out = tensor.new_full((3 * rows, *tensor.shape[1:]), fill)
        for g, m in enumerate(matrices):
            i = MATRICES.index(m)
            out[i * rows:(i + 1) * rows] = tensor[g * rows:(g + 1) * rows]
        return out

    @staticmethod
    def fused_matrices(options: Mapping[str, Any], model_type: str | None, module: str | None = None) -> list[str]:
        """The matrices (q, k, v) on GPT-2's fused ``c_attn`` that AdapterHub options adapt, where ``module`` (a
        module path; None: any) is that layer; [] elsewhere."""
        return _fused_matrices(options) if is_fused(options, model_type, module) else []

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        self.refuse_changed(options, REQUIRED, "LoRA")
        values = {"r": int(options.get("r", 8)), "alpha": options.get("alpha", 8),
                  "dropout": float(options.get("dropout", 0.0)), "use_gating": bool(options.get("use_gating")),
                  **self.placement_targets(options, model_type, "LoRA")}
        if is_fused(options, model_type):
            _refuse_fused_gating(values["use_gating"])
            if _with_ffn(options):  # one rank per q, k and v at c_attn, r at the MLP's layers
                values.update(_fused_patterns(model_type, values["r"], values["alpha"]))
            else:
                values.update(r=3 * values["r"], alpha=_number(3 * values["alpha"]))
        return values

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        where = placement_values(*placements_out(config, model_type, "LoRA", _default_targets(config, model_type)))
        r, alpha = config.r, config.alpha
        fused_beside_ffn = is_fused(where, model_type) and _with_ffn(where)
        self._refuse_options(config, patterns=not fused_beside_ffn)
        if fused_beside_ffn:
            _refuse_fused_gating(config.use_gating)
            expected = _fused_patterns(model_type, r, alpha)
            if {k: getattr(config, k) for k in expected} != expected:
                raise ConfigError(f"rank_pattern={config.rank_pattern!r}, alpha_pattern={config.alpha_pattern!r}; "
                                  f"AdapterHub's LoRA on {model_type}'s fused c_attn beside the MLP's layers has one "
                                  f"rank r per q, k and v: write {expected['rank_pattern']!r} and "
                                  f"{expected['alpha_pattern']!r} (rank 3r, alpha 3 alpha there)")
        elif is_fused(where, model_type):
            _refuse_fused_gating(config.use_gating)
            if r % 3:
                raise ConfigError(f"r={r}; AdapterHub's LoRA on {model_type}'s fused c_attn has one rank per q, k "
                                  f"and v (r a multiple of 3)")
            r, alpha = r // 3, _number(alpha / 3)
        return {**LORA_DEFAULTS, "r": r, "alpha": alpha, "dropout": config.dropout, "use_gating": config.use_gating,
                **where}

    @staticmethod
    def _refuse_options(config: Any, patterns: bool = True) -> None:
        """ConfigError for an option AdapterHub has no place for (``patterns``: rank_pattern / alpha_pattern too,
        which only the fused layer beside the MLP's may have)."""
        fields = [("use_dora", False), ("use_rslora", False), ("lora_bias", False), ("trainable_token_indices", None)]
        for field_name, off in fields + ([("rank_pattern", {}), ("alpha_pattern", {})] if patterns else []):
            if getattr(config, field_name, off) not in (off, None, [], {}):
                raise ConfigError(f"{field_name}={getattr(config, field_name)!r} has no AdapterHub equivalent")

    def tensor_in(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None, *,
                  module: str = "") -> Any:
        if not is_fused(options, model_type, module) or key not in ("lora_A.weight", "lora_B.weight"):
            return tensor
        matrices, r = _fused_matrices(options), int(options.get("r", 8))
        if key == "lora_A.weight":  # (n r, in) -> (3 r, in): zero rows for a matrix left out
            if tensor.shape[0] != len(matrices) * r:
                raise ConfigError(f"lora_A has {tensor.shape[0]} rows, not r={r} per matrix of {matrices}")
            return self.spread_over_thirds(tensor, matrices, 0.0)
        d = tensor.shape[0] // len(matrices)  # (n d, r) -> (3 d, 3 r), block diagonal
        if tensor.shape != (len(matrices) * d, r):
            raise ConfigError(f"lora_B has shape {tuple(tensor.shape)}, not ({len(matrices)} * d, r={r})")
        out = tensor.new_zeros((3 * d, 3 * r))
        for g, m in enumerate(matrices):
            i = MATRICES.index(m)
            out[i * d:(i + 1) * d, i * r:(i + 1) * r] = tensor[g * d:(g + 1) * d]
        return out

    def tensor_out(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None, *,
                   module: str = "") -> Any:
        if not is_fused(options, model_type, module) or key != "lora_B.weight":
            return tensor  # lora_A (3 r, in) is already the groups' rows in q, k, v order
        r, d = tensor.shape[1] // 3, tensor.shape[0] // 3
        blocks = [tensor[i * d:(i + 1) * d, i * r:(i + 1) * r] for i in range(3)]
        off = tensor.clone()
        for i in range(3):
            off[i * d:(i + 1) * d, i * r:(i + 1) * r] = 0
        if off.abs().max() > 0:
            raise ConfigError("lora_B on the fused c_attn mixes q, k and v (entries off its diagonal blocks are "
                              "not zero), which AdapterHub's grouped LoRA (one rank-r pair per matrix) cannot hold")
        import torch

        return torch.cat(blocks).contiguous()

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}.get(rest, rest)

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        return [key.removesuffix(".weight")] if key in ("lora_A.weight", "lora_B.weight") else [key]
