"""AdapterHub's (IA)^3 (``adapters``' IA3Config: LoRAConfig with composition_mode="scale") as ia3.

``adapters`` multiplies the output of each layer it adapts by ``alpha * lora_B`` (out, 1): the self-attention
projections named in ``attn_matrices`` and, with ``intermediate_lora`` / ``output_lora``, the feed-forward layers
its LoRA takes (BERT ``intermediate.dense`` / ``layer.N.output.dense``, Llama ``mlp.down_proj`` / ``mlp.up_proj``,
GPT-2 ``mlp.c_fc`` / ``mlp.c_proj``); even the "intermediate" layer's output is scaled. That is peftkit's ia3
with those targets and no feed-forward (input-scaled) modules. The places, and ``leave_out`` written as
``exclude_modules``, are the lora plugin's translation (:meth:`LoraAdapterHub.placement_targets`), shared
through the registry. ``alpha`` is folded into the vectors on load; saving writes ``alpha=1``.

On GPT-2's fused ``c_attn`` ``adapters`` keeps one vector for the n matrices of ``attn_matrices`` (n d) and
scales the other thirds of the output by ``alpha`` alone: peftkit loads one (3d, 1) vector holding ``alpha``
there (the MLP's vectors are left as they are), and saves ``attn_matrices`` q, k, v. ``use_gating`` (a gate
that replaces ``alpha``) is refused.
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
REQUIRED = {"r": 1, "use_gating": False, "use_dora": False, "vera_b": None, "vera_d": None, "dropout": 0.0}


def _places() -> Any:
    """The lora plugin's AdapterHub translation, which knows where ``adapters`` puts LoRA and IA3."""
    from peftkit.plugin_api import get_method

    return get_method("lora").adapterhub


def _alpha(options: Mapping[str, Any]) -> float:
    alpha = options.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"AdapterHub IA3 option alpha={alpha!r} is not supported by peftkit (a number)")
    return float(alpha)


class IA3AdapterHub(AdapterHubFormat):
    module_dict = "loras"
    on_site = True

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "lora" and options.get("composition_mode") == "scale"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        options = {**IA3_DEFAULTS, **options}
        self.refuse_changed(options, REQUIRED, "IA3")
        _alpha(options)
        return {**_places().placement_targets(options, model_type, "IA3"), "feedforward_modules": []}

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        if config.feedforward_modules:
            raise ConfigError(f"feedforward_modules={config.feedforward_modules!r}; AdapterHub's IA3 scales the "
                              f"outputs of the layers it adapts, never their inputs (feedforward_modules=[])")
        return {**IA3_DEFAULTS, **_places().placement_options(config, model_type, "IA3")}

    def tensor_in(self, key: str, tensor: Any, options: Mapping[str, Any], model_type: str | None, *,
                  module: str = "") -> Any:
        """``alpha * lora_B``; on GPT-2's fused layer the whole output's vector, ``alpha`` in a third left out."""
        if key != "ia3_l":
            return tensor
        options = {**IA3_DEFAULTS, **options}
        fused = _places().fused_matrices(options, model_type, module)
        if 0 < len(fused) < 3:  # the thirds left out are scaled by alpha alone
            tensor = _places().spread_over_thirds(tensor, fused, 1.0)
        return tensor * _alpha(options)

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        return "ia3_l" if rest == "lora_B" else rest

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        return ["lora_B"] if key == "ia3_l" else [key]
