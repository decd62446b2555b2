"""Merge adapters in weight space into one new adapter folder: ``peftkit merge`` and :func:`merge_to_folder`.

The members are adapter folders or hub ids (pulled into the cache, verified); they are loaded onto the
base model they were made for and merged by ``AdaptedModel.merge_adapters`` (every strategy it has:
linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, their ``_svd`` forms and any a plugin
registers). The result is written as an ordinary adapter folder (a LoRA for LoRA members and for dense
merges of other methods, IA3 or BitFit for those), with a card saying what was merged and ``merge.json``
recording the members (hub commits included), the weights and the options, so the merge can be repeated
and published (``peftkit hub push OUT REPO``). Options the strategy would refuse are refused before
anything is downloaded or loaded; members that cannot be merged (a method with no weight change, an
adapter made for another model) before the base model loads, from their folders and BASE's config; on
any error nothing is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from peftkit.adapter_sources import (AdapterSource, adapter_configs, check_members_fit_base, fetch_adapters,
                                     plain_base_model, saved_method)
from peftkit.core.errors import MergeError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.core.method import Method
    from peftkit.core.model import AdaptedModel

#: The file in a merged adapter folder that records how it was made.
RECORD_FILE = "merge.json"


@dataclass
class MergedFolder:
    """What :func:`merge_to_folder` wrote: ``peftkit merge``'s summary line and its ``--json`` report."""

    out: str
    name: str
    method: str  # the merged adapter's method
    rank: int | None  # a LoRA result's rank
    strategy: str
    options: dict[str, Any]  # density, rank asked for, majority_sign_method, seed, head: those that apply
    members: list[dict[str, Any]]  # name, source, commit (hub members), method, weight
    energy_kept: dict[str, float] | None = None  # a dense merge truncated to a rank: per site, the share kept
    labels: list[str] | None = None

    def summary(self) -> str:
        parts = ", ".join(f"{m['name']} ({_number(m['weight'])})" for m in self.members)
        how = ", ".join([self.strategy] + [f"{k} {v}" for k, v in self.options.items()])
        kind = self.method + (f", rank {self.rank}" if self.rank is not None else "")
        line = f"Wrote the merged adapter {self.name!r} ({kind}) of {parts} by {how} to {self.out}"
        if self.energy_kept:
            line += f"; the rank keeps at least {min(self.energy_kept.values()):.1%} of the merged change at every site"
        return line

    def to_json(self) -> dict[str, Any]:
        return {"out": self.out, "name": self.name, "method": self.method, "rank": self.rank,
                "strategy": self.strategy, "options": self.options, "members": self.members,
                "energy_kept": self.energy_kept, "labels": self.labels}


def _number(value: float) -> str:
    return f"{value:g}"


def merge_to_folder(base: "str | nn.Module", members: Sequence[str], out: str | Path, *,
                    weights: Sequence[float] | None = None, strategy: str = "svd", density: float | None = None,
                    rank: int | None = None, majority_sign_method: str | None = None, seed: int | None = 0,
                    head: str | None = None, name: str = "merged", hub: Any = None, token: str | None = None,
                    progress: bool = True) -> MergedFolder:
    """Merge ``members`` (adapter folders or hub ids ``namespace/name[@revision]``) with ``weights`` (one
    per member, default 1.0 each; negative subtracts) by ``strategy`` and write the new adapter to ``out``
    (replaced whole when it exists). ``base`` is the base model: a model object, or a folder / hub id
    loaded with the class the members were saved from. ``density``, ``rank``, ``majority_sign_method`` and
    ``seed`` are ``merge_adapters``' options. ``head``: when several members keep a task head, the member
    whose head the merged adapter keeps (as given, or its adapter name) or ``"average"``. Returns what was
    written; on any error nothing is."""
    from peftkit.core.merging import check_merge_options, checked_weights

    refs = [str(m) for m in members]
    if not refs:
        raise MergeError("name at least one adapter to merge (adapter folders or hub ids such as alice/sst2@v2)")
    if len(set(refs)) != len(refs):
        twice = next(r for r in refs if refs.count(r) > 1)
        raise MergeError(f"{twice!r} is named twice; give each adapter once and weigh it with --weights")
    if weights is not None:
        weights = checked_weights(weights, len(refs))
    check_merge_options(strategy, density, rank, majority_sign_method)
    if Path(out).exists() and not Path(out).is_dir():
        raise MergeError(f"cannot write the merged adapter to {str(out)!r}: it is a file, not a folder")
    found = fetch_adapters(refs, hub, token, progress)
    _check_adapter_folders(found)
    _check_methods_merge(found, base)
    _check_given_once(refs, found)
    _check_out_spares_members(Path(out), refs, found)
    _check_one_model_class(found)
    modules_to_save = _head_name(head, refs, found)
    names = [f.name for f in found]
    if name in names:  # known before any model loads
        raise MergeError(f"the merged adapter's name {name!r} is a member's; pick another name (--name)")
    check_members_fit_base(base, found)
    model = plain_base_model(base, [f.path for f in found], progress, who="merge")
    for source in found:
        model.load_adapter(source.path, source.name, activate=False)
    record = model.merge_adapters(names, weights, name=name, strategy=strategy, density=density, rank=rank,
                                  majority_sign_method=majority_sign_method, seed=seed,
                                  modules_to_save=modules_to_save)
    used = list(weights) if weights is not None else [1.0] * len(names)
    report = MergedFolder(
        str(out), name, record.method.name, getattr(record.config, "r", None), strategy,
        _applied_options(strategy, density, rank, majority_sign_method, seed, modules_to_save),
        [{"name": f.name, "source": f.source, "commit": f.revision,
          "method": model.adapter_record(f.name).method.name, "weight": w} for f, w in zip(found, used)],
        (getattr(record, "merge_report", None) or {}).get("energy_kept"), _labels(model, name))
    _write(model, report, Path(out))
    return report


def _check_adapter_folders(found: list[AdapterSource]) -> None:
    """Refuse a member that is a composition or fusion folder: it holds no single weight change to merge."""
    from peftkit.core.composition_io import COMPOSITION_NAME
    from peftkit.core.fusion import FUSION_CONFIG_NAME
    from peftkit.core.serialization import CONFIG_NAME

    for source in found:
        if not (Path(source.path) / CONFIG_NAME).is_file():
            kind = "a composition or fusion" if (Path(source.path) / COMPOSITION_NAME).is_file() or \
                (Path(source.path) / FUSION_CONFIG_NAME).is_file() else "no adapter"
            raise MergeError(f"{source.source!r} holds {kind} folder, not one adapter ({CONFIG_NAME} is missing); "
                             f"merge adapter folders (compose a composition with `peftkit compose` instead)")


def _check_methods_merge(found: list[AdapterSource], base: Any) -> None:
    """Refuse, from the members' saved configs alone (before the base model loads), a member whose method
    ``merge_adapters`` refuses whatever it is merged with. A method merges when its adapters combine
    elementwise (IA3, BitFit), by low-rank factors (LoRA), or densely through their layers' weight change
    (``merge_dense``, which only a method that can fold into the base weights, ``can_merge``, has): prompt,
    P- and prefix tuning (they rewrite the inputs), bottleneck adapters, ReFT and trainable tokens do not."""
    from peftkit.core.adapterhub_format import is_adapterhub_config
    from peftkit.core.merging import beyond_weight_change
    from peftkit.core.serialization import config_from_data

    for source, data in zip(found, adapter_configs([s.path for s in found])):
        where = f"member {source.source!r}"
        method = saved_method(data, where)
        if method.merge_low_rank or method.merge_elementwise or (method.merge_dense and method.can_merge):
            beyond = None if is_adapterhub_config(data) else beyond_weight_change(config_from_data(method, data, where))
            if beyond:
                raise MergeError(f"{where} {beyond}, and a merged adapter holds weight changes only; leave it "
                                 f"out, or {_compose_hint(source, base)} (add --merge to fold it into the base "
                                 f"model)")
            continue
        raise MergeError(f"{where} is a {method.name} adapter, which {_why_unmergeable(method)}, "
                         f"so it cannot be merged in weight space; leave it out, or {_compose_hint(source, base)}")


def _why_unmergeable(method: "Method") -> str:
    from peftkit.core.method import Method

    if type(method).create_layer_adapter is Method.create_layer_adapter:  # a soft prompt or prefix only
        return "changes the model's inputs and has no layer weights to merge"
    return "does not change the layers' weights (its modules compute something else)"


def _compose_hint(source: AdapterSource, base: Any) -> str:
    """How to use the member with the others instead: ``peftkit compose`` (which reads hub repos)."""
    model = base if isinstance(base, (str, Path)) else "BASE"
    if source.revision is not None:  # a hub member
        return f"compose it with the others instead: peftkit compose {model} 'stack({source.source}, ...)' -o OUT"
    return (f"compose it with the others instead: push it (peftkit hub push {source.source} NAMESPACE/NAME), "
            f"then peftkit compose {model} 'stack(NAMESPACE/NAME, ...)' -o OUT")


def _check_given_once(refs: list[str], found: list[AdapterSource]) -> None:
    """Refuse one adapter given twice under two spellings (a folder and the hub repo it was pushed to,
    ``alice/a`` and ``alice/a@main``, ``./a`` and ``a``): the same weights files."""
    seen: dict[str, str] = {}
    for ref, source in zip(refs, found):
        fingerprint = _weights_fingerprint(Path(source.path))
        first = seen.setdefault(fingerprint, ref) if fingerprint else ref
        if first != ref:
            raise MergeError(f"{first!r} and {ref!r} are the same adapter (identical weights); give it once and "
                             f"weigh it with --weights")


def _check_out_spares_members(out: Path, refs: list[str], found: list[AdapterSource]) -> None:
    """Refuse an ``out`` that is a member's folder or holds one: replacing it (``--overwrite``) would delete
    the adapter being merged."""
    target = out.resolve()
    for ref, source in zip(refs, found):
        folder = Path(source.path).resolve()
        if folder == target or target in folder.parents:
            how = "is" if folder == target else "holds"
            raise MergeError(f"{str(out)!r} {how} the folder of {ref!r}, which is being merged: replacing it would "
                             f"delete that adapter; write the merged adapter to another folder (-o)")


def _weights_fingerprint(folder: Path) -> str | None:
    """A digest of the weights files at the top of an adapter folder (None when it has none)."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest() if files else None


def _check_one_model_class(found: list[AdapterSource]) -> None:
    """Refuse members saved from different model classes or task types (a classifier's adapter with a bare
    encoder's): their weights sit at different module paths (``bert.encoder...`` and ``encoder...``), so no
    one base model takes them all. Checked from the saved configs, before the base model loads."""
    from peftkit.hub_client.compose import model_class_for
    from peftkit.hub_client.errors import HubError

    try:
        model_class_for(adapter_configs([source.path for source in found]))
    except HubError:
        listed = ", ".join(f"{source.name}: {model_class_for(adapter_configs([source.path])).__name__}"
                           for source in found)
        raise MergeError(f"the adapters were trained on different model classes ({listed}), so their weights "
                         f"sit at different places in the model and cannot be merged; merge adapters trained "
                         f"for one task (e.g. only sequence classifiers' adapters)") from None


def _head_name(head: str | None, refs: list[str], found: list[AdapterSource]) -> str | None:
    """merge_adapters' ``modules_to_save`` for ``head``: "average", or the adapter name of the member given
    (as typed or by its adapter name first; else by its folder's or repo's own name when that names one member)."""
    if head is None or head == "average":
        return head
    exact = [source for ref, source in zip(refs, found) if head in (ref, source.name)]
    matches = exact if len(exact) == 1 else [
        source for ref, source in zip(refs, found)
        if head in (ref, source.name, source.source, Path(source.source.partition("@")[0]).name)]
    choices = ", ".join(["average"] + [s.name for s in found])
    if len(matches) > 1:
        given = " and ".join(repr(ref) for ref, source in zip(refs, found) if source in matches)
        raise MergeError(f"head {head!r} names both {given}; choose one by its adapter name: {choices}")
    if not matches:
        raise MergeError(f"head {head!r} is not one of the adapters merged; choose one of: {choices}")
    return matches[0].name


def _applied_options(strategy: str, density: float | None, rank: int | None, majority_sign_method: str | None,
                     seed: int | None, head: str | None) -> dict[str, Any]:
    """The options that shaped this merge (for the summary, the card and merge.json)."""
    options: dict[str, Any] = {}
    if density is not None:
        options["density"] = density
    if rank is not None:
        options["rank"] = rank
    if majority_sign_method is not None:
        options["majority_sign_method"] = majority_sign_method
    if strategy.startswith("dare"):
        options["seed"] = seed
    if head is not None:
        options["head"] = head
    return options


def _labels(model: "AdaptedModel", name: str) -> list[str] | None:
    labels = model.adapter_labels(name)
    return list(labels) if labels else None


def _description(report: MergedFolder) -> str:
    members = "\n".join(f"- `{m['source']}`" + (f" at commit `{m['commit']}`" if m["commit"] else "")
                        + f" ({m['method']}), weight {_number(m['weight'])}" for m in report.members)
    how = ", ".join(f"{k} {v}" for k, v in report.options.items())
    return (f"A weight-space merge of {len(report.members)} adapters by `{report.strategy}`"
            + (f" ({how})" if how else "") + f", made with `peftkit merge`:\n\n{members}")


def _write(model: "AdaptedModel", report: MergedFolder, out: Path) -> None:
    """The merged adapter's folder with its card and merge.json, appearing whole (or replacing ``out`` whole)."""
    from peftkit.core.fileio import apply_normal_modes, atomic_folder

    record = report.to_json()
    record.pop("out")
    with atomic_folder(out) as tmp:
        model.save_adapter(str(tmp), report.name, description=_description(report))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        apply_normal_modes(tmp)
