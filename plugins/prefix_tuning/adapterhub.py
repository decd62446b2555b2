"""AdapterHub's prefix tuning (``adapters``' PrefixTuningConfig) on encoder-only and decoder-only models.

``adapters`` keeps one prefix module per adapter in a pool on the model's body
(``<body>prefix_tuning.prefix_tunings.<name>.self_prefix``), registered again under every attention
module (``<attention>.prefix_tuning.pool.prefix_tunings...``: copies of the same tensors). Its prefix is
the flat ``control_trans`` of ``P * layers * 2 * kv_heads * head_dim`` numbers, laid out as PEFT's
``(P, layers * 2 * token_dim)`` prefix, or (``flat=False``, its default) the output of an MLP
``control_trans(wte)``: Linear, non-linearity, Linear, which peftkit computes once at load (as
``adapters``' ``eject_prefix_tuning`` does), so the adapter loads flat. It joins the prefix to the keys and
values inside attention while the tokens keep positions 0..n-1: peftkit's ``token_positions="from_zero"``.
UniPELT's gates (``use_gating``) are ``<attention>.prefix_tuning.prefix_gates.<name>.weight`` / ``.bias``, one
per attention layer: ours ``prefix_gates.<layer>``. ``leave_out``, prefix dropout and encoder-decoder models
are refused by name.
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

#: Every option of ``adapters``' PrefixTuningConfig with its default, as ``adapters`` 1.3 writes it.
PREFIX_DEFAULTS: dict[str, Any] = {
    "architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
    "encoder_prefix": True, "flat": False, "init_weights_seed": None, "leave_out": [], "non_linearity": "tanh",
    "prefix_length": 30, "shared_gating": True, "use_gating": False,
}
#: Options peftkit computes only at these values.
REQUIRED = {"leave_out": [], "dropout": 0.0}
#: The pool module on the model's body, and its copy's name under each attention module.
POOL = "prefix_tuning"
POOL_COPY = "prefix_tuning.pool"
#: The gates' ModuleDict under each attention module's prefix layer.
GATES = "prefix_tuning.prefix_gates"
#: ``adapters``' location key of a self-attention prefix.
LOCATION = "self_prefix"
#: Child names of the attention modules ``adapters`` gives a prefix layer (BERT family, Llama).
_ATTENTION_CHILDREN = (("key", "value"), ("k_proj", "v_proj"))


def _activation(name: str) -> Any:
    import torch

    table = {"tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
             "swish": torch.nn.functional.silu, "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid}
    if name.lower() not in table:
        raise ConfigError(f"AdapterHub prefix tuning option non_linearity={name!r} is not supported by peftkit "
                          f"(one of {', '.join(table)})")
    return table[name.lower()]


class PrefixTuningAdapterHub(AdapterHubFormat):
    module_dict = "prefix_tunings"

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "prefix_tuning"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        self.refuse_changed(options, REQUIRED, "prefix tuning")
        values: dict[str, Any] = {"num_virtual_tokens": int(options.get("prefix_length", 30)),
                                  "token_positions": "from_zero"}
        if options.get("use_gating"):
            values.update(use_gating=True, shared_gating=bool(options.get("shared_gating", True)))
        return values

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        if config.token_positions != "from_zero":
            raise ConfigError(f"token_positions={config.token_positions!r}: AdapterHub's prefix keeps the tokens at "
                              f"positions 0..n-1 (token_positions='from_zero'), where this adapter moves them "
                              f"after its prefix")
        return {**PREFIX_DEFAULTS, "flat": True, "prefix_length": config.num_virtual_tokens,
                "use_gating": config.use_gating, "shared_gating": config.shared_gating}

    def model_tensors_in(self, tensors: Mapping[str, Any], name: str,
                         options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        marker = f"{POOL}.{self.module_dict}.{name}.{LOCATION}."
        copy_marker = f"{POOL_COPY}.{self.module_dict}.{name}.{LOCATION}."
        pool = {key.rpartition(marker)[2]: tensors[key] for key in tensors
                if key.startswith(marker) or f".{marker}" in key}
        used = {key for key in tensors if key.startswith(marker) or f".{marker}" in key or f".{copy_marker}" in key}
        if not pool:
            raise ConfigError(f"the folder has no prefix of adapter {name!r} (no key with {marker!r})")
        prefix_length = int(options.get("prefix_length", 30))
        if set(pool) == {"control_trans"}:  # flat: saved so, or ejected
            flat = pool["control_trans"]
        elif set(pool) == {"wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                           "control_trans.2.weight", "control_trans.2.bias"}:
            flat = self._mlp_output(pool, str(options.get("non_linearity", "tanh")))
        else:
            raise ConfigError(f"the prefix of adapter {name!r} holds {', '.join(sorted(pool))}, neither the flat "
                              f"control_trans nor adapters' MLP (wte, control_trans.0, control_trans.2)")
        if flat.numel() % prefix_length:
            raise ConfigError(f"the prefix of adapter {name!r} has {flat.numel()} numbers, not a multiple of "
                              f"prefix_length={prefix_length}")
        gates, gate_keys = self._gates_in(tensors, name) if options.get("use_gating") else ({}, set())
        return {"prompt_embeddings": flat.reshape(prefix_length, -1), **gates}, used | gate_keys

    @staticmethod
    def _gates_in(tensors: Mapping[str, Any], name: str) -> tuple[dict[str, Any], set[str]]:
        """``prefix_gates.<layer>.<leaf>`` from the keys ``<attention>.prefix_tuning.prefix_gates.<name>.<leaf>``,
        the layer being the one number in the attention module's path."""
        marker = f"{GATES}.{name}."
        gates, used = {}, set()
        for key in tensors:
            module, found, leaf = key.partition(f".{marker}")
            if not found:
                continue
            numbers = [part for part in module.split(".") if part.isdigit()]
            if len(numbers) != 1:
                raise ConfigError(f"the prefix gate {key!r} is under a module whose layer is not one number")
            gates[f"prefix_gates.{int(numbers[0])}.{leaf}"] = tensors[key]
            used.add(key)
        if not gates:
            raise ConfigError(f"the folder's prefix of adapter {name!r} has use_gating=true but no gate "
                              f"(no key with {marker!r})")
        return gates, used

    @staticmethod
    def _mlp_output(pool: Mapping[str, Any], non_linearity: str) -> Any:
        """``control_trans(wte)``: the flat prefix ``adapters``' MLP computes (without dropout)."""
        import torch

        act = _activation(non_linearity)
        with torch.no_grad():
            hidden = act(pool["wte.weight"] @ pool["control_trans.0.weight"].T + pool["control_trans.0.bias"])
            return hidden @ pool["control_trans.2.weight"].T + pool["control_trans.2.bias"]

    def model_tensors_out(self, model: Any, tensors: Mapping[str, Any], name: str,
                          options: Mapping[str, Any]) -> dict[str, Any] | None:
        flat = tensors["prompt_embeddings"].reshape(-1)
        body = getattr(model, "base_model", model)
        prefix = next((f"{n}." for n, m in model.named_children() if m is body), "")
        attention = [n for n, m in model.named_modules()
                     if any(all(hasattr(m, c) for c in pair) for pair in _ATTENTION_CHILDREN)]
        if not attention:
            raise ConfigError(f"{type(model).__name__} has no attention module with key/value (or k_proj/v_proj) "
                              f"projections where adapters puts its prefix")
        rest = f"{self.module_dict}.{name}.{LOCATION}.control_trans"
        out = {f"{prefix}{POOL}.{rest}": flat}
        out.update({f"{site}.{POOL_COPY}.{rest}": flat.clone() for site in attention})
        gates = {key.removeprefix("prefix_gates."): t for key, t in tensors.items() if key.startswith("prefix_gates.")}
        for key, tensor in gates.items():  # "<layer>.<leaf>": the layer's attention module, in model order
            layer, _, leaf = key.partition(".")
            out[f"{attention[int(layer)]}.{GATES}.{name}.{leaf}"] = tensor
        return out
