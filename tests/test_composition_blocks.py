"""Composition blocks: Python, JSON and string forms, and the rules checked before any forward."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit import Average, BatchSplit, CompositionError, Fuse, Parallel, Split, Stack
from peftkit.core import composition
from tests.composition_util import lora_model

NODES = [
    "a",
    Stack("a", "b"),
    Stack("lang_de", Fuse("ner", "pos", name="ner_pos")),
    Average("a", "b", weights=[0.7, 0.3]),
    BatchSplit("a", Stack("b", "c"), "__base__", sizes=[2, 3, 1]),
    Parallel("a", Fuse(Stack("x", "b"), "c"), Average("a", "b")),
    Fuse("a", "b"),
]


@pytest.mark.parametrize("node", NODES, ids=str)
def test_python_json_and_string_forms_round_trip(node):
    text = str(node)
    assert composition.parse(text) == node
    data = json.loads(json.dumps(composition.to_json(node)))
    assert composition.from_json(data) == node
    assert composition.as_node(data) == node
    assert str(composition.parse(text)) == text


def test_string_form_reads_as_written():
    node = peftkit.parse_composition('stack(lang_de, fuse(ner, pos, name="ner_pos"))')
    assert node == Stack("lang_de", Fuse("ner", "pos", name="ner_pos"))
    assert node.to_json() == {"block": "stack", "children": [
        "lang_de", {"block": "fuse", "children": ["ner", "pos"], "name": "ner_pos"}]}
    assert composition.parse("average(a, b, weights=[1, 3])").normalized_weights() == (0.25, 0.75)
    assert composition.parse("batch_split(a, b, sizes=[1, 2])").sizes == (1, 2)


def test_equality_and_hash_see_options():
    assert Average("a", "b", weights=[1, 2]) != Average("a", "b")
    assert Fuse("a", "b", name="x") != Fuse("a", "b")
    assert Stack("a", "b") != Average("a", "b")
    assert len({Stack("a", "b"), Stack("a", "b"), Stack("b", "a")}) == 2
    with pytest.raises(AttributeError):
        Stack("a").children = ("b",)  # type: ignore[misc]


def test_fuse_default_name_joins_members():
    assert Fuse("a", "b").fusion_name == "a_b"
    assert Fuse("a", "b", name="ab").fusion_name == "ab"


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("mix(a, b)", "unknown composition block 'mix'"),
    ("stack(a, b", "unbalanced"),
    ("stack(a b)", "not an adapter name"),
    ("average(a, b, weights=[1])", "2 adapters but 1 weights"),
    ("average(a, b, weights=[1, -1])", "sum to 0"),
    ("batch_split(a, b)", "needs sizes"),
    ("batch_split(a, b, sizes=[1, -1])", "non-negative"),
    ("stack(a, b, weights=[1, 2])", "takes no options"),
    ("average(weights=[1], a)", "comes after an option"),
    ('fuse(a, b, name="bad name")', "invalid"),
    ('fuse(a, b, name="ab\n")', "invalid"),
])
def test_malformed_compositions_name_the_problem(text, fragment):
    with pytest.raises(CompositionError, match=fragment):
        composition.parse(text)


@pytest.mark.parametrize("make, message", [
    (lambda: BatchSplit("b", "c", batch_sizes=[1, 1]),
     r"batch_split\(\) takes the option sizes=, not batch_sizes=; for batch_sizes= write sizes=\[...\]"),
    (lambda: Average("b", "c", normalize_weights=False),
     r"average\(\) takes the option weights=, not normalize_weights=; .*always normalizes them"),
    (lambda: Split("b", "c", split_index=3), r"split\(\) takes the option splits=, not split_index=; .*splits=N"),
    (lambda: Fuse("b", "c", temperature=2.0), r"^fuse\(\) takes the option name=, not temperature=$"),
    (lambda: composition.parse("batch_split(b, c, batch_sizes=[1, 1])"), r"not batch_sizes=; for batch_sizes="),
])
def test_an_unknown_block_option_names_the_options_and_adapterhubs_spelling(make, message):
    """AdapterHub's option names (and any other unknown one) get the block's own, not a TypeError."""
    with pytest.raises(CompositionError, match=message):
        make()


def test_json_errors():
    with pytest.raises(CompositionError, match="'children' must be a list"):
        composition.from_json({"block": "stack", "children": "a"})
    with pytest.raises(CompositionError, match="unknown composition block"):
        composition.from_json({"block": "nope", "children": []})


# -- rules, checked at set_active(), before any forward --------------------------------------


@pytest.fixture(scope="module")
def model():
    adapted = lora_model(("a", "b", "c"))
    adapted.add_adapter("p", "prompt_tuning[num_virtual_tokens=2]")
    return adapted


@pytest.mark.parametrize("node, fragment", [
    (Stack("a", Parallel("b", "c")), "parallel\\(\\) must be the outermost block"),
    (Parallel("a", Parallel("b", "c")), "outermost"),
    (Fuse(Average("a", "b"), "c"), "fuse\\(\\) cannot hold average\\(\\)"),
    (Fuse("a", "a"), "appears twice"),
    (Fuse("a", "__base__"), "cannot be fused"),
    (Fuse(Stack("a", Stack("b", "c")), "a"), "names only"),
    (Average("a", BatchSplit("b", "c", sizes=[1, 1])), "average\\(\\) cannot hold batch_split\\(\\)"),
    (Stack("a", "zzz"), "'zzz', which is not on the model"),
    (Stack(Stack(Stack(Stack(Stack(Stack("a")))))), "nests 6 blocks deep"),
])
def test_nesting_rules(model, node, fragment):
    with pytest.raises(CompositionError, match=fragment):
        model.set_active(node)


def test_unsupported_block_names_method_block_and_alternative(model):
    with pytest.raises(CompositionError) as err:
        model.set_active(Average("a", "p"))
    message = str(err.value)
    assert "'p'" in message and "prompt_tuning" in message and "average()" in message
    assert "supports: stack" in message


def test_input_rewriting_adapter_only_directly_in_the_outer_stack(model):
    model.set_active(Stack("p", "a"))  # fine
    with pytest.raises(CompositionError, match="outermost stack"):
        model.set_active(Stack("a", Stack("p", "b")))
    model.set_active(None)


def test_fuse_needs_fusion_weights_before_any_forward(model):
    with pytest.raises(CompositionError, match="add_fusion"):
        model.set_active(Fuse("a", "b"))
    model.add_fusion(Fuse("a", "b", name="ab"))
    with pytest.raises(CompositionError, match="fuses fuse\\(a, b"):
        model.set_active(Fuse("b", "a", name="ab"))
    model.set_active(Fuse("a", "b", name="ab"))
    assert model.active_adapters == ["a", "b"]
    model.set_active(None)
    model.delete_fusion("ab")


def test_failed_set_active_keeps_the_previous_composition(model):
    model.set_active(Stack("a", "b"))
    with pytest.raises(CompositionError):
        model.set_active(Stack("a", Parallel("b", "c")))
    assert model.active_composition == Stack("a", "b")
    model.set_active(None)


def test_public_names():
    for name in ("Fuse", "Parallel", "split_parallel", "FuseConfig", "merge_adapters", "save_composition",
                 "load_composition"):
        assert getattr(peftkit, name) is not None
