"""The user documentation shipped in the wheel, for ``peftkit docs``.

The repository's ``docs/`` folder ships as ``peftkit/docs`` (pyproject.toml), so a pip install has
every page an error message points to: ``peftkit docs plugins`` prints docs/plugins.md and
``peftkit docs plugins#peftkit_register_methods`` one section of it. Sections are named by the anchor a
Markdown renderer gives their heading (GitHub's rule: lower case, punctuation dropped, spaces as hyphens).
Torch-free, like every CLI module.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from peftkit.method_docs import PAGES

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


@dataclass(frozen=True)
class Topic:
    """One page: ``name`` as ``peftkit docs`` takes it (``plugins``, ``methods/lora``), its first heading."""

    name: str
    title: str
    path: Path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Heading:
    level: int
    title: str
    anchor: str
    line: int


class UnknownTopicError(LookupError):
    """A page or section that the docs do not have; the message lists what there is."""


def docs_root() -> Path:
    """The docs folder: ``peftkit/docs`` in an installed wheel, the checkout's ``docs/`` beside the ``peftkit``
    folder in a source tree or an editable install (where ``peftkit.docs``, a folder without ``__init__.py``,
    cannot be imported: the editable install maps only regular packages)."""
    package = Path(__file__).resolve().parent
    for root in (package / "docs", package.parent / "docs"):
        if (root / "index.md").is_file():
            return root
    raise UnknownTopicError(f"peftkit's docs are not installed beside {package}; reinstall peftkit "
                            f"(pip install --force-reinstall peftkit)")


def topics() -> list[Topic]:
    """Every page, top-level pages first, by name."""
    root = docs_root()
    pages = sorted(root.glob("*.md")) + sorted(root.glob("*/*.md"))
    return [Topic(page.relative_to(root).with_suffix("").as_posix(), _title(page), page) for page in pages]


def _title(page: Path) -> str:
    for heading in headings(page.read_text(encoding="utf-8")):
        return heading.title
    return page.stem


def anchor_of(title: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rule)."""
    plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text
    return re.sub(r"[^\w\- ]", "", plain.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[Heading]:
    """The page's headings outside fenced code blocks (a ``#`` comment in a code block is no heading)."""
    found, fenced, seen = [], False, {}
    for number, line in enumerate(text.splitlines()):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            anchor = anchor_of(match.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.append(Heading(len(match.group(1)), match.group(2), f"{anchor}-{count}" if count else anchor,
                                 number))
    return found


def find_topic(name: str) -> Topic:
    """The page ``name`` names: ``plugins``, ``plugins.md``, ``docs/plugins.md``, ``methods/lora``, or a
    method's name (``lora``; ``seq_bn`` for the bottleneck page, which documents that family)."""
    wanted = name.strip().removeprefix("docs/").removesuffix(".md").lower()
    pages = topics()
    for topic in pages:
        if topic.name.lower() == wanted:
            return topic
    family = next((page.removesuffix(".md") for page, methods in PAGES.items() if wanted in methods), wanted)
    for topic in pages:
        if topic.name.lower() == f"methods/{family}":
            return topic
    names = [t.name for t in pages]
    close = difflib.get_close_matches(wanted, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownTopicError(f"the docs have no page {name!r}; {hint}pages: {', '.join(names)} "
                            f"(`peftkit docs` lists them with their titles)")


def section(topic: Topic, anchor: str) -> str:
    """The part of ``topic`` under the heading whose anchor is ``anchor``, up to the next heading of the same
    or a higher level."""
    text = topic.text()
    found = headings(text)
    start, end = _section_span(topic, found, anchor)
    return "\n".join(text.splitlines()[found[start].line:found[end].line if end < len(found) else None]).rstrip() \
        + "\n"


def section_headings(topic: Topic, anchor: str) -> list[Heading]:
    """The heading whose anchor is ``anchor`` and the headings inside its section (``--sections`` of
    ``PAGE#SECTION``)."""
    found = headings(topic.text())
    start, end = _section_span(topic, found, anchor)
    return found[start:end]


def _section_span(topic: Topic, found: list[Heading], anchor: str) -> tuple[int, int]:
    """``found[start:end]``: the heading whose anchor is ``anchor`` and those inside its section (up to the next
    heading of the same or a higher level); UnknownTopicError with near anchors."""
    start = _heading_index(topic, found, anchor)
    level = found[start].level
    return start, next((i for i in range(start + 1, len(found)) if found[i].level <= level), len(found))


def _heading_index(topic: Topic, found: list[Heading], anchor: str) -> int:
    """Where the heading whose anchor is ``anchor`` is in ``found``; UnknownTopicError with near anchors."""
    wanted = anchor.strip().lstrip("#").lower()
    for index, heading in enumerate(found):
        if heading.anchor == wanted or heading.anchor == anchor_of(wanted):
            return index
    anchors = [h.anchor for h in found]
    close = difflib.get_close_matches(wanted, anchors, n=3) or [a for a in anchors if wanted in a][:3]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownTopicError(f"{topic.name} has no section {anchor!r}; {hint}`peftkit docs {topic.name} "
                            f"--sections` lists them")
