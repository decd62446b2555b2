"""The ReFT methods: ``reft`` and its presets ``loreft``, ``noreft``, ``direft``.

Sites are whole transformer layers (the modules of the model's one list of layers); each holds
one :class:`~.layer.ReftIntervention` per adapter. The positions an intervention acts on are read
from the model's attention mask (:mod:`.batch`), so ReFT runs only on whole batches: it joins
``stack`` (interventions at one layer apply in order, each on the previous one's output),
``average`` (of the interventions' changes) and ``fuse``, not row splits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.plugin_api import AdapterConfig, ConfigError, Method, Site

from .adapterhub import ReftAdapterHub
from .config import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: Names of the ModuleList that holds a transformers model's layers.
LAYER_LISTS = ("layers", "layer", "h", "block", "blocks")


def layer_names(model: "nn.Module") -> list[str]:
    """The module names of the model's transformer layers, in order; ConfigError unless it has one list."""
    import torch.nn as nn

    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and name.rpartition(".")[2] in LAYER_LISTS]
    lists = [(name, module) for name, module in lists  # not the lists inside a layer (T5's block.0.layer)
             if not any(name.startswith(outer + ".") for outer, _ in lists)]
    if len(lists) != 1:
        found = ", ".join(name for name, _ in lists) or "none"
        raise ConfigError(f"ReFT intervenes on the outputs of a model's transformer layers and needs exactly one "
                          f"list of them (a ModuleList named {', '.join(LAYER_LISTS)}); "
                          f"{type(model).__name__} has {found}")
    name, module = lists[0]
    return [f"{name}.{i}" for i in range(len(module))]


class ReftMethod(Method):
    name = "reft"
    config_class = ReftConfig
    description = ("ReFT: interventions on layers' hidden states at chosen token positions (LoReFT, NoReFT, "
                   "DiReFT); AdapterHub format")
    can_merge = False
    merge_dense = False
    identity_at_init = False  # R, W and b start at random, as in adapters
    supported_blocks = frozenset({"stack", "average", "fuse"})
    adapterhub = ReftAdapterHub()

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        assert isinstance(config, ReftConfig)
        names = layer_names(model)
        if config.layers == "all":
            return [Site(name) for name in names]
        missing = [i for i in config.layers if i >= len(names)]
        if missing:
            raise ConfigError(f"{self.name}: layers={config.layers} names {missing}, but the model has "
                              f"{len(names)} layers (0 to {len(names) - 1})")
        return [Site(names[i]) for i in sorted(config.layers)]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        import torch

        from .batch import forward_batch
        from .layer import ReftIntervention

        assert isinstance(config, ReftConfig)
        width = hidden_size(model)
        if config.orthogonality and config.r >= width:
            raise ConfigError(f"{self.name}: r={config.r} must be below the hidden size {width} for orthonormal "
                              f"rows (orthogonality=true)")
        floats = [p.dtype for p in base_layer.parameters() if p.is_floating_point()]
        dtype = torch.float64 if floats and floats[0] == torch.float64 else torch.float32
        return ReftIntervention(forward_batch(model), width, r=config.r, prefix_positions=config.prefix_positions,
                                suffix_positions=config.suffix_positions, unit_indices=config.unit_indices,
                                orthogonal=config.orthogonality, subtract_projection=config.subtract_projection,
                                activation=config.non_linearity, dropout=config.dropout, dtype=dtype,
                                seed=config.init_weights_seed)

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        assert isinstance(config, ReftConfig)
        width = hidden_size(model)
        per_unit = 2 * config.r * width + config.r  # W and b, and R (or the matrix R is read from)
        return len(sites) * len(config.unit_indices) * per_unit


def hidden_size(model: "nn.Module") -> int:
    from peftkit.plugin_api import text_config

    config = text_config(model)
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"ReFT needs the model's hidden size; {type(model).__name__} has no config.hidden_size")
    return size


class LoReftMethod(ReftMethod):
    name = "loreft"
    config_class = LoReftConfig
    description = "LoReFT preset of reft: orthonormal R, subtracting its projection (adapters' LoReftConfig)"


class NoReftMethod(ReftMethod):
    name = "noreft"
    config_class = NoReftConfig
    description = "NoReFT preset of reft: R without orthogonality (adapters' NoReftConfig)"


class DiReftMethod(ReftMethod):
    name = "direft"
    config_class = DiReftConfig
    description = "DiReFT preset of reft: no orthogonality, no projection subtracted (adapters' DiReftConfig)"
