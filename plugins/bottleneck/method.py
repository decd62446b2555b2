"""The bottleneck methods: where they insert, how big each adapter is, the file format.

Insertion points come from the architecture table (core/architectures.py):
``ffn_output`` for seq_bn, ``attention_output`` + ``ffn_output`` for
double_seq_bn (+ ``cross_attention_output`` with cross_attention=true), and
``ffn_output`` reading the input of ``ffn_input`` for par_bn. A model family
without those points can be declared by a plugin, or adapted by naming the
modules in ``target_modules``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, Site, TargetError

from .adapterhub import BottleneckAdapterHub
from .config import BottleneckConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig, SequentialBottleneckConfig
from .residual_points import RESIDUAL_POINTS, residual_point_specs

if TYPE_CHECKING:  # pragma: no cover
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

        from .layer import BottleneckAdapter

        assert isinstance(config, BottleneckConfig)
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
            dtype=dtype, device=weight.device if weight is not None else None)

    def adapter_shape(self, site: Site, base_layer: "nn.Module", config: BottleneckConfig,
                      model: "nn.Module") -> tuple[int, int, int]:
        """(input size, bottleneck size, output size) of the adapter at ``site``."""
        from peftkit.plugin_api import architecture_for, layer_index

        out_f = _out_features(base_layer, site.name)
        if not self.parallel:
            in_f = out_f
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
        return in_f, bottleneck, out_f

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int:
        from peftkit.plugin_api import base_of

        assert isinstance(config, BottleneckConfig)
        total = 0
        for site in sites:
            in_f, b, out_f = self.adapter_shape(site, base_of(model.get_submodule(site.name)), config, model)
            total += in_f * b + b + b * out_f + out_f
            total += 2 * in_f if config.ln_before else 0
            total += 2 * out_f if config.ln_after else 0
            total += 1 if config.scaling == "learned" else 0
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
        inputs = _find_point(model, arch, "ffn_input", self.name, config)
        return [Site(name, input_from=_pair_input(name, inputs, arch, "ffn_input", self.name), role="ffn_output")
                for name in outputs]


# -- helpers ---------------------------------------------------------------------


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
