"""AdapterHub's (IA)^3 (``adapters``' IA3Config: LoRAConfig with composition_mode="scale") as ia3.

``adapters`` multiplies the outputs of the self-attention projections it names
(``attn_matrices``) and, with ``intermediate_lora``, of the feed-forward's first layer
(``intermediate.dense``) by ``alpha * lora_B`` (out, 1): peftkit's ia3 with those targets and
no feed-forward (input-scaled) modules. Only ``alpha=1`` (IA3Config's) is read, so the file's
vectors are ours unchanged; BERT-family module names.
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

#: IA3Config's options as ``adapters`` 1.3 writes them.
IA3_DEFAULTS: dict[str, Any] = {
    "alpha": 1, "architecture": "lora", "attn_matrices": ["k", "v"], "composition_mode": "scale", "dropout": 0.0,
    "dtype": None, "init_weights": "ia3", "init_weights_seed": None, "intermediate_lora": True, "leave_out": [],
    "output_lora": False, "r": 1, "selfattn_lora": True, "use_dora": False, "use_gating": False, "vera_b": None,
    "vera_d": None,
}
REQUIRED = {"alpha": 1, "r": 1, "output_lora": False, "use_gating": False, "use_dora": False, "vera_b": None,
            "vera_d": None, "leave_out": [], "dropout": 0.0}
MATRICES = {"q": "query", "k": "key", "v": "value"}
INTERMEDIATE = "intermediate.dense"
MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


class IA3AdapterHub(AdapterHubFormat):
    module_dict = "loras"
    on_site = True

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "lora" and options.get("composition_mode") == "scale"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        self.refuse_changed(options, REQUIRED, "IA3")
        matrices = list(options.get("attn_matrices", ["k", "v"])) if options.get("selfattn_lora", True) else []
        if any(m not in MATRICES for m in matrices) or model_type not in MODEL_TYPES:
            raise ConfigError(f"AdapterHub IA3 with attn_matrices={matrices} on model_type={model_type!r} is not "
                              f"supported by peftkit yet (q, k, v on {', '.join(MODEL_TYPES)})")
        targets = [MATRICES[m] for m in matrices] + ([INTERMEDIATE] if options.get("intermediate_lora") else [])
        if not targets:
            raise ConfigError("AdapterHub IA3 adapts no module (selfattn_lora and intermediate_lora are off)")
        return {"target_modules": targets, "feedforward_modules": []}

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        targets = config.target_modules if isinstance(config.target_modules, list) else None
        allowed = {*MATRICES.values(), INTERMEDIATE}
        if not targets or any(t not in allowed for t in targets) or config.feedforward_modules:
            raise ConfigError(f"target_modules={config.target_modules!r}, feedforward_modules="
                              f"{config.feedforward_modules!r}; AdapterHub's IA3 scales the outputs of query/key/"
                              f"value and {INTERMEDIATE} only (feedforward_modules=[])")
        if getattr(config, "exclude_modules", None) or getattr(config, "layers_to_transform", None) is not None:
            raise ConfigError("exclude_modules / layers_to_transform have no AdapterHub equivalent")
        return {**IA3_DEFAULTS, "attn_matrices": [m for m, module in MATRICES.items() if module in targets],
                "selfattn_lora": any(module in targets for module in MATRICES.values()),
                "intermediate_lora": INTERMEDIATE in targets}

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        return "ia3_l" if rest == "lora_B" else rest

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        return ["lora_B"] if key == "ia3_l" else [key]
