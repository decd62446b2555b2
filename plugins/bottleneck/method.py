"""The bottleneck methods: where they insert, how big each adapter is, the file format.

Insertion points come from the architecture table (core/architectures.py):
``ffn_output`` for seq_bn, ``attention_output`` + ``ffn_output`` for
double_seq_bn (+ ``cross_attention_output`` with cross_attention=true), and
``ffn_output`` reading the input of ``ffn_input`` for par_bn. A model family
without those points can be declared by a plugin, or adapted by naming the
modules in ``target_modules``.

With ``inv_adapter`` the adapter also has two sites for its invertible adapter: the embedding
output (point ``embedding_output``, registered by this plugin) and the model's output embeddings
(``get_output_embeddings()``, the LM head's output layer) when it has one. With ``phm_layer``
(Compacter) the projections are PHM layers; their shared rule matrices and weight factors, and the
invertible adapter's block, are the adapter's shared state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, Site, TargetError

from .adapterhub import BottleneckAdapterHub
from .config import (BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig,
                     DoubleSeqBnInvConfig, ParBnConfig, SeqBnConfig, SeqBnInvConfig, SequentialBottleneckConfig)
from .embedding_points import EMBEDDING_POINT, embedding_model_types
from .residual_points import RESIDUAL_POINTS, residual_point_specs

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec

#: ``peft_type`` written to adapter_config.json (PEFT has no bottleneck adapters;
#: the method itself is named under the file's ``peftkit.method`` key).
FILE_TYPE = "BOTTLENECK"


class BottleneckMethod(Method):
    """Shared logic of seq_bn, double_seq_bn and par_bn."""

    can_merge = False
    supported_blocks = ALL_BLOCKS
    #: Insertion points this method uses, in order.
    points: ClassVar[tuple[str, ...]] = ()
    parallel: ClassVar[bool] = False

    # -- sites -----------------------------------------------------------------

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        from peftkit.plugin_api import find_targets, is_linear_like, layer_index, name_matches

        assert isinstance(config, BottleneckConfig)
        if config.target_modules is not None:
            names = find_targets(model, config, arch, method=self.name)
            wrong = [n for n in names if not is_linear_like(model.get_submodule(n))]
            if wrong and isinstance(config.target_modules, list):
                raise ConfigError(f"{self.name}: target {wrong[0]!r} is a "
                                  f"{type(model.get_submodule(wrong[0])).__name__}; bottleneck adapters go on "
                                  f"the output of Linear or Conv1D layers")
            sites = [Site(n, role="target") for n in names if n not in wrong]
        else:
            sites = self._point_sites(model, config, arch)
        if config.exclude_modules is not None:
            sites = [s for s in sites if not name_matches(s.name, config.exclude_modules)]
        if config.leave_out:
            sites = [s for s in sites if layer_index(s.name, arch) not in config.leave_out]
        if not sites:
            raise ConfigError(f"{self.name}: no site is left to adapt (leave_out={config.leave_out}, "
                              f"exclude_modules={config.exclude_modules!r}, "
                              f"layers_to_transform={config.layers_to_transform!r})")
        if config.inv_adapter is not None:
            sites += _invertible_sites(model, arch, self.name, config.modules_to_save or [])
        return sites

    def _point_sites(self, model: "nn.Module", config: BottleneckConfig,
                     arch: "ArchitectureSpec | None") -> list[Site]:
        sites: list[Site] = []
        original_ln = isinstance(config, SequentialBottleneckConfig) and config.original_ln_before
        for point in self._points(config):
            names = _find_point(model, arch, point, self.name, config)
            if not original_ln:
                sites.extend(Site(name, role=point) for name in names)
                continue
            source = RESIDUAL_POINTS.get(point)
            if source is None or arch is None or source not in arch.points:
                model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
                raise ConfigError(f"{self.name} config: original_ln_before=true needs the block's residual input "
                                  f"at {point!r}, which peftkit knows for model types "
                                  f"{', '.join(m.model_type for m in residual_point_specs())}, not "
                                  f"{model_type!r}; set original_ln_before=false")
            sources = _find_point(model, arch, source, self.name, config)
            sites.extend(Site(name, input_from=_pair_input(name, sources, arch, source, self.name), role=point)
                         for name in names)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted(sites, key=lambda s: order.get(s.name, 0))

    def _points(self, config: BottleneckConfig) -> tuple[str, ...]:
        return self.points

    # -- modules ---------------------------------------------------------------

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module":
        import torch

        from .invertible import EMBEDDING_ROLE, OUTPUT_ROLE, InvertibleAdapter
        from .layer import ACTIVATIONS, BottleneckAdapter

        assert isinstance(config, BottleneckConfig)
        if site.role in (EMBEDDING_ROLE, OUTPUT_ROLE):
            return InvertibleAdapter(site.role == OUTPUT_ROLE, _embedding_size(model),
                                     ACTIVATIONS[config.non_linearity])
        in_f, bottleneck, out_f = self.adapter_shape(site, base_layer, config, model)
        weight = getattr(base_layer, "weight", None)
        dtype = weight.dtype if weight is not None and weight.dtype in (torch.float32, torch.float64) \
            else torch.float32
        sequential = isinstance(config, SequentialBottleneckConfig)
        original_ln = sequential and config.original_ln_before
        return BottleneckAdapter(
            in_f, out_f, bottleneck, non_linearity=config.non_linearity, scaling=config.scaling,
            dropout=config.dropout, ln_before=config.ln_before, parallel=self.parallel,
            residual=config.residual if sequential else True,
            residual_before_ln=config.residual_before_ln if sequential else True,
            init_weights=config.init_weights, ln_after=config.ln_after,
            ln_after_includes_residual=sequential and config.ln_after_includes_residual,
            original_ln_before=original_ln,
            model_norm=_model_norm(model, site.name, self.name) if original_ln else None,
            original_ln_residual=config.original_ln_residual if sequential else "output",
            phm=config if config.phm_layer else None, use_gating=config.use_gating, dtype=dtype,
            device=weight.device if weight is not None else None)

    def create_shared_state(self, model: "nn.Module", config: AdapterConfig,
                            sites: list[Site]) -> "dict[str, torch.Tensor]":
        from .invertible import nice_tensors
        from .phm import shared_phm_tensors

        assert isinstance(config, BottleneckConfig)
        factory = _factory(model)
        out: dict[str, Any] = {}
        if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm):
            in_f, bottleneck = self._shared_phm_shape(model, config, sites)
            out.update(shared_phm_tensors(config, in_f, bottleneck, zero_up=config.init_weights, factory=factory))
        if config.inv_adapter is not None:
            out.update(nice_tensors(_embedding_size(model), config.inv_adapter_reduction_factor,
                                    identity=config.init_weights, factory=factory))
        return out

    def _shared_phm_shape(self, model: "nn.Module", config: BottleneckConfig, sites: list[Site]) -> tuple[int, int]:
        """(input size, bottleneck size) of every PHM adapter; with shared_W_phm they must all agree."""
        from peftkit.plugin_api import base_of

        shapes = {self.adapter_shape(s, base_of(model.get_submodule(s.name)), config, model)[:2]
                  for s in _bottleneck_sites(sites)}
        if config.shared_W_phm and len(shapes) > 1:
            raise ConfigError(f"{self.name} config: shared_W_phm=true needs every adapter to have the same input "
                              f"and bottleneck sizes, but they are {sorted(shapes)}; set shared_W_phm=false")
        return next(iter(shapes))

    def adapter_shape(self, site: Site, base_layer: "nn.Module", config: BottleneckConfig,
                      model: "nn.Module") -> tuple[int, int, int]:
        """(input size, bottleneck size, output size) of the adapter at ``site``."""
        from peftkit.plugin_api import architecture_for, layer_index

        out_f = _out_features(base_layer, site.name)
        if not self.parallel or getattr(config, "read_residual", False):
            in_f = out_f  # the residual stream has the block's output size
        elif site.input_from is not None:
            in_f = _block_in_features(model.get_submodule(site.input_from), site.input_from)
        else:
            in_f = _in_features(base_layer, site.name)
        hidden = in_f if self.parallel else out_f
        factor = config.reduction_for(layer_index(site.name, architecture_for(model)), site.name)
        bottleneck = int(hidden // factor)
        if bottleneck < 1:
            raise ConfigError(f"{self.name} config: reduction_factor={factor} leaves no bottleneck for hidden "
                              f"size {hidden} at {site.name!r}; use a factor of at most {hidden}")
        if config.phm_layer:
            wrong = [f"{what} {size}" for what, size in (("input size", in_f), ("bottleneck size", bottleneck),
                                                        ("output size", out_f)) if size % config.phm_dim]
            if wrong:
                raise ConfigError(f"{self.name} config: phm_dim={config.phm_dim} must divide every PHM layer's "
                                  f"sizes, but at {site.name!r} the {', '.join(wrong)} is not a multiple of it; "
                                  f"choose another phm_dim or reduction_factor")
        return in_f, bottleneck, out_f

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        from .invertible import nice_shapes

        assert isinstance(config, BottleneckConfig)
        total = 0
        for site in _bottleneck_sites(sites):
            in_f, b, out_f = self.adapter_shape(site, base_of(model.get_submodule(site.name)), config, model)
            total += _phm_count(config, in_f, b, out_f) if config.phm_layer else in_f * b + b + b * out_f + out_f
            total += 2 * in_f if config.ln_before else 0
            total += 2 * out_f if config.ln_after else 0
            total += 1 if config.scaling == "learned" else 0
            total += in_f + 1 if config.use_gating else 0
        if config.phm_layer and config.shared_phm_rule and config.learn_phm:
            total += _rule_size(config)
        if config.phm_layer and config.shared_W_phm:
            in_f, b = self._shared_phm_shape(model, config, sites)
            total += 2 * _w_size(config, in_f, b)
        if config.inv_adapter is not None:
            total += sum(math.prod(shape) for shape in nice_shapes(_embedding_size(model),
                                                                   config.inv_adapter_reduction_factor).values())
        return total

    # -- files -----------------------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        return {"peft_type": FILE_TYPE, **config.to_dict()}


class SeqBnMethod(BottleneckMethod):
    name = "seq_bn"
    config_class = SeqBnConfig
    known_as = {
        "pfeiffer": "AdapterHub's Pfeiffer adapter is seq_bn",
        "adapter": "a bottleneck adapter is seq_bn (Pfeiffer), double_seq_bn (Houlsby) or par_bn (parallel)",
        "bottleneck": "a bottleneck adapter is seq_bn (Pfeiffer), double_seq_bn (Houlsby) or par_bn (parallel)",
    }
    description = "Sequential bottleneck adapter after each feed-forward block (Pfeiffer)"
    adapterhub = BottleneckAdapterHub(mh_adapter=False, parallel=False)
    points = ("ffn_output",)


class DoubleSeqBnMethod(BottleneckMethod):
    name = "double_seq_bn"
    config_class = DoubleSeqBnConfig
    known_as = {"houlsby": "AdapterHub's Houlsby adapter is double_seq_bn"}
    description = "Sequential bottleneck adapters after attention and feed-forward blocks (Houlsby)"
    adapterhub = BottleneckAdapterHub(mh_adapter=True, parallel=False)
    points = ("attention_output", "ffn_output")

    def _points(self, config: BottleneckConfig) -> tuple[str, ...]:
        assert isinstance(config, DoubleSeqBnConfig)
        return self.points + (("cross_attention_output",) if config.cross_attention else ())


class ParBnMethod(BottleneckMethod):
    name = "par_bn"
    config_class = ParBnConfig
    known_as = {"parallel": "AdapterHub's parallel adapter is par_bn"}
    description = "Parallel bottleneck adapter beside each feed-forward block, scaled (He et al.)"
    adapterhub = BottleneckAdapterHub(mh_adapter=False, parallel=True)
    points = ("ffn_output",)
    parallel = True

    def _point_sites(self, model: "nn.Module", config: BottleneckConfig,
                     arch: "ArchitectureSpec | None") -> list[Site]:
        outputs = _find_point(model, arch, "ffn_output", self.name, config)
        point = RESIDUAL_POINTS["ffn_output"] if getattr(config, "read_residual", False) else "ffn_input"
        inputs = _find_point(model, arch, point, self.name, config)
        return [Site(name, input_from=_pair_input(name, inputs, arch, point, self.name), role="ffn_output")
                for name in outputs]


class CompacterMethod(DoubleSeqBnMethod):
    name = "compacter"
    config_class = CompacterConfig
    known_as = {}
    description = "Compacter: Houlsby placement with PHM (hypercomplex) projections, reduction 32, GELU"
    adapterhub = BottleneckAdapterHub(mh_adapter=True, parallel=False, phm=True)


class CompacterPlusPlusMethod(SeqBnMethod):
    name = "compacterpp"
    config_class = CompacterPlusPlusConfig
    known_as = {"compacterplusplus": "Compacter++ is compacterpp (a name cannot hold '+')",
                "compacter_pp": "Compacter++ is compacterpp"}
    description = "Compacter++: Pfeiffer placement with PHM (hypercomplex) projections, reduction 32, GELU"
    adapterhub = BottleneckAdapterHub(mh_adapter=False, parallel=False, phm=True)


class SeqBnInvMethod(SeqBnMethod):
    name = "seq_bn_inv"
    config_class = SeqBnInvConfig
    known_as = {"pfeifferinv": "AdapterHub's pfeiffer+inv is seq_bn_inv",
                "madx": "a MAD-X language adapter is seq_bn_inv "
                        "(see `peftkit docs bottleneck#invertible-adapters-mad-x`)"}
    description = "MAD-X language adapter: seq_bn plus an invertible (NICE) adapter on the embeddings"
    adapterhub = BottleneckAdapterHub(mh_adapter=False, parallel=False, inv=True)


class DoubleSeqBnInvMethod(DoubleSeqBnMethod):
    name = "double_seq_bn_inv"
    config_class = DoubleSeqBnInvConfig
    known_as = {"houlsbyinv": "AdapterHub's houlsby+inv is double_seq_bn_inv"}
    description = "double_seq_bn plus an invertible (NICE) adapter on the embeddings"
    adapterhub = BottleneckAdapterHub(mh_adapter=True, parallel=False, inv=True)


# -- helpers ---------------------------------------------------------------------


def _bottleneck_sites(sites: list[Site]) -> list[Site]:
    """The sites holding bottleneck adapters (not the invertible adapter's)."""
    from .invertible import EMBEDDING_ROLE, OUTPUT_ROLE

    return [s for s in sites if s.role not in (EMBEDDING_ROLE, OUTPUT_ROLE)]


def _rule_size(config: BottleneckConfig) -> int:
    n = config.phm_dim
    return 2 * n * n if config.factorized_phm_rule else n ** 3


def _w_size(config: BottleneckConfig, in_f: int, out_f: int) -> int:
    n = config.phm_dim
    if config.factorized_phm_W:
        return n * (in_f // n) * config.phm_rank + n * config.phm_rank * (out_f // n)
    return n * (in_f // n) * (out_f // n)


def _phm_count(config: BottleneckConfig, in_f: int, b: int, out_f: int) -> int:
    """Trainable parameters of one adapter's two PHM projections (shared tensors not counted)."""
    total = (b + out_f) if config.phm_bias else 0
    if not config.shared_W_phm:
        total += _w_size(config, in_f, b) + _w_size(config, b, out_f)
    if not config.shared_phm_rule and config.learn_phm:
        total += 2 * _rule_size(config)
    return total


def _embedding_size(model: "nn.Module") -> int:
    config = getattr(model, "config", None)
    for key in ("embedding_size", "hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError("invertible adapters need the model's hidden size (config.hidden_size); this model's "
                      "config has none")


def _factory(model: "nn.Module") -> dict[str, Any]:
    import torch

    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.dtype in (torch.float32, torch.float64) else torch.float32
    return {"dtype": dtype, "device": param.device if param is not None else None}


def _invertible_sites(model: "nn.Module", arch: "ArchitectureSpec | None", method: str,
                      modules_to_save: list[str]) -> list[Site]:
    """The invertible adapter's sites: the embedding output, and the output embeddings' input if any
    (refused inside a module the adapter keeps its own copy of: the inverse would be left out)."""
    from peftkit.plugin_api import find_point

    from .invertible import EMBEDDING_ROLE, OUTPUT_ROLE

    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if arch is None or EMBEDDING_POINT not in arch.points:
        raise ConfigError(f"{method} config: inv_adapter needs the model's embedding output, which peftkit knows "
                          f"for model types {', '.join(embedding_model_types())}, not {model_type!r}; set "
                          f"inv_adapter=null, or declare the point {EMBEDDING_POINT!r} in a plugin's ArchitectureSpec")
    found = find_point(model, arch, EMBEDDING_POINT, method)
    if len(found) != 1:
        raise ConfigError(f"{method} config: inv_adapter needs one embedding output, but the point "
                          f"{EMBEDDING_POINT!r} matches {len(found)} modules ({', '.join(found[:4])})")
    sites = [Site(found[0], role=EMBEDDING_ROLE)]
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if output is not None:
        name = next((n for n, m in model.named_modules() if m is output), None)
        size = getattr(output, "in_features", None)
        if name and size is not None and size != _embedding_size(model):
            raise ConfigError(f"{method} config: the output layer {name!r} reads {size} features, not the "
                              f"hidden size {_embedding_size(model)} the invertible adapter inverts")
        inside = [m for m in modules_to_save if name and (name == m or name.startswith(m + "."))]
        if inside:
            raise ConfigError(f"{method} config: the invertible adapter's inverse goes on the input of {name!r}, "
                              f"inside {inside[0]!r}, which this adapter keeps its own copy of (modules_to_save); "
                              f"keep the model's own LM head (a trained head and an invertible adapter in one "
                              f"adapter are not supported)")
        if name:
            sites.append(Site(name, role=OUTPUT_ROLE))
    return sites


def _find_point(model: "nn.Module", arch: "ArchitectureSpec | None", point: str, method: str,
                config: BottleneckConfig) -> list[str]:
    from peftkit.plugin_api import find_point

    if point == "cross_attention_output" and (arch is None or point not in arch.points):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"{method} config: cross_attention=true, but peftkit knows no cross-attention in "
                          f"model type {model_type!r}; set cross_attention=false, or declare the insertion "
                          f"point 'cross_attention_output' in a plugin's ArchitectureSpec")
    try:
        return find_point(model, arch, point, method, config)
    except TargetError as exc:
        if point == "cross_attention_output":
            raise ConfigError(f"{method} config: cross_attention=true, but this model has no "
                              f"cross-attention ({exc}); set cross_attention=false") from None
        if point in RESIDUAL_POINTS.values():  # read_residual / original_ln_before refuse target_modules
            raise
        raise TargetError(f"{exc}. Or name the modules whose outputs get an adapter: "
                          f"{method}[target_modules=[...]]") from None


def _pair_input(output: str, inputs: list[str], arch: "ArchitectureSpec | None", point: str, method: str) -> str:
    """The ``point`` module (in ``inputs``) of the same block as ``output``: the one sharing
    the longest dotted prefix with it, in the same layer."""
    from peftkit.plugin_api import layer_index

    parts = output.split(".")

    def shared(name: str) -> int:
        n = 0
        for a, b in zip(parts, name.split(".")):
            if a != b:
                break
            n += 1
        return n

    layer = layer_index(output, arch)
    candidates = [name for name in inputs if layer_index(name, arch) == layer]
    if candidates:
        best = max(shared(c) for c in candidates)
        chosen = [c for c in candidates if shared(c) == best]
        if len(chosen) == 1 and best > 0:
            return chosen[0]
    raise TargetError(f"{method}: cannot tell which {point!r} module's input goes with {output!r} "
                      f"(candidates: {', '.join(inputs[:6])}); check the architecture's insertion points"
                      + (", or pass target_modules to put each parallel adapter beside one Linear layer"
                         if point == "ffn_input" and method == "par_bn" else ""))


def _model_norm(model: "nn.Module", site: str, method: str) -> "nn.Module | None":
    """The model's own LayerNorm applied after ``site``, for original_ln_before: post-LN blocks such as
    BERT's keep it beside the output projection; None for a pre-LN block (a decoder's), which has none
    there (the adapter then reads h + r as it is)."""
    import torch.nn as nn

    parent = site.rpartition(".")[0]
    norms = [child for child in model.get_submodule(parent).children() if isinstance(child, nn.LayerNorm)]
    if len(norms) > 1:
        raise ConfigError(f"{method} config: original_ln_before=true: cannot tell which LayerNorm of {parent!r} "
                          f"follows {site!r} ({len(norms)} beside it); set original_ln_before=false")
    return norms[0] if norms else None


def _out_features(module: "nn.Module", name: str) -> int:
    import torch.nn as nn

    from peftkit.plugin_api import is_conv1d, linear_features

    if isinstance(module, nn.Linear) or is_conv1d(module):
        return linear_features(module)[1]
    raise ConfigError(f"bottleneck adapters go on the output of Linear or Conv1D layers; {name!r} is a "
                      f"{type(module).__name__}")


def _in_features(module: "nn.Module", name: str) -> int:
    import torch.nn as nn

    from peftkit.plugin_api import is_conv1d, linear_features

    if isinstance(module, nn.Linear) or is_conv1d(module):
        return linear_features(module)[0]
    raise ConfigError(f"cannot tell the input size of {name!r} ({type(module).__name__})")


def _block_in_features(block: "nn.Module", name: str) -> int:
    """Input size of a feed-forward block: that of its first Linear/Conv1D layer."""
    from peftkit.plugin_api import base_of, is_linear_like, iter_candidate_modules

    for _, module in iter_candidate_modules(block):
        if is_linear_like(module):
            return _in_features(base_of(module), name)
    raise ConfigError(f"par_bn: cannot tell the input size of the feed-forward block {name!r}: "
                      f"it has no Linear or Conv1D layer")
