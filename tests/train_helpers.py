"""Helpers for the ``peftkit train`` tests: tiny model folders with a word-level
tokenizer (built here, no downloads) and small synthetic datasets."""

from __future__ import annotations

import contextlib
import json
import random
import socket
from pathlib import Path
from typing import Any, Iterator

from tests.tiny_models import VOCAB, build_tiny

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice", "happy", "wonderful"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "sad", "boring", "ugly", "dreadful"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "was", "is", "very", "really", "and", "acting", "story", "quite",
           "show", "music", "ending"]
NAMES = ["alice", "bob", "paris", "london", "acme", "globex"]
OTHER = ["visited", "met", "works", "at", "in", "lives", "with"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]", "[MASK]"]
WORDS = SPECIALS + POSITIVE + NEGATIVE + NEUTRAL + NAMES + OTHER + DIGITS + ["next", "after", "say"]


def word_tokenizer(style: str = "bert") -> Any:
    """A fast word-level tokenizer over WORDS. ``bert``: [CLS] ... [SEP] around every
    text, pad [PAD]; ``gpt``: no special tokens added, EOS [EOS] and no pad token
    (like GPT-2, so training must pick a pad token itself)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    assert len(WORDS) <= VOCAB
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_max_length=64)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=64)


#: Which tiny model and tokenizer style each task trains.
TASK_MODELS = {"seq-cls": ("bert", "bert"), "token-cls": ("bert", "bert"), "causal-lm": ("gpt2", "gpt"),
               "seq2seq": ("t5", "bert")}


def model_folder(path: Path, name: str, style: str) -> Path:
    """Save tiny model ``name`` with a word tokenizer to ``path``."""
    model = build_tiny(name)
    model.save_pretrained(path)
    word_tokenizer(style).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sentences whose label is the polarity of the one sentiment word in them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        words = rng.sample(NEUTRAL, 4)
        words.insert(rng.randrange(len(words) + 1), word)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def ner_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Words tagged NAME or O."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = [rng.choice(NAMES), rng.choice(OTHER), rng.choice(NAMES), rng.choice(NEUTRAL)]
        rng.shuffle(tokens)
        rows.append({"tokens": tokens, "tags": ["NAME" if t in NAMES else "O" for t in tokens]})
    return rows


def counting_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """prompt 'say next three' -> completion 'four': a mapping a tiny model learns fast."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        d = rng.randrange(9)
        rows.append({"prompt": f"say next {DIGITS[d]}", "completion": DIGITS[d + 1]})
    return rows


def rows_for(task: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    return {"seq-cls": sentiment_rows, "token-cls": ner_rows, "causal-lm": counting_rows,
            "seq2seq": counting_rows}[task](n, seed)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block. On a shared 2-core machine one
    thread is several times faster for tiny models than two contending ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
