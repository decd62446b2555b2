"""The split() block (AdapterHub's ``Split``): its grammar and rules, its values by hand, and its
outputs against the real ``adapters`` 1.3.0 on BERT with bottleneck adapters it saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures
from peftkit.core.composition import Split, Stack, as_node, from_json, parse
from peftkit.core.errors import CompositionError
from peftkit.testing import build_tiny, output_tensor, randomize, sample_inputs, tiny_model



# -- the block as data ------------------------------------------------------------------------------


def test_string_and_json_forms_round_trip_and_an_integer_gives_every_child_that_many_tokens() -> None:
    block = parse("split(a, stack(b, c), splits=[3, 4])")
    assert block == Split("a", Stack("b", "c"), splits=[3, 4])
    assert str(block) == "split(a, stack(b, c), splits=[3, 4])"
    assert from_json(block.to_json()) == block
    assert block.to_json() == {"block": "split", "children": ["a", {"block": "stack", "children": ["b", "c"]}],
                               "splits": [3, 4]}
    assert Split("a", "b", splits=2).splits == (2, 2)  # AdapterHub's shorthand
    assert Split("a", "b", "c", splits=[1, 0, 5]).spans() == [(0, 1), (1, 1), (1, 6)]


@pytest.mark.parametrize("text, message", [
    ("split(a, b)", r"needs splits=\[...\] with one token count per adapter \(2 adapters"),
    ("split(a, b, splits=[4])", r"one token count per adapter \(2 adapters"),
    ("split(a, b, splits=[2, -1])", "non-negative integers"),
    ("split(a, b, splits=[0, 0])", "add up to 0 tokens"),
])
def test_bad_splits_are_refused_with_what_to_give(text: str, message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        parse(text)


def _model(spec: str = "lora[r=4]", names: tuple[str, ...] = ("a", "b")) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny(tiny_model("bert"), seed=0))
    for index, name in enumerate(names):
        model.add_adapter(name, spec)
        randomize(model, name, seed=10 + index)
    return model.eval()


def test_prefix_tuning_cannot_join_a_split_and_the_message_says_why() -> None:
    model = _model()
    model.add_adapter("p", "prefix_tuning[num_virtual_tokens=2]")
    with pytest.raises(CompositionError, match="cannot take part in split.*its span of tokens only.*not prefix"):
        model.set_active(as_node("split(a, p, splits=[3, 5])"))


def test_split_nests_as_in_adapterhub_but_not_under_parallel_or_fuse() -> None:
    model = _model()
    model.set_active(as_node("stack(split(a, b, splits=[4, 4]), a)"))
    model.set_active(as_node("average(split(a, b, splits=[4, 4]), b)"))
    model.set_active(as_node("split(split(a, b, splits=[1, 1]), batch_split(a, b, sizes=[1, 1]), splits=[2, 6])"))
    with pytest.raises(CompositionError, match="parallel.. cannot hold split"):
        model.set_active(as_node("parallel(split(a, b, splits=[4, 4]), a)"))


# -- values -------------------------------------------------------------------------------------------


def test_each_span_of_a_lora_layer_is_its_adapters_own_output_by_hand() -> None:
    """At one LoRA site, split(a, b) gives h + s (x A_a^T) B_a^T on the first tokens and b's on the rest."""
    model = _model(names=("a", "b", "c"))
    layer = model.base_model.base_model.encoder.layer[0].attention.self.query
    x = torch.randn(2, 8, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    model.set_active(as_node("split(a, b, c, splits=[3, 0, 5])"))
    with torch.no_grad():
        got = layer(x)
        base = layer.base_layer(x)
        expected = base.clone()
        for name, span in (("a", slice(0, 3)), ("c", slice(3, 8))):
            a, b, scale = layer.adapters[name].low_rank(forward=True)
            expected[:, span] += scale * (x[:, span] @ a.T) @ b.T
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", ["lora[r=4]", "ia3", "seq_bn[reduction_factor=4]"])
def test_a_split_of_one_adapter_equals_it_and_another_adapter_changes_the_output(spec: str) -> None:
    """Position-local methods: a on every span is a, through the whole model (attention mixes tokens
    between sites, so the spans are checked site by site in the test above)."""
    model = _model(spec)
    inputs = sample_inputs(tiny_model("bert"), batch=2, seed=1)
    tokens = inputs["input_ids"].shape[1]
    with torch.no_grad():
        model.set_active("a")
        alone = output_tensor(model(**inputs))
        model.set_active(as_node(f"split(a, a, splits=[2, {tokens - 2}])"))
        twice = output_tensor(model(**inputs))
        model.set_active(as_node(f"split(a, b, splits=[2, {tokens - 2}])"))
        mixed = output_tensor(model(**inputs))
    torch.testing.assert_close(twice, alone, atol=1e-6, rtol=0)
    assert (mixed - alone).abs().max() > 1e-6  # b changed its tokens (tiny logits: a small change)


def test_a_forward_of_another_length_is_refused_with_how_to_fix_it() -> None:
    model = _model()
    model.set_active(as_node("split(a, b, splits=[3, 4])"))
    with pytest.raises(CompositionError, match=r"cuts sequences of 7 tokens.*pad or truncate"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))


def test_a_convolution_site_is_refused_not_cut_along_its_channels() -> None:
    base = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1))
    model = peftkit.AdaptedModel(base)
    for name in ("a", "b"):
        model.add_adapter(name, 'lora[r=2,target_modules=["0"]]')
    model.set_active(as_node("split(a, b, splits=[2, 2])"))
    with pytest.raises(CompositionError, match="convolution's output has channels, not tokens"):
        model(torch.randn(1, 4, 3))


def test_gradients_reach_each_adapter_from_its_own_tokens() -> None:
    model = _model()
    model.train_adapter(as_node("split(a, b, splits=[4, 4])"))
    layer = model.base_model.base_model.encoder.layer[0].attention.self.query
    x = torch.randn(1, 8, layer.base_layer.in_features)
    layer(x)[:, :4].sum().backward()  # only a's tokens
    for name, own in (("a", True), ("b", False)):
        grads = [p.grad for p in layer.adapters[name].parameters() if p.requires_grad]
        assert grads
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == own, name


# -- against AdapterHub's Split --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures() -> Path:
    return cached_fixtures('split-', 'make_split_fixtures.py', 'make_fixtures.py')


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bert_split_two", "bert_split_three", "bert_stack_of_split"])
def test_adapterhub_split_of_bottleneck_adapters_gives_the_same_outputs(fixtures: Path, case: str) -> None:
    folder = fixtures / case
    spec = json.loads((folder / "model.json").read_text())
    setup = json.loads((folder / "setup.json").read_text())
    base = transformers.BertModel(transformers.BertConfig(**spec["config"]))
    base.load_state_dict(load_file(str(folder / "base.safetensors")))
    model = peftkit.AdaptedModel(base.eval())
    for name in setup["adapters"]:
        model.load_adapter(str(folder / name), name)
    model.set_active(as_node(setup["composition"]))
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        got = model(input_ids=expected["input_ids"],
                    attention_mask=torch.ones_like(expected["input_ids"])).last_hidden_state
    torch.testing.assert_close(got, expected["output"], atol=1e-5, rtol=0)
    with torch.no_grad():
        model.set_active(setup["adapters"][0])
        alone = model(input_ids=expected["input_ids"]).last_hidden_state
    assert (alone - expected["output"]).abs().max() > 1e-3  # the split is not one adapter throughout
