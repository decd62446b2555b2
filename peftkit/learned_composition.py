"""Automatic composition: learn how to combine existing adapters for a new task from a few examples.

``peftkit.auto_compose(base, candidates=[...] | search={...}, examples="few.jsonl", out="combined")``
(and ``peftkit compose BASE --auto``):

1. **Candidates**: hub ids (``alice/sentiment@v2``) or adapter folders, or a hub search for the base
   model (capped at ``max_candidates``). Each is loaded onto one copy of the base model; members
   that cannot take part in every strategy asked for are left out with a reason (the weights strategy
   needs LoRA weight changes; mixture and fusion take any adapter with an output at a layer; none takes
   an adapter that changes the model's inputs), as are those that do not fit the base model.
2. **Heads** (classifiers): when some member's head predicts the examples' labels, members whose heads
   predict another label list are left out and the members' heads predict; otherwise (or with
   ``head="fresh"``) a fresh head for the examples' labels (a head-only adapter) is trained with every
   row of the report (:mod:`peftkit.learned_mixture`), and the members may come from any label set.
3. **Strategies** (:mod:`peftkit.auto_compose_strategies`): ``weights`` (LoraHub, Huang et al. 2023:
   CMA-ES over one merge weight per member, :mod:`peftkit.core.weight_search`), ``mixture`` (one mixing
   weight per member over the members' outputs, trained by gradient) and ``fusion`` (AdapterFusion,
   trained by gradient), the members frozen throughout.
4. **Report**: on held-out examples (a split of the examples, or ``eval_examples``), each candidate
   alone, the uniform average and each learned combination: loss, accuracy (classification) and time.
5. **Save**: the first strategy's combination with a card and ``auto_compose.json`` recording the
   members (with hub revisions), the weights, the number of examples and the metrics: for weights one
   LoRA adapter folder (the exact weighted sum), for mixture and fusion a composition folder; ``push``
   publishes it. With ``merge`` (weights, or a mixture of LoRA members) the base model with the weighted
   sum folded in and a fresh head as its head, a plain transformers model.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from peftkit.adapter_sources import adapter_configs, fetch_adapters, plain_base_model
from peftkit.auto_compose_report import AutoComposeResult, Candidate, push_result, save_result
from peftkit.auto_compose_strategies import Prepared, Settings, compare
from peftkit.core.errors import PeftkitError
from peftkit.core.model_source import looks_local
from peftkit.training_data import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.core.model import AdaptedModel

#: Keys of a hub search (``--search 'task=text-classification author=alice'``); bare words are free text.
SEARCH_KEYS = ("text", "base_model", "method", "task", "tag", "author", "dataset")
#: Which head a classifier's combination predicts with: the members' own (same labels), a fresh head
#: trained for the examples' labels, or (auto) a fresh one only when no member's head predicts them.
HEADS = ("auto", "members", "fresh")


class AutoComposeError(PeftkitError, ValueError):
    """Automatic composition cannot run as asked (no usable candidate, too few examples, ...)."""


# -- candidates ----------------------------------------------------------------------------------


def parse_search(text: str) -> dict[str, Any]:
    """``'task=text-classification tag=a tag=b free words'`` -> search keywords (``tags`` a list)."""
    out: dict[str, Any] = {}
    words: list[str] = []
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep:
            words.append(token)
            continue
        key = key.strip().replace("-", "_")
        if key not in SEARCH_KEYS or not value:
            raise AutoComposeError(f"--search: {token!r} is not KEY=VALUE with a key among {', '.join(SEARCH_KEYS)}")
        if key == "tag":
            out.setdefault("tags", []).append(value)
        else:
            out[key] = value
    if words:
        out["text"] = " ".join(([out["text"]] if "text" in out else []) + words)
    return out


def _searched(search: Mapping[str, Any], base: Any, hub: Any, token: str | None, limit: int) -> list[str]:
    from peftkit.hub_client.api import search as hub_search

    query = dict(search)
    unknown = sorted(set(query) - set(SEARCH_KEYS) - {"tags"})
    if unknown:
        raise AutoComposeError(f"search: unknown key(s) {', '.join(unknown)}; use {', '.join(SEARCH_KEYS)}")
    if not query.get("base_model"):
        base_id = base if isinstance(base, str) else getattr(getattr(base, "config", None), "_name_or_path", None)
        if not base_id or looks_local(str(base_id)):
            raise AutoComposeError("the search needs the base model's hub id: the base is a local folder, so give "
                                   "base_model=ORG/NAME in the search")
        query["base_model"] = str(base_id)
    hits = hub_search(query.pop("text", None), hub, limit=limit, token=token, **query)
    if not hits:
        raise AutoComposeError(f"the hub search {dict(search)} for base model {query['base_model']!r} found no "
                               f"adapter; widen the search or name the candidates")
    return [hit.repo_id for hit in hits]


def _fetch(refs: Sequence[str], hub: Any, token: str | None, progress: bool) -> list[Candidate]:
    """Each candidate's folder, in the order given (the first member's head predicts an average): a local
    adapter folder as it is, a hub id pulled into the cache."""
    return [Candidate(found.name, found.source, found.revision, found.path)
            for found in fetch_adapters(refs, hub, token, progress, role="candidate")]


def _ineligible(model: "AdaptedModel", name: str, strategies: Sequence[str], merge: bool = False) -> str | None:
    """Why adapter ``name`` cannot take part in every strategy asked for, or with ``merge`` be folded into
    the base weights with its weight (None: it can)."""
    record = model.adapter_record(name)
    method = record.method
    if record.model_adapter:
        return f"{method.name} changes the model's inputs and has no output at a layer to weigh, mix or fuse"
    if "weights" in strategies or merge:
        other = _other_way(strategies, merge)
        if not method.merge_low_rank:
            return f"{method.name} has no low-rank weight change (weight-space search needs LoRA adapters){other}"
        if getattr(record.config, "use_dora", False):
            return f"DoRA's change rescales whole rows of W and is not a low-rank weight change{other}"
    for strategy, block in (("mixture", "average"), ("fusion", "fuse")):
        if strategy in strategies and block not in method.supported_blocks:
            supported = ", ".join(sorted(method.supported_blocks))
            return f"{method.name} cannot take part in {block}() (it supports {supported})"
    return None


def _other_way(strategies: Sequence[str], merge: bool) -> str:
    """How an adapter without a low-rank weight change could take part (the hint after its reason)."""
    others = [s for s in strategies if s != "weights"]
    if merge and "weights" not in strategies:
        return " (--merge folds the mixture into the weights as one LoRA; without --merge the mixture takes it)"
    if merge:
        return " (--strategy mixture or fusion without --merge takes it)"
    if others:
        verb = "takes" if len(others) == 1 else "take"
        return f" (only the weights strategy needs LoRA members: without weights in --strategy, " \
               f"{' and '.join(others)} {verb} it)"
    return " (--strategy mixture or fusion takes it)"


def _load_members(model: "AdaptedModel", candidates: list[Candidate], strategies: Sequence[str], merge: bool
                  ) -> list[Candidate]:
    """Load every candidate; leave out (with a reason) those that cannot take part. Returns those kept."""
    from peftkit.core.serialization import CONFIG_NAME

    kept: list[Candidate] = []
    for cand in candidates:
        if not (Path(cand.path or "") / CONFIG_NAME).is_file():
            cand.left_out = "not an adapter folder (a composition or fusion repo has no single weight change)"
            continue
        try:
            model.load_adapter(cand.path, cand.name, activate=False)
        except PeftkitError as exc:
            cand.left_out = f"does not load on this base model: {exc}"
            continue
        cand.left_out = _ineligible(model, cand.name, strategies, merge)
        if cand.left_out is None:
            kept.append(cand)
    return kept


def _drop_left_out(model: "AdaptedModel", candidates: list[Candidate]) -> None:
    for cand in candidates:
        if cand.left_out is not None and cand.name in model.adapters:
            model.delete_adapter(cand.name)


def _covers(model: "AdaptedModel", kept: list[Candidate], needed: set[str]) -> bool:
    """Whether some member's head predicts every label of the examples."""
    return any(needed <= set(model.adapter_labels(c.name) or model.base_labels or ()) for c in kept)


def _same_labels(model: "AdaptedModel", kept: list[Candidate], needed: set[str]) -> list[Candidate]:
    """Keep the members whose head predicts the examples' labels, all with the most common label list."""
    lists: dict[tuple[str, ...], int] = {}
    labels_of: dict[str, tuple[str, ...]] = {}
    for cand in kept:
        labels = tuple(model.adapter_labels(cand.name) or model.base_labels or ())
        labels_of[cand.name] = labels
        missing = sorted(needed - set(labels))
        if missing:
            cand.left_out = (f"its head predicts {', '.join(labels[:8]) or 'no labels'}, not the examples' "
                             f"label(s) {', '.join(missing[:8])}")
        else:
            lists[labels] = lists.get(labels, 0) + 1
    if not lists:
        return [c for c in kept if c.left_out is None]
    chosen = max(lists, key=lambda k: lists[k])
    for cand in kept:
        if cand.left_out is None and labels_of[cand.name] != chosen:
            cand.left_out = (f"its head predicts labels {', '.join(labels_of[cand.name][:8])}, other members' "
                             f"{', '.join(chosen[:8])}: heads with different label lists cannot be merged")
    return [c for c in kept if c.left_out is None]


# -- examples ------------------------------------------------------------------------------------


def _task_of(model: "nn.Module") -> str:
    from peftkit.core.heads import is_classifier

    name = type(model).__name__
    if is_classifier(model):
        return "token-cls" if name.endswith("TokenClassification") else "seq-cls"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    raise AutoComposeError(f"automatic composition scores classifiers and causal language models; the base model "
                           f"is a {name}")


def _split(examples: list[Any], eval_examples: list[Any] | None, holdout: float, seed: int
           ) -> tuple[list[Any], list[Any]]:
    if eval_examples is not None:
        if not examples or not eval_examples:
            raise AutoComposeError("both the examples and the held-out examples need at least one example")
        return examples, eval_examples
    if not 0.0 < holdout < 1.0:
        raise AutoComposeError(f"holdout must be a fraction between 0 and 1, got {holdout!r}")
    if len(examples) < 2:
        raise AutoComposeError(f"{len(examples)} example(s): give at least 2 (some are held out to report on), "
                               f"or pass separate held-out examples (--eval)")
    order = list(examples)
    random.Random(seed).shuffle(order)
    held = min(max(1, round(len(order) * holdout)), len(order) - 1)
    return order[held:], order[:held]


def _batches(task: str, tokenizer: Any, examples: Sequence[Any], labels: list[str] | None, model: Any,
             max_length: int, batch_size: int) -> list[dict[str, Any]]:
    from peftkit.training_data import LabelMap, data_collator, encode

    label_map = LabelMap(list(labels)) if labels else None
    if label_map is not None:
        label_map.check(examples, "the members' heads")
    encoded = encode(task, tokenizer, examples, max_length, label_map)
    if not encoded.features:
        raise DataError("no example has a target after tokenization; give longer completions or a larger max length")
    collate = data_collator(task, tokenizer, model)
    device = model.device
    return [{k: v.to(device) for k, v in collate(encoded.features[i:i + batch_size]).items()}
            for i in range(0, len(encoded.features), batch_size)]


def _tokenizer(base: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    if not isinstance(base, (str, Path)):
        raise AutoComposeError("pass tokenizer= when the base model is a model object")
    from transformers import AutoTokenizer

    from peftkit.core.model_source import model_source_options

    try:
        tok = AutoTokenizer.from_pretrained(str(base), **model_source_options(str(base), "the tokenizer"))
    except (OSError, ValueError) as exc:
        raise AutoComposeError(f"cannot load the tokenizer of {base}: {str(exc).splitlines()[0] if str(exc) else exc}"
                               ) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# -- the whole run -------------------------------------------------------------------------------


def _strategies(strategy: str | Sequence[str]) -> list[str]:
    from peftkit.auto_compose_strategies import STRATEGIES

    asked = [p.strip() for p in strategy.split(",")] if isinstance(strategy, str) else [str(p) for p in strategy]
    asked = list(dict.fromkeys(p for p in asked if p))
    unknown = [p for p in asked if p not in STRATEGIES]
    if not asked or unknown:
        raise AutoComposeError(f"strategy must be one or more of {', '.join(STRATEGIES)} (comma-separated), got "
                               f"{strategy!r}")
    return asked


def _check_rate(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise AutoComposeError(f"{name} must be a number > 0, got {value!r}")


def _check_options(candidates: Any, search: Any, max_candidates: Any, push: Any, out: Any, merge: bool,
                   strategies: list[str], head: str, steps: Any, lr: Any) -> None:
    if (candidates is None) == (search is None):
        raise AutoComposeError("give either candidates (adapter ids or folders) or a hub search, not both or neither")
    for name, value in (("max_candidates", max_candidates), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AutoComposeError(f"{name} must be a positive integer, got {value!r}")
    _check_rate("lr", lr)
    if head not in HEADS:
        raise AutoComposeError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if push and out is None:
        raise AutoComposeError("push needs out: the learned combination is written there first")
    if push and merge:
        raise AutoComposeError("push publishes an adapter; with merge the folder is a whole model: drop one")
    if merge and strategies[0] == "fusion":
        raise AutoComposeError("merge folds a weight change into the base model; the fusion strategy's combination "
                               "attends over the members at run time: drop merge, or put weights or mixture first in "
                               "the strategies")


def _prepare(base: Any, refs: list[str], examples: Any, eval_examples: Any, *, hub: Any, token: str | None,
             tokenizer: Any, holdout: float, seed: int, max_length: int, batch_size: int, text_field: str | None,
             strategies: list[str], head: str, merge: bool, progress: bool) -> Prepared:
    from peftkit.training_data import CLASSIFICATION_TASKS, Fields, LabelMap, read_records, to_examples

    records = read_records(examples)  # a bad file fails before any model loads
    eval_records = read_records(eval_examples) if eval_examples is not None else None
    cands = _fetch(refs, hub, token, progress)
    model = _base_model(base, cands, progress)
    task = _task_of(model.base_model)
    classification = task in CLASSIFICATION_TASKS
    fields = Fields(text=text_field)
    train_ex = to_examples(task, records, fields)
    held_ex = to_examples(task, eval_records, fields) if eval_records is not None else None
    kept = _load_members(model, cands, strategies, merge)
    fresh: list[str] | None = None
    if classification:
        needed = {lab for ex in train_ex + (held_ex or []) for lab in _labels_of(ex)}
        if head == "fresh" or (head == "auto" and kept and not _covers(model, kept, needed)):
            fresh = LabelMap.build(train_ex + (held_ex or [])).names
            if "weights" in strategies:
                raise AutoComposeError(
                    f"the examples' labels ({', '.join(fresh[:8])}) need a fresh classification head (no member's "
                    f"head predicts them all), which the weights strategy's gradient-free search cannot train: use "
                    f"--strategy mixture or fusion (or --head members with members whose heads predict them)")
            if len(model.base_labels or ()) != len(fresh):
                model = _with_labels(base, model, cands, fresh, strategies, merge, progress)
                kept = [c for c in cands if c.left_out is None]
        else:
            kept = _same_labels(model, kept, needed)
    _drop_left_out(model, cands)
    if not kept:
        reasons = "; ".join(f"{c.source}: {c.left_out}" for c in cands)
        raise AutoComposeError(f"no candidate can take part in {' or '.join(strategies)} ({reasons})")
    labels = fresh or (list(model.adapter_labels(kept[0].name) or model.base_labels or []) if classification
                       else None)
    search_ex, held = _split(train_ex, held_ex, holdout, seed)
    tok = _tokenizer(base, tokenizer)
    return Prepared(model, task, cands, kept, tok,
                    _batches(task, tok, search_ex, labels, model, max_length, batch_size),
                    _batches(task, tok, held, labels, model, max_length, batch_size), len(search_ex), len(held),
                    fresh)


def _with_labels(base: Any, model: "AdaptedModel", cands: list[Candidate], labels: list[str],
                 strategies: list[str], merge: bool, progress: bool) -> "AdaptedModel":
    """The base model again, its head sized for ``labels`` (the fresh head copies it), members loaded again."""
    if not isinstance(base, (str, Path)):
        raise AutoComposeError(f"the fresh head predicts {len(labels)} labels ({', '.join(labels[:8])}) but the base "
                               f"model object's head has {len(model.base_labels or ())}; pass the model's folder or "
                               f"hub id, or a model loaded with num_labels={len(labels)}")
    del model
    for cand in cands:
        cand.left_out = None
    fresh = _base_model(base, cands, progress, labels=labels)
    _load_members(fresh, cands, strategies, merge)
    return fresh


def auto_compose(base: "str | nn.Module", candidates: Sequence[str] | None = None, *,
                 search: Mapping[str, Any] | str | None = None, examples: str | Path,
                 eval_examples: str | Path | None = None, hub: Any = None, token: str | None = None,
                 tokenizer: Any = None, strategy: str | Sequence[str] = "weights", head: str = "auto",
                 max_candidates: int = 8, budget: int = 40, l1: float = 0.05, steps: int = 100, lr: float = 0.01,
                 fusion_lr: float = 1e-3,
                 holdout: float = 0.3, seed: int = 0, max_length: int = 128, batch_size: int = 32,
                 text_field: str | None = None, out: str | Path | None = None, merge: bool = False,
                 push: str | None = None, progress: bool = True) -> AutoComposeResult:
    """Learn how to combine ``candidates`` (or a hub ``search``'s hits) for the task of ``examples``.

    ``base``: a model folder or hub id (the class comes from the candidates' saved model class), or a
    model object (then pass ``tokenizer``). ``candidates``: hub ids (``alice/a@v2``) or adapter folders;
    ``search``: hub search keywords (a dict, or ``"task=text-classification author=alice"``), for the
    base model unless ``base_model`` is given; at most ``max_candidates`` are tried.
    ``examples`` / ``eval_examples``: JSONL or CSV files as for ``peftkit train`` (``text`` + ``label`` for a
    classifier, ``prompt`` + ``completion``, or ``text`` with ``text_field="text"``, for a causal LM). Without
    ``eval_examples``, a ``holdout`` share of the examples is held out for the report.
    ``strategy``: ``weights`` (CMA-ES over a linear merge of LoRA weight changes; ``budget`` evaluations),
    ``mixture`` (mixing weights over the members' outputs) or ``fusion`` (AdapterFusion), the last two
    trained by gradient for ``steps`` Adam steps with the members frozen, at ``lr`` (a mixture's few weights,
    a fresh head) or ``fusion_lr`` (a fusion's d x d projections, which diverge at a mixture's rate); several (a list or
    ``"mixture,fusion"``) are all learned and reported, the first is saved. ``l1``: the penalty on the mean
    absolute weight (weights, mixture). ``head``: ``auto`` trains a fresh classification head when no
    member's head predicts the examples' labels, ``fresh`` always, ``members`` never.
    ``out``: write the first strategy's combination there (a LoRA folder for weights, a composition folder
    for mixture and fusion; with ``merge``, weights or mixture first, the base model with it folded in and
    a fresh head as its head); ``push``: publish it as that hub repo. See the module doc for every step.
    """
    strategies = _strategies(strategy)
    _check_options(candidates, search, max_candidates, push, out, merge, strategies, head, steps, lr)
    _check_rate("fusion_lr", fusion_lr)
    if isinstance(search, str):
        search = parse_search(search)
    refs = list(candidates) if candidates is not None else _searched(search or {}, base, hub, token, max_candidates)
    if not refs:
        raise AutoComposeError("no candidate adapters given")
    prep = _prepare(base, list(dict.fromkeys(refs))[:max_candidates], examples, eval_examples, hub=hub,
                    token=token, tokenizer=tokenizer, holdout=holdout, seed=seed, max_length=max_length,
                    batch_size=batch_size, text_field=text_field, strategies=strategies, head=head, merge=merge,
                    progress=progress)
    result, saved = compare(prep, Settings(strategies, budget, l1, steps, lr, seed, progress, fusion_lr))
    result.base_model = _hub_base_id(base, prep.kept)
    result.settings.update({"strategies": strategies, "budget": budget, "l1": l1, "steps": steps, "lr": lr,
                            "fusion_lr": fusion_lr,
                            "holdout": holdout if eval_examples is None else None, "seed": seed,
                            "max_candidates": max_candidates})
    if out is not None:
        save_result(prep.model, result, Path(out), tokenizer=prep.tokenizer, merge=merge, node=saved.node)
        result.out = str(out)
        if push:
            result.pushed = push_result(result, push, hub=hub, token=token, progress=progress)
    return result


def _hub_base_id(base: Any, kept: list[Candidate]) -> str | None:
    """The base model's hub id, for the card: BASE when it is one, else the one the members record."""
    from peftkit.hub_client.compose import members_hub_base

    if isinstance(base, str) and not looks_local(base):
        return base
    return members_hub_base(adapter_configs([c.path for c in kept]))


def _labels_of(example: Any) -> list[str]:
    label = getattr(example, "label", None)
    return [label] if label is not None else list(getattr(example, "tags", []) or [])


def _base_model(base: Any, cands: list[Candidate], progress: bool, labels: list[str] | None = None
                ) -> "AdaptedModel":
    """The base model with no adapter; with ``labels``, its classification head sized (and named) for them."""
    return plain_base_model(base, [c.path for c in cands], progress, labels, who="auto-compose")
