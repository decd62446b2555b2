"""Compose at load time: ``peftkit.load(base, "stack(alice/lang-de, alice/ner@v2)", hub=...)``.

Steps, and what each guarantees:

1. **Plan.** Every hub reference in the composition (``namespace/name[@revision]``)
   gets an adapter name (see :func:`member_names`); the composition is parsed
   with those names by :mod:`peftkit.core.composition`.
2. **Download** every member into the cache (nothing on the model changes yet).
3. **Check**, still before touching the model: each member is an adapter,
   composition or fusion folder; its method is installed (else the error
   names the plugin distribution to install); it was made for this base model
   (model type, hidden sizes, layer count); every member's method supports
   the blocks it sits in.
4. **Load** the members (composition repos bring their adapters and fusion
   weights along) and activate the composition. On any error the model is
   left exactly as it was.

Names: ``alice/ner@v2`` is loaded as ``ner``. When two members would share a
name, both use ``<namespace>__<name>`` (``alice__ner``); the same repo at two
revisions adds the revision (``alice__ner__v2``). Names already on the model
are avoided the same way. Pass ``adapters={"my_name": "alice/ner@v2"}`` to
choose names yourself (and to use them in a composition written with
:class:`~peftkit.Stack` and friends). Members of a composition repo keep the
names they were saved with.
"""

from __future__ import annotations

import contextlib
import os
import re
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from peftkit.core import composition
from peftkit.core.adapter_names import distinct_names
from peftkit.core.composition import BASE_MODEL, Block, Node
from peftkit.core.errors import CompositionError
from peftkit.core.model_source import looks_local
from peftkit.hub_rules.cards import TASK_TYPE_TO_AUTO_CLASS

from .backend import HubBackend
from .errors import HubError
from .resolve import RepoRef, parse_ref

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.core.model import AdaptedModel

_QUOTED = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_REF = re.compile(r"(?<![A-Za-z0-9_.\-/@])"
                  r"[A-Za-z0-9_][A-Za-z0-9_.\-]*/[A-Za-z0-9_][A-Za-z0-9_.\-]*(?:@[A-Za-z0-9_][A-Za-z0-9_./\-]*)?")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")
_PLACEHOLDER = "__hubref{}__"

#: PEFT's task_type -> the transformers Auto class for the base model.
_AUTO_CLASSES = TASK_TYPE_TO_AUTO_CLASS


@dataclass
class Member:
    """One hub repo of a composition."""

    ref: RepoRef
    name: str
    path: Path | None = None
    commit: str | None = None
    kind: str = "adapter"  # "adapter", "composition" or "fusion"
    data: dict[str, Any] = field(default_factory=dict)
    node: Node | None = None  # what the member stands for in the composition

    @property
    def source(self) -> str:
        return f"{self.ref.repo_id}@{self.commit or self.ref.revision or 'main'}"


@dataclass
class Plan:
    """A composition with adapter names, and the hub members behind those names."""

    node: Node
    members: dict[str, Member]


# -- planning ------------------------------------------------------------------------------------


def _sanitize(text: str) -> str:
    name = _NAME_CHARS.sub("_", text).strip("_-") or "adapter"
    return name[:128]


def member_names(refs: Sequence[RepoRef], taken: set[str] = frozenset()) -> dict[RepoRef, str]:  # type: ignore[assignment]
    """Adapter names for hub references: the repo name, else ``namespace__name``, else with the revision."""
    levels = [
        lambda r: _sanitize(r.name),
        lambda r: _sanitize(f"{r.namespace}__{r.name}"),
        lambda r: _sanitize(f"{r.namespace}__{r.name}__{(r.revision or 'main')[:12]}"),
    ]
    return distinct_names(refs, levels, taken)


def _rename(node: Node, mapping: Mapping[str, str]) -> Node:
    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return mapping.get(value, value)
        return dict(value, children=[walk(c) for c in value["children"]])

    return composition.from_json(walk(composition.to_json(node)))


def _substitute_refs(text: str) -> tuple[str, list[RepoRef]]:
    """Replace hub references outside quotes by placeholders; returns the text and the refs in order."""
    refs: list[RepoRef] = []
    index: dict[RepoRef, int] = {}

    def replace(match: re.Match[str]) -> str:
        ref = parse_ref(match.group(0))
        if ref not in index:
            index[ref] = len(refs)
            refs.append(ref)
        return _PLACEHOLDER.format(index[ref])

    out, last = [], 0
    for quoted in _QUOTED.finditer(text):
        out.append(_REF.sub(replace, text[last:quoted.start()]))
        out.append(quoted.group(0))
        last = quoted.end()
    out.append(_REF.sub(replace, text[last:]))
    return "".join(out), refs


def _json_refs(value: Any, refs: list[RepoRef]) -> Any:
    """The JSON form with hub references replaced by placeholders."""
    if isinstance(value, str):
        if "/" not in value:
            return value
        ref = parse_ref(value)
        if ref not in refs:
            refs.append(ref)
        return _PLACEHOLDER.format(refs.index(ref))
    if isinstance(value, dict):
        children = value.get("children")
        if not isinstance(children, list):
            raise CompositionError(f"a composition in JSON is an adapter name or an object with 'block' and "
                                   f"'children', got {value!r}")
        return dict(value, children=[_json_refs(c, refs) for c in children])
    if isinstance(value, Block):
        return composition.to_json(value)
    raise CompositionError(f"cannot read {value!r} as part of a composition; give hub ids, adapter names or blocks")


def plan(spec: Any, *, adapters: Mapping[str, str] | None = None, existing: Sequence[str] = ()) -> Plan:
    """Parse ``spec`` (a string, JSON dict, list = stack, or block) and name its hub members."""
    explicit: dict[str, RepoRef] = {}
    for name, ref_text in (adapters or {}).items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]{1,128}", name) or name == BASE_MODEL:
            raise CompositionError(f"adapters=: {name!r} is not a valid adapter name (letters, digits, '_', '-')")
        if name in existing:
            raise CompositionError(f"adapters=: the model already has an adapter named {name!r}; choose another name")
        try:
            explicit[name] = parse_ref(ref_text)
        except HubError as exc:
            raise type(exc)(f"{exc}{_folders_hint(str(ref_text))}") from None

    refs: list[RepoRef] = []
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir() and not _REF.fullmatch(os.fspath(spec)):
        # a folder that is no hub id (``out/w1`` is both: the hub is asked first, then _local_folder_hint)
        raise CompositionError(f"{os.fspath(spec)!r} is a folder here, and peftkit.load reads hub repos; load a saved "
                               f"adapter folder with peftkit.from_pretrained(model, {os.fspath(spec)!r}) (a "
                               f"composition folder: peftkit.load_composition), or push it and load the repo")
    if isinstance(spec, str):
        text, refs = _substitute_refs(spec)
        try:
            template = composition.parse(text)
        except CompositionError as exc:  # say it in the user's words, not the placeholders'
            message = str(exc)
            for i, ref in enumerate(refs):
                message = message.replace(_PLACEHOLDER.format(i), str(ref))
            raise CompositionError(message + _folders_hint(spec)) from None
    elif isinstance(spec, Block):
        template = spec
    elif isinstance(spec, dict):
        template = composition.from_json(_json_refs(spec, refs))
    elif isinstance(spec, (list, tuple)):
        items = [_json_refs(item, refs) if not isinstance(item, Block) else item for item in spec]
        template = composition.as_node([composition.from_json(i) if isinstance(i, dict) else i for i in items])
    else:
        raise CompositionError(f"cannot read {spec!r} as a composition: give a string such as "
                               f"'stack(alice/a, alice/b)', a list of hub ids, a JSON dict or a block")

    placeholders = {_PLACEHOLDER.format(i): ref for i, ref in enumerate(refs)}
    leaves = composition.leaves(template)
    bare = {leaf for leaf in leaves if leaf not in placeholders}
    for leaf in sorted(bare):
        if leaf != BASE_MODEL and leaf not in explicit and leaf not in existing:
            raise CompositionError(
                f"{leaf!r} in the composition is neither a hub repo (namespace/name[@revision]) nor an adapter on "
                f"the model; write the hub id (e.g. alice/{leaf}), or map it with adapters={{{leaf!r}: 'ns/repo'}}")
    by_ref = {ref: name for name, ref in explicit.items()}
    derived = member_names([r for r in refs if r not in by_ref],
                           taken=set(existing) | set(explicit) | (bare - set(explicit)))
    by_ref.update(derived)
    node = _rename(template, {ph: by_ref[ref] for ph, ref in placeholders.items()})
    members = {name: Member(ref, name) for name, ref in explicit.items()}
    members.update({name: Member(ref, name) for ref, name in derived.items()})
    unused = [n for n in explicit if n not in composition.leaves(node)]
    if unused:
        raise CompositionError(f"adapters= names {', '.join(map(repr, unused))}, which the composition does not use")
    return Plan(node, members)


# -- checks --------------------------------------------------------------------------------------


def _classify(member: Member) -> None:
    from peftkit.core.composition_io import COMPOSITION_NAME, read_composition
    from peftkit.core.fusion import FUSION_CONFIG_NAME, read_fusion_config
    from peftkit.core.serialization import CONFIG_NAME, read_config

    assert member.path is not None
    path = member.path
    if (path / CONFIG_NAME).is_file():
        member.kind, member.data, member.node = "adapter", read_config(path), member.name
    elif (path / COMPOSITION_NAME).is_file():
        member.kind, member.data = "composition", read_composition(path)
        member.node = member.data["node"]
    elif (path / FUSION_CONFIG_NAME).is_file():
        member.kind, member.data = "fusion", read_fusion_config(path)
        node = composition.from_json(member.data["fuse"])
        name = member.data.get("name")
        if isinstance(node, composition.Fuse) and name and node.fusion_name != name:
            node = composition.Fuse(*node.children, name=name)
        member.node = node
    else:
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise HubError(f"{member.source} is not an adapter repo: it has no {CONFIG_NAME}, {COMPOSITION_NAME} or "
                       f"{FUSION_CONFIG_NAME} (it holds: {present})")


def _adapter_datas(member: Member) -> list[tuple[str, dict[str, Any], str]]:
    """``(adapter name, adapter config, where)`` of every adapter a member brings."""
    from peftkit.core.serialization import read_config

    if member.kind == "adapter":
        return [(member.name, member.data, member.source)]
    if member.kind == "composition":
        assert member.path is not None
        out = []
        for name, folder in member.data.get("adapters", {}).items():
            sub = (member.path / folder).resolve()
            if member.path.resolve() not in sub.parents:
                raise HubError(f"{member.source}: adapter folder {folder!r} points outside the repo")
            out.append((name, read_config(sub), f"{member.source}/{folder}"))
        return out
    return []


def _base_module(model: Any) -> Any:
    from peftkit.core.model import AdaptedModel

    return model.base_model if isinstance(model, AdaptedModel) else model


def check_members(model: Any, members: Sequence[Member], node: Node) -> None:
    """Every check that can run before the model changes (see the module docstring)."""
    from peftkit.core.adapterhub_format import claiming_method, is_adapterhub_config
    from peftkit.core.model import AdaptedModel
    from peftkit.core.plugins import get_registry
    from peftkit.core.serialization import base_model_id, check_base_model, method_for

    existing = model.adapter_records if isinstance(model, AdaptedModel) else {}
    shim = types.SimpleNamespace(base_model=_base_module(model))  # what check_base_model reads, without wrapping
    method_of: dict[str, Any] = {name: record.method for name, record in existing.items()}
    owner: dict[str, str] = {}
    for member in members:
        for name, data, where in _adapter_datas(member):
            if name in method_of or name in owner:
                other = owner.get(name, "the model")
                raise HubError(f"{member.source} brings an adapter named {name!r}, which {other} already uses; "
                               f"load the composition repo alone, or on a model without {name!r}")
            owner[name] = member.source
            if is_adapterhub_config(data):  # AdapterHub's folder: its method by its options, no base-model record
                method_of[name] = claiming_method(get_registry().methods.values(), data, where)[0]
                continue
            method_of[name] = method_for(data, where)  # names the plugin to install when missing
            check_base_model(shim, data, where)  # type: ignore[arg-type]
            _warn_other_base(data.get("base_model_name_or_path"), base_model_id(shim), where)  # type: ignore[arg-type]
        if member.kind == "fusion":
            data = member.data
            check_base_model(shim, {"peftkit": {"base_model": data.get("base_model") or {}},  # type: ignore[arg-type]
                                    "base_model_name_or_path": data.get("base_model_name_or_path")}, member.source)
    for member in members:
        if member.kind == "fusion":
            needed = [n for n in composition.adapter_leaves(member.node) if n not in method_of]
            if needed:
                raise HubError(f"{member.source} is a fusion of {', '.join(map(repr, needed))}, which are not on the "
                               f"model nor among the other members; push the whole composition (save_composition) "
                               f"and load that, or load the fused adapters under those names first")
    composition.check_supported(node, method_of)


def _warn_other_base(saved: str | None, current: str | None, where: str) -> None:
    if saved and current and saved != current and "/" in saved and not Path(current).exists():
        warnings.warn(f"{where} was made for {saved!r}; this model is {current!r}. Its shapes fit, so it loads; "
                      f"check that it is the same model", stacklevel=4)


# -- the base model ------------------------------------------------------------------------------


def model_class_for(datas: Sequence[dict[str, Any]]) -> Any:
    """The transformers class to load a base model with, from the members' saved model class (an AdapterHub
    folder's: its head's) or task type."""
    import transformers

    from peftkit.core.adapterhub_heads import head_model_class

    classes = []
    for data in datas:
        own = data.get("peftkit") if isinstance(data.get("peftkit"), dict) else {}
        saved = (own.get("base_model") or {}).get("class") or head_model_class(data)
        if isinstance(saved, str) and hasattr(transformers, saved):
            classes.append(saved)
    if len(set(classes)) > 1:
        raise HubError(f"the members were made for different model classes ({', '.join(sorted(set(classes)))}); "
                       f"load the base model yourself and pass the model object")
    if classes:
        return getattr(transformers, classes[0])
    task_types = {str(d.get("task_type")).upper() for d in datas if d.get("task_type")}
    autos = {_AUTO_CLASSES[t] for t in task_types if t in _AUTO_CLASSES}
    if len(autos) > 1:
        raise HubError(f"the members have different task types ({', '.join(sorted(task_types))}); load the base "
                       f"model yourself and pass the model object")
    return getattr(transformers, autos.pop() if autos else "AutoModel")


def check_base_config(name_or_path: str, members: Sequence[Member], model_kwargs: Mapping[str, Any]) -> None:
    """Refuse a base model of another architecture from its config alone, before its weights load
    (transformers would otherwise load them into the adapters' model class and warn about random weights)."""
    from transformers import AutoConfig

    from peftkit.core.serialization import check_base_model

    options = {k: model_kwargs[k] for k in ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")
               if k in model_kwargs}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **options)
    except Exception:  # noqa: BLE001 - load_base_model reports an unloadable base with its own message
        return
    shim = types.SimpleNamespace(base_model=types.SimpleNamespace(config=config))
    for member in members:
        for _, data, where in _adapter_datas(member):
            check_base_model(shim, data, where)  # type: ignore[arg-type]


@contextlib.contextmanager
def transformers_progress(progress: bool) -> Iterator[None]:
    """Without ``progress``, transformers shows no bars (loading weights, writing shards) meanwhile."""
    from transformers.utils import logging as hf_logging

    if progress or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_base_model(name_or_path: str, datas: Sequence[dict[str, Any]], **kwargs: Any) -> "nn.Module":
    from transformers.utils import logging as hf_logging

    from peftkit.core.adapterhub_heads import head_module_names

    cls = model_class_for(datas)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a missing task head is expected: the adapters carry it (checked below)
    try:
        model, loading = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"cannot load the base model {name_or_path!r} with transformers' {cls.__name__}: {first}. "
                       f"Give a model folder or hub id transformers can load, or pass the model object") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    provided = {m for data in datas for m in [*(data.get("modules_to_save") or []), *head_module_names(model, data)]}
    fresh = [k for k in loading.get("missing_keys") or ()
             if not any(k == m or k.startswith(m + ".") or f".{m}." in f".{k}" for m in provided)]
    if fresh:
        warnings.warn(f"the base model {name_or_path!r} has no weights for {', '.join(sorted(fresh)[:5])}"
                      f"{' ...' if len(fresh) > 5 else ''}, and no adapter provides them: they are random",
                      stacklevel=3)
    hub_id = members_hub_base(datas)
    if hub_id and looks_local(name_or_path):
        model.config.name_or_path = hub_id  # what a saved or pushed composition records, not the local folder
    return model.eval()


def members_hub_base(datas: Sequence[dict[str, Any]]) -> str | None:
    """The one hub id (not a local folder) that the members' configs record as their base model, if they
    agree on one; None when none records one or they name different ones."""
    recorded = {d.get("base_model_name_or_path") for d in datas}
    hub_ids = {r for r in recorded if isinstance(r, str) and r and not looks_local(r)}
    return hub_ids.pop() if len(hub_ids) == 1 else None


# -- loading -------------------------------------------------------------------------------------


def apply(model: Any, plan_: Plan, *, trainable: bool = False) -> "AdaptedModel":
    """Put the (downloaded, checked) members on ``model`` and activate the composition; all or nothing."""
    from peftkit.core.model import AdaptedModel

    members = list(plan_.members.values())
    node = _final_node(plan_)
    fresh = not isinstance(model, AdaptedModel)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    adapted = AdaptedModel(model) if fresh else model
    state = adapted.adapter_state
    previous = (state.active, state.active_names)
    added_adapters: list[str] = []
    added_fusions: list[str] = []
    try:
        for member in members:
            if member.kind == "adapter":
                adapted.load_adapter(str(member.path), member.name, activate=False)
                added_adapters.append(member.name)
        for member in members:
            if member.kind == "composition":
                before_a, before_f = set(adapted.adapters), set(adapted.fusions)
                try:
                    adapted.load_composition(adapted, member.path, activate=False)
                finally:
                    added_adapters += [n for n in adapted.adapters if n not in before_a]
                    added_fusions += [n for n in adapted.fusions if n not in before_f]
        for member in members:
            if member.kind == "fusion":
                record = adapted.load_fusion(member.path)
                added_fusions.append(record.name)
        adapted.set_active(node)
        if trainable:
            adapted.train_adapter(node)
    except BaseException:
        state.active, state.active_names = previous
        for name in reversed(added_fusions):
            if name in adapted.fusions:
                adapted.delete_fusion(name)
        for name in reversed(added_adapters):
            if name in adapted.adapters:
                adapted.delete_adapter(name)
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    if fresh and not trainable:
        adapted.eval()
    return adapted


def _final_node(plan_: Plan) -> Node:
    mapping = {m.name: m.node for m in plan_.members.values() if m.kind != "adapter" and m.node is not None}
    if not mapping:
        return plan_.node
    if isinstance(plan_.node, str):
        return mapping.get(plan_.node, plan_.node)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            replacement = mapping.get(value)
            return composition.to_json(replacement) if replacement is not None else value
        return dict(value, children=[walk(c) for c in value["children"]])

    try:
        return composition.from_json(walk(composition.to_json(plan_.node)))
    except CompositionError as exc:
        raise HubError(f"cannot place the composition repos in {plan_.node}: {exc}") from None


def load(base_model: Any, spec: Any, hub: "str | HubBackend | None" = None, *,
         adapters: Mapping[str, str] | None = None, token: str | None = None, trainable: bool = False,
         cache_dir: str | None = None, progress: bool = True, **model_kwargs: Any) -> "AdaptedModel":
    """Load hub adapters onto a base model, composed as ``spec``; returns the adapted model.

    ``base_model`` is a model object (plain or already adapted) or a folder /
    hub id that transformers loads (the class comes from the adapters' saved
    model class, else their task type); ``model_kwargs`` go to its
    ``from_pretrained``. ``spec`` is one hub id (``"alice/ner@v2"``), a
    composition string (``"stack(alice/lang-de, alice/ner@v2)"``), a list of
    ids (a stack), the JSON form with ids as leaves, or a block whose leaves
    are names given by ``adapters={"name": "ns/repo@rev"}``.
    """
    adapted, _ = load_with_plan(base_model, spec, hub, adapters=adapters, token=token, trainable=trainable,
                                cache_dir=cache_dir, progress=progress, **model_kwargs)
    return adapted


#: A path written in a composition or an adapters= value: ./x, ../x, /x, ~/x.
_PATH_LIKE = re.compile(r"(?:^|[\s(,=])((?:\.{1,2}/|/|~/)[^\s,()]*)")


def _folders_hint(text: str) -> str:
    """For a spec naming folders (``stack(./a, ./b)``): hub compositions take hub repos; what to do instead."""
    found = _PATH_LIKE.search(text)
    if found is None:
        return ""
    folder = found.group(1)
    return (f"; {folder!r} is a path: a composition here names hub repos (namespace/name), so push the folder "
            f"first (peftkit hub push {folder} NAMESPACE/NAME), or merge folders with peftkit merge (peftkit "
            f"compose --auto --candidates takes folders too)")


def _local_folder_hint(repo_id: str) -> str:
    """For a repo id that is also a local folder (``out/w1``): load reads hubs, the folder loads with
    ``peftkit.from_pretrained``."""
    if not Path(repo_id).is_dir():
        return ""
    return (f"; {repo_id!r} is also a folder here: peftkit.load reads hub repos, and "
            f"peftkit.from_pretrained(model, {repo_id!r}) loads a saved folder")


def load_with_plan(base_model: Any, spec: Any, hub: "str | HubBackend | None" = None, *,
                   adapters: Mapping[str, str] | None = None, token: str | None = None, trainable: bool = False,
                   cache_dir: str | None = None, progress: bool = True,
                   **model_kwargs: Any) -> tuple["AdaptedModel", Plan]:
    from peftkit.core.model import AdaptedModel

    from .resolve import open_hub
    from .snapshot import pull_snapshot

    existing = list(base_model.adapters) if isinstance(base_model, AdaptedModel) else []
    the_plan = plan(spec, adapters=adapters, existing=existing)
    if not the_plan.members:
        raise HubError(f"{spec!r} names no hub repo; write ids such as alice/ner or alice/ner@v2")
    backend = open_hub(hub, token=token)
    try:
        for member in the_plan.members.values():
            try:
                pulled = pull_snapshot(backend, member.ref, cache_dir=cache_dir, progress=progress)
            except HubError as exc:
                raise type(exc)(f"{exc}{_local_folder_hint(member.ref.repo_id)}") from None  # RepoNotFound stays
            member.path, member.commit = pulled.path, pulled.commit
            _classify(member)
    finally:
        if not isinstance(hub, HubBackend):
            backend.close()
    members = list(the_plan.members.values())
    if isinstance(base_model, (str, Path)):
        from peftkit.core.model_source import model_source_options

        model_kwargs = {**model_source_options(str(base_model), "the base model",  # fails fast offline
                                               cache_dir=model_kwargs.get("cache_dir")), **model_kwargs}
        check_base_config(str(base_model), members, model_kwargs)  # before loading weights into a wrong class
        datas = [d for m in members for _, d, _ in _adapter_datas(m)]
        with transformers_progress(progress):
            base_model = load_base_model(str(base_model), datas, **model_kwargs)
    elif model_kwargs:
        raise HubError(f"{', '.join(model_kwargs)}: model loading options apply when base_model is a "
                       f"folder or hub id, not a model object")
    check_members(base_model, members, _final_node(the_plan))
    return apply(base_model, the_plan, trainable=trainable), the_plan


# -- writing a composed setup --------------------------------------------------------------------


@dataclass
class ComposedFolder:
    """What :func:`compose_to_folder` wrote: ``peftkit compose``'s summary line and its ``--json`` report."""

    out: str
    composition: str
    members: list[dict[str, Any]]  # each hub member: name, repo_id, revision asked for, commit pulled, kind
    adapters: dict[str, str]  # every adapter on the model -> its method
    labels: list[str] | None  # a classifier's labels (of the head the composition predicts with)
    merged: list[str] | None = None  # with merge: the adapters folded into the base weights, in order
    #: parallel() / batch_split() whose parts predict with heads of different labels: each part's (labels is None)
    labels_by_part: dict[str, list[str]] | None = None

    def summary(self) -> str:
        sources = ", ".join(f"{m['name']} <- {m['repo_id']}@{m['commit'] or m['revision'] or 'main'}"
                            for m in self.members)
        if self.labels is not None:
            sources += f"; labels: {_listed(self.labels)}"
        elif self.labels_by_part:
            sources += "; labels: " + "; ".join(f"{part}: {_listed(names)}"
                                                for part, names in self.labels_by_part.items())
        if self.merged is None:
            return f"Wrote the composition {self.composition} to {self.out} ({sources})"
        return f"Wrote the base model with {', '.join(self.merged)} merged in to {self.out} ({sources})"

    def to_json(self) -> dict[str, Any]:
        return {"out": self.out, "composition": self.composition, "merged": self.merged is not None,
                "merged_adapters": self.merged, "members": self.members, "adapters": self.adapters,
                "labels": self.labels, "labels_by_part": self.labels_by_part}


def _listed(labels: list[str]) -> str:
    return f"{', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}"


def save_composed(base_model: Any, spec: Any, out: str | Path, hub: "str | HubBackend | None" = None, *,
                  merge: bool = False, adapters: Mapping[str, str] | None = None, token: str | None = None,
                  progress: bool = True, **model_kwargs: Any) -> str:
    """Load ``spec`` onto ``base_model`` from the hub and write it to ``out``; returns a summary line
    (:func:`compose_to_folder`, which this calls, returns the same as a report)."""
    return compose_to_folder(base_model, spec, out, hub, merge=merge, adapters=adapters, token=token,
                             progress=progress, **model_kwargs).summary()


def compose_to_folder(base_model: Any, spec: Any, out: str | Path, hub: "str | HubBackend | None" = None, *,
                      merge: bool = False, adapters: Mapping[str, str] | None = None, token: str | None = None,
                      progress: bool = True, **model_kwargs: Any) -> ComposedFolder:
    """Load ``spec`` onto ``base_model`` from the hub and write it to ``out``; returns what it wrote.

    Without ``merge``: a composition folder (``save_composition``: the adapters,
    fusion weights and the composition), loadable offline with
    ``AdaptedModel.load_composition``. With ``merge``: the adapters folded
    into the base weights and saved as a plain transformers model (with the
    base's tokenizer when it has one), when every member's method can merge
    and the composition is one adapter, a stack, or holds averages of LoRA adapters (each folded into one
    adapter first, exactly). A member that cannot take part fails the whole call (nothing is written):
    unlike ``auto_compose``, nothing is left out.
    """
    from peftkit.core.errors import MergeError
    from peftkit.core.fileio import apply_normal_modes, atomic_folder
    from peftkit.core.merging import merge_order

    model, the_plan = load_with_plan(base_model, spec, hub, adapters=adapters, token=token, progress=progress,
                                     **model_kwargs)
    node = model.active_composition
    out = Path(out)
    labels, by_part = _labels(model)
    report = ComposedFolder(
        str(out), str(node),
        [{"name": name, "repo_id": m.ref.repo_id, "revision": m.ref.revision, "commit": m.commit, "kind": m.kind}
         for name, m in the_plan.members.items()],
        {name: record.method.name for name, record in model.adapter_records.items()}, labels, labels_by_part=by_part)
    if not merge:
        model.save_composition(str(out), node)
        return report
    try:  # one adapter, a stack, an average() of LoRA adapters folded into one (core.merging.merge_order)
        names = merge_order(model, node)
    except MergeError as exc:
        raise HubError(str(exc)) from None
    refuse = [f"{n} ({model.adapter_record(n).method.name})" for n in names
              if not model.adapter_record(n).method.can_merge]
    if refuse:
        raise HubError(f"cannot merge {', '.join(refuse)}: the method cannot fold into base weights; save the "
                       f"composition without --merge")
    if not hasattr(model.base_model, "save_pretrained"):
        raise HubError("--merge saves a transformers model; this base model has no save_pretrained()")
    merged = model.merge_and_unload(names)
    with atomic_folder(out) as tmp, transformers_progress(progress):
        merged.save_pretrained(str(tmp))
        if isinstance(base_model, (str, Path)):
            _save_tokenizer(str(base_model), tmp)
        apply_normal_modes(tmp)  # transformers' weights files come out owner-only
    report.merged = list(names)
    return report


def _labels(model: "AdaptedModel") -> tuple[list[str] | None, dict[str, list[str]] | None]:
    """A classifier's labels, those of the head that the composition predicts with, and None; for a parallel()
    or batch_split() whose parts predict with heads of different labels, None and each part's labels (None,
    None: not a classifier)."""
    from peftkit.core.composition import BatchSplit, Parallel
    from peftkit.core.composition_api import head_of, labels_of_head
    from peftkit.core.heads import is_classifier
    from peftkit.core.labels import config_labels

    if not is_classifier(model.base_model):
        return None, None
    node = model.active_composition
    if isinstance(node, (Parallel, BatchSplit)):
        parts = {str(child): list(labels_of_head(model, head_of(model, child)) or []) for child in node.children}
        if len({tuple(labels) for labels in parts.values()}) > 1:
            return None, parts
    return list(config_labels(model.base_model.config) or []), None


def _save_tokenizer(name_or_path: str, folder: Path) -> None:
    """Copy the base model's tokenizer next to the merged weights, when it has one."""
    try:
        from transformers import AutoTokenizer

        from peftkit.core.model_source import model_source_options

        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **model_source_options(name_or_path, "the tokenizer"))
    except Exception:  # noqa: BLE001 - a model without a tokenizer (tests, vision) is fine
        return
    tokenizer.save_pretrained(str(folder))
