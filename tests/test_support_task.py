"""The support-message task family (peftkit.testing_intents): deterministic, balanced, a held-out split
in other words, label noise in training only, and the shipped files in examples/data up to date."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftkit.testing_intents import DEPARTMENTS, INTENTS, few_shot, support_task, vocabulary

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
#: Words that name an intent in the training split's requests; none may carry over to the held-out split.
TRAIN_KEYWORDS = {"refund", "delivery", "log", "password", "locked", "login", "subscription", "cancel", "membership",
                  "broken", "damaged", "cracked", "address", "charged", "charge", "charges", "twice", "wrong",
                  "jacket", "blender", "backpack", "camera"}


def test_same_seed_same_rows_other_seed_other_rows():
    assert support_task() == support_task()
    assert support_task(seed=1).train != support_task().train
    assert support_task(n_train=64).test == support_task().test  # held-out split independent of n_train


def test_held_out_split_uses_other_words():
    task = support_task()
    train, held_out = vocabulary(task.train), vocabulary(task.test)
    assert TRAIN_KEYWORDS <= train
    assert not TRAIN_KEYWORDS & held_out, sorted(TRAIN_KEYWORDS & held_out)
    assert len(held_out - train) > len(held_out) / 2  # most held-out words never occur in training
    assert not {text for text, _ in task.train} & {text for text, _ in task.test}


def test_balanced_labels_and_noise_in_training_only():
    clean, noisy = support_task(noise=0.0), support_task()
    assert [t for t, _ in clean.train] == [t for t, _ in noisy.train]  # noise changes labels, not texts
    flipped = sum(a != b for (_, a), (_, b) in zip(clean.train, noisy.train))
    assert 0.02 * len(clean.train) < flipped < 0.09 * len(clean.train)
    assert Counter(y for _, y in clean.train) == Counter({i: 40 for i in range(len(INTENTS))})
    assert Counter(y for _, y in noisy.test) == Counter({i: 20 for i in range(len(INTENTS))})


def test_department_labels_and_few_shot():
    intents, departments = support_task(noise=0.0), support_task(noise=0.0, labels="department")
    assert departments.labels == ("account", "billing", "returns", "shipping")
    for (text, intent), (same, department) in zip(intents.test, departments.test):
        assert text == same and departments.labels[department] == DEPARTMENTS[INTENTS[intent]]
    few = few_shot(intents, 16, seed=3)
    assert Counter(y for _, y in few.train) == Counter({i: 2 for i in range(len(INTENTS))})
    assert set(few.train) <= set(intents.train) and few.test == intents.test
    assert few_shot(intents, 16, seed=3) == few and few_shot(intents, 16, seed=4) != few
    with pytest.raises(ValueError, match="labels='topic'"):
        support_task(labels="topic")
    with pytest.raises(ValueError, match="n=0"):
        few_shot(intents, 0)


@pytest.mark.parametrize("labels", ["intent", "department"])
def test_shipped_files_are_the_generator_output(labels):
    task = support_task(labels=labels)
    for split, rows in (("train", task.train), ("eval", task.test)):
        lines = (DATA / f"support_{labels}_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == [{"text": t, "label": task.labels[y]} for t, y in rows], (
            "run examples/data/make_data.py")
