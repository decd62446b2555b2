"""A small sentence-classification task and a plain training loop, for "does it learn?"
tests and benchmarks (a demo data set, not a benchmark of language understanding).

:func:`sentiment_task` builds review-like sentences whose label is the
sentiment of their adjective. The held-out split uses other templates, other
adjectives and other subjects than the training split, so a model only scores
well there if it learned what the words mean, not which words occurred.
:func:`train_classifier` fine-tunes a sequence-classification model (a
peftkit AdaptedModel, a Hugging Face PEFT model or a bare model) on it with a
plain torch loop, and reports held-out accuracy and time.

Imports torch only when training.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

LABELS = ("negative", "positive")


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo task: an adapter spec (None: full fine-tuning of the
    encoder), its AdamW learning rate, and whether the classification head trains too."""

    spec: str | None
    lr: float
    train_head: bool = False


#: Runs that learn :func:`sentiment_task` on all-MiniLM-L6-v2 in 3 epochs of batches of 32.
#: The head stays frozen at its random initialization, so the accuracy is the method's own work
#: (a trained head alone learns part of the task: 0.59 in these 24 steps, 0.92 in 30 steps on
#: 320 sentences). Prompt tuning is the exception: a soft prompt alone on a model this small
#: learns a frozen random readout only for some seeds (0.5 to 1.0 held-out accuracy, even in 10
#: epochs), so it trains the head with it, as PEFT's SEQ_CLS task does, starting from embeddings
#: of random vocabulary tokens (0.83 to 0.93 over three seeds; from the default N(0, 1) rows the
#: pooled first position is an out-of-distribution token: 0.59 and 0.81 over two seeds).
#: Prefix tuning needs a far larger learning rate than the rest.
#: tests/test_learning.py asserts these learn; bench/bench_methods.py tabulates them.
SENTIMENT_RUNS: dict[str, DemoRun] = {
    "full": DemoRun(None, 1e-4),
    "lora": DemoRun("lora", 3e-3),
    "dora": DemoRun("lora[use_dora=true]", 3e-3),
    "seq_bn": DemoRun("seq_bn", 3e-3),
    "double_seq_bn": DemoRun("double_seq_bn", 3e-3),
    "par_bn": DemoRun("par_bn", 3e-4),
    "bitfit": DemoRun("bitfit", 1e-2),
    "ia3": DemoRun("ia3", 3e-2),
    "prefix_tuning": DemoRun("prefix_tuning", 5e-2),
    "prompt_tuning": DemoRun('prompt_tuning[init="sample_vocab"]', 1e-2, train_head=True),
    "mam": DemoRun("mam", 3e-4),  # a union: prefix tuning (through its MLP) + par_bn, one learning rate
    "lokr": DemoRun("lokr", 3e-2),
    "vera": DemoRun("vera", 1e-1),  # only the scaling vectors train, lambda_b from zero: 1e-2 learns nothing in 24 steps
    "oft": DemoRun("oft", 1e-2),
    # AdaLoRA: the budget falls from 12 to 8 per layer over steps 9-15. Its orthogonality regularizer at the
    # default weight 0.5 (or 0.1) keeps the frozen-head accuracy near chance in these 24 steps (0.51, 0.61
    # measured), so this short run leaves it out; without allocation the SVD form alone reaches 1.0 too.
    "adalora": DemoRun("adalora[total_step=24,tinit=8,tfinal=8,orth_reg_weight=0]", 3e-2),
}

#: (positive, negative) adjectives; training and held-out lists share no word.
_TRAIN_WORDS = (
    ["good", "great", "excellent", "wonderful", "delightful", "superb", "brilliant", "enjoyable", "lovely",
     "fantastic", "amazing", "charming", "moving", "impressive"],
    ["bad", "terrible", "awful", "boring", "dreadful", "horrible", "dull", "disappointing", "poor", "painful",
     "mediocre", "tedious", "annoying", "forgettable"],
)
_HELD_OUT_WORDS = (
    ["outstanding", "marvelous", "pleasant", "terrific", "splendid", "beautiful", "fun", "memorable"],
    ["lousy", "miserable", "pathetic", "unbearable", "bland", "weak", "clumsy", "unpleasant"],
)
_TRAIN_SUBJECTS = ["movie", "film", "book", "show", "album", "restaurant", "hotel", "story"]
_HELD_OUT_SUBJECTS = ["play", "novel", "concert", "meal", "series", "game"]
_TRAIN_TEMPLATES = [
    "the {s} was {a} .",
    "i thought the {s} was {a} .",
    "what {an} {s} .",
    "honestly , {an} {s} from start to finish .",
    "this {s} is really {a} .",
    "we all agreed the {s} was {a} .",
    "{an} {s} , no doubt about it .",
    "my verdict on the {s} : {a} .",
]
_HELD_OUT_TEMPLATES = [
    "overall the {s} felt {a} .",
    "my friends found the {s} {a} .",
    "it was {an} {s} , to be fair .",
    "i would call this {s} {a} .",
]


@dataclass(frozen=True)
class TextTask:
    """A text-classification data set: (text, label index) pairs and the label names."""

    name: str
    labels: tuple[str, ...]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


@dataclass
class TrainResult:
    """What :func:`train_classifier` measured."""

    accuracy: float
    seconds: float
    steps: int
    losses: list[float] = field(default_factory=list)


def _sentences(n: int, templates: list[str], subjects: list[str], words: tuple[list[str], list[str]],
               rng: random.Random) -> list[tuple[str, int]]:
    rows = []
    for i in range(n):
        label = i % 2  # balanced: 0 negative, 1 positive
        adjective = rng.choice(words[1] if label == 0 else words[0])
        article = "an" if adjective[0] in "aeiou" else "a"
        text = rng.choice(templates).format(s=rng.choice(subjects), a=adjective, an=f"{article} {adjective}")
        rows.append((text, label))
    rng.shuffle(rows)
    return rows


def sentiment_task(n_train: int = 256, n_test: int = 160, seed: int = 0) -> TextTask:
    """Balanced binary sentiment sentences; the held-out split shares no template,
    adjective or subject with the training split (chance accuracy is 0.5)."""
    rng = random.Random(seed)
    train = _sentences(n_train, _TRAIN_TEMPLATES, _TRAIN_SUBJECTS, _TRAIN_WORDS, rng)
    test = _sentences(n_test, _HELD_OUT_TEMPLATES, _HELD_OUT_SUBJECTS, _HELD_OUT_WORDS, rng)
    return TextTask("sentiment", LABELS, train, test)


def _batches(rows: Sequence[tuple[str, int]], tokenizer: Any, batch_size: int, max_length: int,
             order: list[int]) -> list[dict[str, Any]]:
    import torch

    out = []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start:start + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        batch["labels"] = torch.tensor([label for _, label in chunk])
        out.append(batch)
    return out


def _device(model: "nn.Module") -> Any:
    """Where the model's parameters are: batches are moved there."""
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def evaluate(model: "nn.Module", task: TextTask, tokenizer: Any, *, batch_size: int = 64,
             max_length: int = 32) -> float:
    """Held-out accuracy of ``model`` (argmax of its logits)."""
    import torch

    model.eval()
    device = _device(model)
    correct = 0
    with torch.no_grad():
        for batch in _batches(task.test, tokenizer, batch_size, max_length, list(range(len(task.test)))):
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1).cpu() == labels).sum())
    return correct / len(task.test)


class _TrainerEvents:
    """A peftkit model's training callbacks, called as ``transformers.Trainer`` calls them."""

    def __init__(self, model: Any, max_steps: int) -> None:
        self.callbacks: list[Any] = []
        if hasattr(model, "adapter_record"):  # a peftkit AdaptedModel
            from transformers import TrainerControl, TrainerState

            from peftkit.training_hooks import training_callbacks

            self.callbacks = training_callbacks(model)
            self.state, self.control = TrainerState(max_steps=max_steps), TrainerControl()

    def _call(self, event: str) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(None, self.state, self.control)

    def begin(self) -> None:
        self._call("on_train_begin")

    def optimizer_step(self, step: int) -> None:
        if self.callbacks:
            self.state.global_step = step
            self._call("on_optimizer_step")

    def end(self) -> None:
        self._call("on_train_end")


def train_classifier(model: "nn.Module", task: TextTask, tokenizer: Any, *, lr: float, epochs: int = 3,
                     batch_size: int = 32, max_length: int = 32, seed: int = 0, weight_decay: float = 0.0,
                     warmup_steps: int = 2, after_step: Callable[[int], None] | None = None,
                     optimizer: "torch.optim.Optimizer | None" = None) -> TrainResult:
    """Train every parameter of ``model`` that requires a gradient with AdamW (linear warmup,
    then linear decay to 0) on ``task.train``; return held-out accuracy and training time.

    ``model`` takes ``input_ids``, ``attention_mask`` and ``labels`` and returns ``.loss``
    and ``.logits`` (a transformers sequence-classification model, peftkit- or
    PEFT-adapted). The same seed gives the same batches for every model. A peftkit model's
    methods get their training callbacks (``peftkit.training_callbacks``: AdaLoRA's rank
    allocation and regularizer) at the points ``transformers.Trainer`` calls them;
    ``after_step(step)`` runs after each optimizer step, before the gradients are cleared
    (PEFT's AdaLoRA: ``model.base_model.update_and_allocate``). ``optimizer`` replaces the default
    AdamW over the trainable parameters (e.g. LoRA+'s parameter groups; ``lr`` and ``weight_decay``
    then come from it); the schedule scales each of its groups' learning rates.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_classifier: the model has no trainable parameter")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    epochs_batches = []
    for _ in range(epochs):
        order = list(range(len(task.train)))
        rng.shuffle(order)
        epochs_batches.append(_batches(task.train, tokenizer, batch_size, max_length, order))
    total = sum(len(b) for b in epochs_batches)
    warmup = max(0, min(warmup_steps, total - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    torch.manual_seed(seed)  # dropout masks
    losses: list[float] = []
    events = _TrainerEvents(model, total)
    start = time.perf_counter()
    model.train()
    device = _device(model)
    events.begin()
    for batches in epochs_batches:
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            events.optimizer_step(len(losses))
            if after_step is not None:
                after_step(len(losses))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    events.end()
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, task, tokenizer, max_length=max_length)
    return TrainResult(accuracy=accuracy, seconds=seconds, steps=total, losses=losses)
