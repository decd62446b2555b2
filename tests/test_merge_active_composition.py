"""``merge_adapter()`` / ``merge_and_unload()`` without names merge the active composition. Before, they merged
the active adapters one after another whatever the composition, so an active ``average(a, b)`` became the sum
a + b (and a ``fuse``/``parallel`` a stack) in silence. Now an average of LoRA adapters is folded into one adapter
first (the same outputs), and any composition that is not a stack is refused by name."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.errors import MergeError
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny


def _two_loras() -> peftkit.AdaptedModel:
    model = peftkit.adapt(build_tiny("llama"), "lora")
    model.add_adapter("b", "lora")
    randomize(model, "default", seed=1)
    randomize(model, "b", seed=2)
    return model


def test_merge_and_unload_of_an_active_average_gives_the_average():
    model = _two_loras()
    model.set_active("average(default, b)")
    expected = output_of(model, "llama")
    model.set_active("stack(default, b)")
    assert (output_of(model, "llama") - expected).abs().max() > 1e-2  # the sum differs from the average
    model.set_active("average(default, b)")
    torch.testing.assert_close(output_of(model.merge_and_unload(), "llama"), expected, atol=1e-5, rtol=0)


def test_a_stack_still_merges_as_before():
    model = _two_loras()
    model.set_active("stack(default, b)")
    expected = output_of(model, "llama")
    torch.testing.assert_close(output_of(model.merge_and_unload(), "llama"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("composition", ["average(default, b)", "parallel(default, b)"])
def test_merge_adapter_refuses_a_composition_that_is_not_a_stack_and_changes_nothing(composition):
    model = _two_loras()
    model.set_active(composition)
    before = output_of(model, "llama")
    with pytest.raises(MergeError, match=r"is not a stack of adapters, so merging its adapters one after another "
                                         r"would not be the same model"):
        model.merge_adapter()
    assert model.merged_adapters == []
    torch.testing.assert_close(output_of(model, "llama"), before, atol=0, rtol=0)


def test_merge_and_unload_refuses_a_fusion():
    model = _two_loras()
    model.add_fusion('fuse(default, b, name="f")')
    model.set_active('fuse(default, b, name="f")')
    with pytest.raises(MergeError, match=r"cannot be merged into the base weights"):
        model.merge_and_unload()


@pytest.mark.parametrize("spec, why", [
    ("lora[lora_bias=true]", "has lora_bias=true: it changes its layers' biases"),
    ("lora[trainable_token_indices=[3]]", "has trainable_token_indices: it replaces embedding rows"),
])
def test_a_lora_changing_more_than_weights_is_refused_by_weight_space_merges(spec, why):
    """A merged adapter holds weight changes only: a member with B's bias or trained token rows is refused by name
    (PEFT's add_weighted_adapter drops them), also when merge_and_unload folds an active average."""
    model = peftkit.adapt(build_tiny("llama"), spec)
    model.add_adapter("other", "lora")
    with pytest.raises(MergeError, match=f"adapter 'default' {why}"):
        model.merge_adapters(["default", "other"], name="both", strategy="linear")
    assert "both" not in model.adapters
    model.set_active("average(default, other)")
    with pytest.raises(MergeError, match="only LoRA changes, without DoRA, lora_bias or trainable_token_indices"):
        model.merge_and_unload()
