"""Token classification with a real sub-word tokenizer (all-MiniLM-L6-v2's WordPiece): each word's tag
goes on its first sub-token only; its other sub-tokens and the special tokens are ignored (-100)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftkit.training_data import DataError, LabelMap, TaggedExample, encode

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


def test_label_map_documents_round_trip_and_give_the_model_its_label_ids():
    labels = LabelMap(["neg", "pos", "10"])
    document = labels.to_json()
    assert document == {"labels": ["neg", "pos", "10"], "label2id": {"neg": 0, "pos": 1, "10": 2},
                        "id2label": {"0": "neg", "1": "pos", "2": "10"}}
    again = LabelMap.from_json({"labels": ["neg", "pos", 10]})  # names are strings, in the order given
    assert again.names == ["neg", "pos", "10"] and again.id("10") == 2
    assert labels.config_kwargs() == {"num_labels": 3, "id2label": {0: "neg", 1: "pos", 2: "10"},
                                      "label2id": {"neg": 0, "pos": 1, "10": 2}}


def _padded(task: str, features: list[dict], model=None) -> tuple[dict, int]:
    from peftkit.training_data import data_collator

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return data_collator(task, tokenizer, model)([dict(f) for f in features]), tokenizer.pad_token_id


def test_collators_pad_inputs_with_the_pad_token_and_labels_with_ignored_ids():
    short, long = {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1]}, \
        {"input_ids": [101, 7, 8, 9, 102], "attention_mask": [1, 1, 1, 1, 1]}
    batch, pad = _padded("seq-cls", [{**short, "labels": 1}, {**long, "labels": 0}])
    assert batch["input_ids"].tolist() == [[101, 7, 102, pad, pad], [101, 7, 8, 9, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [1, 0]
    for task in ("token-cls", "causal-lm"):
        batch, pad = _padded(task, [{**short, "labels": [IGNORED, 2, IGNORED]}, {**long, "labels": [IGNORED, 0, 1, 2, 3]}])
        assert batch["input_ids"].tolist() == [[101, 7, 102, pad, pad], [101, 7, 8, 9, 102]], task
        assert batch["labels"].tolist() == [[IGNORED, 2, IGNORED, IGNORED, IGNORED], [IGNORED, 0, 1, 2, 3]], task
        assert "decoder_input_ids" not in batch


def test_the_seq2seq_collator_makes_decoder_inputs_from_the_labels_shifted_right():
    from .tiny_models import build_tiny

    model = build_tiny("t5")  # decoder_start_token_id 0, pad 0
    batch, _ = _padded("seq2seq", [{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [7, 8, 1]},
                                   {"input_ids": [5], "attention_mask": [1], "labels": [9, 1]}], model)
    assert batch["labels"].tolist() == [[7, 8, 1], [9, 1, IGNORED]]
    assert batch["decoder_input_ids"].tolist() == [[0, 7, 8], [0, 9, 1]]


# -- JSON arrays, element by element ---------------------------------------------------------------------


def _array_file(tmp_path, text: str):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_compact_json_array_with_nested_lists_gives_every_record_and_its_line(tmp_path):
    from peftkit.training_data import read_records

    path = _array_file(tmp_path, '[{"tokens": ["a", "b"], "tags": ["X", "O"]},{"tokens": ["c"], "tags": ["O"]}]')
    records = read_records(path)
    assert [(r.line, r.values) for r in records] == [
        (1, {"tokens": ["a", "b"], "tags": ["X", "O"]}), (1, {"tokens": ["c"], "tags": ["O"]})]
    # a blank first line: the elements' lines count it
    path = _array_file(tmp_path, '\n[\n{"text": "a", "label": "x"},\n  5]')
    with pytest.raises(DataError, match=r"data.json, line 4: expected a JSON object in the array, found a number"):
        read_records(path)


@pytest.mark.parametrize("text, message", [
    ("[ ]\n", "the file holds no records"),
    ("[]", "the file holds no records"),
    ("[", r"line 1: malformed JSON \("),
    ('[{"text": "a", "label": "b"}', r"line 1: malformed JSON \(expected ',' or '\]' after an object\)"),
    ('[{"text": "a", "label": "b"}, X]', r"line 1: malformed JSON \("),
    ('[{"text": "a", "label": "b"} X]', r"line 1: malformed JSON \(expected ',' or '\]' after an object\)"),
    ('[{"text": "a", "label": "b"}]x', r"line 1: unexpected text after the closing '\]'"),
])
def test_json_arrays_that_hold_nothing_or_are_malformed_are_refused_by_line(tmp_path, text, message):
    from peftkit.training_data import read_records

    with pytest.raises(DataError, match=message):
        read_records(_array_file(tmp_path, text))


def test_a_token_cls_record_without_its_tags_names_the_option_for_them(tmp_path):
    from peftkit.training_data import Fields, load_examples

    path = _array_file(tmp_path, '[{"tokens": ["a"]}]')
    with pytest.raises(DataError, match=r"missing field 'tags' .*name the field that holds the tags with tags_field "
                                        r"\(--tags-field\)"):
        load_examples(path, "token-cls", Fields())


# -- tokenization by task -----------------------------------------------------------------------------


def test_seq_cls_encodes_text_pairs_together_and_truncates_to_max_length():
    from peftkit.training_data import TextExample

    from .train_helpers import word_tokenizer

    tok = word_tokenizer("bert")
    labels = LabelMap(["neg", "pos"])
    [row] = encode("seq-cls", tok, [TextExample("w", "good movie", "bad plot", "pos")], 64, labels).features
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "good", "movie", "[SEP]", "bad", "plot", "[SEP]"]
    assert row["labels"] == 1
    [row] = encode("seq-cls", tok, [TextExample("w", "good movie was very good", None, "neg")], 4, labels).features
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "good", "movie", "[SEP]"]


def _eos_tokenizer():
    """A word tokenizer that ends every text with [EOS] (as some LM tokenizers do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .train_helpers import WORDS

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", model_max_length=64)


def test_causal_lm_takes_the_prompts_special_tokens_but_not_the_completions():
    from peftkit.training_data import PromptExample

    from .train_helpers import word_tokenizer

    bert = word_tokenizer("bert")  # [CLS] ... [SEP] around every text, no EOS token
    [row] = encode("causal-lm", bert, [PromptExample("w", "say next", "two")], 64).features
    assert bert.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "say", "next", "[SEP]", "two"]
    assert row["labels"] == [IGNORED] * 4 + [bert.convert_tokens_to_ids("two")]
    eos = _eos_tokenizer()  # "... [EOS]" for every text: the prompt's EOS is dropped, the completion gets one
    [row] = encode("causal-lm", eos, [PromptExample("w", "say next", "two")], 64).features
    assert eos.convert_ids_to_tokens(row["input_ids"]) == ["say", "next", "two", "[EOS]"]
    assert row["labels"] == [IGNORED, IGNORED] + eos.convert_tokens_to_ids(["two", "[EOS]"])
    gpt = word_tokenizer("gpt")  # plain text (empty prompt): every token but the first is learned
    [row] = encode("causal-lm", gpt, [PromptExample("w", "", "say next one")], 64).features
    assert row["labels"] == [IGNORED] + gpt.convert_tokens_to_ids(["next", "one", "[EOS]"])


def test_seq2seq_truncates_both_the_prompt_and_the_target_to_max_length():
    from peftkit.training_data import PromptExample

    from .train_helpers import word_tokenizer

    tok = word_tokenizer("bert")
    [row] = encode("seq2seq", tok, [PromptExample("w", "say one two three four", "five six seven eight")], 4).features
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "say", "one", "[SEP]"]
    assert tok.convert_ids_to_tokens(row["labels"]) == ["[CLS]", "five", "six", "[SEP]"]


# -- records, fields and labels --------------------------------------------------------------------------


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_files_skip_blank_rows_and_refuse_repeated_columns(tmp_path):
    from peftkit.training_data import read_records

    path = _write(tmp_path, "d.csv", "text,label\na,pos\n\n,\nb,neg\n")
    assert [(r.line, r.values) for r in read_records(path)] == [
        (2, {"text": "a", "label": "pos"}), (5, {"text": "b", "label": "neg"})]
    with pytest.raises(DataError, match=r"d.csv, line 1: the header row must name every column once"):
        read_records(_write(tmp_path, "d.csv", "text,text\na,b\n"))
    with pytest.raises(DataError, match=r"the file holds no records; it is empty or has only a header row"):
        read_records(_write(tmp_path, "d.csv", ""))


def _error(tmp_path, rows: str, task: str = "seq-cls", **fields) -> str:
    from peftkit.training_data import Fields, load_examples

    with pytest.raises(DataError) as info:
        load_examples(_write(tmp_path, "d.jsonl", rows), task, Fields(**fields))
    return str(info.value)


def test_field_errors_name_the_field_its_type_and_the_option_that_names_it(tmp_path):
    where = f"{tmp_path / 'd.jsonl'}, line 1"
    assert _error(tmp_path, '{"label": "x"}\n') == (
        f"{where}: missing field 'text' (the record has: label); name the field that holds the text with text_field "
        f"(--text-field)")
    assert _error(tmp_path, "{}\n", label="y", text="t").endswith(
        "missing field 't' (the record has: no fields); name the field that holds the text with text_field "
        "(--text-field)")
    assert _error(tmp_path, '{"text": "a", "label": "x"}\n', text_pair="b").endswith(
        "missing field 'b' (the record has: label, text); name the field that holds the text_pair with "
        "text_pair_field (--text-pair-field)")
    assert _error(tmp_path, '{"text": true, "label": "x"}\n') == f"{where}: field 'text' must be a string, not true/false"
    assert _error(tmp_path, '{"text": 3, "label": "x"}\n') == f"{where}: field 'text' must be a string, not a number"
    assert _error(tmp_path, '{"prompt": "p"}\n', task="seq2seq").endswith(
        "missing field 'completion' (the record has: prompt); name the field that holds the completion with "
        "completion_field (--completion-field)")


def test_label_names_from_booleans_integral_floats_and_the_order_of_integer_names(tmp_path):
    from peftkit.training_data import Fields, TextExample, load_examples

    rows = '{"text": "a", "label": true}\n{"text": "b", "label": false}\n{"text": "c", "label": 2.0}\n'
    examples = load_examples(_write(tmp_path, "d.jsonl", rows), "seq-cls", Fields())
    assert [ex.label for ex in examples] == ["true", "false", "2"]

    def names(labels):
        return LabelMap.build([TextExample("w", "t", None, label) for label in labels]).names

    assert names(["10", "-1", "2"]) == ["-1", "2", "10"]  # integers in numeric order
    assert names(["X1", "2", "10"]) == ["10", "2", "X1"]  # not all integers: sorted as text
    assert names(["1-", "2"]) == ["1-", "2"]


def test_prompt_completion_records_and_their_errors_by_task(tmp_path):
    from peftkit.training_data import Fields, PromptExample, load_examples

    path = _write(tmp_path, "d.jsonl", '{"prompt": "", "completion": "say", "body": "one two"}\n')
    where = f"{path}, line 1"
    assert load_examples(path, "seq2seq", Fields()) == [PromptExample(where, "", "say")]
    assert load_examples(path, "causal-lm", Fields(text="body")) == [PromptExample(where, "", "one two")]
    assert _error(tmp_path, '{"prompt": "p"}\n', task="causal-lm") == (
        f"{where}: missing field 'completion' (the record has: prompt); name the field that holds the completion "
        f"with completion_field (--completion-field), or a plain-text field with text_field (--text-field)")
    assert _error(tmp_path, '{"prompt": "p"}\n', task="seq2seq").endswith("with completion_field (--completion-field)")
    assert _error(tmp_path, '{"prompt": "p"}\n', task="causal-lm", text="body").endswith(
        "missing field 'body' (the record has: prompt); name the field that holds the text with text_field "
        "(--text-field)")


def test_token_cls_record_errors_name_the_tags_field_and_the_tag(tmp_path):
    assert _error(tmp_path, '{"tokens": ["a"]}\n', task="token-cls").endswith(
        "missing field 'tags' (the record has: tokens); name the field that holds the tags with tags_field "
        "(--tags-field)")
    assert _error(tmp_path, '{"tokens": ["a"], "tags": "O"}\n', task="token-cls").endswith(
        "field 'tags' must be a list of tags, not a string")
    assert _error(tmp_path, '{"tokens": ["a", "b"], "tags": ["O", null]}\n', task="token-cls").endswith(
        "line 1 (tag 1): label field 'tags' must be a string or an integer, not null")


def test_token_cls_needs_a_fast_tokenizer_and_truncates_to_max_length():
    from .train_helpers import word_tokenizer

    labels = LabelMap(["O", "X"])
    example = TaggedExample("w", ["alice", "met", "bob", "in", "paris"], ["X", "O", "X", "O", "X"])

    class Slow:  # no is_fast attribute: a slow tokenizer cannot map sub-tokens back to words
        pass

    with pytest.raises(DataError, match="token-cls needs a fast tokenizer"):
        encode("token-cls", Slow(), [example], 8, labels)
    [row] = encode("token-cls", word_tokenizer("bert"), [example], 4, labels).features
    assert row["labels"] == [IGNORED, 1, 0, IGNORED]  # [CLS] alice met [SEP]


def test_jsonl_byte_order_mark_indented_arrays_and_malformed_lines(tmp_path):
    from peftkit.training_data import read_records

    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'.encode())
    assert [r.values["text"] for r in read_records(path)] == ["a", "b"]
    records = read_records(_write(tmp_path, "d.json", '  [\n  {"text": "a", "label": "x"}\n]\n'))
    assert [(r.line, r.values["text"]) for r in records] == [(2, "a")]
    with pytest.raises(DataError, match=r"d.jsonl, line 1: malformed JSON \(Extra data at column 11\)"):
        read_records(_write(tmp_path, "d.jsonl", '{"a": "b"}X\n'))
    with pytest.raises(DataError) as info:
        read_records(_write(tmp_path, "d.jsonl", '{"text": "a" "label": 1}\n'))
    assert "(Expecting ',' delimiter at column 14); each line must be one JSON object" in str(info.value)


def test_only_the_files_first_bytes_are_a_byte_order_mark_and_a_jsonl_line_is_strict_json(tmp_path):
    """U+FEFF at the start of a later line is text (a zero-width no-break space), kept in the cell; a line
    ends at its newline only, so a form feed after the object is extra data, as JSON has it (and the object is
    closed: no hint of a missing '}')."""
    from peftkit.training_data import read_records

    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\n\ufeffa,pos\n".encode())
    assert [(r.line, r.values) for r in read_records(path)] == [(2, {"text": "\ufeffa", "label": "pos"})]
    with pytest.raises(DataError, match=r"d.jsonl, line 2: malformed JSON \(Extra data at column 11\); each line"):
        read_records(_write(tmp_path, "d.jsonl", '{"a": "b"}\n{"a": "c"}\x0c\n'))
    with pytest.raises(DataError, match=r"line 1: malformed JSON \(Expecting ',' delimiter at column 14: the line ends"):
        read_records(_write(tmp_path, "d.jsonl", '{"a": "b" \t  \n'))
