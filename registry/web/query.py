"""The search page's query string: parsed, bounded, and turned back into links.

The whole search lives in the URL (``/?q=sentiment&method=lora&sort=recent&page=2``)
so results can be shared. Every value is capped in length and count, and
paging in depth, so no URL makes a request cost more than a bounded search.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import urlencode

from ..errors import BadRequest

PAGE_SIZE = 20
MAX_PAGE = 500  # 10,000 results deep; narrow the search to go further
MAX_VALUE_CHARS = 200
MAX_TAGS = 5
MAX_PARAMS = 24
SORTS = {"downloads": "Most downloads", "recent": "Recently updated", "name": "Name"}
#: Single-valued filters: query parameter -> label.
FILTERS = {
    "base_model": "Base model",
    "method": "Method",
    "task": "Task",
    "dataset": "Dataset",
    "license": "License",
    "author": "Author",
}


@dataclass(frozen=True)
class SearchQuery:
    text: str = ""
    filters: dict[str, str] = field(default_factory=dict)  # keys of FILTERS
    tags: tuple[str, ...] = ()
    sort: str = "downloads"
    page: int = 1

    @property
    def offset(self) -> int:
        return (self.page - 1) * PAGE_SIZE

    @property
    def store_tags(self) -> list[str]:
        """Tags for :meth:`RegistryStore.search`: card tags, plus datasets and licenses in their tag form."""
        out = list(self.tags)
        if self.filters.get("dataset"):
            out.append(f"dataset:{self.filters['dataset']}")
        if self.filters.get("license"):
            out.append(f"license:{self.filters['license']}")
        return out

    @property
    def active(self) -> bool:
        return bool(self.text or self.filters or self.tags)

    def params(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.text:
            out.append(("q", self.text))
        out += [(k, v) for k, v in self.filters.items() if v]
        out += [("tag", t) for t in self.tags]
        if self.sort != "downloads":
            out.append(("sort", self.sort))
        if self.page != 1:
            out.append(("page", str(self.page)))
        return out

    def url(self, **change: object) -> str:
        """This query's query string (``?...``, or ``''``) with changes; a changed filter goes back to page 1."""
        query = self
        if "page" not in change:
            query = replace(query, page=1)
        for key, value in change.items():
            if key in FILTERS:
                filters = dict(query.filters)
                if value:
                    filters[key] = str(value)
                else:
                    filters.pop(key, None)
                query = replace(query, filters=filters)
            elif key == "add_tag":
                query = replace(query, tags=tuple(dict.fromkeys([*query.tags, str(value)]))[:MAX_TAGS])
            elif key == "remove_tag":
                query = replace(query, tags=tuple(t for t in query.tags if t != value))
            else:
                query = replace(query, **{key: value})
        params = query.params()
        return "?" + urlencode(params) if params else "?"


def _value(name: str, value: str) -> str:
    value = value.strip()
    if len(value) > MAX_VALUE_CHARS:
        raise BadRequest(f"the search parameter '{name}' is longer than {MAX_VALUE_CHARS} characters; shorten it")
    if any(ord(c) < 32 for c in value):
        raise BadRequest(f"the search parameter '{name}' contains control characters")
    return value


def parse_query(query: dict[str, list[str]]) -> SearchQuery:
    """A :class:`SearchQuery` from the URL's parameters, or :class:`BadRequest` naming what is too big."""
    if sum(len(v) for v in query.values()) > MAX_PARAMS:
        raise BadRequest(f"the search has more than {MAX_PARAMS} parameters; remove some filters")

    def last(name: str) -> str:
        values = query.get(name) or [""]
        return _value(name, values[-1])

    filters = {name: last(name) for name in FILTERS if last(name)}
    tags = tuple(dict.fromkeys(_value("tag", t) for t in query.get("tag", []) if t.strip()))
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"at most {MAX_TAGS} tags can be combined; remove some")
    sort = last("sort") or "downloads"
    if sort not in SORTS:
        raise BadRequest(f"unknown sort {sort[:40]!r}; use one of: {', '.join(SORTS)}")
    page_text = last("page") or "1"
    if not page_text.isdigit() or not 1 <= int(page_text[:6]) <= MAX_PAGE or len(page_text) > 6:
        raise BadRequest(f"page must be a number from 1 to {MAX_PAGE}; narrow the search to see further results")
    return SearchQuery(text=last("q"), filters=filters, tags=tags, sort=sort, page=int(page_text))
