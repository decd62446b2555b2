"""Model cards (README.md with YAML front matter) for adapter folders.

The front matter follows the Hub's conventions for PEFT adapters, so the Hub,
peftkit's registry and PEFT-aware tools index them the same way:
``library_name``, ``base_model``, and tags ``base_model:adapter:<id>`` and the
method name.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from .errors import ConfigError


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


def render_card(meta: dict[str, Any], *, method: str, adapter_name: str, repo_id: str | None = None,
                description: str | None = None, parameters: int | None = None,
                metrics: dict[str, float] | None = None) -> str:
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    if yaml.safe_load(front) != meta:  # PyYAML folds U+0085/U+2028 written raw in quotes: escape them all
        front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False)
    base = meta.get("base_model") or "<base model>"
    where = repo_id or "path/to/this/adapter"
    lines = [
        "---", front.rstrip(), "---", "",
        f"# {repo_id or adapter_name}", "",
        description or f"A {method} adapter for `{base}`, made with peftkit.", "",
        "## Details", "",
        f"- method: `{method}`",
        f"- base model: `{base}`",
    ]
    if parameters is not None:
        lines.append(f"- trainable parameters: {parameters:,}")
    if meta.get("datasets"):
        lines.append(f"- dataset: {', '.join(meta['datasets'])}")
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    lines += ["", "## Usage", "", "```python", "import peftkit",
              f"model = peftkit.load({json.dumps(base)}, {json.dumps(where)})", "```", ""]
    if meta.get("library_name") == "peft":
        lines += ["The folder is in Hugging Face PEFT's format too:", "", "```python",
                  "from peft import PeftModel",
                  f"model = PeftModel.from_pretrained(base_model, {json.dumps(where)})", "```", ""]
    return "\n".join(lines)


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
