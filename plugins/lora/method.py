"""The LoRA method: sites, layer creation, PEFT's file format."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import (AdapterConfig, ConfigError, Method, pattern_value, read_peft_fields, Site,
                                write_peft_fields)

from .adapterhub import LoraAdapterHub
from .config import is_known_init, is_linear_only_init, LoraConfig
from .sites import ParameterSite

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

#: PEFT LoraConfig fields -> ours.
_FROM_PEFT = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "use_rslora",
              "use_dora": "use_dora", "init_lora_weights": "init_weights", "rank_pattern": "rank_pattern",
              "alpha_pattern": "alpha_pattern", "target_modules": "target_modules",
              "exclude_modules": "exclude_modules", "layers_to_transform": "layers_to_transform",
              "modules_to_save": "modules_to_save", "target_parameters": "target_parameters",
              "layers_pattern": "layers_pattern", "lora_bias": "lora_bias",
              "trainable_token_indices": "trainable_token_indices"}
#: PEFT fields we read but that need no setting of ours, or that must keep their default.
_PEFT_DEFAULTS: dict[str, Any] = {"bias": "none", "use_qalora": False,
                                  "layer_replication": None}
_PEFT_IGNORED = {"fan_in_fan_out", "megatron_core", "megatron_config", "qalora_group_size", "peft_type",
                 "ensure_weight_tying"}
#: PEFT's EvaConfig fields (adapter_config.json's "eva_config") -> ours.
_EVA_FIELDS = {"rho": "eva_rho", "tau": "eva_tau", "use_label_mask": "eva_use_label_mask",
               "label_mask_value": "eva_label_mask_value", "whiten": "eva_whiten",
               "adjust_scaling_factors": "eva_adjust_scaling_factors"}
#: ``peft_type`` of a gated LoRA (UniPELT's, use_gating=true): a type PEFT does not have, so PEFT refuses the folder.
#: PEFT 0.21 has no gates: it drops use_gating with only a warning and would load plain LoRA, its gate weights
#: unexpected keys (the folder it writes back does not load in peftkit either).
GATED_TYPE = "LORA_GATED"
#: The layer types LoRA adapts (for error messages).
_ADAPTED = "Linear, transformers' Conv1D, Embedding and torch's Conv1d/Conv2d/Conv3d layers"


class LoraMethod(Method):
    name = "lora"
    config_class = LoraConfig
    description = ("Low-rank adaptation (LoRA), with rsLoRA, DoRA, PiSSA/OLoRA/orthogonal/MiCA/EVA init, LoRA+ and "
                   "MoE expert parameters; mergeable; PEFT format")
    can_merge = True
    merge_low_rank = True
    peft_type = "LORA"
    extra_file_types = frozenset({GATED_TYPE})
    adapterhub = LoraAdapterHub()
    aliases = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights",
               "init": "init_weights"}
    known_as = {
        "dora": "DoRA is LoRA with weight decomposition: lora[use_dora=true]",
        "rslora": "rsLoRA is LoRA with rank-stabilized scaling: lora[use_rslora=true]",
        "pissa": "PiSSA is LoRA initialised from the weight's SVD: lora[init_weights=pissa] (fast: pissa_niter_4)",
        "olora": "OLoRA is LoRA initialised from the weight's QR decomposition: lora[init_weights=olora]",
        "eva": "EVA is LoRA initialised from the SVD of layer inputs: lora[init=eva] (peftkit train runs it on "
               "the training data; in Python peftkit.initialize_eva)",
        "loraplus": "LoRA+ is LoRA trained with a larger lr for B: peftkit train --lora-plus-ratio 16, "
                    "or peftkit.lora_plus_optimizer",
        "qlora": "QLoRA is LoRA on a 4-bit base model: peftkit train --quantize 4bit, or "
                 "peftkit.adapt(a model loaded with BitsAndBytesConfig(load_in_4bit=True), 'lora')",
    }

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: Any) -> list[Site]:
        """The adapted layers, and the embeddings whose rows trainable_token_indices trains (tokens.py)."""
        assert isinstance(config, LoraConfig)
        sites = self._layer_sites(model, config, arch)
        if config.trainable_token_indices is None:
            return sites
        from .tokens import token_sites

        return sites + token_sites(model, config, arch, sites)

    def _layer_sites(self, model: "nn.Module", config: LoraConfig, arch: Any) -> list[Site]:
        from peftkit.plugin_api import adaptable_targets, is_conv, is_embedding, is_linear_like

        if config.layers_pattern:  # None, [] and "" (PEFT: any layer pattern) take the architecture's numbering
            return _in_pattern_layers(model, config, arch, self._layer_sites)
        if config.target_parameters:
            return self._module_and_parameter_sites(model, config, arch)
        names = adaptable_targets(model, config, arch, self.name, label="LoRA", kinds=_ADAPTED,
                                  accepts=lambda m: is_linear_like(m) or is_embedding(m) or is_conv(m))
        return [Site(name) for name in names]

    def _module_and_parameter_sites(self, model: "nn.Module", config: LoraConfig, arch: Any) -> list[Site]:
        """With target_parameters: the modules holding them, plus target_modules' layers when it names
        any (None or [] adapts parameters only, as in PEFT)."""
        from .parameters import parameter_sites

        held = parameter_sites(model, config, arch)
        if not config.target_modules:
            config.target_modules = []
            return list(held)
        layers = self._layer_sites(model, config.replace(target_parameters=None), arch)
        both = {s.name for s in layers} & {s.name for s in held}
        if both:
            raise ConfigError(f"lora: {sorted(both)[0]} is targeted both as a module (target_modules) and through "
                              f"its parameters (target_parameters); name it in one of them")
        return layers + list(held)

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        from .conv import LoraConv, check_conv_site
        from .layer import LoraEmbedding, LoraLinear

        from .tokens import token_layer, TokenPartSite

        assert isinstance(config, LoraConfig)
        if isinstance(site, ParameterSite):
            return _parameter_adapter(site, base_layer, config)
        if isinstance(site, TokenPartSite):
            return token_layer(site, base_layer, config, model)
        r = pattern_value(site.name, config.rank_pattern, config.r)
        alpha = pattern_value(site.name, config.alpha_pattern, config.alpha)
        scale = alpha / (r ** 0.5) if config.use_rslora else alpha / r
        from peftkit.plugin_api import is_conv, is_embedding, is_linear_like

        if config.use_dora:
            from peftkit.plugin_api import quantization_of

            quantized = quantization_of(base_layer)
            if quantized:
                raise ConfigError(f"lora: DoRA rescales the base weight's rows, but {site.name} is quantized "
                                  f"({quantized}); use plain LoRA on a quantized model (QLoRA), or DoRA on an "
                                  f"unquantized one")
        linear = is_linear_like(base_layer) and not is_embedding(base_layer) and not is_conv(base_layer)
        if is_linear_only_init(config.init_weights) and not linear:
            raise ConfigError(f"lora: init_weights={config.init_weights!r} applies to linear layers only, and "
                              f"{site.name} is a {type(base_layer).__name__}; exclude it (exclude_modules) or "
                              f"use another init")
        if config.use_gating:
            return _gated_adapter(site.name, base_layer, r, scale, config)
        if is_embedding(base_layer):
            init = True if config.init_weights == "eva" else config.init_weights
            for option_name, on in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias)):
                if on:
                    raise ConfigError(f"lora: {option_name}=true is not available for Embedding layers ({site.name}), "
                                      f"as in PEFT; exclude it (exclude_modules) or set {option_name}=false")
            return LoraEmbedding(base_layer, r, scale, init)
        if is_conv(base_layer):
            check_conv_site(site.name, base_layer, r, config.use_dora)
            init = True if config.init_weights == "eva" else config.init_weights
            return LoraConv(base_layer, r, scale, config.dropout, init, config.use_dora, config.lora_bias)
        # EVA's A comes later from data (initialize_eva); until then the layer has the default init.
        init = True if config.init_weights == "eva" else config.init_weights
        return LoraLinear(base_layer, r, scale, config.dropout, init, config.use_dora, config.lora_bias)

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """The rows trainable_token_indices trains (tokens.py); nothing else is shared."""
        from .tokens import token_shared_state

        assert isinstance(config, LoraConfig)
        return token_shared_state(model, config, sites)

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        return {}  # the rows are saved by each site's module, under PEFT's keys

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of, is_conv, is_embedding, linear_features

        from .tokens import token_parameter_count, TokenPartSite

        assert isinstance(config, LoraConfig)
        total = token_parameter_count(model, config, sites)
        for site in sites:
            if isinstance(site, TokenPartSite):
                continue
            base = base_of(model.get_submodule(site.name))
            if isinstance(site, ParameterSite):
                total += sum(_parameter_count(getattr(base, p), pattern_value(f"{site.name}.{p}", config.rank_pattern,
                                                                              config.r)) for p in site.parameters)
                continue
            r = pattern_value(site.name, config.rank_pattern, config.r)
            if is_embedding(base):
                total += r * (base.num_embeddings + base.embedding_dim)
                continue
            if is_conv(base):  # A: (r, in, *kernel), B: (out, r / groups, 1, ...)
                kernel = math.prod(base.kernel_size)
                total += r * base.in_channels * kernel + base.out_channels * (r // base.groups)
                total += base.out_channels * (int(config.use_dora) + int(config.lora_bias))
                continue
            in_f, out_f = linear_features(base)
            total += r * (in_f + (0 if config.init_weights == "mica" else out_f))
            total += out_f * (int(config.use_dora) + int(config.lora_bias))
            total += in_f + 1 if config.use_gating else 0
        return total

    def training_callbacks(self, model: Any, adapter_name: str) -> list[Any]:
        """EVA (init_weights="eva") runs on the first training batches when training begins."""
        from .eva import eva_pending

        if not eva_pending(model, adapter_name):
            return []
        from .eva_training import EvaCallback

        return [EvaCallback(model, adapter_name)]

    # -- PEFT's adapter_config.json ---------------------------------------------------

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """LORA, but None for a gated LoRA (use_gating=true): PEFT has no gates."""
        assert isinstance(config, LoraConfig)
        return None if config.use_gating else self.peft_type

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, LoraConfig)
        ours = config.to_dict()
        eva = {peft: ours[mine] for peft, mine in _EVA_FIELDS.items()} if config.init_weights == "eva" else None
        # PEFT has no gates: use_gating is written only when set, under a type PEFT does not have.
        gating = {"use_gating": True} if config.use_gating else {}
        return write_peft_fields(self.peft_type_of(config) or GATED_TYPE, ours, _FROM_PEFT, bias="none",
                                 fan_in_fan_out=False, eva_config=eva, **gating)

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        eva = data.pop("eva_config", None) or {}
        gating = bool(data.pop("use_gating", False))
        _check_loftq(data.pop("loftq_config", None), data.get("init_lora_weights"))
        if data.get("peft_type") == GATED_TYPE and not gating:  # earlier versions wrote LORA with use_gating
            raise ConfigError(f"peft_type {GATED_TYPE!r} is a gated LoRA, but the file has no use_gating=true; the "
                              f"file is damaged or was edited: save the adapter again")
        values = read_peft_fields(data, self.name, _FROM_PEFT, fixed=_PEFT_DEFAULTS, ignored=_PEFT_IGNORED)
        if gating:
            values["use_gating"] = True
        values.update(read_peft_fields(eva, f"{self.name} (eva_config)", _EVA_FIELDS))
        init = values.get("init_weights")
        if not is_known_init(init):
            # PEFT's other inits only matter before training; LoRA-GA's ("lora_ga", which moves part of the
            # base weight into the factors) comes with its lora_ga_config, refused above as a setting peftkit lacks.
            values["init_weights"] = True
        return LoraConfig.from_dict(values)


def _check_loftq(loftq: Any, init: Any) -> None:
    """A folder trained from LoftQ's init: its ``loftq_config`` only records how the factors started (PEFT's LoftQ
    guide saves the adapter with init_lora_weights=true beside the LoftQ-quantized base model), so it loads like
    any LoRA. With init_lora_weights="loftq" still set, PEFT would run LoftQ again while loading (quantizing the
    base weights with bitsandbytes on a GPU and replacing them): refused, naming the fix."""
    if loftq and init == "loftq":
        raise ConfigError("PEFT setting init_lora_weights=\"loftq\" makes PEFT run LoftQ again when it loads the "
                          "folder (it quantizes and replaces the base weights); peftkit does not run LoftQ. Load the "
                          "adapter onto the LoftQ-quantized base model saved with it, after setting "
                          "\"init_lora_weights\": true in adapter_config.json (as PEFT's LoftQ guide saves it)")


def _in_pattern_layers(model: "nn.Module", config: LoraConfig, arch: Any, sites_of: Any) -> list[Site]:
    """The sites of ``config`` whose layer index, read as PEFT reads it with ``layers_pattern`` (the first number
    after ".<pattern>."), is in ``layers_to_transform``."""
    import re

    from peftkit.plugin_api import TargetError

    every = config.replace(layers_pattern=None, layers_to_transform=None)
    found = sites_of(model, every, arch)
    config.target_modules = every.target_modules  # the architecture's defaults, when it named none
    patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else list(config.layers_pattern)
    keep = config.layers_to_transform
    keep = [keep] if isinstance(keep, int) else keep

    def index(name: str) -> int | None:
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                return int(match.group(1))
        return None
    kept = [site for site in found if index(site.name) in keep]
    if not kept:
        raise TargetError(f"lora: no targeted module is in layers {keep} under layers_pattern="
                          f"{config.layers_pattern!r} (the number after '.<pattern>.' in a module's name); targeted "
                          f"modules: {', '.join(s.name for s in found[:6])}{' ...' if len(found) > 6 else ''}")
    return kept


def _gated_adapter(site: str, base: "nn.Module", r: int, scale: float, config: LoraConfig) -> "nn.Module":
    """UniPELT's gated LoRA at a linear layer (gating.py)."""
    from peftkit.plugin_api import is_conv, is_embedding

    from .gating import GatedLoraLinear

    if is_embedding(base) or is_conv(base):
        raise ConfigError(f"lora: use_gating=true gates linear layers only, and {site} is a {type(base).__name__}; "
                          f"exclude it (exclude_modules) or set use_gating=false")
    return GatedLoraLinear(base, r, scale, config.dropout, config.init_weights)


def _parameter_adapter(site: ParameterSite, base: "nn.Module", config: LoraConfig) -> "nn.Module":
    """LoRA on the parameters of ``site`` (rank_pattern / alpha_pattern keys match the parameter names)."""
    from .parameters import check_parameter_config, LoraParameters

    check_parameter_config(config, site.name)
    ranks, scales = [], []
    for name in site.parameters:
        full = f"{site.name}.{name}"
        r = pattern_value(full, config.rank_pattern, config.r)
        alpha = pattern_value(full, config.alpha_pattern, config.alpha)
        ranks.append(r)
        scales.append(alpha / (r ** 0.5) if config.use_rslora else alpha / r)
    init = True if config.init_weights == "eva" else config.init_weights  # EVA sets Linear layers only
    return LoraParameters(base, site.parameters, ranks, scales, init)


def _parameter_count(param: Any, r: int) -> int:
    """LoRA's factors on a 2-D (out, in) or 3-D (experts, a, b) parameter: r per expert on each side."""
    experts = param.shape[0] if param.dim() == 3 else 1
    return r * experts * sum(param.shape[-2:])
