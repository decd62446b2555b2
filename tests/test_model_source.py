"""A model given by hub id fails at once, with one clear message, when the hub cannot be reached or
offline mode is on (huggingface_hub alone retries for about a minute first)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit
from peftkit.core.errors import ModelSourceError
from peftkit.core.model_source import model_source_options
from tests.registry_conftest_helpers import subprocess_env
from tests.tiny_models import build_tiny
from tests.train_helpers import rows_for, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once closed: connections are refused


def _unreachable_hub_env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(hf_home=tmp_path / "hf", endpoint=f"http://127.0.0.1:{_closed_port()}")


def _says_unreachable(text: str) -> None:
    assert "'someorg/somemodel': it is not a local folder" in text, text
    assert "cannot be reached (connection to 127.0.0.1:" in text and "refused" in text, text
    assert "Give the path of a model folder instead, or go online" in text, text
    assert "Retrying" not in text and "Traceback" not in text, text


def test_train_with_an_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    done = subprocess.run([sys.executable, "-m", "peftkit", "train", "someorg/somemodel", "--data", str(data),
                           "--task", "seq-cls", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, env=_unreachable_hub_env(tmp_path), timeout=30)
    assert done.returncode == 1
    _says_unreachable(done.stderr)
    assert done.stderr.count("Error:") == 1 and not (tmp_path / "out").exists()


_LOAD = """
import sys, peftkit
try:
    peftkit.load("someorg/somemodel", "alice/a", hub=sys.argv[1], progress=False)
except peftkit.PeftkitError as exc:
    print(type(exc).__name__, exc)
"""


def test_load_with_an_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    hub = f"local:{tmp_path / 'hub'}"
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    model.save_adapter(tmp_path / "a")
    peftkit.hub.push(tmp_path / "a", "alice/a", hub=hub, base_model="someorg/somemodel", progress=False)
    done = subprocess.run([sys.executable, "-c", _LOAD, hub], capture_output=True, text=True, cwd=ROOT,
                          env=_unreachable_hub_env(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ModelSourceError cannot load the base model 'someorg/somemodel'"), done.stdout
    _says_unreachable(done.stdout + done.stderr)


def test_offline_mode_names_the_variable_to_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    with pytest.raises(ModelSourceError) as caught:
        peftkit.train("someorg/somemodel", "lora", data, task="seq-cls", out=tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("cannot load the model 'someorg/somemodel': it is not a local folder")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and "unset HF_HUB_OFFLINE to download it" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("PEFTKIT_OFFLINE", "yes")  # peftkit's own switch counts too
    with pytest.raises(ModelSourceError, match=r"offline mode is on \(PEFTKIT_OFFLINE=yes\)"):
        model_source_options("someorg/somemodel", cache_dir=str(tmp_path / "empty"))


def test_a_name_that_does_not_resolve_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PEFTKIT_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-host.invalid")
    with pytest.raises(ModelSourceError, match=r"https://no-such-host\.invalid cannot be reached \(the name "
                                               r"'no-such-host\.invalid' does not resolve"):
        model_source_options("someorg/somemodel", "the tokenizer", cache_dir=str(tmp_path / "empty"))


def test_a_cached_copy_or_a_local_folder_needs_no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"  # huggingface_hub's cache layout, as a download leaves it
    commit = "a" * 40
    snapshot = cache / "models--someorg--cached" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--someorg--cached" / "refs").mkdir()
    (cache / "models--someorg--cached" / "refs" / "main").write_text(commit)
    assert model_source_options("someorg/cached", cache_dir=str(cache)) == {"local_files_only": True}
    folder = tmp_path / "some" / "model"
    folder.mkdir(parents=True)
    assert model_source_options(str(folder)) == {}
    assert model_source_options(str(tmp_path / "missing" / "deep" / "path")) == {}  # transformers says it is missing
