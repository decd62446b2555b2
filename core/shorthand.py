"""The string shorthand for adapter configs: ``lora[r=8,alpha=16,target_modules=["q_proj","v_proj"]]``.

Values are JSON (numbers, strings, lists, objects, true/false/null); the
Python spellings True/False/None are accepted, and a bare word such as
``all-linear`` or ``relu`` is read as a string, in a list too (``[q_proj,v_proj]``).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from .errors import ConfigError

_NAME = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*(?:\[(.*)\])?\s*$", re.S)
_PY_LITERALS = {"True": True, "False": False, "None": None}
#: How deeply brackets may nest in a spec or a composition string (deeper text is refused
#: before any recursive parsing, which would otherwise end in a RecursionError).
MAX_NESTING = 32


def _bracket_hint(values: dict[str, Any], rest: list[str]) -> str:
    """For ``target_modules=q_proj,v_proj`` (a list written without its brackets: the items after the last
    key=value are bare words), how to write the list; empty otherwise."""
    if not values or not isinstance(values[list(values)[-1]], str):
        return ""
    last = list(values)[-1]
    words = [values[last]] + [item.strip() for item in itertools.takewhile(lambda i: "=" not in i, rest)]
    return f"; to give {last} a list, write it in brackets: {last}=[{','.join(words)}]"


def parse_shorthand(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``method[k=v,...]`` into the method name and a dict of values."""
    match = _NAME.match(spec)
    if not match:
        raise ConfigError(
            f"cannot parse adapter spec {spec!r}; write it as method[key=value,...], "
            f'e.g. lora[r=8,alpha=16,target_modules=["q_proj","v_proj"]]')
    name, body = match.group(1), match.group(2)
    values: dict[str, Any] = {}
    if body and body.strip():
        items = split_top_level(body, ",")
        for index, item in enumerate(items):
            if "=" not in item:
                raise ConfigError(f"in adapter spec {spec!r}: {item.strip()!r} is not key=value"
                                  + _bracket_hint(values, items[index:]))
            key, raw = item.split("=", 1)
            key = key.strip()
            if not key.isidentifier():
                raise ConfigError(f"in adapter spec {spec!r}: {key!r} is not a valid key name")
            if key in values:
                raise ConfigError(f"in adapter spec {spec!r}: key {key!r} is given twice")
            values[key] = parse_value(raw.strip(), spec)
    return name, values


def parse_value(raw: str, spec: str = "") -> Any:
    if raw in _PY_LITERALS:
        return _PY_LITERALS[raw]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if raw.startswith(("[", "{")):
        try:  # allow Python-style single quotes in lists and mappings
            return json.loads(raw.replace("'", '"').replace("True", "true").replace("False", "false")
                              .replace("None", "null"))
        except json.JSONDecodeError as exc:
            if raw.startswith("[") and raw.endswith("]"):  # a list of bare words: [q_proj,v_proj]
                return [parse_value(item.strip(), spec) for item in split_top_level(raw[1:-1], ",")]
            raise ConfigError(f"in adapter spec {spec!r}: cannot read value {raw!r} ({exc}); write lists and "
                              f'mappings as JSON, e.g. target_modules=["q_proj","v_proj"] or '
                              f'rank_pattern={{"q_proj":16}}') from None
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":  # a quoted regex that is not JSON: "a\.b"
        return raw[1:-1]
    if not raw:
        raise ConfigError(f"in adapter spec {spec!r}: a key has an empty value")
    return raw


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, start, escaped = [], 0, "", 0, False
    for i, ch in enumerate(text):
        if quote:  # inside quotes a backslash escapes the next character, a backslash too
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
            if depth > MAX_NESTING:
                raise ConfigError(f"brackets nest more than {MAX_NESTING} deep in {text[:60]!r}...; "
                                  f"flatten the value")
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise ConfigError(f"unbalanced brackets or quotes in {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p.strip()]
