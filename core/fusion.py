"""AdapterFusion (Pfeiffer et al. 2021, arXiv 2005.00247) over any adapters.

At every site where a fused member acts, a :class:`FusionLayer` attends over
the members' contributions. With ``h`` the site's output before the fusion
(the base output, or the output of what a surrounding stack ran before) and
``z_n`` the change member n makes to it (``delta(x)`` for additive adapters,
``output - h`` for any other adapter or stack of adapters)::

    q   = W_q h + b_q                          (query, from the pre-adapter output)
    k_n = W_k z_n                              (keys, from each member's contribution)
    p   = softmax_n(q . k_n / T)               (per token, over the members acting here)
    out = h + sum_n p_n W_v z_n                (residual=True; AdapterHub's layout)
    out = sum_n p_n W_v (h + z_n) = W_v h + sum_n p_n W_v z_n     (residual=False; the paper's
                                                z_n read as the adapters' full outputs)

W_v starts as the identity, W_k as zero and W_q small random, so a new fusion
starts exactly as the unweighted average of its members, and every parameter
gets a gradient from the first step. ``fusion_regularization_loss()`` is
``regularization * sum ||W_v - I||_F^2`` over the fusion's sites, the paper's
pull of W_v toward the identity. The temperature T is part of the fusion's
config, constant in training and eval, and saved with it.

A fusion is its own artifact: a folder with ``fusion_config.json`` and
``fusion_model.safetensors`` (keys ``<site>.query.weight``, ``<site>.query.bias``,
``<site>.key.weight``, ``<site>.value.weight``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn as nn

from . import composition
from .composition import Fuse, Node
from .composition_exec import node_acts
from .errors import AdapterLoadError, CompositionError, ConfigError, PeftkitError
from .fileio import atomic_folder, read_folder_json, write_bytes_atomic, write_text_atomic
from .layer import name_taken_by_torch
from .fuse_config import FuseConfig
from .state import FusionRecord

if TYPE_CHECKING:  # pragma: no cover
    from .layer import TunerLayer
    from .adapted_protocol import AdaptedModelProtocol

FUSION_CONFIG_NAME = "fusion_config.json"
FUSION_WEIGHTS_NAME = "fusion_model.safetensors"
FUSION_FORMAT_VERSION = 1
class FusionLayer(nn.Module):
    """One fusion at one site: attention over the contributions of the members acting here."""

    def __init__(self, dim: int, member_index: list[int], config: FuseConfig, site: str,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        self.dim = dim
        self.member_index = list(member_index)
        self.config = config  # shared with the FusionRecord: temperature changes apply at once
        self.site = site
        qk = config.query_key_dim or dim
        self.query = nn.Linear(dim, qk, bias=True, dtype=dtype, device=device)
        self.key = nn.Linear(dim, qk, bias=False, dtype=dtype, device=device)
        self.value = nn.Linear(dim, dim, bias=False, dtype=dtype, device=device) if config.value else None
        with torch.no_grad():
            nn.init.normal_(self.query.weight, std=config.init_std)
            nn.init.zeros_(self.query.bias)
            nn.init.zeros_(self.key.weight)
            if self.value is not None:
                self.value.weight.copy_(torch.eye(dim, dtype=dtype))

    def forward(self, h: torch.Tensor, contributions: list[torch.Tensor], query_input: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused output and the attention weights (..., members). ``query_input``: what the query reads
        when not h (``FuseConfig.query_from="adapter_input"``)."""
        if h.shape[-1] != self.dim:
            raise CompositionError(f"fusion at {self.site}: the output width is {h.shape[-1]}, but the fusion "
                                   f"was made for width {self.dim}")
        dtype = self.query.weight.dtype
        hq = h if h.dtype == dtype else h.to(dtype)
        z = torch.stack([c if c.dtype == dtype else c.to(dtype) for c in contributions], dim=-2)  # (..., N, d)
        query = self.query(hq if query_input is None else query_input.to(dtype))  # (..., k)
        # q . (W_k z_n) = (W_k^T q) . z_n: one (k, d) product per token instead of one per member and token
        # (the keys themselves are never needed), which is most of a fusion's cost with several members.
        probe = torch.matmul(query, self.key.weight)  # (..., d)
        scores = torch.matmul(z, probe.unsqueeze(-1)).squeeze(-1)  # (..., N)
        probs = torch.softmax(scores / self.config.temperature, dim=-1)
        mixed = torch.matmul(probs.unsqueeze(-2), z).squeeze(-2)  # sum_n p_n z_n
        if self.config.residual:
            out = mixed if self.value is None else self.value(mixed)
            return h + out.to(h.dtype), probs
        full = mixed + hq  # sum_n p_n (h + z_n), since sum_n p_n = 1
        out = full if self.value is None else self.value(full)
        return out.to(h.dtype), probs

    def value_distance(self) -> torch.Tensor:
        """||W_v - I||_F^2 (0 without a value projection)."""
        if self.value is None:
            return self.query.weight.new_zeros(())
        # W - I as a copy of W less 1 on its diagonal, squared and summed in one dot product: no identity
        # matrix and no squared copy to build (the loss adds this at every site and step; built with
        # torch.eye and pow it took about a tenth of a fusion's training step on MiniLM).
        diff = self.value.weight.clone()
        diff.diagonal().sub_(1.0)
        flat = diff.reshape(-1)
        return torch.dot(flat, flat)

    def extra_repr(self) -> str:
        return f"site={self.site}, dim={self.dim}, members={self.member_index}, T={self.config.temperature:g}"


# -- running --------------------------------------------------------------------------------------


@dataclasses.dataclass
class FusionWeights:
    """Attention weights of one fusion at one site: ``weights[..., j]`` belongs to ``members[j]``."""

    members: list[str]
    weights: torch.Tensor


class FusionCapture:
    """Collects fusion attention weights while ``model.capture_fusion_weights()`` is open.

    ``calls`` has one dict per forward pass ({fusion: {site: FusionWeights}});
    ``weights`` is the last pass (generate() makes one pass per step).
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, dict[str, FusionWeights]]] = []

    def record(self, fusion: str, site: str, members: list[str], probs: torch.Tensor) -> None:
        if not self.calls or site in self.calls[-1].get(fusion, {}):
            self.calls.append({})
        self.calls[-1].setdefault(fusion, {})[site] = FusionWeights(members, probs)

    @property
    def weights(self) -> dict[str, dict[str, FusionWeights]]:
        return self.calls[-1] if self.calls else {}


# -- managing fusions on a model ------------------------------------------------------------------------


def site_output_dim(layer: "TunerLayer") -> int | None:
    """The width of a site's output, from the wrapped module (or its adapters)."""
    base = layer.base_layer
    for attr in ("out_features", "nf", "embedding_dim"):
        value = getattr(base, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(base, "normalized_shape", None)
    if isinstance(shape, tuple) and shape:
        return int(shape[-1])
    for adapter in layer.adapters.values():
        value = getattr(adapter, "out_features", None)
        if isinstance(value, int):
            return value
    last = None
    for module in base.modules():
        value = getattr(module, "out_features", None)
        if isinstance(value, int):
            last = value
    return last


def as_fuse(model: "AdaptedModelProtocol", fuse: Fuse | str) -> Fuse:
    """A Fuse block from a block, its string form, or the name of a fusion on the model."""
    state = model.adapter_state
    if isinstance(fuse, str) and fuse in state.fusions:
        return state.fusions[fuse].node
    node = composition.as_node(fuse)
    if not isinstance(node, Fuse):
        raise CompositionError(f"{node} is not a fuse() block; write e.g. Fuse('a', 'b', name='ab')")
    return node


def add_fusion(model: "AdaptedModelProtocol", fuse: Fuse | str, config: FuseConfig | dict[str, Any] | None = None,
               **options: Any) -> FusionRecord:
    node = composition.as_node(fuse)
    if not isinstance(node, Fuse):
        raise CompositionError(f"add_fusion() takes a fuse() block, e.g. Fuse('a', 'b', name='ab'); got {node}")
    state = model.adapter_state
    name = node.fusion_name
    if name_taken_by_torch(name):
        raise CompositionError(f"fusion name {name!r} is taken by torch (every nn.Module has an attribute "
                               f"{name!r}); give the fusion another name: Fuse(..., name='...')")
    if name in state.fusions:
        raise CompositionError(f"a fusion named {name!r} already exists; delete_fusion({name!r}) first or give "
                               f"this one another name (Fuse(..., name='...'))")
    composition.check_supported(node, {n: r.method for n, r in model.adapter_records.items()})
    model.check_heads(node)
    model_level = [n for n in composition.adapter_leaves(node) if model.adapter_record(n).model_adapter]
    if model_level:
        raise CompositionError(f"adapter {model_level[0]!r} changes the model's inputs and has no output at a "
                               f"layer to fuse; fuse adapters that act at layers")
    cfg = FuseConfig.build(config, options)
    if cfg.query_from == "adapter_input" and not isinstance(node.children[-1], str):
        raise CompositionError(f"query_from='adapter_input' reads what the last member's branch reads, so the "
                               f"last member of {node} must be an adapter, not {node.children[-1]}")
    created: list[TunerLayer] = []
    sites: dict[str, list[int]] = {}
    try:
        for site, layer in model.tuner_layers():
            index = [i for i, child in enumerate(node.children) if node_acts(child, layer)]
            if not index:
                continue
            dim = site_output_dim(layer)
            if dim is None:
                raise CompositionError(f"cannot tell the output width of site {site!r} "
                                       f"({type(layer.base_layer).__name__}) to place a fusion there")
            ref = next(layer.base_layer.parameters(), None)
            dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else torch.float32
            fusion = FusionLayer(dim, index, cfg, site, dtype=dtype, device=ref.device if ref is not None else None)
            fusion.requires_grad_(False)
            fusion.train(layer.training)
            layer.fusions[name] = fusion
            created.append(layer)
            sites[site] = index
        if not sites:
            raise CompositionError(f"the members of {node} act at no layer of this model; nothing to fuse")
    except BaseException:
        for layer in created:
            del layer.fusions[name]
        raise
    record = FusionRecord(name=name, node=node, config=cfg, sites=sites)
    state.fusions[name] = record
    return record


def fusion_record(model: "AdaptedModelProtocol", name: str) -> FusionRecord:
    try:
        return model.adapter_state.fusions[name]
    except KeyError:
        known = ", ".join(model.adapter_state.fusions) or "none"
        raise CompositionError(f"no fusion named {name!r} on this model; fusions: {known}") from None


def fusion_layers(model: "AdaptedModelProtocol", name: str) -> Iterator[tuple[str, FusionLayer]]:
    fusion_record(model, name)
    for site, layer in model.tuner_layers():
        if name in layer.fusions:
            yield site, layer.fusions[name]


def fusion_parameters(model: "AdaptedModelProtocol", name: str) -> Iterator[nn.Parameter]:
    for _, fusion in fusion_layers(model, name):
        yield from fusion.parameters()


def delete_fusion(model: "AdaptedModelProtocol", name: str) -> None:
    fusion_record(model, name)
    state = model.adapter_state
    for _, layer in model.tuner_layers():
        if name in layer.fusions:
            del layer.fusions[name]
    del state.fusions[name]
    if any(f.fusion_name == name for f in composition.fuse_blocks(state.active)):
        state.active, state.active_names = None, ()


def check_fusions(model: "AdaptedModelProtocol", node: Node) -> None:
    """Every fuse() in ``node`` must name a fusion on the model with the same members."""
    fusions = model.adapter_state.fusions
    for block in composition.fuse_blocks(node):
        record = fusions.get(block.fusion_name)
        if record is None:
            raise CompositionError(f"{block} needs fusion weights named {block.fusion_name!r}; create them with "
                                   f"model.add_fusion({block}) or load them with model.load_fusion(path)")
        if record.node.children != block.children:
            raise CompositionError(f"fusion {block.fusion_name!r} fuses {record.node}, not {block}; use the same "
                                   f"members in the same order, or another name")


def fused_members(model: "AdaptedModelProtocol") -> dict[str, list[str]]:
    """Adapter name -> fusions it is a member of."""
    out: dict[str, list[str]] = {}
    for name, record in model.adapter_state.fusions.items():
        for leaf in composition.adapter_leaves(record.node):
            out.setdefault(leaf, []).append(name)
    return out


def train_fusion(model: "AdaptedModelProtocol", fuse: Fuse | str | None = None, *,
                 unfreeze_adapters: bool = False) -> None:
    """Activate ``fuse`` (or keep the active composition) and make only fusion weights trainable
    (and the fused adapters too with ``unfreeze_adapters=True``). Like train_adapter(), it does
    not switch train/eval mode: call ``model.train()`` (transformers' Trainer does)."""
    if fuse is not None:
        node = as_fuse(model, fuse) if isinstance(fuse, str) and fuse in model.adapter_state.fusions \
            else composition.as_node(fuse)
        if not composition.fuse_blocks(node):
            raise CompositionError(f"train_fusion() takes a fuse() block or a fusion's name, e.g. "
                                   f"train_fusion(Fuse('a', 'b')) (AdapterHub's list ['a', 'b'] is Fuse('a', 'b') "
                                   f"here); {fuse!r} is {node}, which holds no fuse()")
        model.set_active(node)
    active = model.adapter_state.active
    blocks = composition.fuse_blocks(active)
    if not blocks:
        raise CompositionError(f"the active composition {active} holds no fuse(); pass one, e.g. "
                               f"train_fusion(Fuse('a', 'b', name='ab'))")
    for param in model.parameters():
        param.requires_grad_(False)
    for block in blocks:
        for param in fusion_parameters(model, block.fusion_name):
            param.requires_grad_(True)
    if unfreeze_adapters:
        for name in composition.adapter_leaves(active):
            for param in model.adapter_parameters(name):
                param.requires_grad_(True)


def unfreeze_fusions(model: "AdaptedModelProtocol", node: Node | None) -> int:
    """Make the fusion weights of every fuse() in ``node`` trainable; returns how many fusions."""
    blocks = composition.fuse_blocks(node)
    for block in blocks:
        for param in fusion_parameters(model, block.fusion_name):
            param.requires_grad_(True)
    return len(blocks)


def regularization_loss(model: "AdaptedModelProtocol", name: str | None = None) -> torch.Tensor:
    """sum over fusions (all, or ``name``) of regularization * sum_sites ||W_v - I||^2."""
    names = [name] if name is not None else list(model.adapter_state.fusions)
    total: torch.Tensor | None = None
    for fusion_name in names:
        factor = fusion_record(model, fusion_name).config.regularization
        for _, fusion in fusion_layers(model, fusion_name):
            term = fusion.value_distance() * factor
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=model.device)
    return total


def set_temperature(model: "AdaptedModelProtocol", name: str, temperature: float) -> None:
    record = fusion_record(model, name)
    new = dataclasses.replace(record.config, temperature=temperature)  # validates
    record.config.temperature = new.temperature  # the layers share this object


@contextlib.contextmanager
def capture(model: "AdaptedModelProtocol") -> Iterator[FusionCapture]:
    state = model.adapter_state
    previous = state.capture
    collector = FusionCapture()
    state.capture = collector
    try:
        yield collector
    finally:
        state.capture = previous


# -- files ----------------------------------------------------------------------------------------------


def save_fusion(model: "AdaptedModelProtocol", name: str, path: str | os.PathLike) -> None:
    """Write fusion ``name`` as a folder (fusion_config.json + fusion_model.safetensors)."""
    from safetensors.torch import save

    from .serialization import base_model_id, base_model_info, peftkit_version

    record = fusion_record(model, name)
    tensors: dict[str, torch.Tensor] = {}
    sites: dict[str, Any] = {}
    for site, fusion in fusion_layers(model, name):
        for key, tensor in fusion.state_dict().items():
            tensors[f"{site}.{key}"] = tensor.detach().to("cpu").contiguous()
        sites[site] = {"dim": fusion.dim, "members": [str(record.node.children[i]) for i in fusion.member_index],
                       "member_index": fusion.member_index}
    data = {
        "peftkit_fusion": {"format_version": FUSION_FORMAT_VERSION, "peftkit_version": peftkit_version()},
        "name": name,
        "fuse": record.node.to_json(),
        "composition": str(record.node),
        "config": record.config.to_dict(),
        "sites": sites,
        "base_model_name_or_path": base_model_id(model),
        "base_model": base_model_info(model),
    }
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PeftkitError(f"cannot save fusion to {str(path)!r}: it is a file, not a folder")

    def write(folder: Path) -> None:
        write_bytes_atomic(folder / FUSION_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
        write_text_atomic(folder / FUSION_CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")

    if path.exists():
        write(path)
    else:
        with atomic_folder(path) as tmp:
            write(tmp)


def read_fusion_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    config_path = path / FUSION_CONFIG_NAME
    data = read_folder_json(path, FUSION_CONFIG_NAME, "fusion")
    own = data.get("peftkit_fusion") if isinstance(data, dict) else None
    if not isinstance(own, dict) or not isinstance(data.get("fuse"), dict):
        raise AdapterLoadError(f"{config_path} is not a peftkit fusion config (no 'peftkit_fusion'/'fuse' keys)")
    version = own.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterLoadError(f"{config_path}: format_version must be a whole number, got {version!r}; "
                               f"save the fusion again")
    if version > FUSION_FORMAT_VERSION:
        raise AdapterLoadError(f"{config_path} has fusion format {own.get('format_version')}, newer than this "
                               f"peftkit reads ({FUSION_FORMAT_VERSION}); upgrade peftkit")
    return data


def read_tensors(file: Path, where: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (never pickle), with a clear error when absent or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    if not file.is_file():
        raise AdapterLoadError(f"{where} has no {file.name}; the folder is incomplete, save it again")
    try:
        return dict(load_bytes(file.read_bytes()))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterLoadError(f"{file} is truncated or corrupted ({exc}); save it again") from None


def load_fusion(model: "AdaptedModelProtocol", path: str | os.PathLike, name: str | None = None) -> FusionRecord:
    """Load a fusion folder onto a model that holds its member adapters (by name).

    ``name`` renames the fusion. On any error the model is left as it was.
    """
    from .serialization import check_base_model

    path = Path(path)
    where = str(path)
    data = read_fusion_config(path)
    try:
        node = composition.from_json(data["fuse"])
    except CompositionError as exc:
        raise AdapterLoadError(f"{where}: the fused composition is invalid: {exc}") from None
    if not isinstance(node, Fuse):
        raise AdapterLoadError(f"{where}: 'fuse' is {node}, not a fuse() block")
    if name is not None:
        node = Fuse(*node.children, name=name)
    missing = [n for n in composition.adapter_leaves(node) if n not in model.adapters]
    if missing:
        raise AdapterLoadError(f"{where}: fusion {node.fusion_name!r} fuses adapters {', '.join(map(repr, missing))},"
                               f" which are not on this model; load them first (or use load_composition())")
    check_base_model(model, {"peftkit": {"base_model": data.get("base_model") or {}},
                             "base_model_name_or_path": data.get("base_model_name_or_path")}, where)
    try:
        config = FuseConfig.from_dict(data.get("config") or {})
    except ConfigError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None
    tensors = read_tensors(path / FUSION_WEIGHTS_NAME, where)
    try:
        record = add_fusion(model, node, config)
    except CompositionError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from None
    try:
        saved_sites = data.get("sites") or {}
        if sorted(saved_sites) != sorted(record.sites):
            extra = sorted(set(saved_sites) ^ set(record.sites))
            raise AdapterLoadError(f"{where}: the fusion was saved for other sites than its members act at now "
                                   f"(differing: {', '.join(extra[:5])}); load the same member adapters")
        own = {f"{site}.{key}": t for site, fusion in fusion_layers(model, record.name)
               for key, t in fusion.state_dict(keep_vars=True).items()}
        if set(own) != set(tensors):
            diff = sorted(set(own) ^ set(tensors))
            raise AdapterLoadError(f"{where}: {FUSION_WEIGHTS_NAME} does not match the fusion's layers "
                                   f"(differing keys: {', '.join(diff[:5])})")
        bad = [k for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
        if bad:
            raise AdapterLoadError(f"{where}: shape mismatch for {', '.join(bad[:3])}")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    except BaseException:
        delete_fusion(model, record.name)
        raise
    return record
