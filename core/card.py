"""Model cards (README.md with YAML front matter) for adapter folders.

The front matter follows the Hub's conventions for PEFT adapters, so the Hub,
peftkit's registry and PEFT-aware tools index them the same way:
``library_name``, ``base_model``, and tags ``base_model:adapter:<id>`` and the
method name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError
from .model_source import looks_local

#: The keyword arguments save_adapter() / save_pretrained() take for the model card.
CARD_FIELDS = ("task", "dataset", "metrics", "tags", "license", "language", "repo_id", "description")
#: Other libraries' save options, and what peftkit does instead.
_FOREIGN_SAVE_OPTIONS = {
    "with_head": "AdapterHub's option: peftkit saves a task model's head with the adapter when it is in the "
                 "adapter's modules_to_save (the default for a task model); to save an adapter without it, add "
                 "the adapter with add_adapter(name, spec, default_head=False)",
    "use_safetensors": "peftkit always writes safetensors (adapter_model.safetensors); drop the option",
    "safe_serialization": "peftkit always writes safetensors (adapter_model.safetensors); drop the option",
    "meta_dict": "AdapterHub's option: card facts go in as keyword arguments of their own: "
                 + ", ".join(f"{field}=" for field in CARD_FIELDS),
    "selected_adapters": "PEFT's option: save_pretrained(path, adapter_names=[...])",
    "is_main_process": "PEFT's option: call save on the main process only (peftkit.train and AdapterTrainer do)",
}


def check_card_fields(card: dict[str, Any], call: str) -> None:
    """ConfigError naming each keyword argument ``call`` got that is no card field (before anything is
    written): another library's option gets what peftkit does instead, anything else the fields it takes."""
    unknown = [key for key in card if key not in CARD_FIELDS]
    if not unknown:
        return
    reasons = [f"{key}=: {_FOREIGN_SAVE_OPTIONS[key]}" if key in _FOREIGN_SAVE_OPTIONS else f"{key}= is not a card field"
               for key in unknown]
    given = ", ".join(f"{key}=" for key in unknown)
    raise ConfigError(f"{call} got {given}, which it does not take ({'; '.join(reasons)}). Besides the path and "
                      f"the adapter's name it takes format= (save_adapter) and the card fields "
                      f"{', '.join(CARD_FIELDS)}")


#: The last line of a card body peftkit writes: a Markdown link reference definition, which renders as nothing
#: (on the Hub, the registry's pages, GitHub), holding the hash of the body above it. A push regenerates a body
#: whose hash still matches (usage snippet, title and results for the repo) and keeps any other body as it is.
_NOTE = '[peftkit-card]: # "written by peftkit (sha256 {digest}{default}); a hub push rewrites this card for the ' \
        'repo unless its text is edited"'
_NOTE_RE = re.compile(r'\[peftkit-card\]: # "written by peftkit \(sha256 (?P<digest>[0-9a-f]{16})'
                      r'(?P<default>, default description)?\)[^"\n]*"')
_DEFAULT_FLAG = ", default description"
#: What earlier versions' default descriptions said, and what they recognized a generated body by.
_LEGACY_MARK = "made with peftkit"
#: What the usage snippets load the adapter onto when the card names only a local folder: a variable to fill in.
_BASE_VARIABLE = "base_model"


def card_metadata(*, method: str, base_model: str | None, peft_format: bool, task: str | None = None,
                  dataset: str | list[str] | None = None, metrics: dict[str, float] | None = None,
                  tags: list[str] | None = None, license: str | None = None,
                  language: str | list[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """A model card's front matter in the Hub's conventions. ``peft_format``: whether Hugging Face PEFT
    loads the folder (``file_in_peft_format`` of its ``adapter_config.json``, decided per folder, not per
    method): ``library_name: peft`` and a ``PeftModel`` usage snippet then, else ``peftkit``. ``name`` is what
    the evaluation results (``model-index``) are results of: the repo id or the adapter's name, never the base
    model's."""
    meta: dict[str, Any] = {"library_name": "peft" if peft_format else "peftkit"}
    if base_model:
        meta["base_model"] = base_model
    all_tags = [f"base_model:adapter:{base_model}"] if base_model else []
    all_tags += [method, "peftkit"]
    if task:
        all_tags.append(f"task:{task}")
    all_tags += [t for t in (tags or []) if t not in all_tags]
    meta["tags"] = all_tags
    if task:
        meta["pipeline_tag"] = task
    if dataset:
        meta["datasets"] = [dataset] if isinstance(dataset, str) else list(dataset)
    if license:
        meta["license"] = license
    if language:
        meta["language"] = language
    if metrics:
        # The Hub's evaluation-results format needs a dataset in every result: without one
        # huggingface_hub drops the whole model-index ("Invalid model-index") and huggingface.co
        # refuses the card, so metrics given without a dataset say so ("unspecified").
        named = meta["datasets"][0] if dataset else "unspecified"
        meta["model-index"] = [{
            "name": name or method,
            "results": [{
                "task": {"type": task or "unknown"},
                "dataset": {"name": named, "type": named},
                "metrics": [{"type": k, "name": k, "value": float(v)} for k, v in metrics.items()],
            }],
        }]
    return meta


#: Where a card saved outside a hub says its folder is.
LOCAL_PLACEHOLDER = "path/to/this/adapter"


#: The card's base-model line when none is recorded (a model built from a config, or a local folder not named).
NO_BASE_LINE = ("- base model: not recorded (a model built from a config); a push names it with base_model=ORG/NAME "
                "(`--base-model` on the command line)")


def render_card(meta: dict[str, Any], *, method: str, adapter_name: str, repo_id: str | None = None,
                description: str | None = None, parameters: int | None = None,
                metrics: dict[str, float] | None = None, default_description: str | None = None) -> str:
    """The card: ``meta`` as front matter, then a body (title, description, details, results, usage) ending
    with a note that marks it as peftkit's (:func:`generated_body`). ``description`` is the text to keep;
    without it ``default_description`` (else a line naming the method and base model) is written, and the
    note says so, so that a push writes the default anew for the repo."""
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(front) != meta:  # PyYAML folds U+0085/U+2028 written raw in quotes: escape them all
        front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False)
    base = meta.get("base_model") or "<base model>"  # the usage snippet's placeholder when none is recorded
    where = repo_id or LOCAL_PLACEHOLDER
    for_base = f" for `{base}`" if meta.get("base_model") else ""
    lines = [
        f"# {repo_id or adapter_name}", "",
        description or default_description or f"A {method} adapter{for_base}, made with peftkit.", "",
        "## Details", "",
        f"- method: `{method}`",
        f"- base model: `{base}`" if meta.get("base_model") else NO_BASE_LINE,
    ]
    if parameters is not None:
        lines.append(f"- trainable parameters: {parameters:,}")
    if meta.get("datasets"):
        lines.append(f"- dataset: {', '.join(meta['datasets'])}")
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    lines += ["", "## Usage", ""] + _usage_lines(base, where, meta.get("library_name") == "peft")
    body = "\n".join(lines)
    note = _NOTE.format(digest=_body_digest(body), default="" if description else _DEFAULT_FLAG)
    return "\n".join(["---", front.rstrip(), "---", "", body, note, ""])


def _usage_lines(base: str, where: str, peft_format: bool) -> list[str]:
    """The usage section's lines (ending with a blank one). A base model recorded as a local folder is a path
    on the machine that saved the adapter, not something anyone can load: the snippet takes a variable."""
    loaded = json.dumps(base)
    lines = []
    if looks_local(base):
        loaded = _BASE_VARIABLE
        lines += [f"The adapter records its base model as a local folder (`{base}`), not a hub id: load that "
                  f"model (or the hub model it is a copy of) as `{_BASE_VARIABLE}`, then:", ""]
    # peftkit.load reads hub repos; a folder (a card saved locally, "path/to/this/adapter") loads with from_pretrained
    loader = "peftkit.load" if where != LOCAL_PLACEHOLDER else "peftkit.from_pretrained"
    lines += ["```python", "import peftkit", f"model = {loader}({loaded}, {json.dumps(where)})", "```", ""]
    if peft_format:
        lines += ["The folder is in Hugging Face PEFT's format too:", "", "```python",
                  "from peft import PeftModel",
                  f"model = PeftModel.from_pretrained({_BASE_VARIABLE}, {json.dumps(where)})", "```", ""]
    return lines


@dataclass(frozen=True)
class GeneratedBody:
    """A card body as peftkit wrote it: a push writes it anew for the repo, keeping its description."""

    description: str | None  # None: a default text, which the push writes anew too


# The body render_card writes, without its note, and (_LEGACY_LAYOUT_RE) as versions without the note wrote it:
# no paragraph before the usage snippet. Only the title and the description are free text.
_LAYOUT = (r"# [^\n]*\n\n(?P<description>.+?)\n\n## Details\n\n- method: `[^\n]*`\n- base model: `[^\n]*`\n"
           r"(?:- trainable parameters: [0-9,]+\n)?(?:- dataset: [^\n]*\n)?"
           r"(?:\n## Results\n\n\| metric \| value \|\n\| --- \| --- \|\n(?:\| [^\n]* \| [^\n]* \|\n)+)?"
           r"\n## Usage\n\n{paragraph}```python\nimport peftkit\n"
           r"model = peftkit\.(?:load|from_pretrained)\([^\n]*\)\n```\n"
           r"(?:\nThe folder is in Hugging Face PEFT's format too:\n\n```python\nfrom peft import PeftModel\n"
           r"model = PeftModel\.from_pretrained\(base_model, [^\n]*\)\n```\n)?")
_LAYOUT_RE = re.compile(_LAYOUT.format(paragraph=r"(?:[^\n]+\n\n)?"), re.DOTALL)
_LEGACY_LAYOUT_RE = re.compile(_LAYOUT.format(paragraph=""), re.DOTALL)


def generated_body(body: str) -> GeneratedBody | None:
    """What a push keeps of a card body peftkit wrote and nobody edited since; None for any other body.

    A body of this version ends with a note holding the hash of the text above it: any edit (but to
    white space at its ends or line endings) changes the hash, and the body is then the user's. A body
    written before the note existed counts as peftkit's when it has the exact layout peftkit wrote then,
    whatever its title and description say (an edited description is kept; a description that says
    "made with peftkit", those versions' default, is written anew, as they did).
    """
    text = body.replace("\r\n", "\n").strip("\n")
    above, _, last = text.rpartition("\n")
    note = _NOTE_RE.fullmatch(last.strip())
    if note is not None:
        if note["digest"] != _body_digest(above):
            return None
        layout = _LAYOUT_RE.fullmatch(above.strip("\n") + "\n")
        if layout is None:
            return None
        return GeneratedBody(None if note["default"] else layout["description"])
    layout = _LEGACY_LAYOUT_RE.fullmatch(text + "\n")
    if layout is None:
        return None
    description = layout["description"]
    return GeneratedBody(None if _LEGACY_MARK in description else description)


def _body_digest(body: str) -> str:
    return hashlib.sha256(body.replace("\r\n", "\n").strip("\n").encode("utf-8")).hexdigest()[:16]


def card_metrics(meta: dict[str, Any]) -> dict[str, float] | None:
    """The metrics a card's front matter records, by name, when its ``model-index`` has the form
    :func:`card_metadata` writes (one model, one result, plain numbers): ``{}`` without a model-index;
    None for a fuller one (several results, extra fields), which a push cannot rewrite without losing some."""
    index = meta.get("model-index")
    if index is None:
        return {}
    if not (isinstance(index, list) and len(index) == 1 and isinstance(index[0], dict)
            and set(index[0]) <= {"name", "results"}):
        return None
    results = index[0].get("results")
    if not (isinstance(results, list) and len(results) == 1 and isinstance(results[0], dict)
            and set(results[0]) <= {"task", "dataset", "metrics"}):
        return None
    found: dict[str, float] = {}
    for metric in results[0].get("metrics") or []:
        if not (isinstance(metric, dict) and set(metric) <= {"type", "name", "value"}
                and isinstance(metric.get("type"), str) and metric.get("name", metric["type"]) == metric["type"]
                and isinstance(metric.get("value"), (int, float)) and not isinstance(metric["value"], bool)):
            return None
        found[metric["type"]] = float(metric["value"])
    return found


def read_card_metadata(text: str) -> dict[str, Any]:
    """The YAML front matter of a card ({} when there is none)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError as exc:
        raise ConfigError(f"the card's YAML front matter (between the '---' lines of README.md) cannot be read: "
                          f"{' '.join(str(exc).split())}; fix it, or delete README.md to have a new card written"
                          ) from None
    return data if isinstance(data, dict) else {}
