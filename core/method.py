"""The tuning-method interface that every plugin implements.

A method owns its config dataclass, finds the sites (modules) it adapts,
creates the adapter modules for one named adapter at each site, and says
whether it can merge into the base weights and which composition blocks it
supports. Everything else (freezing, activation, saving, hub) is the core's
job. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .config import AdapterConfig
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from .adapterhub_format import AdapterHubFormat
    from .architectures import ArchitectureSpec

#: Composition blocks a method may declare support for.
#: ``split`` (spans of tokens) suits only methods whose output at a token depends on that token alone.
ALL_BLOCKS = frozenset({"stack", "fuse", "average", "parallel", "batch_split", "split"})


@dataclass(frozen=True)
class Site:
    """One place in the model where a method inserts an adapter module.

    ``name`` is the module that is wrapped (its output is adapted);
    ``input_from`` optionally names another module whose *input* the adapter
    reads instead of the wrapped module's input (e.g. a parallel bottleneck
    reads the feed-forward block's input and adds to its output projection).
    """

    name: str
    input_from: str | None = None
    role: str = ""


class Method:
    """Base class of tuning methods. Subclass it in a plugin and register an instance."""

    #: Name used in specs, files and the CLI ("lora", "seq_bn", ...).
    name: ClassVar[str] = ""
    #: The method's config dataclass (a subclass of AdapterConfig).
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: One line shown by ``peftkit methods``.
    description: ClassVar[str] = ""
    #: Whether merge_adapter()/merge_and_unload() can fold it into base weights.
    can_merge: ClassVar[bool] = False
    #: Composition blocks it takes part in (see peftkit.core.composition).
    supported_blocks: ClassVar[frozenset[str]] = ALL_BLOCKS
    #: PEFT's ``peft_type`` when Hugging Face PEFT has the same method and file format. A config PEFT's type
    #: cannot express is not in PEFT's format: see :meth:`peft_type_of`.
    peft_type: ClassVar[str | None] = None
    #: The ``peft_type`` values, all types PEFT does not have, that :meth:`config_to_file` writes for configs not
    #: in PEFT's format (``PROMPT_TUNING_EMBEDDING_OUTPUT``): PEFT refuses such a folder, and peftkit loads one
    #: naming them with this method, also without its record (``peftkit.json``).
    extra_file_types: ClassVar[frozenset[str]] = frozenset()
    #: How the method reads and writes AdapterHub's format (``adapters`` library), or None.
    adapterhub: ClassVar["AdapterHubFormat | None"] = None
    #: Shorthand aliases: {"alpha": "lora_alpha"} lets users write either.
    aliases: ClassVar[dict[str, str]] = {}
    #: Whether the adapter output equals the base output right after injection.
    identity_at_init: ClassVar[bool] = True

    # -- optional capabilities (the core asks these, never a method's name) -------

    #: Weight-space merging (``merge_adapters``) combines this method's adapters elementwise:
    #: their tensors are per-channel values around an identity (IA3's scales around 1, BitFit's
    #: biases around 0), merged as identity + strategy(value_i - identity).
    merge_elementwise: ClassVar[bool] = False
    #: Weight-space merging combines this method's adapters through their low-rank factors
    #: (each layer adapter's ``low_rank()``) into a new adapter of the same method; its config
    #: must then have LoRA's rank fields (``r``, ``alpha``, ``use_rslora``, ``use_dora``,
    #: ``rank_pattern``, ``alpha_pattern``).
    merge_low_rank: ClassVar[bool] = False
    #: Weight-space merging may read this method's whole weight change at a site as the dense
    #: matrix its layer adapters' ``delta_weight(base)`` gives, combine those matrices with any
    #: strategy and store the result as a LoRA of the asked rank (truncated SVD). Used when the
    #: members are not all ``merge_low_rank`` methods; a layer adapter without ``delta_weight``
    #: is refused. Set False when ``delta_weight`` is not the adapter's whole effect.
    merge_dense: ClassVar[bool] = True
    #: Names other libraries use for this method (PEFT's, AdapterHub's) -> the sentence telling the user
    #: what to write instead: ``{"dora": "DoRA is LoRA with weight decomposition: lora[use_dora=true]"}``.
    #: Suggested when a spec names an unknown method (case and punctuation ignored), never accepted.
    known_as: ClassVar[dict[str, str]] = {}
    #: This method makes one adapter of several methods' specs joined with ``|``
    #: (``"prefix_tuning|par_bn"``); its config takes them as ``parts=[...]``. The first loaded
    #: method that declares it serves such specs.
    joins_specs: ClassVar[bool] = False
    #: A PEFT-format folder of an adapter that targets an embedding carries the base embedding weights too
    #: (PEFT's ``save_embedding_layers="auto"``). False for a method whose point is to save a few rows of an
    #: embedding (trainable tokens), whose folders PEFT writes without them.
    saves_base_embeddings: ClassVar[bool] = True
    #: The last names of the keys (``vera_A`` in ``base_model.model.vera_A``) of float tensors its folders save
    #: that training does not change: buffers and shared random projections (VeRA's, RandLoRA's bases, DeLoRA's
    #: weight norms). ``peftkit info`` and the hub card count them apart from the adapter's parameters, which
    #: are then what PEFT's ``print_trainable_parameters`` counts; integer tensors (indices) are never counted.
    frozen_tensors: ClassVar[frozenset[str]] = frozenset()

    # Filled in by the plugin manager.
    plugin_name: str | None = None
    distribution: str | None = None
    distribution_version: str | None = None

    # -- configs ---------------------------------------------------------------

    def make_config(self, **values: Any) -> AdapterConfig:
        """Build this method's config, accepting aliases for field names."""
        return self.config_class.from_dict(self.resolve_aliases(values))

    def resolve_aliases(self, values: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in values.items():
            real = self.aliases.get(key, key)
            if real in out:
                raise ConfigError(f"{self.name}: {key!r} and {real!r} name the same setting; give one")
            out[real] = value
        return out

    # -- injection -------------------------------------------------------------

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        """The modules to adapt. The default matches ``config.target_modules`` (or the
        architecture's default for this method) against the model: ``"all-linear"`` keeps linear
        layers only, but a module a name list or regex selects is returned whatever its type
        (``adaptable_targets`` of the plugin API keeps only the types a method accepts)."""
        from .targets import find_targets

        return [Site(name) for name in find_targets(model, config, arch, method=self.name)]

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module | None":
        """Create the adapter module for one site (a peftkit.core.layer.LayerAdapter)."""
        raise NotImplementedError(f"method {self.name!r} does not adapt layers")

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        """Tensors created once per adapter that all its layer adapters share (VeRA's frozen random
        projections, sized for the largest of ``sites``). Called after the sites are known and before
        any layer adapter is created. An ``nn.Parameter`` trains with the adapter; any other tensor is
        frozen. The core keeps them once per adapter, moves them with the model (the same storage
        for every site after ``model.to(...)``), and saves them under :meth:`shared_state_file_keys`.
        Each layer adapter reads them through ``LayerAdapter.shared`` at each use. The default: none.

        Make them deterministic from the config (a seed field, never torch's global random
        generator) when the method allows saving without them: a load then recreates them."""
        return {}

    def shared_state_file_keys(self, config: AdapterConfig, names: list[str]) -> dict[str, str]:
        """Shared-tensor name -> its key in the weights file (the whole key). Names left out are
        not saved; a load recreates them with :meth:`create_shared_state`. The default saves each
        as ``peftkit_shared.<name>``."""
        return {name: f"peftkit_shared.{name}" for name in names}

    def create_model_adapter(self, model: "nn.Module", config: AdapterConfig,
                             arch: "ArchitectureSpec | None") -> "nn.Module | None":
        """Create a model-level adapter (a peftkit.core.layer.ModelAdapter), e.g. a soft prompt.
        Most methods return None."""
        return None

    # -- files -----------------------------------------------------------------

    def peft_type_of(self, config: AdapterConfig) -> str | None:
        """PEFT's ``peft_type`` under which PEFT loads ``config``'s folder as the same adapter, or None when
        PEFT's format cannot express this config. PEFT drops a field it does not know with only a warning,
        so a setting PEFT lacks (a gate, another placement) would load as another adapter: such a config
        must be written under a type PEFT does not have (one of :attr:`extra_file_types`). The default:
        :attr:`peft_type`, for every config."""
        return self.peft_type

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        """The method's part of ``adapter_config.json``. PEFT-format methods (a ``peft_type``)
        override this and :meth:`config_from_file` to write and read PEFT's field names
        (``read_peft_fields``/``write_peft_fields`` of the plugin API), and write
        :meth:`peft_type_of` as the ``peft_type`` (a type of :attr:`extra_file_types` when it is
        None); the core adds base-model fields, and its record goes to ``peftkit.json`` (under the
        ``peftkit`` key when there is no ``peft_type``)."""
        return {"peft_type": self.peft_type_of(config) or self.name.upper(), **config.to_dict()}

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of :meth:`config_to_file`; ``data`` lacks the core's fields (``task_type``,
        ``base_model_name_or_path``, ...) but keeps ``peft_type`` and, for a folder PEFT wrote,
        PEFT's generic fields (``bias``, ``fan_in_fan_out``, ``layers_pattern``), which this
        default refuses."""
        data = {k: v for k, v in data.items() if k != "peft_type"}
        return self.config_class.from_dict(data)

    def config_with_rank(self, config: AdapterConfig, rank: int) -> AdapterConfig | None:
        """``config`` with every site's rank set to ``rank``, or None for a method without ranks.

        ``AdaptedModel.prepare_for_hotswap(target_rank)`` builds a low-rank adapter's modules
        anew from it and pads the trained factors into them with zeros. The default serves
        configs that name the rank ``r``, with per-module ranks in ``rank_pattern`` (LoRA's).
        """
        fields = {f.name for f in dataclasses.fields(config)}
        if "r" not in fields:
            return None
        return config.replace(r=rank, **({"rank_pattern": {}} if "rank_pattern" in fields else {}))

    # -- training hooks (docs/plugins.md, "Training hooks") ---------------------------

    def training_loss(self, model: "nn.Module", adapter_name: str) -> "torch.Tensor | None":
        """A term added to the training loss while ``adapter_name`` trains (AdaLoRA's orthogonality
        regularizer), or None. The default adds nothing, and a method that keeps it costs nothing."""
        return None

    def training_callbacks(self, model: "nn.Module", adapter_name: str) -> list[Any]:
        """``transformers.TrainerCallback`` objects ``adapter_name`` needs while it trains (AdaLoRA's rank
        allocation after each optimizer step). ``peftkit train``, ``AdapterTrainer`` and
        ``peftkit.training_callbacks(model)`` add them. The default needs none."""
        return []

    # -- introspection -----------------------------------------------------------

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig,
                                 sites: list[Site]) -> int | None:
        """The method's own formula for its trainable parameters (checked by
        peftkit.testing); None when the method has no closed form."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"
