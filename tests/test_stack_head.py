"""Which adapter's task head a stack predicts with: ``stack(..., head=NAME)``, else its last member's.

Tiny BERT classifiers built from configs (tests/test_head_labels.py's ``tiny``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.composition import Stack, parse
from peftkit.core.errors import CompositionError
from tests.test_head_labels import MOODS, TOPICS, logits, tiny, trained


def _model_with_zero() -> peftkit.AdaptedModel:
    """``a``: random LoRA weights and head; ``zero``: LoRA at its identity init with its own (base) head copy."""
    model = trained("a", MOODS, seed=3)
    model.add_adapter("zero", "lora[r=2]")
    return model


def test_the_named_head_predicts_whatever_the_order() -> None:
    model = _model_with_zero()
    model.set_active("a")
    alone = logits(model)
    model.set_active(Stack("zero", "a", head="a"))
    first = logits(model)
    model.set_active(parse("stack(a, zero, head=a)"))
    second = logits(model)
    assert torch.allclose(first, second, atol=1e-6) and torch.allclose(first, alone, atol=1e-6)


def test_without_head_a_stack_predicts_with_its_last_member_that_has_one() -> None:
    model = _model_with_zero()
    model.set_active("a")
    alone = logits(model)
    model.set_active(Stack("zero", "a"))
    assert torch.allclose(logits(model), alone, atol=1e-6)
    model.set_active(Stack("a", "zero"))  # zero's head (the base's) predicts on a's features
    last_zero = logits(model)
    assert not torch.allclose(last_zero, alone, atol=1e-3)
    model.set_active(Stack("a", "zero", head="zero"))
    assert torch.allclose(logits(model), last_zero, atol=1e-6)


def test_the_head_follows_labels_and_survives_a_composition_folder(tmp_path: Path) -> None:
    model = trained("topic", TOPICS, seed=4)
    mood = trained("mood", MOODS, seed=5)
    mood.save_adapter(str(tmp_path / "mood"), "mood")
    model.load_adapter(str(tmp_path / "mood"), "mood", activate=False)
    model.set_active(Stack("topic", "mood", head="topic"))
    expected = logits(model)
    assert expected.shape[-1] == 4 and model.config.id2label == dict(enumerate(TOPICS))
    model.save_composition(str(tmp_path / "both"))
    saved = json.loads((tmp_path / "both" / "composition.json").read_text())
    assert json.dumps(saved).count('"head": "topic"') == 1
    loaded = peftkit.AdaptedModel.load_composition(tiny(), str(tmp_path / "both"))
    assert loaded.active_composition == Stack("topic", "mood", head="topic")
    assert torch.allclose(logits(loaded), expected, atol=1e-6)


def test_a_head_that_is_no_member_or_keeps_no_head_is_refused() -> None:
    with pytest.raises(CompositionError, match="not a member of the stack; choose one of a, zero"):
        parse("stack(a, zero, head=b)")
    model = _model_with_zero()
    model.add_adapter("headless", "lora[r=2]", default_head=False)
    with pytest.raises(CompositionError, match="'headless' keeps no task head"):
        model.set_active(Stack("a", "headless", head="headless"))
