"""AdaptedModel's methods for fusion, weight-space merging, parallel outputs and
composition folders. A mixin, so model.py stays about adapters; each method is
a thin front for peftkit.core.fusion / merging / composition_io."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypeVar

from . import composition
from .adapter_names import adapter_name_list
from .composition import BASE_MODEL, Block, Node
from .errors import AdapterError, CompositionError, MergeError
from .heads import check_rows

if TYPE_CHECKING:  # pragma: no cover
    import os

    import torch
    import torch.nn as nn

    from .fuse_config import FuseConfig
    from .fusion import FusionCapture
    from .learned_average import LearnedAverage
    from .adapted_protocol import AdaptedModelProtocol
    from .state import AdapterRecord
    from .state import FusionRecord

#: Keyword arguments of a forward that never carry one row per example.
_NOT_PER_ROW = frozenset({"cache_position", "past_key_values", "use_cache", "return_dict", "output_attentions",
                          "output_hidden_states", "logits_to_keep", "num_logits_to_keep"})


#: The class the mixin is mixed into (AdaptedModel), for the classmethod that returns one of its instances.
_Model = TypeVar("_Model", bound="CompositionMixin")


class CompositionMixin:
    """Fusion, merging, parallel outputs and composition save/load (mixed into AdaptedModel)."""

    # -- fusion ---------------------------------------------------------------------------

    def add_fusion(self: "AdaptedModelProtocol", fuse: composition.Fuse | str,
                   config: "FuseConfig | dict | None" = None,
                   **options: Any) -> "FusionRecord":
        """Add AdapterFusion weights for ``fuse`` (e.g. ``Fuse("a", "b", name="ab")``).

        Options (or a FuseConfig): temperature, query_key_dim, value, residual,
        regularization, init_std. The fusion starts frozen and equal to the
        plain average of its members; train it with ``train_fusion()``.
        """
        from .fusion import add_fusion

        return add_fusion(self, fuse, config, **options)

    def delete_fusion(self: "AdaptedModelProtocol", name: str) -> None:
        from .fusion import delete_fusion

        delete_fusion(self, name)

    @property
    def fusions(self: "AdaptedModelProtocol") -> dict[str, composition.Fuse]:
        """Fusion name -> its fuse() block."""
        return {name: record.node for name, record in self.adapter_state.fusions.items()}

    def fusion_parameters(self: "AdaptedModelProtocol", name: str) -> Iterator["nn.Parameter"]:
        from .fusion import fusion_parameters

        return fusion_parameters(self, name)

    def train_fusion(self: "AdaptedModelProtocol", fuse: composition.Fuse | str | None = None, *,
                     unfreeze_adapters: bool = False) -> None:
        """Activate ``fuse`` and make only the fusion weights trainable (members stay frozen
        unless ``unfreeze_adapters``). ``train_adapter(Fuse(...))`` does the same."""
        from .fusion import train_fusion

        train_fusion(self, fuse, unfreeze_adapters=unfreeze_adapters)

    def fusion_regularization_loss(self: "AdaptedModelProtocol", name: str | None = None) -> "torch.Tensor":
        """regularization * sum ||W_v - I||^2 over the fusion's sites (every fusion when no name);
        add it to the training loss to keep the value projections near the identity."""
        from .fusion import regularization_loss

        return regularization_loss(self, name)

    def set_fusion_temperature(self: "AdaptedModelProtocol", name: str, temperature: float) -> None:
        from .fusion import set_temperature

        set_temperature(self, name, temperature)

    def capture_fusion_weights(self: "AdaptedModelProtocol") -> contextlib.AbstractContextManager["FusionCapture"]:
        """``with model.capture_fusion_weights() as cap: model(**batch)``; then
        ``cap.weights[fusion][site]`` holds the members and their attention weights (..., members)."""
        from .fusion import capture

        return capture(self)

    def save_fusion(self: "AdaptedModelProtocol", path: "str | os.PathLike", name: "str | composition.Fuse") -> None:
        """Write the fusion ``name`` (or that of a ``Fuse`` block) as a folder."""
        from .fusion import save_fusion

        save_fusion(self, name.fusion_name if isinstance(name, composition.Fuse) else name, path)

    def load_fusion(self: "AdaptedModelProtocol", path: "str | os.PathLike", name: str | None = None, *,
                    activate: bool = False) -> "FusionRecord":
        """Load a fusion folder (peftkit's, or one AdapterHub's ``save_adapter_fusion`` wrote); its member adapters
        must already be on the model."""
        from .adapterhub_fusion import is_adapterhub_fusion, load_adapterhub_fusion
        from .fusion import load_fusion

        if is_adapterhub_fusion(path):  # save_adapter_fusion's folder (adapter_fusion_config.json)
            record = load_adapterhub_fusion(self, path, name)
        else:
            record = load_fusion(self, path, name)
        if activate:
            self.set_active(record.node)
        return record

    # -- learned average() weights ------------------------------------------------------------

    @contextlib.contextmanager
    def learn_average(self: "AdaptedModelProtocol", block: "composition.Average | str", *, rest: str | None = None
                      ) -> Iterator["LearnedAverage"]:
        """While open, the ``average()`` block ``block`` (wherever it runs: activate a composition holding
        it) takes its weights from the yielded module's parameters, which gradients reach; train them with
        any optimizer, then ``learned.block()`` is the block with the trained weights as numbers, which runs
        the same outputs once saved. ``rest=`` names a child (e.g. ``"__base__"``) whose weight is ``1 - sum``
        of the others, so that the weights are used as they are (``h + sum_i w_i delta_i``); without it the
        weights are normalized to sum to 1, as the block's own. The members stay as they are (frozen or not)."""
        from .learned_average import LearnedAverage

        node = composition.as_node(block)
        if not isinstance(node, composition.Average):
            raise CompositionError(f"learn_average() takes an average() block, e.g. Average('a', 'b'); got {node}")
        composition.check_supported(node, {n: r.method for n, r in self.adapter_records.items()})
        state = self.adapter_state
        if node in state.learned_averages:
            raise CompositionError(f"the weights of {node} are already being learned (learn_average is open)")
        learned = LearnedAverage(node, rest=rest, device=self.device)
        state.learned_averages[node] = learned
        try:
            yield learned
        finally:
            del state.learned_averages[node]

    # -- weight-space merging -----------------------------------------------------------------

    def merge_adapters(self: "AdaptedModelProtocol", adapters: Sequence[str], weights: Sequence[float] | None = None,
                       name: str = "merged", strategy: str = "svd", **options: Any) -> "AdapterRecord":
        """Merge adapters in weight space into a new adapter (see peftkit.core.merging): LoRA factors,
        IA3/BitFit values elementwise, other methods (LoKr, VeRA, OFT, ...) or a mix through their dense
        weight changes into a LoRA of rank ``rank`` (default full; ``record.merge_report`` says what a
        smaller rank keeps).

        Strategies: cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune (also with
        PEFT's ``_svd`` suffix) and any a plugin registers. Options: density, rank,
        majority_sign_method, seed, modules_to_save.
        """
        from .merging import merge_adapters

        return merge_adapters(self, adapters, weights, name, strategy, **options)

    def names_to_merge(self: "AdaptedModelProtocol", adapter_names: str | Sequence[str] | None = None, *,
                       fold_average: bool = False) -> list[str]:
        """The adapters ``merge_adapter`` merges, in order: those named, or the active ones. An active
        composition other than one adapter or a stack of adapters is not its adapters merged one after
        another: with ``fold_average`` (merge_and_unload) an ``average()`` of LoRA adapters is first made
        one adapter (``merge_order``); anything else is refused, rather than merged as a stack."""
        from .merging import merge_order

        names = adapter_name_list(adapter_names)
        if names is not None:
            return names
        node = self.active_composition
        plain_stack = isinstance(node, composition.Stack) and all(isinstance(c, str) for c in node.children)
        if node is None or isinstance(node, str) or plain_stack:
            return self.active_adapters
        if fold_average:
            return merge_order(self, node)
        raise MergeError(f"the active composition {node} is not a stack of adapters, so merging its adapters one "
                         f"after another would not be the same model; merge_and_unload() folds an average() of "
                         f"LoRA adapters into one, and merge_adapters([...], name=..., strategy=\"linear\") makes "
                         f"one adapter you can merge")

    def add_weighted_adapter(self: "AdaptedModelProtocol", adapters: Sequence[str], weights: Sequence[float],
                             adapter_name: str, combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str | None = None,
                             modules_to_save: str | None = None, seed: int | None = 0) -> "AdapterRecord":
        """PEFT's spelling of :meth:`merge_adapters` (same results where PEFT is exact;
        docs/composition.md lists where PEFT's own results differ and why). ``modules_to_save`` is
        peftkit's addition (PEFT refuses adapters that each keep a copy of one module, such as
        classifiers' heads): ``"average"`` or the name of the adapter whose copy the new one keeps.
        ``seed`` seeds DARE's random drops (the same merge each time); None draws them from torch's
        global generator, as PEFT does."""
        from .errors import MergeError

        if svd_clamp is not None:
            raise MergeError("svd_clamp is not supported: clamping the factors changes the merged weights "
                             "arbitrarily; leave it at None")
        return self.merge_adapters(adapters, weights, adapter_name, combination_type, rank=svd_rank,
                                   density=density, majority_sign_method=majority_sign_method,
                                   modules_to_save=modules_to_save, seed=seed)

    # -- parallel ----------------------------------------------------------------------------------

    def split_parallel(self: "AdaptedModelProtocol", output: Any) -> list[Any]:
        """Split the output of a forward under an active ``parallel()`` into one output per child."""
        node = self.adapter_state.active
        if not isinstance(node, composition.Parallel):
            raise CompositionError(f"split_parallel() needs an active parallel() composition, not {node}")
        return composition.split_parallel(output, len(node.children))

    # -- composition folders -------------------------------------------------------------------------

    def save_composition(self: "AdaptedModelProtocol", path: "str | os.PathLike",
                         composition_node: Node | str | None = None,
                         **card: Any) -> None:
        """Save a composition (the active one by default) with its adapters and fusions to one folder."""
        from .composition_io import save_composition

        save_composition(self, path, composition_node, **card)

    @classmethod
    def load_composition(cls: "type[_Model]", model: "nn.Module", path: "str | os.PathLike", *,
                         activate: bool = True) -> "_Model":
        """Load a folder written by save_composition() onto ``model`` (a base model or an
        AdaptedModel) and activate the saved composition. On error the model is left as it was."""
        from .composition_io import load_composition

        if isinstance(model, cls):
            load_composition(model, path, activate=activate)
            return model
        flags = [(p, p.requires_grad) for p in model.parameters()]  # wrapping freezes the base model
        adapted = cls(model)
        try:
            load_composition(adapted, path, activate=activate)
        except BaseException:
            for param, flag in flags:
                param.requires_grad_(flag)
            raise
        adapted.eval()
        return adapted

# -- rules model.py applies (functions of the model, so both modules use public names) --------------------

def head_of(model: "AdaptedModelProtocol", node: Node | None) -> str | None:
    """The adapter whose classification head runs for ``node`` (None: the base model's head)."""
    return composition.head_leaf(node, lambda n: model.adapter_labels(n) is not None)


def labels_of_head(model: "AdaptedModelProtocol", owner: str | None) -> list[str] | None:
    """The labels of ``owner``'s head (the base model's when ``owner`` is None)."""
    return model.adapter_labels(owner) if owner is not None else model.base_labels


def check_composition_extras(model: "AdaptedModelProtocol", node: Node) -> None:
    """Rules needing the model: input-rewriting adapters only in a top-level stack; fusions exist."""
    from .fusion import check_fusions

    def model_level(n: str) -> bool:
        return n != BASE_MODEL and model.adapter_record(n).model_adapter

    if isinstance(node, Block):
        direct = set(node.children) if isinstance(node, composition.Stack) else set()
        for leaf in composition.adapter_leaves(node):
            if model_level(leaf) and leaf not in direct:
                raise CompositionError(
                    f"adapter {leaf!r} (method {model.adapter_record(leaf).method.name!r}) changes the model's "
                    f"inputs, so it acts on the whole model: it can only be activated alone or as a direct "
                    f"member of the outermost stack(), e.g. stack({leaf}, ...), not inside {node}")
    check_fusions(model, node)

def refuse_if_fused(model: "AdaptedModelProtocol", name: str) -> None:
    from .fusion import fused_members

    fusions = fused_members(model).get(name)
    if fusions:
        raise AdapterError(f"adapter {name!r} is fused in {', '.join(map(repr, fusions))}; "
                           f"delete_fusion({fusions[0]!r}) first")

def unfreeze_model_fusions(model: "AdaptedModelProtocol", node: Node | None) -> int:
    from .fusion import unfreeze_fusions

    return unfreeze_fusions(model, node)

def routing_entries(model: "AdaptedModelProtocol", adapter_names: Sequence[Any], batch_size: int | None) -> list[Node]:
    """Check ``adapter_names=`` (one adapter name, ``"__base__"`` or composition per row)."""
    if isinstance(adapter_names, str):
        raise CompositionError("adapter_names must be a list with one entry per row, not a string")
    entries: list[Node] = []
    parsed: dict[Any, Node] = {}
    for row, entry in enumerate(adapter_names):
        key = entry if isinstance(entry, (str, Block)) else repr(entry)
        node = parsed.get(key)
        if node is None:
            if isinstance(entry, str) and (entry == BASE_MODEL or entry in model.adapters):
                node = entry
                method = model.adapter_record(entry).method if entry != BASE_MODEL else None
                if method is not None and "batch_split" not in method.supported_blocks \
                        and not model.adapter_record(entry).model_adapter:
                    raise CompositionError(f"adapter {entry!r} (method {method.name!r}) cannot be routed per "
                                           f"row (its method does not support batch_split); "
                                           f"{method.name} supports: {', '.join(sorted(method.supported_blocks))}")
            elif isinstance(entry, str) and "(" not in entry:
                raise AdapterError(f"adapter_names[{row}] is {entry!r}, not on this model; "
                                   f"{composition.adapters_on_model(entry, list(model.adapters))}")
            elif entry is None:
                raise CompositionError(f"adapter_names[{row}] is None; give an adapter name, or {BASE_MODEL!r} "
                                       f"for the base model (as in PEFT)")
            else:
                node = composition.as_node(entry)
                if isinstance(node, (composition.Parallel, composition.BatchSplit)):
                    raise CompositionError(f"a row of adapter_names cannot be {node.kind}(); rows are "
                                           f"already split by adapter_names")
                model.check_composition(node)
            if node != BASE_MODEL and any(model.adapter_record(n).model_adapter
                                          for n in composition.adapter_leaves(node)):
                raise CompositionError(f"adapter_names: {node} changes the model's inputs (prefix or prompt "
                                       f"tuning, alone or in a union), so it cannot be routed per example; run "
                                       f"its rows as a batch of their own after set_active({str(node)!r})")
            parsed[key] = node
        entries.append(node)
    if batch_size is not None and len(entries) != batch_size:
        raise CompositionError(f"adapter_names has {len(entries)} entries for a batch of {batch_size} rows; "
                               f"give one name per row")
    check_rows(entries, lambda n: head_of(model, n), lambda o: labels_of_head(model, o), "adapter_names")
    return entries

@contextlib.contextmanager
def composition_inputs(model: "AdaptedModelProtocol", args: tuple, kwargs: dict, batch_size: int | None
                        ) -> Iterator[tuple[tuple, dict]]:
    """Check row counts of batch_split() and, under parallel(), replicate the batch once per child."""
    import torch

    state = model.adapter_state
    state.parallel_copies = None  # drops one kept for a recomputing backward (below)
    node = state.active
    if state.routing is not None or state.disabled or not isinstance(node, Block):
        yield args, kwargs
        return
    if batch_size is not None:
        for block in node.blocks():
            if isinstance(block, composition.BatchSplit) and sum(block.sizes) != batch_size:
                raise CompositionError(f"{block} splits {sum(block.sizes)} rows but the batch has "
                                       f"{batch_size}; give sizes that add up to the batch size")
    if not isinstance(node, composition.Parallel):
        yield args, kwargs
        return
    if batch_size is None:
        raise CompositionError("parallel(): cannot find the batch in the inputs (input_ids, inputs_embeds "
                               "or a first positional tensor) to replicate it")
    if kwargs.get("past_key_values") is not None:
        raise CompositionError("parallel() replicates the batch and cannot extend a given past_key_values "
                               "cache; use model.generate(), which replicates once before decoding")
    copies = len(node.children)
    args, kwargs = replicate_rows(args, kwargs, batch_size, copies)
    state.parallel_copies = copies
    try:
        yield args, kwargs
    finally:
        if not torch.is_grad_enabled():
            # With gradients, keep it until the next forward: activation checkpointing
            # recomputes layers during backward(), under the same parallel() split.
            state.parallel_copies = None


def replicate_rows(args: tuple, kwargs: dict, batch_size: int, copies: int) -> tuple[tuple, dict]:
    """Every per-row tensor (first dimension = batch) repeated ``copies`` times along the batch, child-major."""
    import torch

    def rep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            return torch.cat([value] * copies, dim=0)
        return value

    new_args = tuple(rep(a) for a in args)
    new_kwargs = {k: (v if k in _NOT_PER_ROW else rep(v)) for k, v in kwargs.items()}
    return new_args, new_kwargs
