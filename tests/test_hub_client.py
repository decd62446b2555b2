"""Hub client pieces without a model: hub selection, references, names, tokens, the cache."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import peftkit
from peftkit.core.composition import Stack
from peftkit.core.errors import CompositionError
from peftkit.hub_client import auth, cache
from peftkit.hub_client.backend import HubBackend, RemoteFile
from peftkit.hub_client.compose import member_names, members_hub_base, plan
from peftkit.hub_client.errors import HubAuthError, IntegrityError, InvalidRepoRef
from peftkit.hub_client.http import HttpBackend
from peftkit.hub_client.local import LocalBackend
from peftkit.hub_client.resolve import RepoRef, open_hub, parse_ref


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    for name in ("PEFTKIT_HUB", "PEFTKIT_HUB_TOKEN", "HF_TOKEN", "HF_ENDPOINT", "PEFTKIT_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


# -- hub selection ---------------------------------------------------------------------------------


def test_default_hub_is_the_embedded_store_under_peftkit_home(tmp_path: Path) -> None:
    backend = open_hub()
    assert isinstance(backend, LocalBackend)
    assert backend.root == tmp_path / "home" / "hub"
    assert not backend.remote


def test_hub_addresses_pick_their_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert open_hub(f"local:{tmp_path}/a").root == tmp_path / "a"
    assert open_hub(f"file://{tmp_path}/b").root == tmp_path / "b"
    assert open_hub(str(tmp_path / "c")).root == tmp_path / "c"
    registry = open_hub("http://127.0.0.1:9/")
    assert isinstance(registry, HttpBackend) and registry.endpoint == "http://127.0.0.1:9"
    assert not registry.huggingface
    monkeypatch.setenv("PEFTKIT_HUB", "http://10.0.0.1:8080")
    assert open_hub().endpoint == "http://10.0.0.1:8080"
    assert isinstance(open_hub("local"), LocalBackend)  # an explicit hub wins over PEFTKIT_HUB


def test_hf_means_huggingface_co_without_any_request() -> None:
    backend = open_hub("hf")
    assert isinstance(backend, HttpBackend)
    assert backend.endpoint == "https://huggingface.co"
    assert backend.huggingface and backend.address == "hf" and backend.key == "huggingface.co"
    assert open_hub("https://huggingface.co").huggingface


def test_hf_follows_hf_endpoint_for_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1234")
    backend = open_hub("hf")
    assert backend.endpoint == "http://127.0.0.1:1234" and backend.huggingface


def test_unknown_hub_and_scheme_are_clear_errors() -> None:
    with pytest.raises(InvalidRepoRef, match="unknown hub 'nonsense'"):
        open_hub("nonsense")
    with pytest.raises(InvalidRepoRef, match="no hub backend for 's3'.*installed backends: file, hf, http, https"):
        open_hub("s3://bucket/adapters")


def test_a_plugin_registers_a_hub_backend(tmp_path: Path) -> None:
    class Plugin:
        PEFTKIT_PLUGIN_API = 1

        @staticmethod
        @peftkit.hookimpl
        def peftkit_register_hub_backends(register):
            register("mem", lambda url, token=None, **options: LocalBackend(tmp_path / url.split("://")[1]))

    with peftkit.use_plugin(Plugin(), "mem-hub") as record:
        assert not record.errors
        backend = open_hub("mem://store1")
        assert isinstance(backend, HubBackend) and backend.root == tmp_path / "store1"
    with pytest.raises(InvalidRepoRef):
        open_hub("mem://store1")


# -- references and names ----------------------------------------------------------------------------


def test_parse_ref() -> None:
    assert parse_ref("alice/ner") == RepoRef("alice/ner", None)
    assert parse_ref("alice/ner@v2") == RepoRef("alice/ner", "v2")
    assert parse_ref("alice/ner", "main").revision == "main"
    sha = "a" * 40
    assert parse_ref(f"alice/ner@{sha}").revision == sha
    for bad, match in [("alice", "namespace/name"), ("alice/ner@", "ends with '@'"), ("a/b/c", "namespace/name"),
                       ("alice/ner@x..y", "invalid revision")]:
        with pytest.raises(InvalidRepoRef, match=match):
            parse_ref(bad)
    with pytest.raises(InvalidRepoRef, match="give one"):
        parse_ref("alice/ner@v1", "v2")


def test_member_names_prefer_the_repo_name_and_resolve_collisions() -> None:
    refs = [parse_ref("alice/ner@v2"), parse_ref("alice/lang-de"), parse_ref("bob/ner"),
            parse_ref("carol/pos@v1"), parse_ref("carol/pos@v2"), parse_ref("dan/my.adapter")]
    names = member_names(refs, taken={"lang-de"})
    assert [names[r] for r in refs] == ["alice__ner", "alice__lang-de", "bob__ner", "carol__pos__v1",
                                        "carol__pos__v2", "my_adapter"]


def test_members_hub_base_is_the_one_hub_id_the_members_agree_on() -> None:
    """A base model loaded from a local folder records this id (hub_client/compose.load_base_model)."""
    def config(base):
        return {"base_model_name_or_path": base}

    assert members_hub_base([config("org/base"), config("org/base"), config(None)]) == "org/base"
    assert members_hub_base([config("org/base"), config("/home/me/base"), config("./base")]) == "org/base"
    assert members_hub_base([config("org/base"), config("org/other")]) is None  # they disagree: no guess
    assert members_hub_base([config("/home/me/base"), config(None), {}]) is None


def test_plan_parses_strings_lists_json_and_blocks() -> None:
    p = plan("stack(alice/lang-de, average(alice/ner@v2, bob/pos, weights=[0.25, 0.75]))")
    assert str(p.node) == "stack(lang-de, average(ner, pos, weights=[0.25, 0.75]))"
    assert {n: str(m.ref) for n, m in p.members.items()} == {"lang-de": "alice/lang-de", "ner": "alice/ner@v2",
                                                             "pos": "bob/pos"}
    assert plan("alice/ner@v2").node == "ner"
    assert plan(["alice/a", "alice/b"]).node == Stack("a", "b")
    assert plan({"block": "stack", "children": ["alice/a", "bob/a"]}).node == Stack("alice__a", "bob__a")
    p = plan(Stack("de", "ner"), adapters={"de": "alice/lang-de", "ner": "alice/ner@v2"})
    assert p.node == Stack("de", "ner") and str(p.members["ner"].ref) == "alice/ner@v2"
    # the same repo twice is loaded once; a quoted fusion name is never read as a repo
    p = plan('stack(alice/a, fuse(alice/a, alice/b, name="a_b"))')
    assert str(p.node) == 'stack(a, fuse(a, b, name="a_b"))' and sorted(p.members) == ["a", "b"]


def test_plan_errors_name_the_problem() -> None:
    with pytest.raises(CompositionError, match="'ner' in the composition is neither a hub repo"):
        plan("stack(alice/lang, ner)")
    assert plan("stack(alice/lang, ner)", existing=["ner"]).node == Stack("lang", "ner")
    with pytest.raises(CompositionError, match="does not use"):
        plan("alice/lang", adapters={"x": "alice/x"})
    with pytest.raises(CompositionError, match="already has an adapter named 'ner'"):
        plan("ner", adapters={"ner": "alice/ner"}, existing=["ner"])
    with pytest.raises(CompositionError, match=r"composition 'stack\(alice/lang, bob/ner@v2,'$"):
        plan("stack(alice/lang, bob/ner@v2, ")  # the user's own words, not the placeholders


# -- tokens ---------------------------------------------------------------------------------------


def test_login_token_file_is_private_and_per_hub(tmp_path: Path) -> None:
    path = auth.save_token("127.0.0.1_8080-abc", "pkr_1_secretsecret")
    assert path == tmp_path / "home" / "hub_tokens.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == {"127.0.0.1_8080-abc": "pkr_1_secretsecret"}
    assert auth.stored_token("127.0.0.1_8080-abc") == "pkr_1_secretsecret"
    assert auth.stored_token("other") is None
    assert auth.delete_token("127.0.0.1_8080-abc") and not auth.delete_token("127.0.0.1_8080-abc")


def test_token_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    auth.save_token("reg", "pkr_saved_000000")
    assert auth.resolve_token("reg") == ("pkr_saved_000000", auth.resolve_token("reg")[1])
    monkeypatch.setenv("HF_TOKEN", "hf_from_env_0000")
    assert auth.resolve_token("reg")[0] == "pkr_saved_000000"  # a registry prefers its own login over HF_TOKEN
    assert auth.resolve_token("other")[0] == "hf_from_env_0000"
    assert auth.resolve_token("huggingface.co", huggingface=True)[0] == "hf_from_env_0000"
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", "pkr_env_0000000")
    assert auth.resolve_token("reg")[0] == "pkr_env_0000000"
    assert auth.resolve_token("reg", explicit="pkr_arg_0000000") == ("pkr_arg_0000000", "the token argument")


def test_redact_hides_every_token_seen() -> None:
    auth.resolve_token("x", explicit="pkr_very_secret_1")
    assert auth.redact("Bearer pkr_very_secret_1 refused") == "Bearer *** refused"


def test_push_without_a_token_says_how_to_get_one() -> None:
    backend = open_hub("http://127.0.0.1:9")
    with pytest.raises(HubAuthError, match=r"needs a token.*peftkit hub login --hub http://127.0.0.1:9"):
        backend.push("alice/x", {}, private=None, commit_message="m", revision="main")


def test_a_hugging_face_push_without_a_token_names_the_login_for_hf(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token saved by `huggingface-cli login`
    backend = open_hub("hf")
    with pytest.raises(HubAuthError, match=r"run `peftkit hub login --hub hf` .* set HF_TOKEN"):
        backend.push("alice/x", {}, private=None, commit_message="m", revision="main")


# -- cache ----------------------------------------------------------------------------------------


def test_offline_mode_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not cache.offline_mode()
    monkeypatch.setenv("PEFTKIT_OFFLINE", "1")
    assert cache.offline_mode()
    monkeypatch.setenv("PEFTKIT_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert cache.offline_mode()


def test_verify_files_checks_sizes_and_hashes(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"hello")
    sha256, git = cache.hash_file(tmp_path / "a.json", 5)
    assert git == "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0"  # `git hash-object` of "hello"
    cache.verify_files(tmp_path, [RemoteFile("a.json", 5, git, None)], "t")
    cache.verify_files(tmp_path, [RemoteFile("a.json", 5, None, sha256)], "t")
    with pytest.raises(IntegrityError, match="a.json does not match its sha256"):
        cache.verify_files(tmp_path, [RemoteFile("a.json", 5, git, "0" * 64)], "t")
    with pytest.raises(IntegrityError, match="does not match its git hash"):
        cache.verify_files(tmp_path, [RemoteFile("a.json", 5, "0" * 40, None)], "t")
    with pytest.raises(IntegrityError, match="has 5 bytes, the hub announced 6"):
        cache.verify_files(tmp_path, [RemoteFile("a.json", 6, git, None)], "t")
    with pytest.raises(IntegrityError, match="lacks b.json"):
        cache.verify_files(tmp_path, [RemoteFile("b.json", 1, None, None)], "t")


def test_cache_refs_and_atomic_install(tmp_path: Path) -> None:
    c = cache.PullCache(tmp_path / "c")
    sha = "b" * 40
    with c.staging("hub") as staging:
        (staging / "f").write_text("x")
        final = c.install(staging, "hub", "alice/a", sha)
    c.record_ref("hub", "alice/a", "feature/x", sha)
    assert c.lookup("hub", "alice/a", "feature/x") == (sha, final)
    assert c.lookup("hub", "alice/a", sha) == (sha, final)
    assert c.lookup("hub", "alice/a", "main") is None
    with pytest.raises(RuntimeError):
        with c.staging("hub") as staging:
            (staging / "partial").write_text("x")
            raise RuntimeError("download interrupted")
    assert not any((tmp_path / "c" / "hub" / ".tmp").iterdir())  # nothing half-done is left
