"""Composition blocks: how several adapters act together at every site.

Blocks are small immutable objects with a JSON form and a string form that
round-trip into one another::

    stack(lang_de, fuse(ner, pos, name="ner_pos"))
    {"block": "stack", "children": ["lang_de", {"block": "fuse", "children": ["ner", "pos"],
                                                "name": "ner_pos"}]}

A leaf is an adapter name (or ``"__base__"``, the bare base model). The
semantics and the math of each block are in docs/composition.md; the rules a
composition must follow are checked by :func:`check_supported` before any
forward pass. Blocks are plain data: this module holds them, their grammar and
their rules, imports no torch at import time, and knows nothing of layers.
What a block does at a layer is :mod:`peftkit.core.composition_exec`, which
dispatches on the block's type (:func:`~peftkit.core.composition_exec.run_node`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import re
from typing import Any, Iterator, Sequence, Union

from .errors import CompositionError
from .shorthand import MAX_NESTING, parse_value, split_top_level

#: The row marker for "no adapter" in per-example routing (PEFT's spelling).
#: As a leaf of a block it is the identity (the site's output passes unchanged).
BASE_MODEL = "__base__"
#: How deeply blocks may nest (``stack(a, fuse(b, c))`` has depth 2).
MAX_DEPTH = 5

_LEAF = re.compile(r"[A-Za-z0-9_\-]{1,128}")

Node = Union[str, "Block"]


#: Options of AdapterHub's composition blocks (and older spellings) -> what peftkit's block calls them.
FOREIGN_BLOCK_OPTIONS = {
    "batch_sizes": "sizes=[...] (rows per child)",
    "split_index": "splits=N or splits=[...] (token positions)",
    "normalize_weights": "weights=[...] (peftkit always normalizes them to sum to 1)",
}


@functools.lru_cache(maxsize=None)
def _option_names(setter: Any) -> tuple[str, ...] | None:
    """The keyword parameters of a block's option setter; None when it takes ``**options`` (and checks them)."""
    params = inspect.signature(setter).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.name != "self")


def refuse_unknown_options(kind: str, setter: Any, options: dict[str, Any]) -> None:
    """CompositionError naming the options block ``kind`` takes (the keyword parameters of its ``setter``) when
    ``options`` holds others, with peftkit's name for an AdapterHub option."""
    allowed = _option_names(setter) if options else None
    if allowed is None:
        return
    unknown = [name for name in options if name not in allowed]
    if not unknown:
        return
    takes = f"takes the option {', '.join(f'{n}=' for n in allowed)}" if allowed else "takes no options"
    fixes = [f"for {n}= write {FOREIGN_BLOCK_OPTIONS[n]}" for n in unknown if n in FOREIGN_BLOCK_OPTIONS]
    raise CompositionError(f"{kind}() {takes}, not {', '.join(f'{n}=' for n in unknown)}"
                           + (f"; {'; '.join(fixes)}" if fixes else ""))


class Block:
    """A composition of children (adapter names or blocks). Immutable, hashable."""

    kind: str = ""
    __slots__ = ("children",)

    children: tuple[Node, ...]

    def __init__(self, *children: Node | Sequence[Node], **options: Any) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise CompositionError(f"{self.kind}() needs at least one adapter")
        checked = []
        for child in children:
            if isinstance(child, str):
                child = child.strip()
                if not _LEAF.fullmatch(child):
                    raise CompositionError(f"{self.kind}(): {child!r} is not an adapter name (letters, digits, "
                                           f"'_' and '-') nor a block")
            elif not isinstance(child, Block):
                raise CompositionError(f"{self.kind}(): {child!r} is neither an adapter name nor a block")
            checked.append(child)
        object.__setattr__(self, "children", tuple(checked))
        refuse_unknown_options(self.kind, type(self)._set_options, options)
        self._set_options(**options)

    def __copy__(self) -> "Block":
        return self  # immutable: copies (copy.deepcopy of a model holding it too) share it

    def __deepcopy__(self, memo: dict) -> "Block":
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new block instead")

    def _set_options(self, **options: Any) -> None:
        if options:
            raise CompositionError(f"{self.kind}() takes no options, got {', '.join(options)}")

    def options(self) -> dict[str, Any]:
        """The block's options as plain JSON values (None = not set)."""
        return {}

    # -- identity ----------------------------------------------------------------

    def _key(self) -> tuple:
        return (self.kind, self.children, json.dumps(self.options(), sort_keys=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children]
        parts += [f"{k}={v!r}" for k, v in self.options().items() if v is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

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

    def blocks(self) -> Iterator["Block"]:
        """This block and every block nested in it, outermost first."""
        yield self
        for child in self.children:
            if isinstance(child, Block):
                yield from child.blocks()

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children if isinstance(c, Block)), default=0)


class Stack(Block):
    """Apply children in sequence, each on the previous one's output.

    ``head`` names the member whose task head (``modules_to_save`` copy, e.g. a classifier)
    predicts; without it, the last member that has one does (see :func:`head_leaf`).
    """

    kind = "stack"
    __slots__ = ("head",)

    head: str | None

    def _set_options(self, head: str | None = None, **unknown: Any) -> None:  # type: ignore[override]
        if unknown:
            raise CompositionError(f"stack() takes no options other than head=NAME, got {', '.join(unknown)}")
        if head is not None:
            if isinstance(head, int) and not isinstance(head, bool):
                head = str(head)  # head=7 in the string form: an adapter named "7"
            if not isinstance(head, str) or not _LEAF.fullmatch(head.strip()):
                raise CompositionError(f"stack() head={head!r} is not an adapter name; name the member whose "
                                       f"task head predicts, e.g. stack(lang, task, head=task)")
            head = head.strip()
            members = list(dict.fromkeys(n for n in self.leaves() if n != BASE_MODEL))
            if head not in members:
                raise CompositionError(f"stack() head={head!r} is not a member of the stack; choose one of "
                                       f"{', '.join(members) or 'its adapters'}")
        object.__setattr__(self, "head", head)

    def options(self) -> dict[str, Any]:
        return {"head": self.head}


class Average(Block):
    """Weighted average of the children's outputs; weights normalized once to sum to 1."""

    kind = "average"
    __slots__ = ("weights",)

    weights: tuple[float, ...] | None

    def _set_options(self, weights: Sequence[float] | None = None) -> None:  # type: ignore[override]
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise CompositionError(f"average() weights must be a list of numbers, got {weights!r}")
            try:
                weights = tuple(float(w) for w in weights)
            except (TypeError, ValueError):
                raise CompositionError(f"average() weights must be numbers, got {list(weights)!r}") from None
            if len(weights) != len(self.children):
                raise CompositionError(f"average() has {len(self.children)} adapters but "
                                       f"{len(weights)} weights; give one weight per adapter")
            if abs(sum(weights)) < 1e-12:
                raise CompositionError("average() weights sum to 0; they must sum to a non-zero value "
                                       "(they are divided by their sum once)")
        object.__setattr__(self, "weights", weights)

    def options(self) -> dict[str, Any]:
        return {"weights": list(self.weights) if self.weights is not None else None}

    def normalized_weights(self) -> tuple[float, ...]:
        """w_i / sum(w): the factors applied to the children's outputs (summing to 1)."""
        if self.weights is None:
            n = len(self.children)
            return tuple(1.0 / n for _ in range(n))
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)


class Fuse(Block):
    """AdapterFusion: a trained attention over the children's outputs at each site.

    The fusion's weights live on the model under ``name`` (``model.add_fusion``);
    without a name, the children's adapter names joined by ``_`` are used.
    """

    kind = "fuse"
    __slots__ = ("name",)

    name: str | None

    def _set_options(self, name: str | None = None) -> None:  # type: ignore[override]
        if name is not None and (not isinstance(name, str) or not _LEAF.fullmatch(name)):
            raise CompositionError(f"fuse() name {name!r} is invalid; use letters, digits, '_' and '-'")
        object.__setattr__(self, "name", name)

    def options(self) -> dict[str, Any]:
        return {"name": self.name}

    @property
    def fusion_name(self) -> str:
        """The name the fusion's weights are stored under."""
        return self.name or "_".join(self.leaves())

    def members(self) -> tuple[Node, ...]:
        return self.children


class BatchSplit(Block):
    """Rows of the batch go to the children in consecutive chunks of ``sizes``."""

    kind = "batch_split"
    __slots__ = ("sizes",)

    sizes: tuple[int, ...]

    def _set_options(self, sizes: Sequence[int] | None = None) -> None:  # type: ignore[override]
        if sizes is None or isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) \
                or len(sizes) != len(self.children):
            raise CompositionError(f"batch_split() needs sizes=[...] with one row count per adapter "
                                   f"({len(self.children)} adapters)")
        if any((not isinstance(s, int)) or isinstance(s, bool) or s < 0 for s in sizes):
            raise CompositionError(f"batch_split() sizes must be non-negative integers, got {list(sizes)}")
        object.__setattr__(self, "sizes", tuple(sizes))

    def options(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes)}


class Parallel(Block):
    """One input, one output per child, in one forward pass.

    The AdaptedModel replicates the batch once per child at the model input
    (B rows become N*B); at every site, rows ``i*B:(i+1)*B`` go to child
    ``i``. Outputs come back with N*B rows, child-major; split them with
    :func:`split_parallel` or ``model.split_parallel(output)``.
    """

    kind = "parallel"
    __slots__ = ()


class Split(Block):
    """Tokens go to the children in consecutive spans of the sequence (AdapterHub's ``Split``).

    ``splits`` gives each child's number of tokens, in order, and must add up to the sequence
    length of every forward (``split(a, b, splits=[4, 6])``: tokens 0-3 run ``a``, 4-9 run ``b``);
    one integer gives every child that many tokens. At each site the children run on their span
    of the site's input and output only, so only methods whose output at a token depends on that
    token alone take part (``Method.supported_blocks`` lists ``split``).
    """

    kind = "split"
    __slots__ = ("splits",)

    splits: tuple[int, ...]

    def _set_options(self, splits: Sequence[int] | int | None = None) -> None:  # type: ignore[override]
        n = len(self.children)
        if isinstance(splits, int) and not isinstance(splits, bool):
            splits = [splits] * n  # AdapterHub's shorthand: every child gets that many tokens
        if splits is None or isinstance(splits, (str, bytes)) or not isinstance(splits, Sequence) \
                or len(splits) != n:
            raise CompositionError(f"split() needs splits=[...] with one token count per adapter ({n} adapters, "
                                   f"adding up to the sequence length), e.g. split(a, b, splits=[4, 6]), got "
                                   f"{splits!r}")
        if any((not isinstance(s, int)) or isinstance(s, bool) or s < 0 for s in splits):
            raise CompositionError(f"split() splits must be non-negative integers, got {list(splits)}")
        if sum(splits) == 0:
            raise CompositionError("split() splits add up to 0 tokens; give each adapter its number of tokens")
        object.__setattr__(self, "splits", tuple(splits))

    def options(self) -> dict[str, Any]:
        return {"splits": list(self.splits)}

    def spans(self) -> list[tuple[int, int]]:
        """Each child's ``(start, stop)`` token positions."""
        out, start = [], 0
        for length in self.splits:
            out.append((start, start + length))
            start += length
        return out


BLOCK_TYPES: dict[str, type[Block]] = {cls.kind: cls for cls in (Stack, Average, Fuse, BatchSplit, Parallel,
                                                                   Split)}


# -- parsing --------------------------------------------------------------------

_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)
_OPTION = re.compile(r"^([a-z_]+)\s*=(.*)$", re.S)


def parse(text: str) -> Node:
    """Parse the string form (``stack(a, fuse(b, c))``) into blocks; a bare name stays a str."""
    if not isinstance(text, str):
        raise CompositionError(f"a composition string is expected, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise CompositionError("empty composition; name at least one adapter")
    if text.count("(") != text.count(")"):
        raise CompositionError(f"unbalanced parentheses in composition {text!r}")
    match = _CALL.match(text)
    if not match:
        names = [part.strip() for part in text.split(",")]
        if "(" not in text and len(names) > 1 and all(_LEAF.fullmatch(n) for n in names):
            # AdapterHub's "a,b" (a fusion's name, or a stack in its older parse_composition)
            raise CompositionError(f"cannot parse composition {text!r}: names joined by commas are AdapterHub's "
                                   f"spelling; write a block: fuse({', '.join(names)}) for a fusion (named "
                                   f"{'_'.join(names)}) or stack({', '.join(names)})")
        if not _LEAF.fullmatch(text):
            raise CompositionError(f"cannot parse composition {text!r}: it is not an adapter name (letters, "
                                   f"digits, '_' and '-') nor a block such as stack(a, b), "
                                   f"fuse(a, b, name=\"ab\") or average(a, b, weights=[0.5, 0.5]); "
                                   f"blocks: {', '.join(BLOCK_TYPES)}")
        return text
    kind, body = match.group(1), match.group(2)
    cls = BLOCK_TYPES.get(kind)
    if cls is None:
        raise CompositionError(f"unknown composition block {kind!r}; known blocks: {', '.join(BLOCK_TYPES)}")
    children: list[Node] = []
    options: dict[str, Any] = {}
    try:
        parts = split_top_level(body, ",")
    except Exception as exc:
        raise CompositionError(f"cannot parse composition {text!r}: {exc}") from None
    for part in parts:
        part = part.strip()
        key_match = _OPTION.match(part)
        if key_match:
            if key_match.group(1) in options:
                raise CompositionError(f"{kind}(): option {key_match.group(1)!r} is given twice")
            try:
                options[key_match.group(1)] = parse_value(key_match.group(2).strip(), text)
            except Exception as exc:
                raise CompositionError(f"{kind}(): {exc}") from None
        else:
            if options:
                raise CompositionError(f"{kind}(): adapter {part!r} comes after an option; list the adapters "
                                       f"first, then key=value options")
            children.append(parse(part))
    try:
        return cls(*children, **options)
    except TypeError as exc:
        raise CompositionError(f"{kind}(): {exc}") from None


def from_json(data: Any, _depth: int = 0) -> Node:
    """The inverse of :func:`to_json`."""
    if _depth > MAX_NESTING:  # refused before Python's recursion limit is reached
        raise CompositionError(f"the composition nests blocks more than {MAX_NESTING} deep; at most {MAX_DEPTH} "
                               f"are allowed")
    if isinstance(data, str):
        name = data.strip()
        if not _LEAF.fullmatch(name):
            raise CompositionError(f"{data!r} is not an adapter name")
        return name
    if not isinstance(data, dict) or "block" not in data:
        raise CompositionError(f"a composition in JSON is an adapter name or an object with 'block' "
                               f"and 'children', got {data!r}")
    cls = BLOCK_TYPES.get(data["block"]) if isinstance(data["block"], str) else None  # a list is unhashable
    if cls is None:
        raise CompositionError(f"unknown composition block {data['block']!r}; known: {', '.join(BLOCK_TYPES)}")
    children = data.get("children")
    if not isinstance(children, list):
        raise CompositionError(f"{data['block']}: 'children' must be a list, got {children!r}")
    options = {k: v for k, v in data.items() if k not in ("block", "children")}
    try:
        return cls(*[from_json(c, _depth + 1) for c in children], **options)
    except TypeError as exc:
        raise CompositionError(f"{data['block']}(): {exc}") from None


def to_json(node: Node) -> Any:
    return node.to_json() if isinstance(node, Block) else node


def adapters_on_model(unknown: str, names: Sequence[str]) -> str:
    """The end of a message refusing the adapter name ``unknown``: the model's adapters ``names``
    (and ``__base__``), with the closest of them when one is close (``llama_b``: ``llama-b``)."""
    close = difflib.get_close_matches(unknown, [*names, BASE_MODEL], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"adapters: {', '.join(sorted(names)) or 'none'} (and {BASE_MODEL!r} for the base model){hint}"


def as_node(value: Node | Sequence[Any]) -> Node:
    """Accept a name, a block, a string form, JSON, or a list of those (= Stack)."""
    if isinstance(value, Block):
        return value
    if isinstance(value, str):
        return parse(value)
    if isinstance(value, dict):
        return from_json(value)
    if not isinstance(value, (list, tuple)):
        raise CompositionError(f"cannot read {value!r} as a composition; give an adapter name, a block, "
                               f"or a string such as 'stack(a, b)'")
    names = list(value)
    if not names:
        raise CompositionError("an empty list is no composition; name at least one adapter")
    if len(names) == 1:
        return as_node(names[0])
    return Stack(*[as_node(n) for n in names])


def leaves(node: Node) -> list[str]:
    return [node] if isinstance(node, str) else list(node.leaves())


def adapter_leaves(node: Node) -> list[str]:
    """The adapter names in ``node``, first appearance first, without ``__base__``."""
    return [n for n in dict.fromkeys(leaves(node)) if n != BASE_MODEL]


def fuse_blocks(node: Node | None) -> list[Fuse]:
    if not isinstance(node, Block):
        return []
    return [b for b in node.blocks() if isinstance(b, Fuse)]


def trained_leaves(node: Node | None) -> list[str]:
    """Adapters that train_adapter() makes trainable: every one not inside a fuse()."""

    def walk(n: Node) -> Iterator[str]:
        if isinstance(n, str):
            if n != BASE_MODEL:
                yield n
        elif not isinstance(n, Fuse):
            for child in n.children:
                yield from walk(child)

    return list(dict.fromkeys(walk(node))) if node is not None else []


def head_leaf(node: Node | None, has_head: Any) -> str | None:
    """The adapter whose task head (``modules_to_save`` copy) ``node`` runs, or None for the model's own.

    A stack with ``head=NAME`` uses NAME's head (the model's own where NAME keeps no copy of
    this module). Without it, a stack's head is that of its last part that has one (AdapterHub
    uses the last adapter's head too: ``stack(lang, task)`` predicts with ``task``'s); an
    average, a fuse and a row split (when it runs unsplit) use their first member's that has
    one. ``has_head(name)`` says whether an adapter keeps its own head.
    """
    if node is None:
        return None
    if isinstance(node, str):
        return node if node != BASE_MODEL and has_head(node) else None
    if isinstance(node, Stack) and node.head is not None:
        return node.head if has_head(node.head) else None
    children = reversed(node.children) if isinstance(node, Stack) else node.children
    for child in children:
        found = head_leaf(child, has_head)
        if found is not None:
            return found
    return None


# -- rules, checked before any forward ------------------------------------------------


def check_stack_heads(node: Node, has_head: Any) -> None:
    """Refuse a ``stack(..., head=NAME)`` whose NAME keeps no task head (``has_head(NAME)`` false)."""
    if not isinstance(node, Block):
        return
    for block in node.blocks():
        if isinstance(block, Stack) and block.head is not None and not has_head(block.head):
            raise CompositionError(
                f"{block}: adapter {block.head!r} keeps no task head (its modules_to_save is empty), so it "
                f"cannot be the stack's head; name a member trained with a head (modules_to_save, e.g. a "
                f"classifier), or leave head= out to keep the base model's head")

#: For each block, the kinds of blocks it may hold (names are always allowed).
ALLOWED_CHILDREN: dict[str, frozenset[str]] = {
    "stack": frozenset({"stack", "average", "fuse", "batch_split", "split"}),
    "average": frozenset({"stack", "average", "fuse", "split"}),
    "fuse": frozenset({"stack"}),
    "batch_split": frozenset({"stack", "average", "fuse", "batch_split", "split"}),
    "parallel": frozenset({"stack", "average", "fuse", "batch_split"}),
    "split": frozenset({"stack", "average", "batch_split", "split"}),  # AdapterHub's nesting rules for Split
}


def _what_works(method: Any) -> str:
    blocks = sorted(method.supported_blocks)
    if not blocks:
        return f"{method.name} supports no block: activate it alone"
    return f"{method.name} supports: {', '.join(blocks)}"


def check_supported(node: Node, method_of: dict[str, Any]) -> None:
    """Fail before any forward when a composition is malformed or unsupported.

    ``method_of`` maps adapter names to their Method objects. Checked: every
    name is on the model; nesting depth; which block may hold which (parallel
    only at the top, fuse children are names or stacks, ...); and that each
    adapter's method supports every block it sits in.
    """
    if isinstance(node, str):
        if node != BASE_MODEL and node not in method_of:
            raise CompositionError(f"composition names adapter {node!r}, which is not on the model; "
                                   f"{adapters_on_model(node, method_of)}")
        return
    if node.depth() > MAX_DEPTH:
        raise CompositionError(f"composition {node} nests {node.depth()} blocks deep; at most {MAX_DEPTH} "
                               f"are allowed: flatten it (e.g. stack(a, stack(b, c)) is stack(a, b, c))")
    for name in node.leaves():
        if name != BASE_MODEL and name not in method_of:
            raise CompositionError(f"composition names adapter {name!r}, which is not on the model; "
                                   f"{adapters_on_model(name, method_of)}")
    _check_block(node, method_of, ancestors=())


def _check_block(block: Block, method_of: dict[str, Any], ancestors: tuple[Block, ...]) -> None:
    path = ancestors + (block,)
    allowed = ALLOWED_CHILDREN.get(block.kind)
    if block.kind == "parallel" and ancestors:
        raise CompositionError(f"parallel() must be the outermost block (it replicates the whole batch), but "
                               f"it sits in {ancestors[-1].kind}(); write e.g. parallel(stack(x, a), stack(x, b)) "
                               f"instead of stack(x, parallel(a, b))")
    if isinstance(block, Fuse):
        seen = [c for c in block.children if isinstance(c, str)]
        if len(set(seen)) != len(seen):
            raise CompositionError(f"{block}: an adapter appears twice among the fused members")
        if BASE_MODEL in seen:
            raise CompositionError(f"{block}: {BASE_MODEL!r} cannot be fused (it has no output of its own)")
        for child in block.children:
            if isinstance(child, Block) and any(isinstance(g, Block) for g in child.children):
                raise CompositionError(f"{block}: a fused stack may hold adapter names only, not {child}")
    for child in block.children:
        if isinstance(child, Block):
            if isinstance(child, Parallel):
                _check_block(child, method_of, path)  # explains that parallel() goes outermost
            if allowed is not None and child.kind not in allowed:
                ok = ", ".join(sorted(allowed)) or "adapter names only"
                raise CompositionError(f"{block.kind}() cannot hold {child.kind}() (in {path[0]}); "
                                       f"{block.kind}() may hold adapter names and: {ok}")
            _check_block(child, method_of, path)
        elif child != BASE_MODEL:
            method = method_of[child]
            for outer in path:
                if outer.kind not in method.supported_blocks:
                    why = (" (split() runs each adapter on its span of tokens only, so it takes methods whose "
                           "output at a token depends on that token alone: e.g. LoRA, IA3, bottleneck adapters; "
                           "not prefix or prompt tuning, which add tokens every position attends to)"
                           if outer.kind == "split" else "")
                    raise CompositionError(
                        f"adapter {child!r} (method {method.name!r}) cannot take part in {outer.kind}() "
                        f"(in {path[0]}){why}; {_what_works(method)}")


# -- outputs of a parallel() forward ---------------------------------------------------


def split_parallel(output: Any, n: int) -> list[Any]:
    """Split an output of a ``parallel()`` forward (N*B rows, child-major) into N outputs.

    Works on tensors, tuples/lists and mappings (transformers ModelOutputs):
    tensors whose first dimension is a multiple of ``n`` are chunked; other
    values (a scalar loss, a cache) are passed to every part unchanged.
    """
    import torch

    if n < 1:
        raise CompositionError(f"split_parallel(): n must be positive, got {n}")
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] % n:
            raise CompositionError(f"split_parallel(): a tensor of shape {tuple(output.shape)} does not hold "
                                   f"{n} equal groups of rows")
        return list(output.chunk(n, dim=0))
    if isinstance(output, dict):
        parts: list[dict[str, Any]] = [{} for _ in range(n)]
        for key, value in output.items():
            for part, piece in zip(parts, _split_value(value, n)):
                part[key] = piece
        cls = type(output)
        try:
            return [cls(**p) for p in parts]
        except TypeError:
            return parts
    if isinstance(output, (tuple, list)):
        columns = [_split_value(v, n) for v in output]
        return [type(output)(col[i] for col in columns) if isinstance(output, list)
                else tuple(col[i] for col in columns) for i in range(n)]
    raise CompositionError(f"split_parallel(): cannot split a {type(output).__name__}")


def _split_value(value: Any, n: int) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] % n == 0:
        return list(value.chunk(n, dim=0))
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        columns = [_split_value(v, n) for v in value]
        return [tuple(col[i] for col in columns) for i in range(n)]
    return [value] * n
