"""Finding the modules a method adapts: target lists, regexes, "all-linear",
per-architecture defaults, layer selection and exclusions."""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence, TypeVar, Union

from .errors import ConfigError, TargetError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from .architectures import ArchitectureSpec
    from .config import AdapterConfig

V = TypeVar("V")

ALL_LINEAR = "all-linear"
#: ``target_modules`` of an adapter that adapts no layer: a head-only adapter, whose only trained part is
#: what ``modules_to_save`` names (a task head). PEFT's own name for it, so PEFT loads such a folder too.
NO_LAYERS = "dummy-target-modules"
#: Output heads never adapted by "all-linear" (train them via modules_to_save).
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "decoder"})


def base_of(module: "nn.Module") -> "nn.Module":
    """The original module under a peftkit wrapper (or the module itself)."""
    from .layer import TunerLayer

    return module.base_layer if isinstance(module, TunerLayer) else module


def is_linear_like(module: "nn.Module") -> bool:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(base_of(module), (nn.Linear, Conv1D))


def is_embedding(module: "nn.Module") -> bool:
    import torch.nn as nn

    return isinstance(base_of(module), nn.Embedding)


def is_conv(module: "nn.Module") -> bool:
    """torch's Conv1d/Conv2d/Conv3d (not transposed ones). Never matched by "all-linear": methods that
    adapt convolutions (LoRA) take them when target_modules names them or a regex matches them."""
    import torch.nn as nn

    return isinstance(base_of(module), (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def iter_candidate_modules(model: "nn.Module") -> Iterable[tuple[str, "nn.Module"]]:
    """Named modules of the user's model, skipping peftkit's own internals."""
    from .layer import ModulesToSave, TunerLayer

    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (TunerLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def name_matches(name: str, targets: Union[Sequence[str], str]) -> bool:
    """PEFT's rule: a string is a regex matched in full; a list matches a name
    exactly or as a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_value(name: str, patterns: Mapping[str, V], default: V) -> V:
    """A per-module override, PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first
    key (a regex) that matches the end of ``name`` at a dot boundary gives the value."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def layer_index(name: str, arch: "ArchitectureSpec | None") -> int | None:
    from .architectures import ArchitectureSpec

    pattern = arch.layer_pattern if arch is not None else ArchitectureSpec.layer_pattern
    match = re.fullmatch(pattern, name)
    return int(match.group(1)) if match else None


def output_head_names(model: "nn.Module") -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
        elif name.rsplit(".", 1)[-1] in HEAD_NAMES and "." not in name and not _holds_layers(module):
            heads.add(name)
    return heads


def _holds_layers(module: "nn.Module") -> bool:
    """Whether a module holds a stack of layers (T5's top-level ``decoder``), so is no head."""
    import torch.nn as nn

    return any(isinstance(m, nn.ModuleList) for m in module.modules())


def find_targets(model: "nn.Module", config: "AdapterConfig", arch: "ArchitectureSpec | None",
                 method: str, *, linear_only: bool = False) -> list[str]:
    """Names of the modules ``config`` targets in ``model``, in model order.

    Raises TargetError listing candidate names when nothing matches.
    """
    targets = config.target_modules
    if targets == NO_LAYERS:
        return []
    if targets is None:
        default = arch.default_targets(method) if arch is not None else None
        if default is None:
            model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise TargetError(
                f"method {method!r} has no default target modules for model type {model_type!r}; "
                f"pass target_modules (a list of names, a regex, or 'all-linear'), e.g. "
                f"{method}[target_modules=[...]]. Linear, embedding and convolution layers in this model: "
                f"{', '.join(_sample_linear_names(model))}")
        targets = list(default)
        config.target_modules = targets  # saved explicitly, so the file needs no table to be read
    heads = output_head_names(model)
    keep_layers = config.layers_to_transform
    if isinstance(keep_layers, int):
        keep_layers = [keep_layers]
    found, left_out = [], []
    for name, module in iter_candidate_modules(model):
        if not name:
            continue
        if targets == ALL_LINEAR:
            if not is_linear_like(module) or name in heads or name.startswith(tuple(h + "." for h in heads)):
                continue
        elif not name_matches(name, targets):
            continue
        if (config.exclude_modules is not None and name_matches(name, config.exclude_modules)) \
                or (keep_layers is not None and layer_index(name, arch) not in keep_layers):
            left_out.append(name)
            continue
        if linear_only and not is_linear_like(module):
            continue
        found.append(name)
    if not found:
        raise TargetError(_all_left_out(config, targets, method, left_out) if left_out
                          else _nothing_matched(model, targets, method))
    return found


def _all_left_out(config: "AdapterConfig", targets: object, method: str, left_out: list[str]) -> str:
    """The error when target_modules matched modules but exclude_modules / layers_to_transform left out all."""
    shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
    by = [f"{key}={getattr(config, key)!r}" for key in ("exclude_modules", "layers_to_transform")
          if getattr(config, key) is not None]
    why = " (it keeps only modules inside those transformer layers)" if config.layers_to_transform is not None else ""
    return (f"target_modules={targets!r} of method {method!r} matched {shown}, but {' and '.join(by)} left out "
            f"every one{why}; change or remove {' / '.join(b.split('=')[0] for b in by)}")


def adaptable_targets(model: "nn.Module", config: "AdapterConfig", arch: "ArchitectureSpec | None", method: str,
                      *, accepts: Callable[["nn.Module"], bool], label: str, kinds: str,
                      defaults_of: str | None = None) -> list[str]:
    """:func:`find_targets`, keeping the modules ``accepts`` takes (a method adapting some layer types).

    A module that ``target_modules`` names in a list but ``accepts`` refuses is an error, as is
    keeping none; a regex or "all-linear" may match other modules, which are left out. ``label``
    names the method in messages ("LoRA") and ``kinds`` what it adapts ("Linear and Embedding layers").
    ``defaults_of="lora"``: when the config names no targets and the model family registers none for
    ``method``, take that method's defaults (as PEFT does for LoKr, VeRA, ...); they are written into
    ``config.target_modules`` so that the saved config names them.
    """
    chose_targets = config.target_modules is not None  # else the model family's defaults (this method's or LoRA's)
    if defaults_of is not None and config.target_modules is None and arch is not None \
            and arch.default_targets(method) is None:
        other = arch.default_targets(defaults_of)
        if other is not None:
            config.target_modules = list(other)
    names = find_targets(model, config, arch, method=method)
    if config.target_modules == NO_LAYERS:
        return []
    kept = []
    for name in names:
        module = model.get_submodule(name)
        if accepts(module):
            kept.append(name)
        elif isinstance(config.target_modules, list) and name_matches(name, config.target_modules):
            fix = "Leave it out of target_modules" if chose_targets else \
                f"It is one of this model's default targets ({', '.join(config.target_modules)}): name the layers " \
                f"to adapt in target_modules"
            raise ConfigError(f"{method}: target {name!r} is {_article(type(base_of(module)).__name__)}; {label} adapts "
                              f"{kinds}. {fix}")
    if not kept:
        raise ConfigError(f"{method}: target_modules={config.target_modules!r} matched no layer {label} adapts "
                          f"({kinds}): {', '.join(names[:5])} ...")
    return kept


def _sample_linear_names(model: "nn.Module", limit: int = 12) -> list[str]:
    suffixes: list[str] = []
    for name, module in iter_candidate_modules(model):
        if name and (is_linear_like(module) or is_embedding(module) or is_conv(module)):
            short = re.sub(r"\.\d+\.", ".N.", name)
            if short not in suffixes:
                suffixes.append(short)
    return suffixes[:limit] or ["(none)"]


def _nothing_matched(model: "nn.Module", targets: object, method: str) -> str:
    candidates = _sample_linear_names(model, limit=20)
    msg = f"target_modules={targets!r} of method {method!r} matched no module of this model."
    if isinstance(targets, (list, tuple)):
        leaves = sorted({c.rsplit(".", 1)[-1] for c in candidates})
        for t in targets:
            close = difflib.get_close_matches(str(t), leaves, n=3)
            if close:
                msg += f" {t!r} is not here; did you mean {', '.join(map(repr, close))}?"
    elif isinstance(targets, str):
        leaves = {c.rsplit(".", 1)[-1] for c in candidates}
        named = [t.strip() for t in re.split(r"[,|]", targets) if t.strip() in leaves]
        if named:  # a list of names written as one string: PEFT reads a string as a regex too
            msg += (f" A string is a regular expression over the full module name (as in PEFT); to adapt the "
                    f"modules named {', '.join(map(repr, named))}, pass a list: target_modules={named!r} (in a spec, "
                    f"target_modules=[{','.join(named)}]).")
    return msg + f" Candidate modules: {', '.join(candidates)}"


def find_point(model: "nn.Module", arch: "ArchitectureSpec | None", point: str, method: str,
               config: "AdapterConfig | None" = None) -> list[str]:
    """Module names matching an insertion point of the architecture table."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if arch is None or point not in arch.points:
        raise TargetError(
            f"method {method!r} needs the insertion point {point!r}, which peftkit does not know for "
            f"model type {model_type!r}. Declare it in a plugin: implement peftkit_register_architectures "
            f"and register ArchitectureSpec({model_type!r}, points={{{point!r}: r'<regex of module names>'}}) "
            f"(see `peftkit docs plugins#peftkit_register_architectures`)")
    pattern = arch.points[point]
    keep_layers = config.layers_to_transform if config is not None else None
    if isinstance(keep_layers, int):
        keep_layers = [keep_layers]
    found = [name for name, _ in iter_candidate_modules(model)
             if name and re.fullmatch(pattern, name)
             and (keep_layers is None or layer_index(name, arch) in keep_layers)]
    if not found:
        raise TargetError(f"insertion point {point!r} ({pattern}) matched no module of this "
                          f"{model_type!r} model; candidates: {', '.join(_sample_linear_names(model))}")
    return found


def _article(noun: str) -> str:
    """``noun`` with "a" or "an" before it ("an Embedding", "a Conv3d")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
