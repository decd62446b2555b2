"""Property-based tests of the names the hub reads from users and clients: repo
references (``org/name@rev``), the registry's repo, account, file and revision
names, and model-card front matter.

Valid input round-trips (printed, then parsed back equal); any other input is
refused with the library's own error (InvalidRepoRef, InvalidRepoId,
InvalidPath, InvalidRevision, CardError), never a crash.
"""

from __future__ import annotations

import json
import posixpath

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peftkit.core.card import card_metadata, read_card_metadata, render_card
from peftkit.core.errors import ConfigError
from peftkit.hub_client.errors import InvalidRepoRef
from peftkit.hub_client.resolve import RepoRef, parse_ref
from peftkit.hub_rules.cards import CardError, split_front_matter
from peftkit.hub_rules.names import MAX_NAME_LENGTH, is_commit_sha
from peftkit.registry import names
from peftkit.registry.cards import extract_metadata, indexable, validate_card
from peftkit.registry.errors import InvalidPath, InvalidRepoId, InvalidRevision

BOUNDED = settings(max_examples=100, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

_NAME = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_.\-]{0,20}[A-Za-z0-9_])?", fullmatch=True).filter(
    lambda n: "--" not in n and ".." not in n and not n.endswith(".git"))
_BRANCH = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,10}(/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,10}){0,2}",
                        fullmatch=True).filter(
    lambda b: ".." not in b and not b.endswith((".", ".lock")) and not is_commit_sha(b))
_SHA = st.text("0123456789abcdef", min_size=40, max_size=40)
# Text near the grammar's alphabet reaches the edge cases; arbitrary unicode checks the rest.
_NEAR = st.sampled_from(list("ab_-./@:\\ 0f9\x00\n~%Gé"))
_ANY_TEXT = st.one_of(st.text(_NEAR, max_size=40), st.text(max_size=40))
_NOT_TEXT = st.one_of(st.none(), st.integers(), st.binary(max_size=4), st.lists(st.text(max_size=3), max_size=2))


# -- hub references ----------------------------------------------------------------------------------------------------


@BOUNDED
@given(namespace=_NAME, name=_NAME, revision=st.one_of(st.none(), _BRANCH, _SHA))
def test_a_repo_reference_prints_and_parses_back(namespace, name, revision):
    ref = RepoRef(f"{namespace}/{name}", revision)
    assert parse_ref(str(ref)) == ref
    assert parse_ref(f" {ref} ") == ref
    assert (ref.namespace, ref.name) == (namespace, name)
    if revision is not None:
        assert parse_ref(ref.repo_id, revision=revision) == ref  # revision= fills in an absent @


@BOUNDED
@given(text=_ANY_TEXT, revision=st.one_of(st.none(), _ANY_TEXT))
@example(text="a/b@", revision=None)
@example(text="a/b@x", revision="y")
@example(text="a/b@..", revision=None)
@example(text="a/b/c", revision=None)
@example(text="/b", revision=None)
def test_any_repo_reference_is_read_or_refused_with_invalid_repo_ref(text, revision):
    try:
        ref = parse_ref(text, revision=revision)
    except InvalidRepoRef as exc:
        assert str(exc)
        return
    namespace, name = names.split_repo_id(ref.repo_id)  # what parse_ref accepts the registry accepts too
    if ref.revision is not None:
        names.validate_revision(ref.revision)  # one rule for revisions too (peftkit.hub_rules.names)
    assert parse_ref(str(ref)) == ref


@BOUNDED
@given(value=_NOT_TEXT)
def test_a_reference_that_is_not_text_is_refused(value):
    try:
        parse_ref(value)
    except InvalidRepoRef:
        return
    raise AssertionError(f"parse_ref({value!r}) did not refuse")


# -- the registry's names ----------------------------------------------------------------------------------------------


@BOUNDED
@given(namespace=_NAME, name=_NAME)
def test_valid_names_are_accepted_unchanged(namespace, name):
    assert names.validate_name(name) == name
    assert names.split_repo_id(f"{namespace}/{name}") == (namespace, name)
    assert names.validate_repo_id(f"{namespace}/{name}") == f"{namespace}/{name}"


@BOUNDED
@given(text=st.one_of(_ANY_TEXT, _NOT_TEXT))
@example(text="a" * 97)
@example(text="a--b")
@example(text="x.git")
@example(text="-a")
def test_any_name_is_accepted_as_is_or_refused_with_invalid_repo_id(text):
    for check in (names.validate_name, names.validate_account_name, names.validate_repo_id):
        try:
            assert check(text) == text
        except InvalidRepoId as exc:
            assert exc.status == 400 and exc.message
            continue
        for part in text.split("/"):
            assert 0 < len(part) <= MAX_NAME_LENGTH
            assert "--" not in part and ".." not in part and not part.startswith((".", "-"))
            assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in part)


_SEGMENT = st.one_of(st.text(_NEAR, min_size=0, max_size=8), st.sampled_from([".", "..", ".git", ""]))


@BOUNDED
@given(path=st.one_of(st.lists(_SEGMENT, min_size=1, max_size=5).map("/".join), _ANY_TEXT, _NOT_TEXT))
@example(path="a/../../etc/passwd")
@example(path="a\\..\\b")
@example(path="a/./b")
@example(path="x" * 1025)
def test_an_accepted_file_path_stays_inside_the_repo(path):
    try:
        assert names.validate_path(path) == path
    except InvalidPath as exc:
        assert exc.status == 400 and exc.message
        return
    assert not path.startswith("/") and "\\" not in path
    assert posixpath.normpath(path) == path  # nothing to collapse: no '', '.' or '..' segment
    assert not any(ord(c) < 32 or ord(c) == 127 for c in path)
    assert ".git" not in path.split("/")
    assert names.validate_folder(path + "/") == path


@BOUNDED
@given(revision=st.one_of(_ANY_TEXT, _NOT_TEXT, _BRANCH, _SHA, _BRANCH.map(lambda b: "refs/tags/" + b)))
@example(revision="refs/heads/main")
@example(revision="a" * 201)
@example(revision="main.lock")
@example(revision="a//b")
def test_any_revision_is_accepted_idempotently_or_refused_with_invalid_revision(revision):
    try:
        accepted = names.validate_revision(revision)
    except InvalidRevision as exc:
        assert exc.status == 400 and exc.message
        return
    assert names.validate_revision(accepted) == accepted
    assert ".." not in accepted and "//" not in accepted


# -- model-card front matter -------------------------------------------------------------------------------------------

_CARD_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)


@BOUNDED
@given(method=_CARD_TEXT, base_model=st.one_of(st.none(), _CARD_TEXT), task=st.one_of(st.none(), _CARD_TEXT),
       dataset=st.one_of(st.none(), _CARD_TEXT, st.lists(_CARD_TEXT, min_size=1, max_size=2)),
       tags=st.lists(_CARD_TEXT, max_size=3), license=st.one_of(st.none(), _CARD_TEXT),
       metrics=st.dictionaries(_CARD_TEXT, st.floats(allow_nan=False, allow_infinity=False), max_size=2),
       peft_format=st.booleans())
@example(method="lora", base_model="2020-01-01", task="yes", dataset="null", tags=["1e3", "---", "a: b"],
         license="~", metrics={"true": 0.5}, peft_format=True)
def test_card_front_matter_round_trips(method, base_model, task, dataset, tags, license, metrics, peft_format):
    meta = card_metadata(method=method, base_model=base_model, peft_format=peft_format, task=task, dataset=dataset,
                         metrics=metrics, tags=tags, license=license)
    card = render_card(meta, method=method, adapter_name="default", metrics=metrics)
    plain = json.loads(json.dumps(meta))
    assert split_front_matter(card)[0] == plain
    assert read_card_metadata(card) == plain
    assert validate_card(card) == ([], [])
    indexed = extract_metadata(card.encode("utf-8"), None)
    assert indexed.card == plain and indexed.card_error is None
    tags = {t.lower() for t in indexed.tags}
    assert method.lower() in tags if indexable(method) else method.lower() not in tags  # '\x08' is no tag


_YAML_NEAR = st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,? \n\t0.\\\ufeff"))
_YAML_TEXT = st.one_of(st.text(_YAML_NEAR, max_size=60), st.text(max_size=40),
                       st.lists(st.sampled_from(["<<: ", "---", "a: ", "- ", "  ", "\n", "&x ", "*x",
                                                 "!!python/name:x"]), max_size=12).map("".join))


@BOUNDED
@given(block=_YAML_TEXT, config=st.one_of(st.none(), st.binary(max_size=30), _YAML_TEXT.map(str.encode)))
@example(block="a: &x [1]\nb: *x", config=None)
@example(block="a: 1\na: 2", config=None)
@example(block="? [a]\n: b", config=None)
@example(block="- 1", config=b'{"peft_type": ["LORA"], "task_type": 3, "peftkit": []}')
@example(block="base_model: {a: 1}", config=b'{"base_model_name_or_path": 7}')
@example(block="[" * 100 + "]" * 100, config=None)
def test_any_front_matter_is_read_or_refused_with_card_error(block, config):
    card = f"---\n{block}\n---\nbody"
    try:
        meta, body = split_front_matter(card)
    except CardError as exc:
        assert str(exc)
    else:
        assert isinstance(meta, dict) and isinstance(body, str)
        json.dumps(meta)  # only JSON values reach the index
    errors, warnings = validate_card(card)
    assert all(isinstance(e["message"], str) for e in errors + warnings)
    indexed = extract_metadata(card.encode("utf-8", errors="replace"), config)  # a broken card never blocks a commit
    assert isinstance(indexed.to_json(), dict)
    json.dumps(indexed.to_json())


@BOUNDED
@given(block=_YAML_TEXT)
@example(block="license: [mit")
@example(block="!!python/name:os.system x")
def test_the_client_reads_any_front_matter_or_refuses_with_config_error(block):
    try:
        meta = read_card_metadata(f"---\n{block}\n---\nbody")
    except ConfigError as exc:
        assert "README.md" in str(exc)
        return
    assert isinstance(meta, dict)


def test_pushing_a_folder_whose_card_is_broken_names_the_card(tmp_path, monkeypatch):
    from peftkit.core.model import AdaptedModel
    from peftkit.hub_client.api import push

    from .tiny_models import build_tiny

    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    model = AdaptedModel(build_tiny("llama"))
    model.add_adapter("default", "lora[r=2]")
    model.save_adapter(str(tmp_path / "a"), "default")
    (tmp_path / "a" / "README.md").write_text("---\nlicense: [mit\n---\n# my adapter\n")
    with pytest.raises(ConfigError, match=r"front matter .* README\.md\) cannot be read: .*line 2"):
        push(str(tmp_path / "a"), "alice/x", hub=f"local:{tmp_path / 'hub'}", base_model="org/base")
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("README.md"))
