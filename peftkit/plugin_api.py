"""The plugin API: everything a tuning-method plugin may use, and nothing else.

A method plugin (built-in or third-party) imports from this module only, plus
its own package, torch, transformers, safetensors and the standard library::

    from peftkit.plugin_api import PLUGIN_API_VERSION, AdapterConfig, LayerAdapter, Method, Site, hookimpl

The names listed in ``__all__`` keep their meaning and signature for every
peftkit that implements the same ``PLUGIN_API_VERSION``; a change that breaks
a plugin raises that version, and peftkit then refuses plugins written for
the old one with a message naming the fix (see docs/plugins.md, "The plugin
API"). Where a name is defined inside ``peftkit.core`` is not part of the
promise.

Like ``import peftkit``, importing this module does not import torch: each
name loads on first use, so loading plugins (``peftkit methods``) stays fast.
This module imports only the core; the core never imports it (see
docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.core.hookspecs import PLUGIN_API_VERSION, hookimpl
from peftkit.core.lazy_names import lazy_attributes

_LAZY: dict[str, str] = {
    # the method interface
    "Method": "peftkit.core.method",
    "Site": "peftkit.core.method",
    "ALL_BLOCKS": "peftkit.core.method",
    "AdapterConfig": "peftkit.core.config",
    "option": "peftkit.core.config",
    "LayerAdapter": "peftkit.core.layer",
    "ModelAdapter": "peftkit.core.layer",
    "PointOutputAdapter": "peftkit.core.output_points",
    "EMBEDDING_OUTPUT": "peftkit.core.output_points",
    "TunerLayer": "peftkit.core.layer",
    "adapters_at": "peftkit.core.layer",
    "layer_adapters_of": "peftkit.core.method_training",
    "SharedState": "peftkit.core.shared_state",
    "SequenceGate": "peftkit.core.gates",
    "VirtualTokenMethod": "peftkit.core.virtual_tokens",
    "AdapterHubFormat": "peftkit.core.adapterhub_format",
    # errors
    "PeftkitError": "peftkit.core.errors",
    "ConfigError": "peftkit.core.errors",
    "TargetError": "peftkit.core.errors",
    "PluginError": "peftkit.core.errors",
    "MergeError": "peftkit.core.errors",
    "AdapterLoadError": "peftkit.core.errors",
    # model families and finding sites
    "ArchitectureSpec": "peftkit.core.architectures",
    "architecture_for": "peftkit.core.plugins",
    "base_of": "peftkit.core.targets",
    "is_linear_like": "peftkit.core.targets",
    "is_conv": "peftkit.core.targets",
    "is_embedding": "peftkit.core.targets",
    "find_targets": "peftkit.core.targets",
    "adaptable_targets": "peftkit.core.targets",
    "find_point": "peftkit.core.targets",
    "iter_candidate_modules": "peftkit.core.targets",
    "name_matches": "peftkit.core.targets",
    "pattern_value": "peftkit.core.targets",
    "layer_index": "peftkit.core.targets",
    "output_head_names": "peftkit.core.targets",
    # base layers: shape, layout, quantization
    "is_conv1d": "peftkit.core.base_layers",
    "linear_features": "peftkit.core.base_layers",
    "weight_out_in": "peftkit.core.base_layers",
    "plain_linear": "peftkit.core.base_layers",
    "fusable_linear": "peftkit.core.base_layers",
    "accumulating_gemm_is_fast": "peftkit.core.base_layers",
    "quantization_of": "peftkit.core.base_layers",
    "adapter_dtype": "peftkit.core.base_layers",
    "adapter_precision": "peftkit.core.base_layers",
    "kept_scaled_transpose": "peftkit.core.base_layers",
    "to_dtype": "peftkit.core.base_layers",
    "fused_lora": "peftkit.core.fused_lora",
    "dora_norm": "peftkit.core.fused_lora",
    "norm_joins_base_product": "peftkit.core.fused_lora",
    "rotate_blocks": "peftkit.core.block_rotation",
    "kept_while_unchanged": "peftkit.core.kept_values",
    # PEFT's adapter_config.json fields
    "read_peft_fields": "peftkit.core.peft_format",
    "write_peft_fields": "peftkit.core.peft_format",
    "refuse_fields_peft_lacks": "peftkit.core.peft_format",
    # hot-swapping a layer adapter's weights
    "swap_plan": "peftkit.core.swap_plan",
    "scaled_swap_plan": "peftkit.core.swap_plan",
    # a model's forward arguments (model-level adapters: prompts, prefixes)
    "CACHE_ARGUMENTS": "peftkit.core.model_inputs",
    "batch_size": "peftkit.core.model_inputs",
    "bind_arguments": "peftkit.core.model_inputs",
    "cache_argument": "peftkit.core.model_inputs",
    "check_growing_cache": "peftkit.core.model_inputs",
    "extend_mask": "peftkit.core.model_inputs",
    "note_prefix": "peftkit.core.model_inputs",
    "pop_cache": "peftkit.core.model_inputs",
    "real_length": "peftkit.core.model_inputs",
    "starts_sequence": "peftkit.core.model_inputs",
    "text_config": "peftkit.core.model_inputs",
    "model_source_options": "peftkit.core.model_source",
    # virtual-token methods (prompt and prefix tuning)
    "LAYER_SELECTION_FIELDS": "peftkit.core.virtual_tokens",
    "check_num_virtual_tokens": "peftkit.core.virtual_tokens",
    "check_num_transformer_submodules": "peftkit.core.virtual_tokens",
    "refuse_layer_selection": "peftkit.core.virtual_tokens",
    "on_model_device": "peftkit.core.virtual_tokens",
    # other methods (a method made of other methods' parts)
    "get_registry": "peftkit.core.plugins",
    "get_method": "peftkit.core.plugins",
    "parse_spec": "peftkit.core.plugins",
    "unknown_method_message": "peftkit.core.plugins",
}

__all__ = ["PLUGIN_API_VERSION", "hookimpl", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, __all__, "; `peftkit docs plugins#the-plugin-api` lists "
                                                                   "the plugin API (peftkit.plugin_api.__all__)")


if TYPE_CHECKING:  # pragma: no cover
    from peftkit.core.adapterhub_format import AdapterHubFormat  # noqa: F401
    from peftkit.core.architectures import ArchitectureSpec  # noqa: F401
    from peftkit.core.base_layers import (accumulating_gemm_is_fast, adapter_dtype,  # noqa: F401
                                          adapter_precision, fusable_linear, is_conv1d,
                                          kept_scaled_transpose, linear_features, plain_linear,
                                          quantization_of, to_dtype, weight_out_in)
    from peftkit.core.config import AdapterConfig, option  # noqa: F401
    from peftkit.core.block_rotation import rotate_blocks  # noqa: F401
    from peftkit.core.kept_values import kept_while_unchanged  # noqa: F401
    from peftkit.core.fused_lora import dora_norm, fused_lora, norm_joins_base_product  # noqa: F401
    from peftkit.core.gates import SequenceGate  # noqa: F401
    from peftkit.core.errors import (AdapterLoadError, ConfigError, MergeError, PeftkitError,  # noqa: F401
                                     PluginError, TargetError)
    from peftkit.core.swap_plan import scaled_swap_plan, swap_plan  # noqa: F401
    from peftkit.core.layer import LayerAdapter, ModelAdapter, TunerLayer, adapters_at  # noqa: F401
    from peftkit.core.method import ALL_BLOCKS, Method, Site  # noqa: F401
    from peftkit.core.method_training import layer_adapters_of  # noqa: F401
    from peftkit.core.output_points import EMBEDDING_OUTPUT, PointOutputAdapter  # noqa: F401
    from peftkit.core.shared_state import SharedState  # noqa: F401
    from peftkit.core.model_inputs import (CACHE_ARGUMENTS, batch_size, bind_arguments,  # noqa: F401
                                           cache_argument, check_growing_cache, extend_mask, note_prefix,
                                           pop_cache, real_length, starts_sequence, text_config)
    from peftkit.core.model_source import model_source_options  # noqa: F401
    from peftkit.core.peft_format import read_peft_fields, refuse_fields_peft_lacks, write_peft_fields  # noqa: F401
    from peftkit.core.plugins import (architecture_for, get_method, get_registry, parse_spec,  # noqa: F401
                                      unknown_method_message)
    from peftkit.core.targets import (adaptable_targets, base_of, find_point, find_targets,  # noqa: F401
                                      is_conv, is_embedding, is_linear_like, iter_candidate_modules,
                                      layer_index, name_matches, output_head_names, pattern_value)
    from peftkit.core.virtual_tokens import (LAYER_SELECTION_FIELDS, VirtualTokenMethod,  # noqa: F401
                                             check_num_transformer_submodules, check_num_virtual_tokens,
                                             on_model_device, refuse_layer_selection)
