"""Token classification with a real sub-word tokenizer (all-MiniLM-L6-v2's WordPiece): each word's tag
goes on its first sub-token only; its other sub-tokens and the special tokens are ignored (-100)."""

from __future__ import annotations

from transformers import AutoTokenizer

from peftkit.training_data import LabelMap, TaggedExample, encode

from .tiny_models import minilm_path

IGNORED = -100
WORDS = ["alice", "deployed", "Kubernetes", "unbelievably", "fast"]
TAGS = ["NAME", "O", "TECH", "O", "O"]


def _expected(tokenizer, words, tags, labels):
    """[CLS] + per word: its tag id, then IGNORED for each further sub-token + [SEP], from tokenizing
    each word alone (not from the word_ids() the encoder uses)."""
    out = [IGNORED]
    for word, tag in zip(words, tags):
        pieces = tokenizer.tokenize(word)
        out += [labels.id(tag)] + [IGNORED] * (len(pieces) - 1)
    return out + [IGNORED]


def test_token_cls_tags_the_first_sub_token_of_each_word_only():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    assert [len(tokenizer.tokenize(w)) for w in WORDS] == [1, 1, 4, 5, 1]  # two words split into sub-tokens
    labels = LabelMap(["NAME", "O", "TECH"])
    [row] = encode("token-cls", tokenizer, [TaggedExample("w", WORDS, TAGS)], 64, labels).features
    assert len(row["labels"]) == len(row["input_ids"]) == 1 + 12 + 1
    assert row["labels"] == _expected(tokenizer, WORDS, TAGS, labels)
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    tagged = [(tok, labels.names[i]) for tok, i in zip(tokens, row["labels"]) if i != IGNORED]
    assert tagged == [("alice", "NAME"), ("deployed", "O"), ("ku", "TECH"), ("un", "O"), ("fast", "O")]


def test_a_word_cut_by_max_length_keeps_its_tag_on_the_first_sub_token():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    labels = LabelMap(["NAME", "O", "TECH"])
    [row] = encode("token-cls", tokenizer, [TaggedExample("w", WORDS, TAGS)], 6, labels).features
    # [CLS] alice deployed ku ##ber [SEP]: Kubernetes is cut after two of its four sub-tokens
    assert tokenizer.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "alice", "deployed", "ku", "##ber", "[SEP]"]
    assert row["labels"] == [IGNORED, labels.id("NAME"), labels.id("O"), labels.id("TECH"), IGNORED, IGNORED]
