"""What the search index knows about an adapter repo.

Sources, in the order the Hub and PEFT use them:

* ``README.md`` front matter (YAML between ``---`` lines): ``library_name``,
  ``base_model`` (a string or a list), ``tags``, ``pipeline_tag``, ``datasets``,
  ``license``, ``language``.
* ``adapter_config.json`` (PEFT's format): ``peft_type`` -> method (lower-cased),
  ``base_model_name_or_path``, ``task_type``; and peftkit's own record, with
  ``method``/``task``, when present (its method wins over ``peft_type``): the
  config's ``peftkit`` key, else ``peftkit.json`` (``PEFTKIT_RECORD_FILE`` of :mod:`peftkit.hub_rules.cards`,
  where peftkit keeps it for methods in PEFT's format, which warns about keys
  it does not know).
* an AdapterHub ``adapter_config.json`` and card (:mod:`peftkit.hub_rules.adapterhub`):
  library ``adapter-transformers``, ``model_name`` -> base model, the method its options
  describe, ``adapterhub:<task>/...`` tags -> task.

From those we derive the tags ``list_models(filter=...)`` matches, the way the
Hub does: the card's tags, the library (``peft``), the method (``lora``), the
task (``text-generation``), ``base_model:<id>`` and ``base_model:adapter:<id>``,
``dataset:<id>`` and ``license:<id>``.

The library is what loads the files, whatever the card says (:func:`library_of`): ``peft`` for a ``peft_type``
PEFT has, ``peftkit`` for one it does not (:mod:`peftkit.hub_rules.peft_types`).

The card is the author's and a commit never fails for it, but the index keeps
only values that can be names (:func:`indexable`): at most
:data:`MAX_FACET_CHARS` characters (a hub id is at most 96 + 1 + 96) without a
control character or line break, and at most :data:`MAX_FACET_VALUES` of each
kind. Anything else (100 KB of base model, a tag with a line break, 30,000
tags) is left out of the facets, the tags and the search text; the card keeps it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from peftkit.hub_rules import adapterhub
from peftkit.hub_rules.cards import (
    ADAPTER_OF_TAG_PREFIX,
    CardError,
    TASK_TYPE_TO_PIPELINE,
    as_list,
    split_front_matter,
)
from peftkit.hub_rules.peft_types import file_in_peft_format

MAX_INDEXED_BODY_CHARS = 20_000
#: The libraries the index names for an adapter's files: PEFT's (it loads them) and peftkit's (only peftkit does).
PEFT_LIBRARY = "peft"
PEFTKIT_LIBRARY = "peftkit"
#: The longest value indexed (a base model, tag, dataset, library, task, ...): longer than any hub id
#: (two names of at most 96 characters) and the longest filter the web pages' search takes.
MAX_FACET_CHARS = 200
#: The most values of one kind (tags, base models, datasets, licenses, languages) indexed for a repo;
#: a many-language card names ~200 languages.
MAX_FACET_VALUES = 256
# C0 and C1 control characters (line breaks, tabs, NUL, NEL, ...) and the Unicode line and paragraph separators.
_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def indexable(value: object) -> str | None:
    """``value`` when it can be indexed as a facet value: a string of 1 to :data:`MAX_FACET_CHARS`
    characters, not blank, without a control character or line break; else None."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_FACET_CHARS:
        return None
    return None if _NOT_IN_A_NAME.search(value) else value


def _indexable_list(values: Iterable[object]) -> list[str]:
    """The :func:`indexable` ones of ``values``, at most :data:`MAX_FACET_VALUES`."""
    out = [v for v in map(indexable, values) if v is not None]
    return out[:MAX_FACET_VALUES]


def _json_object(raw: bytes | None) -> dict[str, Any]:
    """A JSON file's object, or ``{}`` when it is missing, broken or not an object."""
    if raw is None:
        return {}
    try:
        loaded = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def validate_card(text: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Errors and warnings in the shape of the Hub's ``/api/validate-yaml``."""
    errors: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    try:
        meta, _ = split_front_matter(text)
    except CardError as exc:
        return [{"message": str(exc)}], warnings
    for key in ("tags", "datasets", "language"):
        value = meta.get(key)
        if value is not None and not isinstance(value, (str, list)):
            errors.append({"message": f"'{key}' must be a string or a list of strings"})
    base = meta.get("base_model")
    if base is not None and not isinstance(base, (str, list)):
        errors.append({"message": "'base_model' must be a model id or a list of model ids"})
    for key in ("library_name", "pipeline_tag", "license"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            errors.append({"message": f"'{key}' must be a string"})
    return errors, warnings


def _looks_like_hub_id(name: str) -> bool:
    """``base_model_name_or_path`` is often a local folder; index only hub-style ids."""
    if not name or name.startswith(("/", ".", "~")) or "\\" in name or ":" in name:
        return False
    return name.count("/") <= 1


def _dedupe(values: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for v in values:
        key = v.lower()
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


@dataclass
class RepoMetadata:
    """Everything indexed about one revision of a repo."""

    card: dict[str, Any] = field(default_factory=dict)
    library_name: str | None = None
    pipeline_tag: str | None = None
    base_models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    is_adapter: bool = False
    body: str = ""
    card_error: str | None = None

    def facets(self) -> list[tuple[str, str]]:
        out = [("tag", t) for t in self.tags]
        out += [("method", m) for m in self.methods]
        out += [("task", t) for t in self.tasks]
        out += [("base_model", b) for b in self.base_models]
        out += [("dataset", d) for d in self.datasets]
        if self.library_name:
            out.append(("library", self.library_name))
        return sorted({(k, v.lower()): (k, v) for k, v in out}.values())

    def search_text(self) -> str:
        parts = [
            " ".join(self.tags),
            " ".join(self.base_models),
            " ".join(self.methods),
            " ".join(self.tasks),
            " ".join(self.datasets),
            visible_text(self.body[:MAX_INDEXED_BODY_CHARS]),
        ]
        return "\n".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        return {
            "library_name": self.library_name,
            "pipeline_tag": self.pipeline_tag,
            "base_models": self.base_models,
            "methods": self.methods,
            "tasks": self.tasks,
            "datasets": self.datasets,
            "tags": self.tags,
            "is_adapter": self.is_adapter,
        }


#: A Markdown link reference definition on a line of its own (``[label]: destination "title"``): it renders as
#: nothing, so search does not match its words (peftkit's cards end with one, the same in every card).
_LINK_DEFINITION = re.compile(r"""^ {0,3}\[[^\]\n]+\]:[ \t]*\S+(?:[ \t]+(?:"[^"\n]*"|'[^'\n]*'|\([^)\n]*\)))?[ \t]*$""",
                              re.MULTILINE)


def visible_text(body: str) -> str:
    """A card body without what renders as nothing (link reference definitions), for the search index."""
    return _LINK_DEFINITION.sub("", body)


def refused_by_peft(config: dict[str, Any]) -> bool:
    """Whether ``config`` (an ``adapter_config.json``'s content) names a ``peft_type`` PEFT does not have: PEFT
    refuses the folder, so nothing indexed about it may say ``peft``."""
    return bool(config.get("peft_type")) and not file_in_peft_format(config)


def library_of(card_library: str | None, config: dict[str, Any]) -> str | None:
    """The library indexed for a repo whose card names ``card_library`` (None: none or AdapterHub's, see
    :func:`extract_metadata`) and whose ``adapter_config.json`` holds ``config`` (``{}``: none).

    The files decide over the card: a ``peft_type`` PEFT has is ``peft`` unless the card says ``peft`` or
    ``peftkit`` (transformers' ``push_to_hub`` rewrites PEFT's card with ``library_name: transformers``); any
    other ``peft_type`` is ``peftkit`` whatever the card says, since PEFT refuses the folder (peftkit writes such
    types, ``BITFIT`` or ``PROMPT_TUNING_EMBEDDING_OUTPUT``, for what PEFT cannot load). Another config without a
    library on its card is ``peftkit``'s."""
    if refused_by_peft(config):
        return PEFTKIT_LIBRARY
    if config.get("peft_type"):
        return card_library if card_library in (PEFT_LIBRARY, PEFTKIT_LIBRARY) else PEFT_LIBRARY
    if card_library is None and config:
        return PEFTKIT_LIBRARY
    return card_library


def extract_metadata(readme: bytes | None, adapter_config: bytes | None,
                     peftkit_record: bytes | None = None) -> RepoMetadata:
    """Build the index entry from the card, the adapter config and peftkit's record (any may be
    missing or broken).

    A broken card never blocks a commit (the client validates YAML before
    uploading); it is indexed as if it had no front matter and the error kept.
    """
    meta = RepoMetadata()
    card: dict[str, Any] = {}
    if readme is not None:
        text = readme.decode("utf-8", errors="replace")
        try:
            card, meta.body = split_front_matter(text)
        except CardError as exc:
            meta.card_error = str(exc)
            meta.body = text
    meta.card = card

    config = _json_object(adapter_config)
    peftkit_cfg = config.get("peftkit") if isinstance(config.get("peftkit"), dict) else _json_object(peftkit_record)

    card_library = indexable(card.get("library_name"))
    card_tags = _indexable_list(as_list(card.get("tags")))
    is_adapterhub = adapterhub.is_adapterhub_config(config)
    if card_library is None and (is_adapterhub or adapterhub.LIBRARY_TAGS & {t.lower() for t in card_tags}):
        card_library = adapterhub.LIBRARY  # as the Hub names the library of AdapterHub's repos
    meta.library_name = library_of(card_library, config)
    meta.is_adapter = bool(config) or meta.library_name in (PEFT_LIBRARY, PEFTKIT_LIBRARY, adapterhub.LIBRARY)
    if refused_by_peft(config):
        # Neither the card's `library_name: peft` nor its tag `peft` finds these files as PEFT's.
        card_tags = [t for t in card_tags if t.lower() != PEFT_LIBRARY]
        if card_library is not None and card_library.lower() == PEFT_LIBRARY:
            card_library = None

    base_models = _indexable_list(as_list(card.get("base_model")))
    cfg_base = indexable(config.get("model_name" if is_adapterhub else "base_model_name_or_path"))
    if not base_models and cfg_base is not None and _looks_like_hub_id(cfg_base):
        base_models = [cfg_base]
    for tag in card_tags:  # a card may carry only the tag form
        if tag.startswith(ADAPTER_OF_TAG_PREFIX):
            base_models.append(tag[len(ADAPTER_OF_TAG_PREFIX) :])
    meta.base_models = _dedupe(base_models)[:MAX_FACET_VALUES]

    # peftkit's own method name is authoritative: a peftkit method saved in
    # PEFT's format also carries PEFT's peft_type, which may be coarser.
    own_method, peft_type = indexable(peftkit_cfg.get("method")), indexable(config.get("peft_type"))
    if own_method:
        meta.methods = [own_method.lower()]
    elif peft_type:
        meta.methods = [peft_type.lower()]
    elif is_adapterhub and adapterhub.method_of(config["config"]):
        meta.methods = [str(adapterhub.method_of(config["config"]))]

    tasks: list[str] = []
    pipeline_tag = indexable(card.get("pipeline_tag"))
    own_task = indexable(peftkit_cfg.get("task"))
    if own_task:
        tasks.append(own_task)
    if pipeline_tag:
        tasks.append(pipeline_tag)
    tasks += adapterhub.tasks_from_tags(card_tags)
    task_type = indexable(config.get("task_type"))
    if task_type:
        mapped = TASK_TYPE_TO_PIPELINE.get(task_type.upper())
        if mapped:
            tasks.append(mapped)
            pipeline_tag = pipeline_tag or mapped
        tasks.append(task_type.lower())
    meta.tasks = _dedupe(tasks)
    meta.pipeline_tag = pipeline_tag

    meta.datasets = _dedupe(_indexable_list(as_list(card.get("datasets"))))

    tags = list(card_tags)
    if meta.library_name:
        tags.append(meta.library_name)
    if card_library and card_library != meta.library_name:
        tags.append(card_library)  # still found by the library the card names
    tags += meta.methods
    if meta.pipeline_tag:
        tags.append(meta.pipeline_tag)
    for base in meta.base_models:
        tags.append(f"base_model:{base}")
        if meta.is_adapter:
            tags.append(f"{ADAPTER_OF_TAG_PREFIX}{base}")
    tags += [f"dataset:{d}" for d in meta.datasets]
    for lic in _indexable_list(as_list(card.get("license"))):
        tags.append(f"license:{lic}")
    tags += _indexable_list(as_list(card.get("language")))
    meta.tags = _dedupe(tags)
    return meta


def normalize_task(task: str) -> list[str]:
    """A task query matches the pipeline tag or PEFT's task type: 'CAUSAL_LM' == 'text-generation'."""
    mapped = TASK_TYPE_TO_PIPELINE.get(task.upper())
    return _dedupe([task] + ([mapped] if mapped else []))
