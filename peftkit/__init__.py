"""peftkit: parameter-efficient fine-tuning as a plugin ecosystem, with an adapter hub.

Quick start::

    import peftkit
    model = peftkit.adapt(base_model, "lora[r=8,alpha=16]")   # adds adapter "default", trainable
    ...train...
    model.save_adapter("out/my-adapter")
    model = peftkit.AdaptedModel.from_pretrained(base_model, "out/my-adapter")

``import peftkit`` does not import torch; the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.core.hookspecs import PLUGIN_API_VERSION, hookimpl
from peftkit.core.lazy_names import lazy_attributes

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # model wrapper and entry points
    "AdaptedModel": "peftkit.core.model",
    "AdapterRecord": "peftkit.core.state",
    "adapt": "peftkit.api",
    "from_pretrained": "peftkit.api",
    "list_methods": "peftkit.api",
    "get_method": "peftkit.core.plugins",
    "get_registry": "peftkit.core.plugins",
    "reload_plugins": "peftkit.core.plugins",
    "use_plugin": "peftkit.core.plugins",
    # plugin author's interface
    "Method": "peftkit.core.method",
    "Site": "peftkit.core.method",
    "AdapterConfig": "peftkit.core.config",
    "LayerAdapter": "peftkit.core.layer",
    "ModelAdapter": "peftkit.core.layer",
    "ArchitectureSpec": "peftkit.core.architectures",
    "parse_shorthand": "peftkit.core.shorthand",
    # composition
    "Stack": "peftkit.core.composition",
    "Average": "peftkit.core.composition",
    "BatchSplit": "peftkit.core.composition",
    "BASE_MODEL": "peftkit.core.composition",
    "Fuse": "peftkit.core.composition",
    "Parallel": "peftkit.core.composition",
    "Split": "peftkit.core.composition",
    "split_parallel": "peftkit.core.composition",
    "FuseConfig": "peftkit.core.fuse_config",
    "merge_adapters": "peftkit.core.merging",
    "auto_compose": "peftkit.learned_composition",
    "merge_to_folder": "peftkit.weight_merge",
    "save_composition": "peftkit.core.composition_io",
    "load_composition": "peftkit.api",
    "parse_composition": "peftkit.api",
    # training (peftkit train, transformers.Trainer)
    "train": "peftkit.training",
    "TrainOptions": "peftkit.training",
    "TrainResult": "peftkit.training",
    "DataError": "peftkit.training_data",
    "PushAfterTrainingError": "peftkit.core.errors",
    "training_callbacks": "peftkit.training_hooks",
    "AdapterTrainer": "peftkit.adapter_trainer",
    # configs of built-in methods
    "LoraConfig": "peftkit.plugins.lora.config",
    "save_as_lora": "peftkit.plugins.lora.convert",
    "initialize_eva": "peftkit.plugins.lora.eva",
    "lora_plus_optimizer": "peftkit.lora_plus",
    "PrefixTuningConfig": "peftkit.plugins.prefix_tuning.config",
    "PromptTuningConfig": "peftkit.plugins.prompt_tuning.config",
    "PTuningConfig": "peftkit.plugins.prompt_tuning.p_tuning_config",
    "SeqBnConfig": "peftkit.plugins.bottleneck.config",
    "DoubleSeqBnConfig": "peftkit.plugins.bottleneck.config",
    "ParBnConfig": "peftkit.plugins.bottleneck.config",
    "BitFitConfig": "peftkit.plugins.bitfit.config",
    "IA3Config": "peftkit.plugins.ia3.config",
    "LokrConfig": "peftkit.plugins.lokr.config",
    "OftConfig": "peftkit.plugins.oft.config",
    "BoftConfig": "peftkit.plugins.boft.config",
    "VeraConfig": "peftkit.plugins.vera.config",
    "PveraConfig": "peftkit.plugins.vera.config",
    "GloraConfig": "peftkit.plugins.glora.config",
    "AdaloraConfig": "peftkit.plugins.adalora.config",
    "UnionConfig": "peftkit.plugins.union.config",
    "MamConfig": "peftkit.plugins.union.config",
    "UniPeltConfig": "peftkit.plugins.union.config",
    "TrainableTokensConfig": "peftkit.plugins.trainable_tokens.config",
    "FourierFTConfig": "peftkit.plugins.fourierft.config",
    "LNTuningConfig": "peftkit.plugins.ln_tuning.config",
    "HRAConfig": "peftkit.plugins.hra.config",
    "MissConfig": "peftkit.plugins.miss.config",
    "VBLoRAConfig": "peftkit.plugins.vblora.config",
    "RandLoraConfig": "peftkit.plugins.randlora.config",
    "C3AConfig": "peftkit.plugins.c3a.config",
    "ShiraConfig": "peftkit.plugins.shira.config",
    "RoadConfig": "peftkit.plugins.road.config",
    "BeftConfig": "peftkit.plugins.beft.config",
    "DeloraConfig": "peftkit.plugins.delora.config",
    "GraloraConfig": "peftkit.plugins.gralora.config",
    "HiraConfig": "peftkit.plugins.hira.config",
    "AdaptionPromptConfig": "peftkit.plugins.adaption_prompt.config",
    # errors
    "PeftkitError": "peftkit.core.errors",
    "ConfigError": "peftkit.core.errors",
    "TargetError": "peftkit.core.errors",
    "AdapterError": "peftkit.core.errors",
    "AdapterLoadError": "peftkit.core.errors",
    "PluginError": "peftkit.core.errors",
    "CompositionError": "peftkit.core.errors",
    "MergeError": "peftkit.core.errors",
    # hub: peftkit.load(base, "stack(alice/a, alice/b@v2)"), peftkit.hub.push/pull/search/info/delete
    "load": "peftkit.hub_client.api",
    "hub": "peftkit.hub_client",
    "HubError": "peftkit.hub_client.errors",
}

__all__ = ["PLUGIN_API_VERSION", "hookimpl", "__version__", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, __all__)


if TYPE_CHECKING:  # pragma: no cover
    from peftkit.api import adapt, from_pretrained, list_methods, load_composition, parse_composition  # noqa: F401
    from peftkit.learned_composition import auto_compose  # noqa: F401
    from peftkit.weight_merge import merge_to_folder  # noqa: F401
    from peftkit.hub_client import api as hub  # noqa: F401
    from peftkit.hub_client.api import load  # noqa: F401
    from peftkit.hub_client.errors import HubError  # noqa: F401
    from peftkit.core.architectures import ArchitectureSpec  # noqa: F401
    from peftkit.core.composition import (BASE_MODEL, Average, BatchSplit, Fuse, Parallel,  # noqa: F401
                                          Split, Stack, split_parallel)
    from peftkit.core.composition_io import save_composition  # noqa: F401
    from peftkit.core.fuse_config import FuseConfig  # noqa: F401
    from peftkit.core.merging import merge_adapters  # noqa: F401
    from peftkit.core.config import AdapterConfig  # noqa: F401
    from peftkit.core.errors import (AdapterError, AdapterLoadError, CompositionError,  # noqa: F401
                                     ConfigError, MergeError, PeftkitError, PluginError, TargetError)
    from peftkit.core.layer import LayerAdapter, ModelAdapter  # noqa: F401
    from peftkit.core.method import Method, Site  # noqa: F401
    from peftkit.core.model import AdaptedModel  # noqa: F401
    from peftkit.core.plugins import get_method, get_registry, reload_plugins, use_plugin  # noqa: F401
    from peftkit.core.shorthand import parse_shorthand  # noqa: F401
    from peftkit.core.state import AdapterRecord  # noqa: F401
    from peftkit.training import TrainOptions, TrainResult, train  # noqa: F401
    from peftkit.training_data import DataError  # noqa: F401
    from peftkit.training_hooks import training_callbacks  # noqa: F401
    from peftkit.adapter_trainer import AdapterTrainer  # noqa: F401
    from peftkit.plugins.lora.config import LoraConfig  # noqa: F401
    from peftkit.plugins.lora.convert import save_as_lora  # noqa: F401
    from peftkit.plugins.lora.eva import initialize_eva  # noqa: F401
    from peftkit.lora_plus import lora_plus_optimizer  # noqa: F401
    from peftkit.plugins.prefix_tuning.config import PrefixTuningConfig  # noqa: F401
    from peftkit.plugins.prompt_tuning.config import PromptTuningConfig  # noqa: F401
    from peftkit.plugins.prompt_tuning.p_tuning_config import PTuningConfig  # noqa: F401
    from peftkit.plugins.bitfit.config import BitFitConfig  # noqa: F401
    from peftkit.plugins.trainable_tokens.config import TrainableTokensConfig  # noqa: F401
    from peftkit.plugins.fourierft.config import FourierFTConfig  # noqa: F401
    from peftkit.plugins.ln_tuning.config import LNTuningConfig  # noqa: F401
    from peftkit.plugins.hra.config import HRAConfig  # noqa: F401
    from peftkit.plugins.miss.config import MissConfig  # noqa: F401
    from peftkit.plugins.vblora.config import VBLoRAConfig  # noqa: F401
    from peftkit.plugins.randlora.config import RandLoraConfig  # noqa: F401
    from peftkit.plugins.c3a.config import C3AConfig  # noqa: F401
    from peftkit.plugins.shira.config import ShiraConfig  # noqa: F401
    from peftkit.plugins.road.config import RoadConfig  # noqa: F401
    from peftkit.plugins.beft.config import BeftConfig  # noqa: F401
    from peftkit.plugins.delora.config import DeloraConfig  # noqa: F401
    from peftkit.plugins.gralora.config import GraloraConfig  # noqa: F401
    from peftkit.plugins.hira.config import HiraConfig  # noqa: F401
    from peftkit.plugins.adaption_prompt.config import AdaptionPromptConfig  # noqa: F401
    from peftkit.plugins.bottleneck.config import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig  # noqa: F401
    from peftkit.plugins.ia3.config import IA3Config  # noqa: F401
    from peftkit.plugins.lokr.config import LokrConfig  # noqa: F401
    from peftkit.plugins.oft.config import OftConfig  # noqa: F401
    from peftkit.plugins.boft.config import BoftConfig  # noqa: F401
    from peftkit.plugins.vera.config import PveraConfig, VeraConfig  # noqa: F401
    from peftkit.plugins.glora.config import GloraConfig  # noqa: F401
    from peftkit.plugins.adalora.config import AdaloraConfig  # noqa: F401
    from peftkit.plugins.union.config import MamConfig, UnionConfig, UniPeltConfig  # noqa: F401
