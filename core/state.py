"""What one adapted model holds and runs: the records of its adapters and fusions, and the activation state
shared by every peftkit module of the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .composition import BatchSplit, Block, Node, Parallel, Stack
from .composition_exec import RowPlan, Routing, run_copies, run_node
from .errors import CompositionError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .config import AdapterConfig
    from .fuse_config import FuseConfig
    from .layer import TunerLayer
    from .method import Method, Site


@dataclass
class AdapterRecord:
    """What the model knows about one named adapter."""

    name: str
    method: Method
    config: AdapterConfig
    sites: list[Site] = field(default_factory=list)
    model_adapter: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    #: The label names of its own classification head as saved with it (labels.json); see adapter_labels().
    labels: list[str] | None = None
    #: What merge_adapters() measured while making it (a dense merge: {"rank", "energy_kept": {site: fraction}}).
    merge_report: dict | None = None


@dataclass
class FusionRecord:
    """What the model knows about one fusion: its block, config and the sites it covers
    (site name -> indices of the Fuse children that act there)."""

    name: str
    node: Any  # a composition.Fuse
    config: "FuseConfig"
    sites: dict[str, list[int]] = field(default_factory=dict)


class AdapterState:
    """Which composition runs now. One object per AdaptedModel, referenced (not
    owned) by its TunerLayers, so switching adapters touches no layer."""

    def __init__(self) -> None:
        self.active: Node | None = None
        self.active_names: tuple[str, ...] = ()
        self.disabled = False
        self.routing: Routing | None = None
        #: Fusions on the model by name (their weights live in TunerLayer.fusions).
        self.fusions: dict[str, FusionRecord] = {}
        #: average() blocks whose weights are being learned (``model.learn_average``): block -> LearnedAverage.
        self.learned_averages: dict[Any, Any] = {}
        #: While a fusion-weights capture is open: the object collecting them.
        self.capture: Any = None
        #: While AdaptedModel runs a parallel() forward: the number of copies of the batch.
        self.parallel_copies: int | None = None
        self._plans: dict[tuple[int, int], tuple[Block, RowPlan]] = {}

    @property
    def current(self) -> Node | Routing | None:
        """What the TunerLayers run now: the per-row routing of this forward, or the active composition."""
        return self.routing if self.routing is not None else self.active

    def run(self, layer: "TunerLayer", x: "torch.Tensor", h: "torch.Tensor") -> "torch.Tensor":
        if self.routing is not None:
            return self.routing.run(layer, x, h)
        return run_node(self.active, layer, x, h)  # type: ignore[arg-type]

    # -- row splits --------------------------------------------------------------------

    def plan_for(self, block: Block, rows: int) -> RowPlan:
        """The row plan of a batch_split() or parallel() block for a batch of ``rows`` rows."""
        key = (id(block), rows)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is block:
            return hit[1]
        if isinstance(block, Parallel):
            copies = self.parallel_copies
            if copies != len(block.children):
                raise CompositionError(
                    "a parallel() composition runs only through the AdaptedModel (model(...) or "
                    "model.generate(...)), which replicates the batch once per child; do not call the "
                    "wrapped base model directly while it is active")
            if rows % copies:
                raise CompositionError(f"parallel(): a layer got {rows} rows, not a multiple of {copies} copies")
            plan = RowPlan.from_sizes(block.children, [rows // copies] * copies)
        elif isinstance(block, BatchSplit):
            total = sum(block.sizes)
            if total == 0 or rows % total:
                raise CompositionError(f"batch_split sizes {list(block.sizes)} add up to {total} rows but the "
                                       f"batch has {rows}; give sizes that add up to the batch size")
            plan = RowPlan.from_sizes(block.children, block.sizes).for_rows(rows)
        else:  # pragma: no cover - only row-splitting blocks ask
            raise CompositionError(f"{block.kind}() does not split rows")
        if len(self._plans) > 64:
            self._plans.clear()
        self._plans[key] = (block, plan)
        return plan

    def row_split(self) -> Block | None:
        """The row-splitting block that decides which adapter's modules_to_save copy each row uses:
        the active batch_split()/parallel(), or the first one directly inside an active stack()."""
        node = self.active
        if isinstance(node, (BatchSplit, Parallel)):
            return node
        if isinstance(node, Stack):
            return next((c for c in node.children if isinstance(c, BatchSplit)), None)
        return None

    def run_copies(self, module: Any, args: tuple, kwargs: dict) -> Any:
        """Under a row split, run a ModulesToSave wrapper per group of rows (None otherwise)."""
        if self.disabled:
            return None
        if self.routing is not None:
            return run_copies(self.routing.plan, module, self.active_names, args, kwargs)
        block = self.row_split()
        if block is None:
            return None
        import torch

        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        if first is None:
            return None
        try:
            plan = self.plan_for(block, first.shape[0])
        except CompositionError:
            return None  # not batch-first here; the layers report a real size mismatch
        return run_copies(plan, module, self.active_names, args, kwargs)

    def __repr__(self) -> str:
        return f"AdapterState(active={self.active!s}, disabled={self.disabled})"
