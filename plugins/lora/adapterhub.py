"""AdapterHub's LoRA (``adapters``' LoRAConfig) on the self-attention projections of BERT-family and Llama models.

``adapters`` computes ``W x + (alpha / r) * B A x`` like peftkit, with ``lora_A`` (r, in) and
``lora_B`` (out, r) saved as bare parameters on the adapted layer. Its other placements
(intermediate_lora, output_lora), IA3 (composition_mode="scale"), gating and VeRA are refused.
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
            "use_gating": False, "use_dora": False, "vera_b": None, "vera_d": None, "leave_out": []}
#: Per model type: ``attn_matrices`` letter -> the self-attention projection's module name.
_BERT_MATRICES = {"q": "query", "k": "key", "v": "value"}
MATRICES_BY_TYPE = {"bert": _BERT_MATRICES, "roberta": _BERT_MATRICES, "xlm-roberta": _BERT_MATRICES,
                    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj"}}


class LoraAdapterHub(AdapterHubFormat):
    module_dict = "loras"
    on_site = True

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "lora" and options.get("composition_mode", "add") == "add"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        self.refuse_changed(options, REQUIRED, "LoRA")
        matrices = list(options.get("attn_matrices", ["q", "v"]))
        table = MATRICES_BY_TYPE.get(model_type or "", {})
        if not table or any(m not in table for m in matrices):
            raise ConfigError(f"AdapterHub LoRA with attn_matrices={matrices} on model_type={model_type!r} is not "
                              f"supported by peftkit yet (q, k, v on {', '.join(MATRICES_BY_TYPE)})")
        return {"r": int(options.get("r", 8)), "alpha": options.get("alpha", 8),
                "dropout": float(options.get("dropout", 0.0)), "target_modules": [table[m] for m in matrices]}

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        targets = config.target_modules if isinstance(config.target_modules, list) else None
        table = MATRICES_BY_TYPE.get(model_type or "", {})
        if not targets or any(t not in table.values() for t in targets):
            names = "/".join(table.values()) or f"none on model_type={model_type!r}"
            raise ConfigError(f"target_modules={config.target_modules!r}; AdapterHub's LoRA adapts the "
                              f"self-attention projections {names} only")
        for field, off in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                           ("exclude_modules", None), ("layers_to_transform", None)):
            if getattr(config, field, off) not in (off, None, [], {}):
                raise ConfigError(f"{field}={getattr(config, field)!r} has no AdapterHub equivalent")
        return {**LORA_DEFAULTS, "r": config.r, "alpha": config.alpha, "dropout": config.dropout,
                "attn_matrices": [m for m, module in table.items() if module in targets]}

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}.get(rest, rest)

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        return [key.removesuffix(".weight")] if key in ("lora_A.weight", "lora_B.weight") else [key]
