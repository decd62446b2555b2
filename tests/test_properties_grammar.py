"""Property-based tests of peftkit's two small languages: the method shorthand
(``lora[r=8,target_modules=[q_proj,v_proj]]``) and the composition grammar
(``stack(a, fuse(b, c, name="bc"))``).

For each: what is printed parses back to the same value, and any text at all is
either read or refused with the library's own error type (ConfigError,
CompositionError), never a crash (KeyError, IndexError, RecursionError, TypeError).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from peftkit.core import composition
from peftkit.core.composition import Average, BatchSplit, Fuse, Parallel, Stack
from peftkit.core.errors import CompositionError, ConfigError, PeftkitError
from peftkit.core.plugins import parse_spec
from peftkit.core.shorthand import parse_shorthand
from peftkit.plugins.lora.config import LoraConfig

BOUNDED = settings(max_examples=100, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

# -- the method shorthand ----------------------------------------------------------------------------------------------

_IDENT_START = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_IDENT = st.text(_IDENT_START, min_size=1, max_size=1).flatmap(
    lambda first: st.text(_IDENT_START + "0123456789", max_size=12).map(lambda rest: first + rest))
_METHOD_NAME = st.text(_IDENT_START, min_size=1, max_size=1).flatmap(
    lambda first: st.text(_IDENT_START + "0123456789-", max_size=12).map(lambda rest: first + rest))
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_JSON_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=12)
# What a bare word (unquoted) may be without being read as a number or literal.
_BARE_WORD = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True).filter(
    lambda w: w not in ("true", "false", "null", "True", "False", "None", "NaN", "Infinity"))


@BOUNDED
@given(name=_METHOD_NAME, values=st.dictionaries(_IDENT, _JSON_VALUE, max_size=5))
@example(name="lora", values={"target_modules": "a\\"})  # a string ending in a backslash
@example(name="lora", values={"x": ["q_proj", "v,proj", "(", "]"]})
def test_shorthand_prints_json_values_that_parse_back(name, values):
    text = f"{name}[{','.join(f'{k}={json.dumps(v)}' for k, v in values.items())}]"
    assert parse_shorthand(text) == (name, values)


@BOUNDED
@given(words=st.lists(_BARE_WORD, min_size=1, max_size=5), spaced=st.booleans())
def test_shorthand_list_of_bare_words_is_the_list_of_those_strings(words, spaced):
    sep = ", " if spaced else ","
    assert parse_shorthand(f"lora[target_modules=[{sep.join(words)}]]") == ("lora", {"target_modules": words})


_LORA = st.builds(
    LoraConfig,
    r=st.integers(1, 64),
    alpha=st.floats(0.5, 256, allow_nan=False).map(lambda a: round(a, 3)),
    dropout=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
    target_modules=st.one_of(st.none(), st.lists(_BARE_WORD.filter(lambda w: "." not in w), min_size=1,
                                                 max_size=3, unique=True)),
    use_dora=st.booleans(),
    rank_pattern=st.dictionaries(st.sampled_from(["q_proj", "v_proj", "up_proj"]), st.integers(1, 32), max_size=2),
)


@BOUNDED
@given(config=_LORA)
def test_a_config_round_trips_through_its_shorthand(config):
    method, again = parse_spec(config.to_shorthand())
    assert method.name == "lora" and again == config
    assert LoraConfig.from_json(config.to_json()) == config


# Text close to the shorthand's own alphabet finds the edge cases faster than arbitrary unicode.
_SHORTHAND_ALPHABET = st.sampled_from(list("lora[]=,{}:\"'\\ 0123456789.-_xTrueNn|()"))
_SHORTHAND_TEXT = st.one_of(st.text(_SHORTHAND_ALPHABET, max_size=40), st.text(max_size=30),
                            st.text(_SHORTHAND_ALPHABET, max_size=20).map(lambda body: f"lora[{body}]"))


@BOUNDED
@given(text=_SHORTHAND_TEXT)
@example(text="lora[x=" + "[" * 3000 + "]" * 3000 + "]")
@example(text="lora[x=" + "[a," * 3000 + "]" * 3000 + "]")
def test_any_shorthand_text_is_read_or_refused_with_config_error(text):
    try:
        name, values = parse_shorthand(text)
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(name, str) and isinstance(values, dict)


@BOUNDED
@given(text=_SHORTHAND_TEXT)
@example(text="lora[r=" + "{" * 3000 + "]")
def test_any_spec_text_is_a_config_or_a_peftkit_error(text):
    try:
        method, config = parse_spec(text)
    except PeftkitError as exc:  # ConfigError for the syntax and values, PluginError for an unknown method
        assert str(exc)
        return
    assert config.method == method.name


# -- the composition grammar -------------------------------------------------------------------------------------------

_ADAPTER = st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True)


def _members(children: list) -> list[st.SearchStrategy]:
    """A strategy drawing one adapter of ``children`` (a stack's possible head), or none when it has none."""
    names = [n for n in dict.fromkeys(composition.leaves(Stack(*children))) if n != composition.BASE_MODEL]
    return [st.sampled_from(names)] if names else []


def _blocks(children: st.SearchStrategy) -> st.SearchStrategy:
    kids = st.lists(children, min_size=1, max_size=3)
    weights = st.floats(-4, 4, allow_nan=False).filter(lambda w: abs(w) > 1e-3)
    return st.one_of(
        kids.map(lambda c: Stack(*c)),
        kids.flatmap(lambda c: st.one_of(st.none(), *_members(c)).map(lambda h: Stack(*c, head=h))),
        kids.flatmap(lambda c: st.one_of(st.none(), st.lists(weights, min_size=len(c), max_size=len(c)))
                     .filter(lambda w: w is None or abs(sum(w)) > 1e-6)
                     .map(lambda w: Average(*c, weights=w))),
        st.tuples(kids, st.one_of(st.none(), _ADAPTER)).map(lambda a: Fuse(*a[0], name=a[1])),
        kids.flatmap(lambda c: st.lists(st.integers(0, 64), min_size=len(c), max_size=len(c))
                     .map(lambda s: BatchSplit(*c, sizes=s))),
        kids.map(lambda c: Parallel(*c)),
    )


_NODE = st.recursive(_ADAPTER, _blocks, max_leaves=10)


@BOUNDED
@given(node=_NODE)
def test_a_composition_prints_and_parses_back_equal(node):
    text = str(node)
    assert composition.parse(text) == node
    assert composition.parse(f"  {text}  ") == node
    assert composition.from_json(json.loads(json.dumps(composition.to_json(node)))) == node
    assert composition.as_node(composition.to_json(node)) == node
    for block in composition.parse(text).blocks() if isinstance(node, composition.Block) else ():
        if isinstance(block, Average):  # weights are normalized once, to sum to 1
            assert math.isclose(sum(block.normalized_weights()), 1.0, rel_tol=1e-9, abs_tol=1e-9)


_COMPOSITION_ALPHABET = st.sampled_from(list("stackavergfusbp_lidh(),= \"[]0123456789.-ab"))
_COMPOSITION_TEXT = st.one_of(st.text(_COMPOSITION_ALPHABET, max_size=50), st.text(max_size=30))


def _refused_or_node(text: str) -> None:
    try:
        node = composition.parse(text)
    except CompositionError as exc:
        assert str(exc)
        return
    assert isinstance(node, (str, composition.Block))
    assert composition.parse(str(node)) == node  # whatever is read prints to a form that reads the same


@BOUNDED
@given(text=_COMPOSITION_TEXT)
@example(text="stack(" * 3000 + "a" + ")" * 3000)
@example(text="average(a, b, weights=" + "[" * 3000 + "]" * 3000 + ")")
@example(text="average(a, b, weights=[1, NaN])")
@example(text="fuse(a, b, name=3)")
@example(text="batch_split(a, sizes=[true])")
def test_any_composition_text_is_read_or_refused_with_composition_error(text):
    _refused_or_node(text)


@BOUNDED
@given(node=_NODE, data=st.data())
def test_a_damaged_composition_is_read_or_refused_with_composition_error(node, data):
    text = str(node)
    at = data.draw(st.integers(0, len(text)))
    damage = data.draw(st.sampled_from(["drop", "insert", "swap"]))
    if damage == "drop":
        text = text[:at] + text[at + 1:]
    elif damage == "insert":
        text = text[:at] + data.draw(_COMPOSITION_ALPHABET) + text[at:]
    else:
        assume(at + 1 < len(text))
        text = text[:at] + text[at + 1] + text[at] + text[at + 2:]
    _refused_or_node(text)


_JSON_ANY = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["block", "children", "weights", "name", "sizes", "head", "x"]), inner, max_size=4)),
    max_leaves=10)


@BOUNDED
@given(data=st.one_of(_JSON_ANY, _NODE.map(composition.to_json)))
@example(data={"block": "stack", "children": [{"block": ["stack"], "children": ["a"]}]})
@example(data={"block": "average", "children": ["a", "b"], "weights": {"a": 1}})
@example(data={"block": "fuse", "children": ["a"], "name": ["x"]})
def test_any_json_is_a_composition_or_refused_with_composition_error(data):
    try:
        node = composition.from_json(data)
    except CompositionError as exc:
        assert str(exc)
        return
    assert composition.from_json(composition.to_json(node)) == node


def test_deep_nesting_is_refused_by_name_not_a_recursion_error():
    deep = "stack(" * 5000 + "a" + ")" * 5000
    with pytest.raises(CompositionError, match="nest"):
        composition.parse(deep)
    data: object = "a"
    for _ in range(5000):
        data = {"block": "stack", "children": [data]}
    with pytest.raises(CompositionError, match="nest"):
        composition.from_json(data)
    with pytest.raises(ConfigError, match="nest"):
        parse_shorthand("lora[x=" + "[" * 5000 + "]" * 5000 + "]")


@settings(max_examples=60, deadline=None, database=None)
@given(own=st.one_of(_JSON_ANY, st.fixed_dictionaries({"format_version": _JSON_ANY})),
       node=st.one_of(_JSON_ANY, _NODE.map(composition.to_json)), adapters=_JSON_ANY)
@example(own={"format_version": "2"}, node="a", adapters={"a": "a"})
@example(own={"format_version": [1]}, node="a", adapters={"a": "a"})
@example(own={"format_version": 1}, node={"block": ["stack"], "children": ["a"]}, adapters={"a": "a"})
@example(own={"format_version": 1}, node="@deep@", adapters={"a": "a"})  # nested past Python's recursion limit
def test_any_composition_file_is_read_or_refused_with_adapter_load_error(tmp_path_factory, own, node, adapters):
    from peftkit.core.composition_io import read_composition
    from peftkit.core.errors import AdapterLoadError

    folder = tmp_path_factory.mktemp("composition")
    data = {"peftkit_composition": own, "composition": node, "adapters": adapters}
    text = json.dumps(data).replace('"@deep@"', '{"block": "stack", "children": [' * 5000 + '"a"' + ']}' * 5000)
    (folder / "composition.json").write_text(text, encoding="utf-8")
    try:
        read = read_composition(folder)
    except AdapterLoadError as exc:
        assert str(exc)
        return
    assert read["node"] == composition.from_json(node)


class _Claims:
    """What check_supported reads of a method: its name and the blocks it claims."""

    def __init__(self, name: str, blocks: frozenset[str]) -> None:
        self.name, self.supported_blocks = name, blocks


@BOUNDED
@given(node=_NODE, data=st.data())
def test_checking_any_composition_against_any_claims_passes_or_says_why(node, data):
    blocks = st.frozensets(st.sampled_from(sorted(composition.BLOCK_TYPES)))
    names = composition.adapter_leaves(node)
    on_model = data.draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    method_of = {n: _Claims(f"m_{n}", data.draw(blocks)) for n in on_model}
    try:
        composition.check_supported(node, method_of)
    except CompositionError as exc:
        assert str(exc)
        return
    assert set(names) <= set(method_of)  # passing means every adapter is on the model
    for block in node.blocks() if isinstance(node, composition.Block) else ():
        assert block.depth() <= composition.MAX_DEPTH
        for leaf in block.leaves():
            if leaf != composition.BASE_MODEL:
                assert block.kind in method_of[leaf].supported_blocks
