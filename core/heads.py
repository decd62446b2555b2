"""Classification heads kept per adapter: how many labels each predicts, and which may be combined.

A classifier adapter keeps its own copy of the model's head (``modules_to_save``).
Its number of labels is the output size of the head's last linear layer, so an
adapter trained for 4 labels loads onto a model whose head has 2: the copy is
rebuilt with 4 outputs from the file's weights. The label names live in the
adapter's ``labels.json`` (:mod:`peftkit.core.labels`).

Heads are combined as :func:`~peftkit.core.composition.head_leaf` says (a
stack predicts with its ``head=`` member's head, else its last part's). Blocks that mix their members'
outputs (average, fuse) need members whose heads predict the same labels;
blocks that run members side by side in one batch (parallel, batch_split,
per-row routing) need heads with the same number of outputs. Anything else is
refused before it runs, naming the adapters and their labels.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .composition import Average, BatchSplit, Block, Fuse, Node, Parallel, Stack
from .errors import CompositionError
from .labels import default_names
from .layer import ModulesToSave

#: transformers model classes whose head predicts ``config.num_labels`` labels named by ``config.id2label``.
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification",
                       "ForAudioClassification")


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith(CLASSIFIER_SUFFIXES) and hasattr(getattr(model, "config", None), "id2label")


def label_layer(head: nn.Module) -> tuple[str, nn.Linear] | None:
    """The head's last linear layer (its name inside the head, and the layer): one output per label."""
    found = None
    for name, module in head.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def label_heads(base_model: nn.Module, name: str, base_count: int) -> Iterator[ModulesToSave]:
    """The model's classification heads (those predicting its ``base_count`` labels) that adapter ``name``
    keeps a copy of."""
    if not is_classifier(base_model):
        return
    for module in base_model.modules():
        if isinstance(module, ModulesToSave) and name in module.copies:
            original = label_layer(module.original_module)
            if original is not None and original[1].out_features == base_count:
                yield module


def head_size(base_model: nn.Module, name: str, base_count: int) -> int | None:
    """How many labels adapter ``name``'s own classification head predicts (None: it keeps none)."""
    for module in label_heads(base_model, name, base_count):
        layer = label_layer(module.copies[name])
        if layer is not None:
            return layer[1].out_features
    return None


def adapter_labels(base_model: nn.Module, name: str, saved: Sequence[str] | None,
                   base_labels: Sequence[str]) -> list[str] | None:
    """The names of the labels adapter ``name``'s head predicts: ``saved`` (its labels.json), else the
    base model's when the sizes agree, else ``LABEL_0``...; None when it keeps no classification head."""
    size = head_size(base_model, name, len(base_labels))
    if size is None:
        return None
    for names in (saved, base_labels):
        if names is not None and len(names) == size:
            return list(names)
    return default_names(size)


def fit_heads(base_model: nn.Module, name: str, base_count: int, own: dict[str, torch.Tensor],
              saved: dict[str, torch.Tensor]) -> int | None:
    """Give adapter ``name``'s head copies the number of labels of the saved head weights.

    ``own`` maps the adapter's file keys to its live tensors, ``saved`` holds the file's. A
    copy whose last linear layer has another output size than the file's (same input size)
    is rebuilt with the file's size. Returns that size (None: the adapter keeps no
    classification head). Any other difference is left for the weight check to report.
    """
    key_of = {id(tensor): key for key, tensor in own.items()}
    size = None
    for module in list(label_heads(base_model, name, base_count)):
        head = module.copies[name]
        sub_name, layer = label_layer(head)  # type: ignore[misc]
        weight = saved.get(key_of.get(id(layer.weight), ""))
        if weight is None or weight.dim() != 2 or weight.shape[1] != layer.in_features:
            continue
        size = int(weight.shape[0])
        if size != layer.out_features:
            resized = nn.Linear(layer.in_features, size, bias=layer.bias is not None,
                                device=layer.weight.device, dtype=layer.weight.dtype)
            resized.requires_grad_(layer.weight.requires_grad)
            resized.train(layer.training)
            if sub_name:
                parent, _, child = sub_name.rpartition(".")
                setattr(head.get_submodule(parent) if parent else head, child, resized)
            else:
                module.copies[name] = resized
    return size


def check_heads(node: Node, head_of: Callable[[Node], str | None],
                labels_of: Callable[[str | None], list[str] | None]) -> None:
    """Refuse blocks of ``node`` that combine heads predicting different labels (see the module docstring).

    ``head_of(child)`` is the adapter whose head a child runs (None: the model's own), ``labels_of``
    that head's label names (None when the model is no classifier)."""
    if not isinstance(node, Block):
        return
    for block, heads_run in blocks_with_heads(node):
        if isinstance(block, (Average, Fuse)) and heads_run:
            owners = [o for o in dict.fromkeys(head_of(c) for c in block.children) if o is not None]
            named = {o: labels_of(o) for o in owners}
            if len({tuple(v) for v in named.values() if v is not None}) > 1:
                verb = "averaged" if isinstance(block, Average) else "fused"
                raise CompositionError(
                    f"{block}: the adapters' classification heads predict different labels "
                    f"({describe_labels(named)}), so their outputs cannot be {verb}; use stack(...) (it predicts "
                    f"with the last adapter's head), or run each adapter on its own")
        elif isinstance(block, (Parallel, BatchSplit)):
            check_rows(list(block.children), head_of, labels_of, f"{block.kind}()")


def blocks_with_heads(node: Block, heads_run: bool = True) -> Iterator[tuple[Block, bool]]:
    """Every block of ``node`` and whether its members' heads may run: not inside a part of a stack whose
    ``head=`` names an adapter outside that part (``stack(average(a, b), h, head=h)`` predicts with h's head,
    so a's and b's heads need not agree)."""
    yield node, heads_run
    for child in node.children:
        if not isinstance(child, Block):
            continue
        runs = heads_run and not (isinstance(node, Stack) and node.head is not None and node.head not in child.leaves())
        yield from blocks_with_heads(child, runs)


def check_rows(nodes: Sequence[Node], head_of: Callable[[Node], str | None],
               labels_of: Callable[[str | None], list[str] | None], what: str) -> None:
    """Refuse running ``nodes`` side by side in one batch when their heads' output sizes differ."""
    owners = {str(n): head_of(n) for n in dict.fromkeys(nodes)}
    named = {key: labels_of(owner) for key, owner in owners.items()}
    if len({len(v) for v in named.values() if v is not None}) > 1:
        raise CompositionError(
            f"{what} runs {', '.join(named)} in one batch, but their classification heads predict different "
            f"numbers of labels ({describe_labels(named)}), which one output tensor cannot hold; run each in a "
            f"batch of its own (set_active)")


def describe_labels(named: dict[str, list[str] | None]) -> str:
    """``a: 2 labels (neg, pos); b: 4 labels (...)`` for the entries that have labels."""
    return "; ".join(f"{key}: {len(v)} labels ({', '.join(v[:6])}{', ...' if len(v) > 6 else ''})"
                     for key, v in named.items() if v is not None)
