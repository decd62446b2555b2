"""AdapterFusion folders saved by AdapterHub's ``adapters`` (``save_adapter_fusion``), read into peftkit's fusion.

``adapters`` writes ``adapter_fusion_config.json`` (``adapter_names``, the fusion's options under ``"config"``,
``model_type``, ``hidden_size``) and ``model_adapter_fusion.safetensors`` or ``pytorch_model_adapter_fusion.bin``,
keyed ``<module>.adapter_fusion_layer.<a,b>.{query,key,value}.*`` at each module its bottleneck adapters hang on.
Its fusion (``BertFusion``) over sequential bottleneck adapters is peftkit's (docs/composition.md):

    q = W_q h + b_q,  s_n = q . (W_k u_n + b_k),  p = softmax(s / T),  out = h + sum_n p_n W_v u_n

with ``h`` the site's output before the adapters and ``u_n`` adapter n's scaled up-projection, its
contribution. ``b_k`` adds ``q . b_k`` to every member's score alike, so the softmax drops it: peftkit's key has
no bias. Without ``query``/``key``/``value`` the projection is the identity; ``residual_before=true`` is
peftkit's ``residual=false``. This holds only where ``adapters``' query and residual are the output the
adapters read, with one translation: over members made with ``original_ln_before`` (AdapterHub's default
``SeqBnConfig``), ``adapters``' query reads ``LN(h + r)`` (the model's LayerNorm of the site's output and the
block's residual input: what those members read), so peftkit's fusion gets ``query_from="adapter_input"``
(``query_before_ln=true`` keeps the query on ``h``). Refused, by the option's name: members that differ in
``original_ln_before``, such members whose skip connection carries anything but ``h``
(``residual_before_ln`` other than true), an own ``ln_after`` (whose ``u_n`` is not the member's contribution)
and gates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .adapterhub_format import read_adapterhub_weights, same_module
from .composition import Fuse
from .errors import AdapterLoadError, CompositionError, ConfigError
from .fuse_config import FuseConfig
from .fusion import add_fusion, delete_fusion, fusion_layers

if TYPE_CHECKING:  # pragma: no cover
    from .adapted_protocol import AdaptedModelProtocol
    from .state import FusionRecord

CONFIG_NAME = "adapter_fusion_config.json"
SAFE_WEIGHTS_NAME = "model_adapter_fusion.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
#: The identity-or-learned projections of ``adapters``' fusion config.
PROJECTIONS = ("query", "key", "value")


def is_adapterhub_fusion(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder ``adapters``' ``save_adapter_fusion`` wrote."""
    return (Path(path) / CONFIG_NAME).is_file()


def fuse_config(options: Mapping[str, Any], reads_model_norm: bool = False) -> FuseConfig:
    """peftkit's fusion settings for ``adapters``' fusion options; ConfigError names one peftkit cannot run.
    ``reads_model_norm``: the members read through the model's LayerNorm (``original_ln_before``), so
    ``adapters``' query reads that LayerNorm's output unless ``query_before_ln``."""
    if not any(options.get(projection) for projection in PROJECTIONS):
        raise ConfigError("AdapterHub fusion with query, key and value all false scores members with one dense "
                          "layer, which peftkit's fusion does not have; train a fusion in peftkit instead "
                          "(model.train_fusion(Fuse(...)))")
    if options.get("temperature"):
        raise ConfigError("AdapterHub fusion option temperature=true: its softmax temperature starts at 50 and "
                          "drops on every forward, so its outputs depend on how many forwards ran; peftkit's "
                          "temperature is a constant (FuseConfig(temperature=...)); train the fusion again with "
                          "model.train_fusion(Fuse(...))")
    query_from = "adapter_input" if reads_model_norm and not options.get("query_before_ln") else "output"
    return FuseConfig(value=bool(options.get("value", True)), residual=not options.get("residual_before"),
                      regularization=0.01 if options.get("regularization") else 0.0, query_from=query_from)


def check_member(model: "AdaptedModelProtocol", name: str) -> None:
    """ConfigError unless adapter ``name``'s contribution is what ``adapters``' fusion attends over."""
    record = model.adapter_record(name)
    fmt = record.method.adapterhub
    if fmt is None or not fmt.fusion_member:
        raise ConfigError(f"adapter {name!r} is {record.method.name!r}, which is no member peftkit reads an "
                          f"AdapterHub fusion over (its method's AdapterHub format does not say fusion_member: "
                          f"the sequential bottleneck adapters do)")
    residual = getattr(record.config, "original_ln_residual", "output")
    if getattr(record.config, "original_ln_before", False) and residual != "output":
        raise ConfigError(f"adapter {name!r} reads through the model's LayerNorm with its skip connection "
                          f"carrying {residual!r} (adapters' residual_before_ln="
                          f"{'post_add' if residual == 'sum' else 'false'}): adapters' fusion then adds its "
                          f"output to that skip, not to the site's output, so the fusion would compute otherwise "
                          f"here; train a fusion in peftkit instead (model.train_fusion(Fuse(...)))")
    for option, why in (("ln_after", "adapters' fusion then attends over the branch before that LayerNorm"),
                        ("use_gating", "adapters' fusion then attends over the branch before the gate")):
        if getattr(record.config, option, False):
            raise ConfigError(f"adapter {name!r} has {option}=true: {why}, so the fusion would compute "
                              f"otherwise here; train a fusion in peftkit instead (model.train_fusion(Fuse(...)))")


def _reads_model_norm(model: "AdaptedModelProtocol", members: list[str]) -> bool:
    """Whether the members read through the model's LayerNorm (``original_ln_before``); ConfigError when some do
    and some do not: ``adapters`` feeds every member what the last one reads, peftkit each member its own."""
    reads = {name: bool(getattr(model.adapter_record(name).config, "original_ln_before", False)) for name in members}
    if len(set(reads.values())) > 1:
        which = ", ".join(f"{name}: {value}" for name, value in reads.items())
        raise ConfigError(f"the fused adapters differ in original_ln_before ({which}): adapters' fusion feeds "
                          f"every member what the last one reads, peftkit each member its own input; fuse "
                          f"adapters made with the same setting, or train a fusion in peftkit "
                          f"(model.train_fusion(Fuse(...)))")
    return any(reads.values())


def fusion_tensors(record: "FusionRecord", model: "AdaptedModelProtocol", tensors: Mapping[str, torch.Tensor],
                   saved_name: str, options: Mapping[str, Any], model_type: str | None,
                   where: str) -> dict[str, torch.Tensor]:
    """The fusion's tensors keyed as peftkit's (``<site>.query.weight``) from ``adapters``' keys."""
    marker = f".adapter_fusion_layer.{saved_name}."
    member = model.adapter_record(str(record.node.children[0]))
    fmt = member.method.adapterhub
    modules = {site: fmt.module_for(site, model_type) for site in record.sites}
    theirs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, found, rest = key.partition(marker)
        if not found:
            raise AdapterLoadError(f"{where}: weight {key!r} is not one of fusion {saved_name!r}'s")
        matches = [site for site, m in modules.items() if same_module(m, module)]
        if len(matches) != 1:
            raise AdapterLoadError(f"{where}: weight {key!r} fits {len(matches)} of the fusion's sites here; load "
                                   f"the member adapters the fusion was trained with")
        theirs.setdefault(matches[0], {})[rest] = tensor
    out: dict[str, torch.Tensor] = {}
    for site in record.sites:
        saved = theirs.get(site)
        if saved is None:
            raise AdapterLoadError(f"{where}: the fusion has no weights for site {site} (adapters' module "
                                   f"{modules[site]}), where its members act; load the member adapters it was "
                                   f"trained with")
        dim = next(t for t in saved.values()).shape[-1]
        identity = {"query.weight": torch.eye(dim), "query.bias": torch.zeros(dim), "key.weight": torch.eye(dim),
                    "value.weight": torch.eye(dim)}
        wanted = {}
        for key, same in identity.items():
            projection = key.partition(".")[0]
            if projection == "value" and not options.get("value", True):
                continue  # peftkit's value=false: no W_v at all
            if not options.get(projection, True):
                wanted[key] = same
            elif key in saved:
                wanted[key] = saved[key]
            else:
                raise AdapterLoadError(f"{where}: the fusion's weights lack {key} at {modules[site]} although "
                                       f"{CONFIG_NAME} says {projection}=true; save the fusion again")
        out.update({f"{site}.{key}": tensor for key, tensor in wanted.items()})
    return out


def load_adapterhub_fusion(model: "AdaptedModelProtocol", path: str | os.PathLike, name: str | None = None
                           ) -> "FusionRecord":
    """Load a fusion ``adapters`` saved onto a model holding its member adapters (by their saved names).

    The fusion is named as peftkit names ``Fuse(*members)`` (``a_b``) unless ``name`` is given. On any error
    the model is left as it was."""
    path = Path(path)
    where = str(path)
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"{where}: {CONFIG_NAME} cannot be read ({exc}); save the fusion again") from None
    members, options = data.get("adapter_names"), data.get("config")
    if not isinstance(members, list) or not members or not isinstance(options, dict):
        raise AdapterLoadError(f"{where}: {CONFIG_NAME} has no 'adapter_names' list and 'config' dict")
    missing = [n for n in members if n not in model.adapters]
    if missing:
        raise AdapterLoadError(f"{where}: the AdapterHub fusion fuses adapters {', '.join(map(repr, missing))}, "
                               f"which are not on this model; load them first under their saved names "
                               f"(model.load_adapter(folder, name, activate=False))")
    model_type = getattr(getattr(model.base_model, "config", None), "model_type", None)
    hidden = getattr(getattr(model.base_model, "config", None), "hidden_size", None)
    for key, ours in (("model_type", model_type), ("hidden_size", hidden)):
        if data.get(key) is not None and ours is not None and data[key] != ours:
            raise AdapterLoadError(f"{where}: the fusion was saved for a model with {key}={data[key]!r}, this "
                                   f"model has {key}={ours!r}; load it on the base model it was trained for")
    try:
        for member in members:
            check_member(model, str(member))
        config = fuse_config(options, _reads_model_norm(model, [str(m) for m in members]))
        node = Fuse(*map(str, members), name=name)
    except (ConfigError, CompositionError) as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None
    tensors = read_adapterhub_weights(path, SAFE_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME)
    try:
        record = add_fusion(model, node, config)
    except CompositionError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None
    try:
        saved_name = str(data.get("name") or ",".join(map(str, members)))
        ours = fusion_tensors(record, model, tensors, saved_name, options, model_type, where)
        with torch.no_grad():
            for site, fusion in fusion_layers(model, record.name):
                for key, target in fusion.state_dict(keep_vars=True).items():
                    source = ours[f"{site}.{key}"]
                    if tuple(source.shape) != tuple(target.shape):
                        raise AdapterLoadError(f"{where}: {key} at {site} has shape {tuple(source.shape)}, the "
                                               f"fusion there needs {tuple(target.shape)}")
                    target.copy_(source.to(device=target.device, dtype=target.dtype))
    except BaseException:
        delete_fusion(model, record.name)
        raise
    return record
