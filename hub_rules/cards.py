"""An adapter's card and files as a hub reads them: the fields both the registry and the hub client use.

The conventions are the Hugging Face Hub's (and PEFT's): ``README.md`` front
matter (YAML between ``---`` lines) with ``base_model``, ``tags``,
``pipeline_tag``, ``library_name``; tags ``base_model:adapter:<id>``; PEFT's
``task_type`` mapped to the Hub's pipeline tags and to the transformers Auto
class that loads the base model.
"""

from __future__ import annotations

import re
from typing import Any

#: PEFT task types -> the Hub's pipeline tags.
TASK_TYPE_TO_PIPELINE = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}

#: PEFT task types -> the transformers Auto class that loads the base model.
TASK_TYPE_TO_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

#: Files whose GET counts as one download of the repo (the Hub counts config files too).
DOWNLOAD_COUNTING_FILES = frozenset({"adapter_config.json", "config.json", "fusion_config.json", "composition.json"})

#: peftkit's own record of an adapter in PEFT's format, beside its adapter_config.json.
PEFTKIT_RECORD_FILE = "peftkit.json"

#: The tag that says "an adapter of this base model": ``base_model:adapter:<id>``.
ADAPTER_OF_TAG_PREFIX = "base_model:adapter:"

# YAML front matter is attacker-controlled: bounded in size and nesting, and
# aliases (``*name``, which let a few bytes expand into gigabytes: "billion
# laughs") are refused, so parsing costs linear time and memory in what was sent.
MAX_FRONT_MATTER_BYTES = 128 * 1024
MAX_FRONT_MATTER_DEPTH = 32

_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", re.DOTALL | re.MULTILINE)


class CardError(ValueError):
    """The README's front matter is not valid YAML or not a mapping."""


def as_list(value: Any) -> list[str]:
    """A card field that may be one string or a list of them (``base_model``, ``tags``, ``datasets``), as a list
    of its non-blank strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v).strip()]
    return [str(value)]


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Return ``(metadata, body)``; metadata is ``{}`` when there is no front matter.

    Raises :class:`CardError` naming the problem when the block exists but
    does not parse to a mapping.
    """
    text = text.lstrip("\ufeff")
    match = _FRONT_MATTER_RE.match(text)
    if not match:
        return {}, text
    block = match.group(1)
    body = text[match.end() :].lstrip("\r\n")
    size = len(block.encode("utf-8"))
    if size > MAX_FRONT_MATTER_BYTES:
        raise CardError(
            f"README.md front matter is {size} bytes; at most {MAX_FRONT_MATTER_BYTES} are accepted: "
            "move long content (tables, eval results) into the card's body below the closing '---'"
        )
    import yaml  # lazily: only cards need it, and server start-up stays fast

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built with it: ~10x faster
    try:
        _check_bounded(yaml, block, loader)
        data = yaml.load(block, Loader=loader) if block.strip() else {}  # noqa: S506 - a safe loader
    except CardError:
        raise
    except yaml.YAMLError as exc:
        raise CardError(f"README.md front matter is not valid YAML: {exc}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of 5,000 digits
        raise CardError(f"README.md front matter has a value that cannot be read: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CardError(
            f"README.md front matter must be a YAML mapping (key: value lines), got {type(data).__name__}"
        )
    return _jsonable(data), body


def _check_bounded(yaml: Any, block: str, loader: Any) -> None:
    """Refuse aliases and deep nesting, from the parser's events (one linear pass, nothing built)."""
    depth = 0
    for event in yaml.parse(block, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            raise CardError(
                f"README.md front matter uses the YAML alias '*{event.anchor}'; aliases (and '<<' merges) are "
                "not accepted: write the value out in full"
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_FRONT_MATTER_DEPTH:
                raise CardError(
                    f"README.md front matter nests deeper than {MAX_FRONT_MATTER_DEPTH} levels; flatten it"
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _jsonable(value: Any) -> Any:
    """YAML can yield dates and other objects; keep what JSON can carry."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
