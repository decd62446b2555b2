"""Automatic composition: learn how to combine existing LoRA adapters for a new task from a few examples.

``peftkit.auto_compose(base, candidates=[...] | search={...}, examples="few.jsonl", out="combined")``
(and ``peftkit compose BASE --auto``) works as LoraHub (Huang et al. 2023):

1. **Candidates**: hub ids (``alice/sentiment@v2``) or adapter folders, or a hub search for the base
   model (capped at ``max_candidates``). Each is loaded onto one copy of the base model; members
   that cannot take part are left out with a reason: no low-rank weight change (only LoRA's weight
   deltas add up), a base model they do not fit, or, for a classifier, a head whose labels differ
   from the other members' or do not cover the examples' labels.
2. **Search**: CMA-ES (:mod:`peftkit.core.weight_search`) over one weight per member, in [-1.5, 1.5],
   from the uniform average (each member alone is scored too, so the result is never worse on the
   search examples than the best member alone), minimising the loss on the search split plus ``l1``
   times the mean absolute weight; every evaluation rebuilds the weighted merge in place (:class:`peftkit.core.merge_search.WeightedMerge`).
3. **Report**: on held-out examples (a split of the examples, or ``eval_examples``), each candidate
   alone, the uniform average and the learned combination: loss, accuracy (classification) and time.
4. **Save**: the learned combination as one LoRA adapter folder (the exact weighted sum,
   :func:`peftkit.merge_adapters` with ``linear``) whose card and ``auto_compose.json`` record the
   members (with hub revisions), the weights, the number of examples and the metrics; ``push`` publishes it;
   with ``merge`` the folder is instead the base model with the combination folded in.

Gradient-based mixing (AdapterFusion-style) and fresh heads for new label sets are not part of this step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from peftkit.auto_compose_report import AutoComposeResult, Candidate, Row, push_result, save_result
from peftkit.core.errors import PeftkitError
from peftkit.training_data import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.core.model import AdaptedModel

#: Keys of a hub search (``--search 'task=text-classification author=alice'``); bare words are free text.
SEARCH_KEYS = ("text", "base_model", "method", "task", "tag", "author", "dataset")
#: The adapter name the search works on while it runs.
WORK_NAME = "auto_compose"


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


def _looks_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).exists()


def _searched(search: Mapping[str, Any], base: Any, hub: Any, token: str | None, limit: int) -> list[str]:
    from peftkit.hub_client.api import search as hub_search

    query = dict(search)
    unknown = sorted(set(query) - set(SEARCH_KEYS) - {"tags"})
    if unknown:
        raise AutoComposeError(f"search: unknown key(s) {', '.join(unknown)}; use {', '.join(SEARCH_KEYS)}")
    if not query.get("base_model"):
        base_id = base if isinstance(base, str) else getattr(getattr(base, "config", None), "_name_or_path", None)
        if not base_id or _looks_local(str(base_id)):
            raise AutoComposeError("the search needs the base model's hub id: the base is a local folder, so give "
                                   "base_model=ORG/NAME in the search")
        query["base_model"] = str(base_id)
    hits = hub_search(query.pop("text", None), hub, limit=limit, token=token, **query)
    if not hits:
        raise AutoComposeError(f"the hub search {dict(search)} for base model {query['base_model']!r} found no "
                               f"adapter; widen the search or name the candidates")
    return [hit.repo_id for hit in hits]


def _fetch(refs: Sequence[str], hub: Any, token: str | None, progress: bool) -> list[Candidate]:
    """Each candidate's folder: a local adapter folder as it is, a hub id pulled into the cache."""
    from peftkit.hub_client.backend import HubBackend
    from peftkit.hub_client.compose import member_names
    from peftkit.hub_client.resolve import open_hub, parse_ref
    from peftkit.hub_client.snapshot import pull_snapshot

    local = [r for r in refs if Path(r).is_dir()]
    remote = [parse_ref(r) for r in refs if r not in local]
    names = member_names(remote, taken={Path(r).name for r in local})
    out = [Candidate(Path(r).name, r, None, str(Path(r))) for r in local]
    if remote:
        backend = open_hub(hub, token=token)
        try:
            for ref in remote:
                pulled = pull_snapshot(backend, ref, progress=progress)
                out.append(Candidate(names[ref], ref.repo_id, pulled.commit, str(pulled.path)))
        finally:
            if not isinstance(hub, HubBackend):
                backend.close()
    return out


def _datas(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    from peftkit.core.serialization import CONFIG_NAME, read_config

    datas = []
    for cand in candidates:
        if cand.path and (Path(cand.path) / CONFIG_NAME).is_file():
            datas.append(read_config(Path(cand.path)))
    return datas


def _ineligible(model: "AdaptedModel", name: str) -> str | None:
    """Why adapter ``name`` cannot be part of a weighted merge of weight changes (None: it can)."""
    record = model.adapter_record(name)
    if record.model_adapter:
        return f"{record.method.name} changes the model's inputs and has no weight change to weigh"
    if not record.method.merge_low_rank:
        return f"{record.method.name} has no low-rank weight change (weight-space search needs LoRA adapters)"
    if getattr(record.config, "use_dora", False):
        return "DoRA's change rescales whole rows of W and is not a low-rank weight change"
    return None


def _load_members(model: "AdaptedModel", candidates: list[Candidate], needed_labels: set[str] | None,
                  classification: bool) -> list[Candidate]:
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
        cand.left_out = _ineligible(model, cand.name)
        if cand.left_out is None:
            kept.append(cand)
    if classification:
        kept = _same_labels(model, kept, needed_labels or set())
    for cand in candidates:
        if cand.left_out is not None and cand.name in model.adapters:
            model.delete_adapter(cand.name)
    return kept


def _same_labels(model: "AdaptedModel", kept: list[Candidate], needed: set[str]) -> list[Candidate]:
    """Keep the members whose head predicts the examples' labels, all with the most common label list."""
    lists: dict[tuple[str, ...], int] = {}
    labels_of: dict[str, tuple[str, ...]] = {}
    for cand in kept:
        labels = tuple(model.adapter_labels(cand.name) or model.base_labels() or ())
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


def _timed_score(merge: Any, weights: list[float], batches: list[dict[str, Any]], classification: bool
                 ) -> tuple[Any, float]:
    start = time.perf_counter()
    score = merge.score(weights, batches, classification=classification)
    return score, time.perf_counter() - start


def _check_options(candidates: Any, search: Any, max_candidates: Any, push: Any, out: Any, merge: bool) -> None:
    if (candidates is None) == (search is None):
        raise AutoComposeError("give either candidates (adapter ids or folders) or a hub search, not both or neither")
    if not isinstance(max_candidates, int) or isinstance(max_candidates, bool) or max_candidates < 1:
        raise AutoComposeError(f"max_candidates must be a positive integer, got {max_candidates!r}")
    if push and out is None:
        raise AutoComposeError("push needs out: the merged adapter is written there first")
    if push and merge:
        raise AutoComposeError("push publishes an adapter; with merge the folder is a whole model: drop one")


@dataclass
class _Prepared:
    """The model with the kept members on it, and the examples as batches."""

    model: "AdaptedModel"
    task: str
    candidates: list[Candidate]
    kept: list[Candidate]
    tokenizer: Any
    search_batches: list[dict[str, Any]]
    held_batches: list[dict[str, Any]]
    search_count: int
    held_count: int


def _prepare(base: Any, refs: list[str], examples: Any, eval_examples: Any, *, hub: Any, token: str | None,
             tokenizer: Any, holdout: float, seed: int, max_length: int, batch_size: int, text_field: str | None,
             progress: bool) -> _Prepared:
    from peftkit.training_data import CLASSIFICATION_TASKS, Fields, read_records, to_examples

    records = read_records(examples)  # a bad file fails before any model loads
    eval_records = read_records(eval_examples) if eval_examples is not None else None
    cands = _fetch(refs, hub, token, progress)
    model = _base_model(base, cands, progress)
    task = _task_of(model.base_model)
    classification = task in CLASSIFICATION_TASKS
    fields = Fields(text=text_field)
    train_ex = to_examples(task, records, fields)
    held_ex = to_examples(task, eval_records, fields) if eval_records is not None else None
    needed = {lab for ex in train_ex + (held_ex or []) for lab in _labels_of(ex)} if classification else None
    kept = _load_members(model, cands, needed, classification)
    if not kept:
        reasons = "; ".join(f"{c.source}: {c.left_out}" for c in cands)
        raise AutoComposeError(f"no candidate can take part in a weighted merge ({reasons})")
    labels = list(model.adapter_labels(kept[0].name) or model.base_labels() or []) if classification else None
    search_ex, held = _split(train_ex, held_ex, holdout, seed)
    tok = _tokenizer(base, tokenizer)
    return _Prepared(model, task, cands, kept, tok,
                     _batches(task, tok, search_ex, labels, model, max_length, batch_size),
                     _batches(task, tok, held, labels, model, max_length, batch_size), len(search_ex), len(held))


def auto_compose(base: "str | nn.Module", candidates: Sequence[str] | None = None, *,
                 search: Mapping[str, Any] | str | None = None, examples: str | Path,
                 eval_examples: str | Path | None = None, hub: Any = None, token: str | None = None,
                 tokenizer: Any = None, max_candidates: int = 8, budget: int = 40, l1: float = 0.05,
                 holdout: float = 0.3, seed: int = 0, max_length: int = 128, batch_size: int = 32,
                 text_field: str | None = None, out: str | Path | None = None, merge: bool = False,
                 push: str | None = None, progress: bool = True) -> AutoComposeResult:
    """Learn weights for a linear merge of LoRA ``candidates`` (or a hub ``search``'s hits) on ``examples``.

    ``base``: a model folder or hub id (the class comes from the candidates' saved model class), or a
    model object (then pass ``tokenizer``). ``candidates``: hub ids (``alice/a@v2``) or adapter folders;
    ``search``: hub search keywords (a dict, or ``"task=text-classification author=alice"``), for the
    base model unless ``base_model`` is given; at most ``max_candidates`` are tried.
    ``examples`` / ``eval_examples``: JSONL or CSV files as for ``peftkit train`` (``text`` + ``label`` for a
    classifier, ``prompt`` + ``completion``, or ``text`` with ``text_field="text"``, for a causal LM). Without
    ``eval_examples``, a ``holdout`` share of the examples is held out for the report. ``budget``: how
    many weight vectors the search scores; ``l1``: the penalty on the mean absolute weight.
    ``out``: write the merged adapter there (with ``merge``: the base model with it folded in);
    ``push``: publish the adapter as that hub repo. See the module doc for every step.
    """
    _check_options(candidates, search, max_candidates, push, out, merge)
    if isinstance(search, str):
        search = parse_search(search)
    refs = list(candidates) if candidates is not None else _searched(search or {}, base, hub, token, max_candidates)
    if not refs:
        raise AutoComposeError("no candidate adapters given")
    prep = _prepare(base, list(dict.fromkeys(refs))[:max_candidates], examples, eval_examples, hub=hub,
                    token=token, tokenizer=tokenizer, holdout=holdout, seed=seed, max_length=max_length,
                    batch_size=batch_size, text_field=text_field, progress=progress)
    result = _search(prep, budget=budget, l1=l1, seed=seed, progress=progress)
    result.base_model = _hub_base_id(base, prep.kept)
    result.settings.update({"budget": budget, "l1": l1, "holdout": holdout if eval_examples is None else None,
                            "seed": seed, "max_candidates": max_candidates})
    if out is not None:
        save_result(prep.model, result, Path(out), tokenizer=prep.tokenizer, merge=merge)
        result.out = str(out)
        if push:
            result.pushed = push_result(result, push, hub=hub, token=token, progress=progress)
    return result


def _search(prep: _Prepared, *, budget: int, l1: float, seed: int, progress: bool) -> AutoComposeResult:
    """Score each member alone and the uniform average on the held-out batches, search the weights on the
    search batches, and score the learned combination."""
    from peftkit.core.merge_search import WeightedMerge, score_batches
    from peftkit.core.weight_search import BOUND, search_weights
    from peftkit.training_data import CLASSIFICATION_TASKS

    model, classification = prep.model, prep.task in CLASSIFICATION_TASKS
    names = [c.name for c in prep.kept]
    rows: list[Row] = []
    for name in names:
        start = time.perf_counter()
        model.set_active(name)
        score = score_batches(model, prep.held_batches, classification=classification)
        rows.append(Row("single", name, {name: 1.0}, score.loss, score.accuracy, time.perf_counter() - start))
    merge = WeightedMerge(model, names, WORK_NAME if WORK_NAME not in model.adapters else WORK_NAME + "_work")
    uniform = [1.0 / len(names)] * len(names)
    score, seconds = _timed_score(merge, uniform, prep.held_batches, classification)
    rows.append(Row("uniform", "uniform average", dict(zip(names, uniform)), score.loss, score.accuracy, seconds))

    def objective(weights: list[float]) -> float:
        loss = merge.score(weights, prep.search_batches, classification=classification).loss
        return loss + l1 * sum(abs(w) for w in weights) / len(weights)

    started = time.perf_counter()
    try:
        alone = [[1.0 if j == i else 0.0 for j in range(len(names))] for i in range(len(names))]
        found = search_weights(objective, uniform, also=alone if len(names) > 1 else (), budget=budget, seed=seed,
                               progress=progress, desc=f"weighing {len(names)} adapters")
        search_seconds = time.perf_counter() - started
        score, seconds = _timed_score(merge, found.weights, prep.held_batches, classification)
    finally:
        merge.remove()
    weights = dict(zip(names, found.weights))
    rows.append(Row("learned", "learned combination", weights, score.loss, score.accuracy, search_seconds + seconds))
    return AutoComposeResult(
        task=prep.task, members=prep.kept, left_out=[c for c in prep.candidates if c.left_out is not None],
        weights=weights, rows=rows, examples=prep.search_count + prep.held_count,
        search_examples=prep.search_count, heldout_examples=prep.held_count, evaluations=found.evaluations,
        seconds_per_evaluation=search_seconds / max(found.evaluations, 1), search_seconds=search_seconds,
        settings={"strategy": "cma-es", "bound": BOUND})


def _hub_base_id(base: Any, kept: list[Candidate]) -> str | None:
    """The base model's hub id, for the card: BASE when it is one, else what the members recorded."""
    if isinstance(base, str) and not _looks_local(base):
        return base
    for data in _datas(kept):
        recorded = data.get("base_model_name_or_path")
        if isinstance(recorded, str) and recorded and not _looks_local(recorded):
            return recorded
    return None


def _labels_of(example: Any) -> list[str]:
    label = getattr(example, "label", None)
    return [label] if label is not None else list(getattr(example, "tags", []) or [])


def _base_model(base: Any, cands: list[Candidate], progress: bool) -> "AdaptedModel":
    from peftkit.core.model import AdaptedModel

    if isinstance(base, AdaptedModel):
        raise AutoComposeError("pass the plain base model (or its folder / hub id), not an adapted model: "
                               "auto-compose loads the candidates onto it itself")
    if isinstance(base, (str, Path)):
        from peftkit.core.model_source import model_source_options
        from peftkit.hub_client.compose import load_base_model, transformers_progress

        with transformers_progress(progress):
            module = load_base_model(str(base), _datas(cands), **model_source_options(str(base), "the base model"))
    else:
        module = base
    return AdaptedModel(module)

