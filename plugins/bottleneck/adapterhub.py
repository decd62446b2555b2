"""AdapterHub's bottleneck adapters (``adapters``' BnConfig) as seq_bn, double_seq_bn and par_bn.

Every placement ``adapters`` has around the model's own residual and LayerNorm maps onto
options of peftkit's sequential adapters: ``original_ln_before`` (its default Pfeiffer config),
``residual_before_ln`` (true, "post_add", false: our ``original_ln_residual`` output, sum,
normed), ``ln_before``, ``ln_after`` with ``adapter_residual_before_ln`` (our
``ln_after_includes_residual``), and UniPELT's gate ``use_gating`` (``gate.weight`` / ``gate.bias``). ``original_ln_after=false`` (AdapterPlus) skips the model's
LayerNorm, which an adapter on the projection cannot do: refused by name.

Compacter's PHM options (``phm_layer`` and the rest) and the invertible adapter (``inv_adapter``,
``inv_adapter_reduction_factor``) have the same names here. Their adapter-wide tensors are keyed
by ``adapters`` below the model's body: ``shared_parameters.<name>.phm_rule`` and
``invertible_adapters.<name>.F.0.weight`` (see :meth:`BottleneckAdapterHub.shared_key`).
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

#: Every option of ``adapters``' BnConfig with its default, as ``adapters`` 1.3 writes it.
BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
#: Options that must keep one value for peftkit to compute the same function.
REQUIRED = {"original_ln_after": True, "cross_adapter": False}
#: Compacter's options, the same in both libraries.
PHM_OPTIONS = ("phm_layer", "phm_dim", "shared_phm_rule", "factorized_phm_rule", "learn_phm", "shared_W_phm",
               "factorized_phm_W", "phm_rank", "phm_bias", "hypercomplex_nonlinearity", "phm_c_init",
               "phm_init_range")
#: ``adapters``' residual_before_ln (read only with original_ln_before) <-> our original_ln_residual.
RESIDUALS_IN = {True: "output", "post_add": "sum", False: "normed"}
RESIDUALS_OUT = {ours: theirs for theirs, ours in RESIDUALS_IN.items()}
#: Their activation names (transformers' ACT2FN) -> ours.
ACTIVATIONS_IN = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "swish": "swish", "silu": "silu",
                  "tanh": "tanh", "sigmoid": "sigmoid", "leakyrelu": "leaky_relu"}
ACTIVATIONS_OUT = {ours: theirs for theirs, ours in ACTIVATIONS_IN.items()}
#: Decoder families where ``adapters`` hangs bottleneck adapters on the layer (``layers.N.attention_adapters``,
#: ``layers.N.output_adapters``), not on the module around the projection: our site's parent -> theirs.
DECODER_MODULES = {"llama": {"self_attn": "attention_adapters", "mlp": "output_adapters"},
                   "gpt2": {"attn": "attention_adapters", "mlp": "output_adapters"}}


class BottleneckAdapterHub(AdapterHubFormat):
    """One placement of AdapterHub's bottleneck adapter: (mh_adapter, is_parallel), claiming the folders
    with PHM layers or not (``phm``) and with an invertible adapter or not (``inv``); None: either."""

    module_dict = "adapters"
    on_site = False

    def __init__(self, mh_adapter: bool, parallel: bool, phm: bool | None = False, inv: bool | None = False) -> None:
        self.mh_adapter, self.parallel, self.phm, self.inv = mh_adapter, parallel, phm, inv
        # Checked against adapters' fusion: the plain sequential placements (not parallel, PHM or invertible).
        self.fusion_member = not parallel and not phm and not inv
        if phm:  # a PHM folder is Compacter's, with or without an invertible adapter
            self.inv = None
        if parallel:  # peftkit has no parallel presets: par_bn reads them all
            self.phm = self.inv = None

    def claims(self, options: Mapping[str, Any]) -> bool:
        return (options.get("architecture") in (None, "bottleneck")
                and bool(options.get("mh_adapter")) == self.mh_adapter
                and bool(options.get("is_parallel")) == self.parallel
                and bool(options.get("output_adapter", True))
                and self.phm in (None, bool(options.get("phm_layer")))
                and self.inv in (None, bool(options.get("inv_adapter"))))

    def module_for(self, site: str, model_type: str | None) -> str:
        parent = site.rpartition(".")[0]
        layer, _, block = parent.rpartition(".")
        renamed = DECODER_MODULES.get(model_type or "", {}).get(block)
        return f"{layer}.{renamed}" if renamed else parent

    def _check_decoder_placement(self, config: Any, model_type: str | None) -> None:
        """``adapters``' parallel adapter on a decoder layer reads the residual stream before the layer's
        LayerNorm: peftkit's par_bn with read_residual=true."""
        if model_type in DECODER_MODULES and self.parallel and not getattr(config, "read_residual", False):
            raise ConfigError(f"AdapterHub's parallel adapter on model_type={model_type!r} reads the residual "
                              f"stream before the layer's LayerNorm; par_bn reading the feed-forward block's input "
                              f"has no equivalent there: use par_bn[read_residual=true]")

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        if options.get("original_ln_after") is False:
            raise ConfigError("AdapterHub bottleneck option original_ln_after=false (the block's output skips the "
                              "model's own residual and LayerNorm, as in AdapterPlusConfig) is not supported by "
                              "peftkit; only original_ln_after=true")
        self.refuse_changed(options, REQUIRED, "bottleneck")
        scaling = options.get("scaling", 1.0)
        if scaling != "learned" and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
            raise ConfigError(f"AdapterHub bottleneck option scaling={scaling!r} is not supported by peftkit "
                              f"(a number or 'learned')")
        activation = str(options.get("non_linearity", "relu")).lower()
        if activation not in ACTIVATIONS_IN:
            raise ConfigError(f"AdapterHub non_linearity={activation!r} is not supported by peftkit "
                              f"({', '.join(sorted(ACTIVATIONS_IN))})")
        values: dict[str, Any] = {
            "reduction_factor": options.get("reduction_factor", 16), "non_linearity": ACTIVATIONS_IN[activation],
            "scaling": scaling, "dropout": float(options.get("dropout", 0.0)),
            "ln_before": bool(options.get("ln_before")), "leave_out": list(options.get("leave_out") or []),
            "ln_after": bool(options.get("ln_after")), "use_gating": bool(options.get("use_gating")),
            **{key: options[key] for key in PHM_OPTIONS if key in options},
        }
        if options.get("inv_adapter"):
            values["inv_adapter"] = options["inv_adapter"]
            if options.get("inv_adapter_reduction_factor") is not None:
                values["inv_adapter_reduction_factor"] = options["inv_adapter_reduction_factor"]
        if self.parallel and model_type in DECODER_MODULES:
            values["read_residual"] = True  # adapters' parallel adapter there reads the residual stream
        if not self.parallel:  # adapters' parallel adapter reads neither option
            values["ln_after_includes_residual"] = values["ln_after"] and bool(
                options.get("adapter_residual_before_ln"))
            if options.get("original_ln_before"):
                residual = options.get("residual_before_ln", True)
                if residual not in RESIDUALS_IN:
                    raise ConfigError(f"AdapterHub bottleneck option residual_before_ln={residual!r} is not "
                                      f"supported by peftkit (true, 'post_add' or false)")
                values.update(original_ln_before=True, original_ln_residual=RESIDUALS_IN[residual])
        return values

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        for field in ("target_modules", "exclude_modules", "layers_to_transform"):
            if getattr(config, field, None) not in (None, [], ""):
                raise ConfigError(f"{field} is set; AdapterHub places bottleneck adapters only at its fixed points")
        if getattr(config, "residual", True) is False:
            raise ConfigError("residual=false; AdapterHub's adapters always keep their skip connection")
        if config.ln_before and getattr(config, "residual_before_ln", True) is False:
            raise ConfigError("residual_before_ln=false; AdapterHub's skip connection carries the adapter's input")
        if getattr(config, "cross_attention", False):
            raise ConfigError("cross_attention=true has no AdapterHub equivalent")
        if config.phm_layer and config.shared_W_phm and not config.factorized_phm_W:
            raise ConfigError("shared_W_phm=true with factorized_phm_W=false; adapters 1.3 fails to create "
                              "such shared weights (set factorized_phm_W=true)")
        self._check_decoder_placement(config, model_type)
        factor = config.reduction_factor  # adapters looks layers up as str(layer_idx)
        return {**BN_DEFAULTS,
                "reduction_factor": {str(k): v for k, v in factor.items()} if isinstance(factor, dict) else factor,
                "non_linearity": ACTIVATIONS_OUT[config.non_linearity],
                "scaling": config.scaling if config.scaling == "learned" else float(config.scaling),
                "dropout": config.dropout, "ln_before": config.ln_before, "leave_out": list(config.leave_out),
                "use_gating": config.use_gating,
                "mh_adapter": self.mh_adapter, "is_parallel": self.parallel,
                "init_weights": "mam_adapter" if self.parallel else "bert", "ln_after": config.ln_after,
                "adapter_residual_before_ln": getattr(config, "ln_after_includes_residual", False),
                "original_ln_before": getattr(config, "original_ln_before", False),
                "residual_before_ln": RESIDUALS_OUT[getattr(config, "original_ln_residual", "output")],
                **{key: getattr(config, key) for key in PHM_OPTIONS},
                "inv_adapter": config.inv_adapter,
                "inv_adapter_reduction_factor": config.inv_adapter_reduction_factor if config.inv_adapter else None}

    def shared_key(self, tensor_name: str, adapter: str) -> str | None:
        """``adapters``' key, below the model's body, of the adapter-wide tensor ``tensor_name``."""
        if tensor_name.startswith("inv_"):
            _, net, index, leaf = tensor_name.split("_")
            return f"invertible_adapters.{adapter}.{net}.{index}.{leaf}"
        return f"shared_parameters.{adapter}.{tensor_name}"

    # adapters' down projection is a Sequential: [LayerNorm (ln_before)], Linear, activation;
    # its LayerNorm is also registered as adapter_norm_before, so torch.save writes it twice.

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        ln_before = bool(options.get("ln_before"))
        if rest == "scaling":
            return "adapter_scaling"
        if rest.startswith("adapter_norm_before."):
            return "adapter_norm." + rest.split(".", 1)[1]
        head, _, leaf = rest.rpartition(".")
        if head == "adapter_down.0":
            return None if ln_before else "adapter_down." + leaf
        if head == "adapter_down.1" and ln_before:
            return "adapter_down." + leaf
        return rest

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        ln_before = bool(options.get("ln_before"))
        head, _, leaf = key.partition(".")
        if key == "adapter_scaling":
            return ["scaling"]
        if head == "adapter_norm":
            return [f"adapter_norm_before.{leaf}", f"adapter_down.0.{leaf}"]
        if head == "adapter_down":
            return [f"adapter_down.{1 if ln_before else 0}.{leaf}"]
        return [key]
