"""Label names of a classification adapter: its ``labels.json`` and a model config's ``id2label``.

A classifier adapter (``seq-cls``, ``token-cls``) carries its own task head
(a ``modules_to_save`` copy); the head's weights give the number of labels,
and ``labels.json`` beside the weights gives their names::

    {"labels": ["food", "sports"], "label2id": {"food": 0, "sports": 1}, "id2label": {"0": "food", "1": "sports"}}

Names that transformers would invent anyway (``LABEL_0``, ``LABEL_1``, ...)
are not written. This module imports no torch (``peftkit train`` checks data
with it before torch loads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import AdapterLoadError

LABELS_FILE = "labels.json"


def default_names(count: int) -> list[str]:
    """The names transformers gives labels it knows no names for."""
    return [f"LABEL_{i}" for i in range(count)]


def is_default(names: Sequence[str]) -> bool:
    return list(names) == default_names(len(names))


def labels_document(names: Sequence[str]) -> dict[str, Any]:
    """The JSON object of ``labels.json`` for ``names`` in id order."""
    return {"labels": list(names), "label2id": {n: i for i, n in enumerate(names)},
            "id2label": {str(i): n for i, n in enumerate(names)}}


def labels_text(names: Sequence[str]) -> str:
    return json.dumps(labels_document(names), indent=2) + "\n"


def read_labels(folder: str | Path) -> list[str] | None:
    """The label names in ``folder/labels.json`` in id order; None when there is no such file.

    Accepted: the object peftkit writes (``labels``, else ``id2label``) or a plain list of names.
    """
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{path} is not valid JSON ({exc}); fix it or delete it (the labels are then "
                               f"named LABEL_0, LABEL_1, ...)") from None
    names: Any = data
    if isinstance(data, dict):
        names = data.get("labels")
        if names is None and isinstance(data.get("id2label"), dict):
            names = _from_id2label(data["id2label"], path)
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise AdapterLoadError(f"{path} must list the label names in id order, as "
                               f'{{"labels": ["neg", "pos"]}} or ["neg", "pos"]; it holds {json.dumps(data)[:120]}')
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise AdapterLoadError(f"{path} names a label twice ({', '.join(names)}); give each label once")
    return names


def _from_id2label(table: dict[str, Any], path: Path) -> list[str]:
    try:
        ids = sorted(int(k) for k in table)
    except ValueError:
        raise AdapterLoadError(f"{path}: id2label keys must be label ids 0, 1, ...; got {sorted(table)[:5]}") from None
    if ids != list(range(len(ids))):
        raise AdapterLoadError(f"{path}: id2label must number the labels 0..{len(ids) - 1} without gaps; got {ids}")
    return [table[str(i)] for i in ids]


def config_labels(config: Any) -> list[str] | None:
    """A transformers config's label names in id order (None when it has no labels)."""
    table = getattr(config, "id2label", None)
    if not isinstance(table, dict) or not table:
        return None
    return [str(table[k]) for k in sorted(table, key=int)]


def set_config_labels(config: Any, names: Sequence[str]) -> None:
    """Make ``config`` describe ``names`` (``num_labels`` follows ``id2label`` in transformers)."""
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
