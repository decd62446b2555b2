"""peftkit train's data side: reading JSONL/JSON/CSV, checking records (errors name
file and line), label maps, and tokenization per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.training_data import (DataError, Fields, LabelMap, PromptExample, TaggedExample, TextExample, encode,
                                   load_examples, read_records)
from tests.train_helpers import word_tokenizer, write_jsonl


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, task: str = "seq-cls", fields: Fields | None = None) -> str:
    with pytest.raises(DataError) as info:
        load_examples(path, task, fields or Fields())
    return str(info.value)


# -- reading ------------------------------------------------------------------------------


def test_jsonl_records_keep_their_line_numbers_and_skip_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    records = read_records(path)
    assert [(r.line, r.values["text"]) for r in records] == [(1, "a"), (3, "b")]
    assert records[1].where == f"{path}, line 3"



def test_unclosed_jsonl_object_reports_its_own_line_and_column(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n{"text": "c", "label": 1}\n')
    message = error_of(path)
    assert f"{path}, line 2: malformed JSON (Expecting ',' delimiter at column 25: the line ends before the " \
           "object is closed, a missing '}'?)" in message


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": }\n')
    message = error_of(path)
    assert f"{path}, line 2: malformed JSON" in message


def test_a_line_that_is_not_an_object_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n')
    assert f"{path}, line 2: expected a JSON object, found an array" in error_of(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, text):
    path = write(tmp_path / "d.jsonl", text)
    assert "holds no records" in error_of(path) and str(path) in error_of(path)


def test_csv_with_only_a_header_is_empty(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\n")
    assert "holds no records" in error_of(path) and "header" in error_of(path)


def test_missing_field_names_the_field_what_is_there_and_the_option(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "lbl": "y"}])
    message = error_of(path)
    assert f"{path}, line 2: missing field 'label'" in message
    assert "lbl, text" in message and "with label_field (--label-field)" in message


@pytest.mark.parametrize("row, expected", [
    ({"text": ["a"], "label": "x"}, "field 'text' must be a string, not an array"),
    ({"text": "a", "label": None}, "label field 'label' must be a string or an integer, not null"),
    ({"text": "a", "label": 1.5}, "not a number (1.5)"),
    ({"text": "a", "label": {"k": 1}}, "not an object"),
    ({"text": "   ", "label": "x"}, "field 'text' is empty"),
])
def test_wrong_types_name_the_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "x"}, row])
    message = error_of(path)
    assert f"{path}, line 2:" in message and expected in message


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 0}\n')
    assert f"{path}, line 2: not valid UTF-8" in error_of(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    assert "cannot tell the format" in error_of(write(tmp_path / "d.txt", "x"))
    assert "does not exist" in error_of(tmp_path / "nope.jsonl")


def test_json_array_file_reports_element_lines(tmp_path):
    good = write(tmp_path / "a.json", '[\n  {"text": "a", "label": "x"},\n  {"text": "b", "label": "y"}\n]\n')
    assert [(e.where, e.text) for e in load_examples(good, "seq-cls", Fields())] == [
        (f"{good}, line 2", "a"), (f"{good}, line 3", "b")]
    bad = write(tmp_path / "b.json", '[\n  {"text": "a", "label": "x"},\n  {"text": "b"}\n]\n')
    assert f"{bad}, line 3: missing field 'label'" in error_of(bad)


def test_csv_rows_report_their_first_line_also_after_a_multiline_cell(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"two\nlines",pos\nplain,neg\n"x",\n')
    examples = load_examples(write(tmp_path / "ok.csv", 'text,label\n"two\nlines",pos\nplain,neg\n'),
                             "seq-cls", Fields())
    assert [(e.where.rsplit(", ", 1)[1], e.text, e.label) for e in examples] == [
        ("line 2", "two\nlines", "pos"), ("line 4", "plain", "neg")]
    assert f"{path}, line 5: label field 'label' is empty" in error_of(path)


def test_csv_row_with_wrong_column_count(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\nok\tpos\ntoo\tmany\tcells\n")
    assert f"{path}, line 3: 3 columns, but the header has 2 (text, label); quote cells that contain '\\t'" \
        in error_of(path)
    short = write(tmp_path / "short.csv", "text,label\ngreat movie\n")
    assert error_of(short).endswith(f"{short}, line 2: 1 column, but the header has 2 (text, label); give every "
                                    f"column a cell (an empty one is two ',' in a row)")


def test_custom_field_names_and_text_pairs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"premise": "a", "hypothesis": "b", "gold": 2}])
    [example] = load_examples(path, "seq-cls", Fields(text="premise", text_pair="hypothesis", label="gold"))
    assert example == TextExample(f"{path}, line 1", "a", "b", "2")


# -- per task ----------------------------------------------------------------------------------


def test_token_cls_checks_lists(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "X"]},
                                              {"tokens": ["a", "b"], "tags": ["O"]}])
    assert f"{path}, line 2: 2 tokens but 1 tags" in error_of(path, "token-cls")
    path = write_jsonl(tmp_path / "e.jsonl", [{"tokens": ["a", 3], "tags": ["O", "X"]}])
    assert f"{path}, line 1: token 1 of field 'tokens' must be a non-empty string" in error_of(path, "token-cls")
    path = write_jsonl(tmp_path / "f.jsonl", [{"tokens": "a b", "tags": ["O", "X"]}])
    assert "field 'tokens' must be a list of tokens, not a string" in error_of(path, "token-cls")


def test_token_cls_from_csv_cells(tmp_path):
    path = write(tmp_path / "d.csv", 'tokens,tags\nalice met bob,NAME O NAME\n"[""a"", ""b""]","[""O"", 1]"\n')
    first, second = load_examples(path, "token-cls", Fields())
    assert first == TaggedExample(f"{path}, line 2", ["alice", "met", "bob"], ["NAME", "O", "NAME"])
    assert second.tokens == ["a", "b"] and second.tags == ["O", "1"]


def test_causal_lm_prompt_completion_and_plain_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "completion": "x"}, {"text": "t"}])
    with pytest.raises(DataError, match=r"line 2: missing field 'prompt'.*, or a plain-text field with text_field "
                                        r"\(--text-field\)"):
        load_examples(path, "causal-lm", Fields())
    plain = write_jsonl(tmp_path / "p.jsonl", [{"text": "all of it"}])
    assert load_examples(plain, "causal-lm", Fields(text="text")) == [
        PromptExample(f"{plain}, line 1", "", "all of it")]
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "completion": ""}])
    assert "field 'completion' is empty" in error_of(empty, "seq2seq")


# -- labels ------------------------------------------------------------------------------------


def _examples(labels: list) -> list[TextExample]:
    return [TextExample(f"f, line {i + 1}", "t", None, str(x)) for i, x in enumerate(labels)]


def test_label_order_numeric_for_integers_else_sorted():
    assert LabelMap.build(_examples([10, 2, 1, 2])).names == ["1", "2", "10"]
    assert LabelMap.build(_examples(["pos", "neg", "neutral"])).names == ["neg", "neutral", "pos"]


def test_explicit_labels_keep_their_order_and_must_cover_the_data():
    labels = LabelMap.build(_examples(["pos", "neg"]), ["pos", "neg", "neutral"])
    assert labels.names == ["pos", "neg", "neutral"]
    assert labels.config_kwargs() == {"num_labels": 3, "id2label": {0: "pos", 1: "neg", 2: "neutral"},
                                      "label2id": {"pos": 0, "neg": 1, "neutral": 2}}
    assert json.loads(json.dumps(labels.to_json()))["id2label"] == {"0": "pos", "1": "neg", "2": "neutral"}
    with pytest.raises(DataError, match=r"f, line 2: label 'other' is not in the labels list \(--labels\)"):
        LabelMap.build(_examples(["pos", "other"]), ["pos", "neg"])


def test_one_label_is_not_a_classification_task():
    with pytest.raises(DataError, match="only 1 distinct label"):
        LabelMap.build(_examples(["pos", "pos"]))


def test_unknown_label_in_eval_names_eval_file_and_line(tmp_path):
    train = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"},
                                                             {"text": "b", "label": "neg"}]), "seq-cls", Fields())
    dev = tmp_path / "dev.jsonl"
    evaluation = load_examples(write_jsonl(dev, [{"text": "c", "label": "neg"}, {"text": "d", "label": "meh"}]),
                               "seq-cls", Fields())
    with pytest.raises(DataError, match=rf"{dev}, line 2: label 'meh' is not in the training data"):
        LabelMap.build(train).check(evaluation)


# -- tokenization ------------------------------------------------------------------------------


def test_causal_lm_learns_only_the_completion_and_its_eos():
    tok = word_tokenizer("gpt")
    encoded = encode("causal-lm", tok, [PromptExample("w", "say next one", "two")], 64)
    [row] = encoded.features
    ids = tok.convert_tokens_to_ids(["say", "next", "one", "two", "[EOS]"])
    assert row["input_ids"] == ids and row["attention_mask"] == [1] * 5
    assert row["labels"] == [-100, -100, -100, ids[3], ids[4]]


def test_causal_lm_example_without_completion_tokens_after_truncation_is_skipped():
    tok = word_tokenizer("gpt")
    encoded = encode("causal-lm", tok, [PromptExample("f, line 1", "say next one two", "three"),
                                        PromptExample("f, line 2", "say", "one")], 3)
    assert encoded.skipped == ["f, line 1"]
    assert len(encoded.features) == 1


def test_token_cls_labels_first_subtoken_and_ignores_specials():
    tok = word_tokenizer("bert")
    labels = LabelMap(["NAME", "O"])
    [row] = encode("token-cls", tok, [TaggedExample("w", ["alice", "met", "bob"], ["NAME", "O", "NAME"])],
                   64, labels).features
    assert row["labels"] == [-100, 0, 1, 0, -100]  # [CLS] alice met bob [SEP]


def test_seq_cls_and_seq2seq_rows():
    tok = word_tokenizer("bert")
    [row] = encode("seq-cls", tok, [TextExample("w", "good movie", None, "pos")], 64,
                   LabelMap(["neg", "pos"])).features
    assert row["labels"] == 1 and len(row["input_ids"]) == 4
    [row] = encode("seq2seq", tok, [PromptExample("w", "say next one", "two")], 64).features
    assert row["labels"] == tok("two")["input_ids"] and row["input_ids"] == tok("say next one")["input_ids"]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


@pytest.mark.parametrize("name, task, count", [
    ("sentiment_train.jsonl", "seq-cls", 160), ("sentiment_eval.jsonl", "seq-cls", 40),
    ("sentiment_train.csv", "seq-cls", 40), ("topic_train.jsonl", "seq-cls", 160), ("topic_eval.jsonl", "seq-cls", 40),
    ("ner_train.jsonl", "token-cls", 80), ("ner_eval.jsonl", "token-cls", 20),
    ("instructions_train.jsonl", "causal-lm", 120), ("instructions_eval.jsonl", "seq2seq", 30)])
def test_example_datasets_are_valid(name, task, count):
    examples = load_examples(EXAMPLES / name, task, Fields())
    assert len(examples) == count
    if task in ("seq-cls", "token-cls"):
        assert len(LabelMap.build(examples).names) >= 2
