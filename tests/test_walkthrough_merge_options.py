"""Merge options a PEFT user passes by habit: each one either changes the merge or is refused, naming why.

PEFT's ``add_weighted_adapter`` ignores ``density`` for svd/cat/linear and ``majority_sign_method`` outside
the TIES strategies, and takes ``density=0`` (an all-zero merge, or a division by zero for DARE); peftkit
refuses those with the strategies that read the option. A ``cat`` merge with a DoRA member names it.
"""

from __future__ import annotations

import pytest

import peftkit
from tests.test_merging import TARGETS
from tests.tiny_models import build_tiny


def _model(*specs: str) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny("llama"))
    for i, spec in enumerate(specs or (f"lora[r=4,init_weights=false,target_modules={TARGETS}]",) * 2):
        model.add_adapter("ab"[i], spec)
    return model.eval()


@pytest.mark.parametrize("strategy, options, fragment", [
    ("svd", {"density": 0.5}, "density=0.5 has no effect on strategy 'svd'; it is read by dare_linear, dare_ties, "
                              "magnitude_prune, ties"),
    ("cat", {"density": 0.5}, "has no effect on strategy 'cat'"),
    ("linear", {"density": 0.5}, "has no effect on strategy 'linear'"),
    ("ties", {"density": 0.0}, "a number in \\(0, 1\\] \\(0 keeps none"),
    ("dare_linear", {"density": 0}, "a number in \\(0, 1\\]"),
    ("dare_linear", {"density": 0.5, "majority_sign_method": "frequency"},
     "majority_sign_method='frequency' has no effect on strategy 'dare_linear'; it elects signs in dare_ties, ties"),
    ("svd", {"majority_sign_method": "frequency"}, "has no effect on strategy 'svd'"),
    ("svd", {"majority_sign_method": "total"}, "majority_sign_method='total' has no effect on strategy 'svd'"),
])
def test_an_option_the_strategy_does_not_read_is_refused(strategy, options, fragment):
    model = _model()
    with pytest.raises(peftkit.MergeError, match=fragment):
        model.merge_adapters(["a", "b"], [0.5, 0.5], "m", strategy, **options)
    with pytest.raises(peftkit.MergeError, match=fragment):  # PEFT's spelling too
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type=strategy, **options)
    assert list(model.adapters) == ["a", "b"]


@pytest.mark.parametrize("strategy, options", [
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("dare_ties_svd", {"density": 1.0, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
    ("svd", {}),
])
def test_options_the_strategy_reads_are_taken(strategy, options):
    model = _model()
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type=strategy, **options)
    assert "m" in model.adapters


def test_a_cat_merge_with_a_dora_member_names_it():
    model = _model(f"lora[r=4,init_weights=false,target_modules={TARGETS}]",
                   f"lora[r=4,use_dora=true,init_weights=false,target_modules={TARGETS}]")
    with pytest.raises(peftkit.MergeError, match="which b \\(DoRA: its change rescales the base weight's rows\\) "
                                                 "lack; use strategy='linear'"):
        model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "m", combination_type="cat")
    assert list(model.adapters) == ["a", "b"]
