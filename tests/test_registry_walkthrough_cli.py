"""What an operator's walkthrough of `peftkit registry` found (session 35): the ready line of `serve` names the
URL clients must use when it differs from the listening address, and `migrate`'s closing hint is a command
that runs as printed (it said `--database URL`, a placeholder), and a `--public-url` without its scheme is
refused instead of served (every redirect then named `hub.lan:8080/...`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.core import ParameterSource
from click.testing import CliRunner

from tests.registry_conftest_helpers import stop_process, subprocess_env

from peftkit.registry.cli import (
    checked_public_url,
    migrate_command,
    ready_line,
    registry_group,
    serve_after_migrate,
)


def test_ready_line_names_the_public_url_clients_use() -> None:
    line = ready_line("/srv/reg", "http://127.0.0.1:8080", "http://hub.lan:8080/")
    assert line == "peftkit registry serving /srv/reg at http://127.0.0.1:8080 (clients use http://hub.lan:8080; " \
                   "Ctrl-C to stop)"
    # the URL stays the first word after " at " (scripts and tests/registry_conftest_helpers.py read it)
    assert line.split(" at ", 1)[1].split()[0] == "http://127.0.0.1:8080"
    assert ready_line("/srv/reg", "http://127.0.0.1:8080", None).endswith("at http://127.0.0.1:8080 (Ctrl-C to stop)")
    same = ready_line("/srv/reg", "http://127.0.0.1:8080", "http://127.0.0.1:8080/")
    assert "clients use" not in same


def test_serve_prints_the_public_url(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftkit.registry", "serve", "--port", "0", "--data", str(tmp_path / "reg"),
         "--quiet", "--public-url", "http://hub.lan:8080"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "(clients use http://hub.lan:8080; Ctrl-C to stop)" in line, line
        assert line.split(" at ", 1)[1].startswith("http://127.0.0.1:")
    finally:
        stop_process(proc)


def _hint(source: ParameterSource, target: str) -> str:
    ctx = click.Context(migrate_command)
    ctx.set_parameter_source("target", source)
    with ctx:
        return serve_after_migrate(target, "/srv/peftkit registry")


def test_migrate_hint_repeats_the_typed_database_without_its_password() -> None:
    typed = _hint(ParameterSource.COMMANDLINE, "postgresql://registry:secret@db.internal/registry")
    assert typed == ("peftkit registry serve --database 'postgresql://registry:***@db.internal/registry' "
                     "--blobs '/srv/peftkit registry'")
    assert "URL" not in typed and "secret" not in typed


def test_migrate_hint_leaves_out_a_database_from_the_environment() -> None:
    # serve reads PEFTKIT_REGISTRY_DATABASE too, and the variable may hold a password
    hint = _hint(ParameterSource.ENVIRONMENT, "postgresql://registry:secret@db.internal/registry")
    assert hint == "peftkit registry serve --blobs '/srv/peftkit registry'"


@pytest.mark.parametrize("url, says", [
    ("hub.lan:8080", "is not an http(s) URL"),  # no scheme: links became 'hub.lan:8080/...', hub.lan got 421
    ("ftp://hub.lan", "is not an http(s) URL"),
    ("http://hub.lan:port", "is not a URL"),
    ("https://hub.example.com/?x=1", "has a user, query or fragment"),
])
def test_serve_refuses_a_public_url_that_is_not_one(tmp_path: Path, url: str, says: str) -> None:
    # --public-url is checked as it is read, so a --data that is a file (refused next) is never reached; and
    # were --public-url let through, the command fails on --data instead of starting a server that never ends
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    run = CliRunner().invoke(registry_group, ["serve", "--port", "0", "--public-url", url, "--data", str(not_a_folder)])
    assert run.exit_code == 2 and says in run.output and "--public-url" in run.output, run.output


@pytest.mark.parametrize("url", ["http://hub.lan:8080", "https://hub.example.com/", "https://example.com/hub"])
def test_real_public_urls_pass(url: str) -> None:
    assert checked_public_url(url) == url


def test_a_database_url_is_shown_without_its_password_but_an_empty_one_stays_empty() -> None:
    """A hint pasted back must not set the password '***' where the URL had none."""
    from peftkit.registry.pg_db import redact

    assert redact("postgresql://reg:s3cret@db/reg") == "postgresql://reg:***@db/reg"
    assert redact("postgresql://postgres:@db/reg") == "postgresql://postgres:@db/reg"
    assert redact("postgresql://postgres@db/reg") == "postgresql://postgres@db/reg"
    assert redact("postgresql://db/reg") == "postgresql://db/reg"
