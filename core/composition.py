"""Composition blocks: how several adapters act together at every site.

Blocks are small immutable objects with a JSON form and a string form that
round-trip into one another::

    stack(lang_de, average(ner, pos, weights=[0.7, 0.3]))
    {"block": "stack", "children": ["lang_de", {"block": "average", ...}]}

A leaf is an adapter name. The semantics and the math of each block are in
docs/composition.md; the executor here runs at every TunerLayer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence, Union

from .errors import CompositionError
from .shorthand import parse_value, split_top_level

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .layer import TunerLayer

#: The row marker for "no adapter" in per-example routing (PEFT's spelling).
BASE_MODEL = "__base__"
MAX_DEPTH = 8

Node = Union[str, "Block"]


@dataclass(frozen=True)
class Block:
    """A composition of children (adapter names or blocks)."""

    kind: ClassVar[str] = ""
    children: tuple[Node, ...] = ()

    def __init__(self, *children: Node | Sequence[Node], **options: Any) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise CompositionError(f"{self.kind}() needs at least one adapter")
        for child in children:
            if not isinstance(child, (str, Block)):
                raise CompositionError(f"{self.kind}(): {child!r} is neither an adapter name nor a block")
        object.__setattr__(self, "children", tuple(children))
        self._set_options(**options)

    def _set_options(self, **options: Any) -> None:
        if options:
            raise CompositionError(f"{self.kind}() takes no options, got {', '.join(options)}")

    def options(self) -> dict[str, Any]:
        return {}

    # -- forms -----------------------------------------------------------------

    def __str__(self) -> str:
        parts = [str(c) for c in self.children]
        parts += [f"{k}={json.dumps(v)}" for k, v in self.options().items() if v is not None]
        return f"{self.kind}({', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"block": self.kind,
                                "children": [c.to_json() if isinstance(c, Block) else c for c in self.children]}
        data.update({k: v for k, v in self.options().items() if v is not None})
        return data

    def leaves(self) -> Iterator[str]:
        for child in self.children:
            if isinstance(child, Block):
                yield from child.leaves()
            else:
                yield child

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children if isinstance(c, Block)), default=0)


class Stack(Block):
    """Apply children in sequence, each on the previous one's output."""

    kind = "stack"


class Average(Block):
    """Weighted average of the children's outputs; weights normalized once to sum to 1."""

    kind = "average"
    weights: tuple[float, ...] | None = None

    def _set_options(self, weights: Sequence[float] | None = None) -> None:  # type: ignore[override]
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(self.children):
                raise CompositionError(f"average() has {len(self.children)} adapters but "
                                       f"{len(weights)} weights; give one weight per adapter")
            if abs(sum(weights)) < 1e-12:
                raise CompositionError("average() weights sum to 0; they must sum to a non-zero value")
        object.__setattr__(self, "weights", weights)

    def options(self) -> dict[str, Any]:
        return {"weights": list(self.weights) if self.weights is not None else None}

    def normalized_weights(self) -> tuple[float, ...]:
        if self.weights is None:
            n = len(self.children)
            return tuple(1.0 / n for _ in range(n))
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)


class BatchSplit(Block):
    """Rows of the batch go to the children in consecutive chunks of ``sizes``."""

    kind = "batch_split"
    sizes: tuple[int, ...] = ()

    def _set_options(self, sizes: Sequence[int] | None = None) -> None:  # type: ignore[override]
        if sizes is None or len(sizes) != len(self.children):
            raise CompositionError(f"batch_split() needs sizes=[...] with one row count per adapter "
                                   f"({len(self.children)} adapters)")
        if any((not isinstance(s, int)) or s < 0 for s in sizes):
            raise CompositionError(f"batch_split() sizes must be non-negative integers, got {list(sizes)}")
        object.__setattr__(self, "sizes", tuple(sizes))

    def options(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes)}


BLOCK_TYPES: dict[str, type[Block]] = {cls.kind: cls for cls in (Stack, Average, BatchSplit)}


def register_block(cls: type[Block]) -> type[Block]:
    """Make a block type known to parse() and from_json()."""
    BLOCK_TYPES[cls.kind] = cls
    return cls


# -- parsing --------------------------------------------------------------------

_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


def parse(text: str) -> Node:
    """Parse the string form (``stack(a, fuse(b, c))``) into blocks; a bare name stays a str."""
    text = text.strip()
    if not text:
        raise CompositionError("empty composition; name at least one adapter")
    match = _CALL.match(text)
    if not match:
        if any(ch in text for ch in "(),[]"):
            raise CompositionError(f"cannot parse composition {text!r}; write e.g. stack(a, b) or "
                                   f"average(a, b, weights=[0.5, 0.5]); blocks: {', '.join(BLOCK_TYPES)}")
        return text
    kind, body = match.group(1), match.group(2)
    cls = BLOCK_TYPES.get(kind)
    if cls is None:
        raise CompositionError(f"unknown composition block {kind!r}; known blocks: {', '.join(BLOCK_TYPES)}")
    children: list[Node] = []
    options: dict[str, Any] = {}
    for part in split_top_level(body, ","):
        part = part.strip()
        key_match = re.match(r"^([a-z_]+)\s*=(.*)$", part, re.S)
        if key_match and "(" not in key_match.group(1):
            options[key_match.group(1)] = parse_value(key_match.group(2).strip(), text)
        else:
            children.append(parse(part))
    try:
        return cls(*children, **options)
    except TypeError as exc:
        raise CompositionError(f"{kind}(): {exc}") from None


def from_json(data: Any) -> Node:
    if isinstance(data, str):
        return data
    if not isinstance(data, dict) or "block" not in data:
        raise CompositionError(f"a composition in JSON is an adapter name or an object with 'block' "
                               f"and 'children', got {data!r}")
    cls = BLOCK_TYPES.get(data["block"])
    if cls is None:
        raise CompositionError(f"unknown composition block {data['block']!r}; known: {', '.join(BLOCK_TYPES)}")
    options = {k: v for k, v in data.items() if k not in ("block", "children")}
    return cls(*[from_json(c) for c in data.get("children", [])], **options)


def to_json(node: Node) -> Any:
    return node.to_json() if isinstance(node, Block) else node


def as_node(value: Node | Sequence[str]) -> Node:
    """Accept a name, a block, a string form, or a list of names (= Stack)."""
    if isinstance(value, Block):
        return value
    if isinstance(value, str):
        return parse(value)
    names = list(value)
    if len(names) == 1:
        return as_node(names[0])
    return Stack(*[as_node(n) for n in names])


def leaves(node: Node) -> list[str]:
    return [node] if isinstance(node, str) else list(node.leaves())


def check_supported(node: Node, method_of: dict[str, Any], top: bool = True) -> None:
    """Fail before any forward when a block is malformed or unsupported.

    ``method_of`` maps adapter names to their Method objects.
    """
    if isinstance(node, str):
        if node not in method_of:
            raise CompositionError(f"composition names adapter {node!r}, which is not on the model; "
                                   f"adapters: {', '.join(sorted(method_of)) or 'none'}")
        return
    if node.depth() > MAX_DEPTH:
        raise CompositionError(f"composition nests deeper than {MAX_DEPTH} blocks; flatten it")
    for name in node.leaves():
        if name not in method_of:
            raise CompositionError(f"composition names adapter {name!r}, which is not on the model; "
                                   f"adapters: {', '.join(sorted(method_of)) or 'none'}")
    for child in node.children:
        if isinstance(child, str):
            method = method_of[child]
            if node.kind not in method.supported_blocks:
                ok = ", ".join(sorted(method.supported_blocks)) or "no block (use it alone)"
                raise CompositionError(
                    f"adapter {child!r} (method {method.name!r}) cannot take part in {node.kind}(); "
                    f"{method.name} supports: {ok}")
        else:
            check_supported(child, method_of, top=False)


# -- execution --------------------------------------------------------------------


def run_node(node: Node, layer: "TunerLayer", x: "torch.Tensor", h: "torch.Tensor") -> "torch.Tensor":
    """The output of ``node`` at one site, given the site input and current output."""
    if isinstance(node, str):
        if node in layer.merged:
            return h  # already folded into the base weights
        adapters = layer.adapters
        if node not in adapters:
            return h  # this adapter does not touch this site
        return adapters[node](x, h, layer.base_layer)
    if isinstance(node, Stack):
        for child in node.children:
            h = run_node(child, layer, x, h)
        return h
    if isinstance(node, Average):
        out = None
        for child, w in zip(node.children, node.normalized_weights()):
            part = run_node(child, layer, x, h) * w
            out = part if out is None else out + part
        return out
    if isinstance(node, BatchSplit):
        import torch

        if sum(node.sizes) != h.shape[0]:
            raise CompositionError(f"batch_split sizes {list(node.sizes)} add up to {sum(node.sizes)} rows "
                                   f"but the batch has {h.shape[0]}")
        xs, hs = x.split(node.sizes), h.split(node.sizes)
        return torch.cat([run_node(c, layer, xi, hi) for c, xi, hi in zip(node.children, xs, hs)])
    runner = getattr(node, "run", None)
    if runner is None:
        raise CompositionError(f"block {node.kind!r} cannot run at a layer")
    return runner(layer, x, h)


@dataclass
class Routing:
    """Per-example adapter routing for one forward: each row's adapter name."""

    names: list[str]
    groups: list[tuple[str, Any]] = field(default_factory=list)  # (name, slice or index tensor)

    @classmethod
    def build(cls, names: Sequence[str], device: Any) -> "Routing":
        import torch

        routing = cls(list(names))
        order: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            order.setdefault(name, []).append(row)
        for name, rows in order.items():
            if name == BASE_MODEL:
                continue
            if rows == list(range(rows[0], rows[-1] + 1)):
                routing.groups.append((name, slice(rows[0], rows[-1] + 1)))
            else:
                routing.groups.append((name, torch.tensor(rows, dtype=torch.long, device=device)))
        return routing

    def run(self, layer: "TunerLayer", x: "torch.Tensor", h: "torch.Tensor") -> "torch.Tensor":
        out = h
        for name, rows in self.groups:
            if name in layer.merged:
                raise CompositionError(f"adapter {name!r} is merged into the base weights; unmerge it "
                                       f"before routing rows to it")
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is None:
                continue
            if isinstance(rows, slice):
                xs, hs = x[rows], h[rows]
            else:
                xs, hs = x.index_select(0, rows), h.index_select(0, rows)
            idx = _arange(rows, h.device) if isinstance(rows, slice) else rows
            if adapter.additive:
                out = out.index_add(0, idx, adapter.delta(xs, hs, layer.base_layer))
            else:
                out = out.index_copy(0, idx, adapter(xs, hs, layer.base_layer))
        return out


def _arange(rows: slice, device: Any) -> "torch.Tensor":
    import torch

    return torch.arange(rows.start, rows.stop, device=device)
