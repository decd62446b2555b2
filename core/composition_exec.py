"""Running composition blocks at one site (the torch side of peftkit.core.composition).

The blocks are plain data; :func:`run_node` dispatches on the block's type
(:data:`RUNNERS`) to the function that runs it here. A TunerLayer reaches this
module through the :class:`~peftkit.core.state.AdapterState` it is handed, so
imports go one way only: this module and the layers import the blocks, the
state imports this module, and neither this module nor the layers import the
other or the state.

Two speed paths matter here, both for adapters whose change at a site is an
exact low-rank product, ``delta(x) = scale * (x A^T) B^T`` (LoRA without
DoRA or active dropout; a LayerAdapter says so through ``low_rank(forward=True)``):

- ``stack`` and ``average`` of such adapters are one low-rank product with
  the factors concatenated (``[A_1; ...; A_k]`` and ``[w_1 s_1 B_1, ...]``):
  two matmuls and one pass over the output instead of 2k and k.
- Row splits (per-example routing, ``batch_split``, ``parallel``) gather each
  row's factors instead of each adapter's rows: ``x`` is never copied. With
  the factors of the S adapters stacked (plus a zero slot for rows that no
  adapter touches), every row picks its slot with one ``index_select`` of
  small tensors, and two batched matmuls (``bmm``, then ``baddbmm`` into the
  output, in place when no gradient is recorded) do all rows at once, in any
  row order. Two BLAS calls per site, whatever the number of adapters: this
  was also faster than per-adapter products on views of contiguous rows
  (and far steadier on a loaded machine, where every extra BLAS call waits
  for its threads).

Everything else falls back to the general path: each group of rows is taken
(a slice, or an index_select), run through its node, and the pieces are put
back in order with one concatenation (and one index_select if rows were
interleaved). Gradients flow to each adapter only from its own rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from .composition import BASE_MODEL, Average, BatchSplit, Block, Fuse, Node, Parallel, Split, Stack, head_leaf
from .errors import CompositionError
from .learned_average import run_weights

if TYPE_CHECKING:  # pragma: no cover
    from .layer import TunerLayer

Factors = tuple[torch.Tensor, torch.Tensor, float]


# -- dispatch -------------------------------------------------------------------------------


def run_node(node: Node, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The output of ``node`` at one site, given the site input ``x`` and current output ``h``.

    An adapter whose site reads another module's input (``Site.input_from``) gets that
    input instead of ``x`` (``TunerLayer.input_of``); row splits select its rows too.
    """
    if isinstance(node, str):
        if node == BASE_MODEL or node in layer.merged:
            return h  # the identity / already folded into the base weights
        adapter = layer.adapters[node] if node in layer.adapters else None
        if adapter is None:
            return h  # this adapter does not touch this site
        return adapter(layer.input_of(node, x) if layer.input_sources else x, h, layer.base_layer)
    runner = RUNNERS.get(type(node))
    if runner is None:
        raise CompositionError(f"block {node.kind!r} cannot run at a layer")
    return runner(node, layer, x, h)


# -- helpers --------------------------------------------------------------------------------


def factors(layer: "TunerLayer", name: str) -> Factors | None:
    """``(A (r, in), B (out, r), scale)`` when adapter ``name``'s delta here is exactly that product now
    of the site's own input ``x``: an adapter reading another module's input takes the general path."""
    if layer.input_sources and name in layer.input_sources:
        return None
    get = getattr(layer.adapters[name], "low_rank", None)
    return get(forward=True) if get is not None else None


def node_acts(node: Node, layer: "TunerLayer") -> bool:
    """Whether any adapter of ``node`` has a module at this site."""
    if isinstance(node, str):
        return node != BASE_MODEL and node in layer.adapters
    return any(n != BASE_MODEL and n in layer.adapters for n in node.leaves())


def refuse_merged(node: Node, layer: "TunerLayer", where: str) -> None:
    if not layer.merged:
        return
    names = [node] if isinstance(node, str) else list(node.leaves())
    merged = [n for n in names if n in layer.merged]
    if merged:
        raise CompositionError(f"adapter {merged[0]!r} is merged into the base weights, so its output cannot be "
                               f"taken apart from the base in {where}; unmerge_adapter() first")


def node_delta(node: Node, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
    """What ``node`` adds to ``h`` at this site (None when it does not act here)."""
    if not node_acts(node, layer):
        return None
    if isinstance(node, str):
        adapter = layer.adapters[node]
        if layer.input_sources:
            x = layer.input_of(node, x)
        if adapter.additive:
            return adapter.delta(x, h, layer.base_layer)
        return adapter(x, h, layer.base_layer) - h
    return run_node(node, layer, x, h) - h


#: Where a layer keeps the products of its adapters' factors (in its ``__dict__``: not a submodule).
CACHE_KEY = "_peftkit_cache"


def _cache(layer: "TunerLayer") -> dict[Any, Any]:
    cache = layer.__dict__.get(CACHE_KEY)
    if cache is None:
        cache = {}
        layer.__dict__[CACHE_KEY] = cache
    return cache


def forget_products(layer: "TunerLayer") -> None:
    """Drop the products of factors kept for ``layer`` (after its adapter modules were replaced:
    a kept product is keyed by the factors' identity and version, not by the module)."""
    layer.__dict__.pop(CACHE_KEY, None)


def _key(items: Sequence[tuple[str, Factors, float]]) -> tuple:
    return tuple((name, id(a), a._version, id(b), b._version, s, w) for name, (a, b, s), w in items)


def _cached(layer: "TunerLayer", tag: str, key: tuple, build: Any) -> Any:
    """``build()``, memoized per layer while no gradient is recorded (one entry per tag). Not under
    torch.compile: there the products are part of the graph, and checking the key would break it."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return build()
    cache = _cache(layer)
    hit = cache.get(tag)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    cache[tag] = (key, value)
    return value


# -- stack and average --------------------------------------------------------------------------


def _low_rank_terms(children: Sequence[Node], weights: Sequence[float], layer: "TunerLayer",
                    skip_merged: bool) -> list[tuple[str, Factors, float]] | None:
    """The children as low-rank terms, or None when one of them is not a plain low-rank leaf here."""
    terms = []
    for child, weight in zip(children, weights):
        if not isinstance(child, str):
            return None
        if child == BASE_MODEL or child not in layer.adapters:
            continue
        if child in layer.merged:
            if skip_merged:
                continue
            return None
        fac = factors(layer, child)
        if fac is None:
            return None
        terms.append((child, fac, weight))
    return terms


def low_rank_sum(layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor,
                 terms: list[tuple[str, Factors, float]]) -> torch.Tensor:
    """h + sum_i w_i s_i (x A_i^T) B_i^T with one concatenated pair of matmuls."""
    if not terms:
        return h
    if len(terms) == 1 and terms[0][2] == 1.0:
        return layer.adapters[terms[0][0]](x, h, layer.base_layer)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        a_cat = torch.cat([a for _, (a, _, _), _ in terms], dim=0)
        b_cat = torch.cat([b * (s * w) for _, (_, b, s), w in terms], dim=1)
        return a_cat, b_cat

    a_cat, b_cat = _cached(layer, "sum", _key(terms), build)
    xf = x.reshape(-1, x.shape[-1])
    xf = xf if xf.dtype == a_cat.dtype else xf.to(a_cat.dtype)
    hf = h.reshape(-1, h.shape[-1])
    if hf.dtype == a_cat.dtype:
        return torch.addmm(hf, F.linear(xf, a_cat), b_cat.t()).view(h.shape)
    return h + F.linear(F.linear(xf, a_cat), b_cat).to(h.dtype).view(h.shape)


def run_stack(block: Stack, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    terms = _low_rank_terms(block.children, [1.0] * len(block.children), layer, skip_merged=True)
    if terms is not None:  # low-rank deltas depend on x only: the stack is their sum
        return low_rank_sum(layer, x, h, terms)
    for child in block.children:
        h = run_node(child, layer, x, h)
    return h


def run_average(block: Average, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    refuse_merged(block, layer, "average()")
    learning = layer.adapter_state.learned_averages
    # Looked up only while model.learn_average is open: hashing a block (its options as JSON) breaks a
    # torch.compile graph.
    learned = learning.get(block) if learning else None
    # Weights being learned (model.learn_average): a tensor while gradients are recorded, else numbers.
    weights = block.normalized_weights() if learned is None else run_weights(learned)
    terms = _low_rank_terms(block.children, weights, layer, skip_merged=False)
    if terms is not None:
        if len(terms) == 1 and terms[0][2] != 1.0:
            name, _, w = terms[0]
            return h + layer.adapters[name].delta(x, h, layer.base_layer) * w
        return low_rank_sum(layer, x, h, terms)
    out = h
    for child, w in zip(block.children, weights):
        delta = node_delta(child, layer, x, h)
        if delta is not None:
            out = out + delta * w
    return out


# -- fuse ---------------------------------------------------------------------------------------


def run_fuse(node: Fuse, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """AdapterFusion at one site: the site's fusion layer (``layer.fusions``, made by
    :func:`peftkit.core.fusion.add_fusion`) attends over the members' contributions."""
    name = node.fusion_name
    fusion = layer.fusions[name] if name in layer.fusions else None
    if fusion is None:
        if node_acts(node, layer):
            raise CompositionError(f"fusion {name!r} has no weights at a site where its members act; "
                                   f"add it with model.add_fusion({node}) or load it with model.load_fusion()")
        return h
    refuse_merged(node, layer, "fuse()")
    contributions = []
    for index in fusion.member_index:
        delta = node_delta(node.children[index], layer, x, h)
        contributions.append(delta if delta is not None else torch.zeros_like(h))
    out, probs = fusion(h, contributions, _query_input(node, layer, x, h, fusion.config.query_from))
    capture = layer.adapter_state.capture
    if capture is not None:
        capture.record(name, fusion.site, [str(node.children[i]) for i in fusion.member_index], probs.detach())
    return out


def _query_input(node: Fuse, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor, source: str
                 ) -> torch.Tensor | None:
    """What the fusion's query reads: None for h, else what its last member's branch reads here (a member
    absent at this site reads nothing: then h)."""
    if source == "output":
        return None
    last = str(node.children[-1])
    if last not in layer.adapters:
        return None
    return layer.adapters[last].fusion_query(layer.input_of(last, x) if layer.input_sources else x, h,
                                             layer.base_layer)


# -- row splits ---------------------------------------------------------------------------------


class RowPlan:
    """Which node each row of the batch runs: ``nodes`` are the distinct nodes,
    ``row_slot[i]`` the index of row i's node (-1 for the bare base)."""

    def __init__(self, nodes: list[Node], row_slot: list[int]) -> None:
        self.nodes = nodes
        self.row_slot = row_slot
        self.rows = len(row_slot)
        self.all_leaves = all(isinstance(n, str) for n in nodes)
        self._expanded: dict[int, RowPlan] = {}
        self._on: dict[Any, _DevicePlan] = {}

    @classmethod
    def from_entries(cls, entries: Sequence[Node]) -> "RowPlan":
        nodes: list[Node] = []
        index: dict[Node, int] = {}
        slots = []
        for entry in entries:
            if entry == BASE_MODEL:
                slots.append(-1)
                continue
            if entry not in index:
                index[entry] = len(nodes)
                nodes.append(entry)
            slots.append(index[entry])
        return cls(nodes, slots)

    @classmethod
    def from_sizes(cls, children: Sequence[Node], sizes: Sequence[int]) -> "RowPlan":
        entries: list[Node] = []
        for child, size in zip(children, sizes):
            entries.extend([child] * size)
        return cls.from_entries(entries)

    def for_rows(self, rows: int) -> "RowPlan":
        """This plan for a batch of ``rows`` rows: the same, or each row repeated
        ``rows / self.rows`` times in place (as generate() expands beams and samples)."""
        if rows == self.rows:
            return self
        if self.rows and rows % self.rows == 0:
            plan = self._expanded.get(rows)
            if plan is None:
                k = rows // self.rows
                plan = RowPlan(self.nodes, [s for s in self.row_slot for _ in range(k)])
                self._expanded[rows] = plan
            return plan
        raise CompositionError(f"a layer's output has {rows} rows but the composition routes {self.rows} rows; "
                               f"give one adapter per row of the batch (or sizes adding up to the batch size)")

    def on(self, device: torch.device) -> "_DevicePlan":
        plan = self._on.get(device)
        if plan is None:
            plan = _DevicePlan(self, device)
            self._on[device] = plan
        return plan


class _DevicePlan:
    """A RowPlan's index tensors on one device."""

    def __init__(self, plan: RowPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        base_slot = len(plan.nodes)
        self.row_slot = torch.tensor([s if s >= 0 else base_slot for s in plan.row_slot], dtype=torch.long,
                                     device=device)
        order: dict[int, list[int]] = {}
        for row, slot in enumerate(plan.row_slot):
            order.setdefault(slot, []).append(row)
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        flat: list[int] = []
        for slot, rows in order.items():
            flat.extend(rows)
            if rows == list(range(rows[0], rows[-1] + 1)):
                self.groups.append((slot, slice(rows[0], rows[-1] + 1)))
            else:
                self.groups.append((slot, torch.tensor(rows, dtype=torch.long, device=device)))
        self.in_order = flat == list(range(plan.rows))
        self.inverse = None if self.in_order else \
            torch.argsort(torch.tensor(flat, dtype=torch.long, device=device))
        self._slot_maps: dict[tuple[str, ...], torch.Tensor] = {}

    def stacked_index(self, present: tuple[str, ...]) -> torch.Tensor:
        """Per row: the index of its adapter in ``present``, or len(present) (the zero slot)."""
        index = self._slot_maps.get(present)
        if index is None:
            where = {name: i for i, name in enumerate(present)}
            zero = len(present)
            mapping = [where.get(node, zero) if isinstance(node, str) else zero for node in self.plan.nodes]
            mapping.append(zero)  # the base slot
            index = torch.tensor(mapping, dtype=torch.long, device=self.device).index_select(0, self.row_slot)
            self._slot_maps[present] = index
        return index


def _take(t: torch.Tensor, sel: slice | torch.Tensor) -> torch.Tensor:
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def run_rows(plan: RowPlan, layer: "TunerLayer", x: Any, h: torch.Tensor) -> torch.Tensor:
    """Run each row's node on its rows; rows with no adapter keep ``h``."""
    if layer.merged:
        raise CompositionError(f"adapters {', '.join(layer.merged)} are merged into the base weights, which "
                               f"changes every row of the batch; unmerge_adapter() before splitting a batch "
                               f"among adapters (adapter_names=, batch_split, parallel)")
    rows = h.shape[0]
    if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != rows):
        raise CompositionError(f"a layer's input has leading dimension {tuple(x.shape)[:1]} but its output has "
                               f"{rows} rows; rows can only be routed at layers that keep the batch dimension first")
    dev = plan.on(h.device)
    if plan.all_leaves:
        present = tuple(n for n in plan.nodes if n in layer.adapters)  # type: ignore[operator]
        if not present:
            return h
        facs = {name: factors(layer, name) for name in present}
        if all(f is not None for f in facs.values()) and isinstance(x, torch.Tensor) \
                and x.is_floating_point() and x.dim() >= 2:
            return _rows_batched(dev, layer, x, h, present, facs)  # type: ignore[arg-type]
    if len(dev.groups) == 1 and dev.groups[0][0] >= 0:
        return run_node(plan.nodes[dev.groups[0][0]], layer, x, h)
    full = _captured_rows(layer, rows) if layer.input_sources else None
    pieces = []
    try:
        for slot, sel in dev.groups:
            hs = _take(h, sel)
            if slot < 0:
                pieces.append(hs)
                continue
            xs = _take(x, sel) if isinstance(x, torch.Tensor) else x
            if full:  # the same rows of every captured input (in the hooks' own dict)
                layer.captured.update({k: _take(v, sel) if isinstance(v, torch.Tensor) else v
                                       for k, v in full.items()})
            pieces.append(run_node(plan.nodes[slot], layer, xs, hs))
    finally:
        if full:
            layer.captured.update(full)
    out = torch.cat(pieces)
    return out if dev.in_order else out.index_select(0, dev.inverse)


def _captured_rows(layer: "TunerLayer", rows: int) -> dict[str, Any]:
    """The layer's captured inputs (read by adapters here instead of ``x``), checked to have
    the output's rows first, so that a row split can hand each group its rows of them."""
    full = dict(layer.captured)
    for source, value in full.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
            raise CompositionError(f"the input of {source!r}, which an adapter reads, has leading dimension "
                                   f"{tuple(value.shape)[:1]} but the layer's output has {rows} rows; rows can "
                                   f"only be routed where inputs keep the batch dimension first")
    return full


def _rows_batched(dev: _DevicePlan, layer: "TunerLayer", x: torch.Tensor, h: torch.Tensor,
                  present: tuple[str, ...], facs: dict[str, Factors]) -> torch.Tensor:
    """Any row order: every row gathers its own (small) factors; two batched matmuls do all rows."""
    items = [(name, facs[name], 1.0) for name in present]

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        rank = max(a.shape[0] for _, (a, _, _), _ in items)
        a_list, b_list = [], []
        for _, (a, b, s), _ in items:
            pad = rank - a.shape[0]
            a_list.append((F.pad(a, (0, 0, 0, pad)) if pad else a).t())
            bt = (b * s).t()
            b_list.append(F.pad(bt, (0, 0, 0, pad)) if pad else bt)
        a0, b0 = a_list[0], b_list[0]
        a_list.append(a0.new_zeros(a0.shape))
        b_list.append(b0.new_zeros(b0.shape))
        return torch.stack(a_list), torch.stack(b_list)  # (S+1, in, r), (S+1, r, out)

    a_all, b_all = _cached(layer, "rows", _key(items), build)
    index = dev.stacked_index(present)
    rows = h.shape[0]
    x3 = x.reshape(rows, -1, x.shape[-1])
    x3 = x3 if x3.dtype == a_all.dtype else x3.to(a_all.dtype)
    xa = torch.bmm(x3, a_all.index_select(0, index))
    b_rows = b_all.index_select(0, index)
    h3 = h.reshape(rows, -1, h.shape[-1])
    if h3.dtype != xa.dtype:
        return h + torch.bmm(xa, b_rows).to(h.dtype).view(h.shape)
    if not torch.is_grad_enabled() and h.is_contiguous():
        h3.baddbmm_(xa, b_rows)
        return h
    return torch.baddbmm(h3, xa, b_rows).view(h.shape)


def run_split(block: BatchSplit | Parallel, layer: "TunerLayer", x: Any, h: torch.Tensor) -> torch.Tensor:
    """A batch_split() or parallel() block: each group of rows runs its child (the plan is the
    model's, :meth:`~peftkit.core.state.AdapterState.plan_for`)."""
    return run_rows(layer.adapter_state.plan_for(block, h.shape[0]), layer, x, h)


# -- spans of tokens ---------------------------------------------------------------------------


def run_token_split(block: Split, layer: "TunerLayer", x: Any, h: torch.Tensor) -> torch.Tensor:
    """A split() block: each child runs on its span of the sequence (dimension 1 of the site's
    input and output, and of any input an adapter reads instead); spans whose child does not act
    here keep ``h``. As in AdapterHub, every forward must hold exactly ``sum(splits)`` tokens."""
    if not node_acts(block, layer):
        return h
    refuse_merged(block, layer, "split()")
    total = sum(block.splits)
    if isinstance(layer.base_layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        raise CompositionError(f"{block}: a convolution's output has channels, not tokens, on dimension 1, so it "
                               f"cannot be cut into spans of tokens; leave convolution layers out of the adapters "
                               f"in the split (target_modules) to use split()")
    if h.dim() < 3:
        raise CompositionError(
            f"{block}: a layer's output has shape {tuple(h.shape)}, which holds no tokens (a pooler or a "
            f"classifier, fed by one token or the pooled sequence), so it cannot be cut into spans; leave that "
            f"module out of the adapters in the split (target_modules) to use split()")
    full = dict(layer.captured) if layer.input_sources else {}
    for what, value in (("output", h), ("input", x), *((f"input of {k!r}", v) for k, v in full.items())):
        if isinstance(value, torch.Tensor) and (value.dim() < 2 or value.shape[1] != total):
            raise CompositionError(
                f"{block} cuts sequences of {total} tokens, but a layer's {what} has shape {tuple(value.shape)} "
                f"(tokens on dimension 1); give inputs of exactly {total} tokens (pad or truncate them), as "
                f"AdapterHub's Split requires. Generating token by token with a cache cannot use split()")
    pieces = []
    try:
        for child, (start, stop) in zip(block.children, block.spans()):
            hs = h[:, start:stop]
            if stop == start or not node_acts(child, layer):
                pieces.append(hs)
                continue
            if full:  # the same span of every captured input (in the hooks' own dict)
                layer.captured.update({k: v[:, start:stop] if isinstance(v, torch.Tensor) else v
                                       for k, v in full.items()})
            xs = x[:, start:stop] if isinstance(x, torch.Tensor) else x
            pieces.append(run_node(child, layer, xs, hs))
    finally:
        if full:
            layer.captured.update(full)
    return torch.cat(pieces, dim=1)


class Routing:
    """Per-example adapter routing for one forward: each row's adapter name
    (or ``"__base__"``, or a composition that the row runs)."""

    def __init__(self, entries: Sequence[Node], device: Any = None) -> None:
        self.names = list(entries)
        self.plan = RowPlan.from_entries(self.names)

    @classmethod
    def build(cls, entries: Sequence[Node], device: Any = None) -> "Routing":
        return cls(entries, device)

    def run(self, layer: "TunerLayer", x: Any, h: torch.Tensor) -> torch.Tensor:
        return run_rows(self.plan.for_rows(h.shape[0]), layer, x, h)

    def __repr__(self) -> str:
        return f"Routing({self.names!r})"


# -- modules_to_save copies under a row split -------------------------------------------------------


def run_copies(plan: RowPlan, module: Any, active_names: Sequence[str], args: tuple, kwargs: dict) -> Any:
    """Run a ModulesToSave wrapper with each group of rows on its own adapter's copy."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if first is None:
        return None
    rows = first.shape[0]
    try:
        plan = plan.for_rows(rows)
    except CompositionError:
        return None  # not batch-first here: fall back to the plain choice
    dev = plan.on(first.device)

    def choose(slot: int) -> Any:
        if slot < 0:
            return module.original_module
        owner = head_leaf(plan.nodes[slot], module.copies.__contains__)
        if owner is None:
            owner = next((name for name in active_names if name in module.copies), None)
        return module.copies[owner] if owner is not None else module.original_module

    chosen = [(choose(slot), sel) for slot, sel in dev.groups]
    if len({id(m) for m, _ in chosen}) == 1:
        return chosen[0][0](*args, **kwargs)
    pieces = []
    for sub, sel in chosen:
        sub_args = tuple(_take(a, sel) if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == rows
                         else a for a in args)
        sub_kwargs = {k: _take(v, sel) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows
                      else v for k, v in kwargs.items()}
        out = sub(*sub_args, **sub_kwargs)
        if not isinstance(out, torch.Tensor):
            raise CompositionError(f"{type(sub).__name__} returns {type(out).__name__}; only modules that "
                                   f"return one tensor can be saved per adapter and split by rows")
        pieces.append(out)
    if len({tuple(p.shape[1:]) for p in pieces}) > 1:
        sizes = ", ".join(f"{plan.nodes[slot] if slot >= 0 else BASE_MODEL}: {tuple(p.shape[1:])}"
                          for (slot, _), p in zip(dev.groups, pieces))
        raise CompositionError(f"the rows' task heads give outputs of different sizes ({sizes}), e.g. classifiers "
                               f"with different numbers of labels, which one batch cannot hold; run the rows of "
                               f"each adapter in a batch of their own (set_active)")
    out = torch.cat(pieces)
    return out if dev.in_order else out.index_select(0, dev.inverse)


#: Block type -> the function that runs it at one site (``run(block, layer, x, h)``).
RUNNERS: dict[type[Block], Any] = {Stack: run_stack, Average: run_average, Fuse: run_fuse,
                                   BatchSplit: run_split, Parallel: run_split, Split: run_token_split}
