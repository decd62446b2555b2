"""AdapterHub's LoRA (``adapters``' LoRAConfig) on the self-attention projections of BERT-family, Llama and GPT-2.

``adapters`` computes ``W x + (alpha / r) * B A x`` like peftkit, with ``lora_A`` (r, in) and
``lora_B`` (out, r) saved as bare parameters on the adapted layer. Its other placements
(intermediate_lora, output_lora), IA3 (composition_mode="scale") and VeRA are refused. UniPELT's gate
(``use_gating``: ``gate.weight`` / ``gate.bias`` beside the factors) maps to ours, except on GPT-2's fused layer.

GPT-2's q, k and v come from one fused layer, ``c_attn`` (out = 3d). There ``adapters`` keeps one
rank-r pair per matrix named in ``attn_matrices`` (n of them): ``lora_A`` (n r, in) and ``lora_B``
(n d, r), applied as a grouped product (group g: ``B_g A_g x`` into matrix g's third of the output).
peftkit loads it as one LoRA on ``c_attn`` of rank 3r with ``alpha`` 3 alpha (the same scale): A
holds the groups' rows (zero rows for a matrix left out) and B is block diagonal (zero blocks off
it), so the output is the same. Saving writes ``attn_matrices`` q, k, v with r = rank / 3 and B's
diagonal blocks, and refuses a B with anything off them (a LoRA trained from peftkit's own init).
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

#: Every option of ``adapters``' LoRAConfig with its default, as ``adapters`` 1.3 writes it.
LORA_DEFAULTS: dict[str, Any] = {
    "alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
    "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False,
    "leave_out": [], "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False,
    "use_gating": False, "vera_b": None, "vera_d": None,
}
REQUIRED = {"selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "composition_mode": "add",
            "use_dora": False, "vera_b": None, "vera_d": None, "leave_out": []}
#: Per model type: ``attn_matrices`` letter -> the self-attention projection's module name.
_BERT_MATRICES = {"q": "query", "k": "key", "v": "value"}
MATRICES_BY_TYPE = {"bert": _BERT_MATRICES, "roberta": _BERT_MATRICES, "xlm-roberta": _BERT_MATRICES,
                    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj"}}
#: Per model type with a fused q/k/v layer: its module name (``adapters``' LoRAMergedLinear).
FUSED_BY_TYPE = {"gpt2": "c_attn"}
#: The fused layer's output thirds, in order.
FUSED_ORDER = ("q", "k", "v")


def _fused_matrices(options: Mapping[str, Any]) -> list[str]:
    matrices = list(options.get("attn_matrices", ["q", "v"]))
    if not matrices or any(m not in FUSED_ORDER for m in matrices):
        raise ConfigError(f"AdapterHub LoRA with attn_matrices={matrices} on GPT-2's fused c_attn is not supported "
                          f"by peftkit (q, k and v only)")
    return [m for m in FUSED_ORDER if m in matrices]


def _refuse_fused_gating(use_gating: bool) -> None:
    if use_gating:
        raise ConfigError("AdapterHub LoRA option use_gating=true on GPT-2's fused c_attn (one gate per q/k/v "
                          "third) is not supported by peftkit; gated LoRA maps on separate projections only")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


class LoraAdapterHub(AdapterHubFormat):
    module_dict = "loras"
    on_site = True

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "lora" and options.get("composition_mode", "add") == "add"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        self.refuse_changed(options, REQUIRED, "LoRA")
        if model_type in FUSED_BY_TYPE:
            _refuse_fused_gating(bool(options.get("use_gating")))
            _fused_matrices(options)
            r = int(options.get("r", 8))
            return {"r": 3 * r, "alpha": _number(3 * options.get("alpha", 8)),
                    "dropout": float(options.get("dropout", 0.0)), "target_modules": [FUSED_BY_TYPE[model_type]]}
        matrices = list(options.get("attn_matrices", ["q", "v"]))
        table = MATRICES_BY_TYPE.get(model_type or "", {})
        if not table or any(m not in table for m in matrices):
            raise ConfigError(f"AdapterHub LoRA with attn_matrices={matrices} on model_type={model_type!r} is not "
                              f"supported by peftkit yet (q, k, v on {', '.join(MATRICES_BY_TYPE)})")
        return {"r": int(options.get("r", 8)), "alpha": options.get("alpha", 8),
                "dropout": float(options.get("dropout", 0.0)), "target_modules": [table[m] for m in matrices],
                "use_gating": bool(options.get("use_gating"))}

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        self._refuse_options(config)
        if model_type in FUSED_BY_TYPE:
            fused = FUSED_BY_TYPE[model_type]
            _refuse_fused_gating(config.use_gating)
            if config.target_modules not in ([fused], fused) or config.r % 3:
                raise ConfigError(f"target_modules={config.target_modules!r} with r={config.r}; AdapterHub's LoRA on "
                                  f"{model_type} adapts the fused {fused} only, with one rank per q, k and v (r a "
                                  f"multiple of 3)")
            return {**LORA_DEFAULTS, "r": config.r // 3, "alpha": _number(config.alpha / 3), "dropout": config.dropout,
                    "attn_matrices": list(FUSED_ORDER)}
        table = MATRICES_BY_TYPE.get(model_type or "", {})
        targets = config.target_modules if isinstance(config.target_modules, list) else None
        if config.target_modules is None and table:  # peftkit's default there: the query and value projections
            targets = [table["q"], table["v"]]
        if not targets or any(t not in table.values() for t in targets):
            names = "/".join(table.values()) or f"none on model_type={model_type!r}"
            raise ConfigError(f"target_modules={config.target_modules!r}; AdapterHub's LoRA adapts the "
                              f"self-attention projections {names} only")
        return {**LORA_DEFAULTS, "r": config.r, "alpha": config.alpha, "dropout": config.dropout,
                "attn_matrices": [m for m, module in table.items() if module in targets],
                "use_gating": config.use_gating}

    @staticmethod
    def _refuse_options(config: Any) -> None:
        for field, off in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                           ("exclude_modules", None), ("layers_to_transform", None), ("lora_bias", False),
                           ("trainable_token_indices", None)):
            if getattr(config, field, off) not in (off, None, [], {}):
                raise ConfigError(f"{field}={getattr(config, field)!r} has no AdapterHub equivalent")

    def tensor_in(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None) -> Any:
        if model_type not in FUSED_BY_TYPE or key not in ("lora_A.weight", "lora_B.weight"):
            return tensor
        matrices, r = _fused_matrices(options), int(options.get("r", 8))
        if key == "lora_A.weight":  # (n r, in) -> (3 r, in): zero rows for a matrix left out
            if tensor.shape[0] != len(matrices) * r:
                raise ConfigError(f"lora_A has {tensor.shape[0]} rows, not r={r} per matrix of {matrices}")
            out = tensor.new_zeros((3 * r, tensor.shape[1]))
            for g, m in enumerate(matrices):
                i = FUSED_ORDER.index(m)
                out[i * r:(i + 1) * r] = tensor[g * r:(g + 1) * r]
            return out
        d = tensor.shape[0] // len(matrices)  # (n d, r) -> (3 d, 3 r), block diagonal
        if tensor.shape != (len(matrices) * d, r):
            raise ConfigError(f"lora_B has shape {tuple(tensor.shape)}, not ({len(matrices)} * d, r={r})")
        out = tensor.new_zeros((3 * d, 3 * r))
        for g, m in enumerate(matrices):
            i = FUSED_ORDER.index(m)
            out[i * d:(i + 1) * d, i * r:(i + 1) * r] = tensor[g * d:(g + 1) * d]
        return out

    def tensor_out(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None) -> Any:
        if model_type not in FUSED_BY_TYPE or key != "lora_B.weight":
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
