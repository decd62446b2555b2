"""Training data for ``peftkit train``: read JSONL/CSV files, check every record,
map labels to ids, and tokenize per task.

Reading and checking import neither torch nor transformers, so a bad data file
fails in well under a second, before any model is loaded. Every error names
the file and the line (``data.jsonl, line 7: ...``).

Formats, chosen by the file's suffix:

- ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines are skipped);
- ``.json``: JSON Lines, or one JSON array of objects;
- ``.csv`` / ``.tsv``: a header row, then one record per row. Token and tag
  lists in a cell are a JSON array (``["EU", "rejects"]``) or words separated
  by whitespace (``EU rejects``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from peftkit.core.errors import PeftkitError
from peftkit.core.labels import LABELS_FILE, labels_document  # noqa: F401 - LABELS_FILE re-exported

#: The tasks ``peftkit train`` knows, by their CLI names.
TASKS = ("causal-lm", "seq-cls", "token-cls", "seq2seq")
CLASSIFICATION_TASKS = ("seq-cls", "token-cls")
#: The Hub's pipeline tag for each task (what model cards and hub search use).
PIPELINE_TAGS = {"causal-lm": "text-generation", "seq-cls": "text-classification",
                 "token-cls": "token-classification", "seq2seq": "text2text-generation"}
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


class DataError(PeftkitError, ValueError):
    """A training or evaluation data file cannot be used; the message names the file and line."""


# -- reading --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record of a data file and where it came from."""

    path: str
    line: int
    values: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}"


def read_records(path: str | os.PathLike) -> list[Record]:
    """Every record of a JSONL/JSON/CSV/TSV file; an unreadable, malformed or empty file is a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; give a .jsonl or .csv file")
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        records = list(_read_json(path))
    elif suffix in CSV_SUFFIXES:
        records = list(_read_csv(path, CSV_SUFFIXES[suffix]))
    else:
        raise DataError(f"cannot tell the format of {str(path)!r} from its suffix {suffix or '(none)'!r}; "
                        f"name it .jsonl (one JSON object per line), .json, .csv or .tsv")
    if not records:
        raise DataError(f"{path}: the file holds no records; it is empty"
                        + (" or has only a header row" if suffix in CSV_SUFFIXES else ""))
    return records


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoding line by line so a bad byte is located."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                                f"save the file as UTF-8") from None
            yield number, text


def _read_json(path: Path) -> Iterator[Record]:
    lines = list(_lines(path))
    first = next((text.lstrip() for _, text in lines if text.strip()), "")
    if first.startswith("["):
        yield from _read_json_array(path, "".join(text for _, text in lines))
        return
    for number, text in lines:
        if not text.strip():
            continue
        line = text.rstrip("\r\n")  # else an unclosed object is reported at column 1 of the next line
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            # JSON's own whitespace only: after a form feed (which str.rstrip() would drop) the object is closed
            unclosed = ": the line ends before the object is closed, a missing '}'?" \
                if exc.pos >= len(line.rstrip(" \t")) else ""
            raise DataError(f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno}{unclosed}); "
                            f"each line must be one JSON object, e.g. {{\"text\": \"...\", \"label\": \"pos\"}}"
                            ) from None
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, found {_json_type(value)}")
        yield Record(str(path), number, value)


def _read_json_array(path: Path, text: str) -> Iterator[Record]:
    """A JSON array of objects, parsed element by element so each error gets its line."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def line_at(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def skip_space(offset: int) -> int:
        while offset < len(text) and text[offset] in " \t\r\n":
            offset += 1
        return offset

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {line_at(pos)}: expected a JSON object in the array, "
                            f"found {_json_type(value)}")
        yield Record(str(path), line_at(pos), value)
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[skip_space(pos + 1):].strip():
                raise DataError(f"{path}, line {line_at(pos)}: unexpected text after the closing ']'")
            return
        raise DataError(f"{path}, line {line_at(pos)}: malformed JSON (expected ',' or ']' after an object)")


def _read_csv(path: Path, delimiter: str) -> Iterator[Record]:
    numbers: list[int] = []  # line number of every line the csv reader has consumed

    def texts() -> Iterator[str]:
        for number, text in _lines(path):
            numbers.append(number)
            yield text

    reader = csv.reader(texts(), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or not all(header):
            raise DataError(f"{path}, line 1: the header row must name every column once (found {header})")
        consumed = len(numbers)
        for row in reader:
            line = numbers[consumed] if consumed < len(numbers) else numbers[-1]  # the row's first line
            consumed = len(numbers)
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                fix = f"quote cells that contain {delimiter!r}" if len(row) > len(header) else \
                    f"give every column a cell (an empty one is two {delimiter!r} in a row)"
                raise DataError(f"{path}, line {line}: {len(row)} column{'s' * (len(row) != 1)}, but the header "
                                f"has {len(header)} ({', '.join(header)}); {fix}")
            yield Record(str(path), line, dict(zip(header, row)))
    except csv.Error as exc:
        raise DataError(f"{path}, line {numbers[-1] if numbers else 1}: malformed CSV ({exc})") from None


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number",
             dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# -- fields and examples -------------------------------------------------------------------


@dataclass(frozen=True)
class Fields:
    """Which record field holds what. ``text`` for causal-lm means plain language
    modelling (the whole text is learned) instead of prompt/completion pairs."""

    text: str | None = None
    text_pair: str | None = None
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"
    tokens: str = "tokens"
    tags: str = "tags"


@dataclass(frozen=True)
class TextExample:
    """seq-cls: a text (and optional second text) with a label name."""

    where: str
    text: str
    pair: str | None
    label: str


@dataclass(frozen=True)
class TaggedExample:
    """token-cls: words and one tag per word."""

    where: str
    tokens: list[str]
    tags: list[str]


@dataclass(frozen=True)
class PromptExample:
    """causal-lm and seq2seq: the model learns ``completion`` given ``prompt``."""

    where: str
    prompt: str
    completion: str


Example = TextExample | TaggedExample | PromptExample

def _field_option(kind: str) -> str:
    """The training option naming the field of ``kind``, as Python and the command line spell it."""
    return f"{kind}_field (--{kind.replace('_', '-')}-field)"


def _get(record: Record, name: str, kind: str, hint: str = "") -> Any:
    if name not in record.values:
        present = ", ".join(sorted(record.values)) or "no fields"
        raise DataError(f"{record.where}: missing field {name!r} (the record has: {present}); "
                        f"name the field that holds the {kind} with {_field_option(kind)}{hint}")
    return record.values[name]


def _string(record: Record, name: str, kind: str, *, allow_empty: bool = False, hint: str = "") -> str:
    value = _get(record, name, kind, hint)
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field {name!r} must be a string, not {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{record.where}: field {name!r} is empty")
    return value


def _label_name(value: Any, where: str, name: str) -> str:
    """A label as its name: strings as they are, integers (and integral floats) as digits."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: label field {name!r} is empty")
        return value
    raise DataError(f"{where}: label field {name!r} must be a string or an integer, not {_json_type(value)}"
                    + (f" ({value})" if isinstance(value, float) else ""))


def _word_list(record: Record, name: str, kind: str, csv_cell: bool) -> list[Any]:
    value = _get(record, name, kind)
    if csv_cell and isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{record.where}: field {name!r} starts with '[' but is not a JSON array "
                                f"({exc.msg})") from None
        else:
            value = text.split()
    if not isinstance(value, list):
        raise DataError(f"{record.where}: field {name!r} must be a list of {kind}, not {_json_type(value)}")
    if not value:
        raise DataError(f"{record.where}: field {name!r} is an empty list")
    return value


def to_examples(task: str, records: Iterable[Record], fields: Fields) -> list[Example]:
    """Check every record for ``task`` and turn it into an example (DataError names the line)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    out: list[Example] = []
    for record in records:
        csv_cell = Path(record.path).suffix.lower() in CSV_SUFFIXES
        if task == "seq-cls":
            text_field = fields.text or "text"
            text = _string(record, text_field, "text")
            pair = _string(record, fields.text_pair, "text_pair") if fields.text_pair else None
            label = _label_name(_get(record, fields.label, "label"), record.where, fields.label)
            out.append(TextExample(record.where, text, pair, label))
        elif task == "token-cls":
            tokens = _word_list(record, fields.tokens, "tokens", csv_cell)
            tags = _word_list(record, fields.tags, "tags", csv_cell)
            for i, token in enumerate(tokens):
                if not isinstance(token, str) or not token:
                    raise DataError(f"{record.where}: token {i} of field {fields.tokens!r} must be a non-empty "
                                    f"string, not {_json_type(token) if token != '' else 'an empty string'}")
            if len(tags) != len(tokens):
                raise DataError(f"{record.where}: {len(tokens)} tokens but {len(tags)} tags; give one tag per "
                                f"token")
            names = [_label_name(tag, f"{record.where} (tag {i})", fields.tags) for i, tag in enumerate(tags)]
            out.append(TaggedExample(record.where, list(tokens), names))
        elif fields.text and task == "causal-lm":
            out.append(PromptExample(record.where, "", _string(record, fields.text, "text")))
        else:
            hint = ", or a plain-text field with text_field (--text-field)" if task == "causal-lm" else ""
            prompt = _string(record, fields.prompt, "prompt", allow_empty=True, hint=hint)
            completion = _string(record, fields.completion, "completion", hint=hint)
            out.append(PromptExample(record.where, prompt, completion))
    return out


def load_examples(path: str | os.PathLike, task: str, fields: Fields) -> list[Example]:
    return to_examples(task, read_records(path), fields)


# -- labels ---------------------------------------------------------------------------------


@dataclass
class LabelMap:
    """Label names in id order. Built from the training data unless given explicitly."""

    names: list[str]
    _ids: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise DataError(f"label names must be unique: {self.names}")
        self._ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def build(cls, examples: Sequence[Example], explicit: Sequence[str] | None = None) -> "LabelMap":
        """The training labels (integer names in numeric order, others sorted), or
        ``explicit`` in the order given, which every training label must be in."""
        if explicit:
            labels = cls([str(x) for x in explicit])
            labels.check(examples, "the labels list (--labels)")
            return labels
        seen = sorted({name for ex in examples for name in _example_labels(ex)})
        if len(seen) < 2 and all(isinstance(ex, TextExample) for ex in examples):
            raise DataError(f"the training data has only {len(seen)} distinct label ({', '.join(seen)}); "
                            f"classification needs at least 2 (or list them all with labels, --labels)")
        if all(_is_int(s) for s in seen):
            seen.sort(key=int)
        return cls(seen)

    def id(self, name: str) -> int:
        return self._ids[name]

    def check(self, examples: Sequence[Example], source: str = "the training data") -> None:
        """Every label of ``examples`` must be known; the error names the first line that is not."""
        for ex in examples:
            for name in _example_labels(ex):
                if name not in self._ids:
                    raise DataError(f"{ex.where}: label {name!r} is not in {source} (labels: "
                                    f"{', '.join(self.names)}); fix the label, or list every label with labels "
                                    f"(--labels)")

    def to_json(self) -> dict[str, Any]:
        return labels_document(self.names)

    def config_kwargs(self) -> dict[str, Any]:
        """What a transformers classification model needs: num_labels, id2label, label2id."""
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": dict(self._ids)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LabelMap":
        return cls([str(x) for x in data["labels"]])


def _example_labels(ex: Example) -> list[str]:
    if isinstance(ex, TextExample):
        return [ex.label]
    if isinstance(ex, TaggedExample):
        return ex.tags
    return []


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


# -- tokenization -------------------------------------------------------------------------------

#: Tokenize this many examples per tokenizer call (fast tokenizers batch in Rust).
CHUNK = 1000


@dataclass
class Encoded:
    """Tokenized features, ready for a data collator, and the examples left out."""

    features: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)


def encode(task: str, tokenizer: Any, examples: Sequence[Example], max_length: int,
           labels: LabelMap | None = None) -> Encoded:
    """Tokenize ``examples`` for ``task``. Labels are token ids for generation tasks
    (-100 where no loss is taken) and label ids for classification."""
    encoder = {"seq-cls": _encode_seq_cls, "token-cls": _encode_token_cls, "causal-lm": _encode_causal_lm,
               "seq2seq": _encode_seq2seq}[task]
    out = Encoded([])
    for start in range(0, len(examples), CHUNK):
        encoder(tokenizer, examples[start:start + CHUNK], max_length, labels, out)
    return out


def _encode_seq_cls(tokenizer: Any, examples: Sequence[Example], max_length: int, labels: LabelMap | None,
                    out: Encoded) -> None:
    assert labels is not None
    texts = [ex.text for ex in examples]  # type: ignore[union-attr]
    pairs = [ex.pair for ex in examples] if examples and examples[0].pair is not None else None  # type: ignore
    batch = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    for i, ex in enumerate(examples):
        row = {key: batch[key][i] for key in batch.keys()}
        row["labels"] = labels.id(ex.label)  # type: ignore[union-attr]
        out.features.append(row)


def _encode_token_cls(tokenizer: Any, examples: Sequence[Example], max_length: int, labels: LabelMap | None,
                      out: Encoded) -> None:
    assert labels is not None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"token-cls needs a fast tokenizer (it maps sub-tokens back to words), but "
                        f"{type(tokenizer).__name__} is not one; use a model folder with tokenizer.json")
    batch = tokenizer([ex.tokens for ex in examples], is_split_into_words=True,  # type: ignore[union-attr]
                      truncation=True, max_length=max_length)
    for i, ex in enumerate(examples):
        row = {key: batch[key][i] for key in batch.keys()}
        tag_ids, previous = [], None
        for word in batch.word_ids(i):
            # Only the first sub-token of a word carries its tag; the rest and special tokens are ignored.
            tag_ids.append(-100 if word is None or word == previous else labels.id(ex.tags[word]))  # type: ignore
            previous = word
        row["labels"] = tag_ids
        out.features.append(row)


def _encode_causal_lm(tokenizer: Any, examples: Sequence[Example], max_length: int, labels: LabelMap | None,
                      out: Encoded) -> None:
    prompts = tokenizer([ex.prompt for ex in examples], add_special_tokens=True)["input_ids"]  # type: ignore
    completions = tokenizer([ex.completion for ex in examples], add_special_tokens=False)["input_ids"]  # type: ignore
    eos = tokenizer.eos_token_id
    for ex, prompt_ids, completion_ids in zip(examples, prompts, completions):
        prompt_ids = list(prompt_ids)
        if eos is not None and prompt_ids and prompt_ids[-1] == eos:
            prompt_ids.pop()  # tokenizers that end every text with EOS: the completion follows the prompt
        completion_ids = list(completion_ids) + ([eos] if eos is not None else [])
        input_ids = (prompt_ids + completion_ids)[:max_length]
        target = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
        target[0] = -100  # nothing predicts the first token
        if all(t == -100 for t in target):
            out.skipped.append(ex.where)
            continue
        out.features.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": target})


def _encode_seq2seq(tokenizer: Any, examples: Sequence[Example], max_length: int, labels: LabelMap | None,
                    out: Encoded) -> None:
    batch = tokenizer([ex.prompt for ex in examples], truncation=True, max_length=max_length)  # type: ignore
    targets = tokenizer(text_target=[ex.completion for ex in examples], truncation=True,  # type: ignore
                        max_length=max_length)["input_ids"]
    for i in range(len(examples)):
        row = {key: batch[key][i] for key in batch.keys()}
        row["labels"] = list(targets[i])
        out.features.append(row)


def data_collator(task: str, tokenizer: Any, model: Any = None) -> Any:
    """Pads a batch: inputs with the pad token, labels with -100 (ignored by the loss).
    For seq2seq, ``model`` makes the decoder inputs from the labels (shifted right)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    if task == "seq-cls":
        return DataCollatorWithPadding(tokenizer)
    if task == "token-cls":
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=-100)
    if task == "seq2seq":
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
