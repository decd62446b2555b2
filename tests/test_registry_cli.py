"""`peftkit registry ...`: users, orgs, tokens, and `serve` as a real process."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import start_cli_server, stop_process, subprocess_env

from peftkit.registry import RegistryStore
from peftkit.registry.cli import registry_group


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(registry_group, list(args), env=env, catch_exceptions=False)


def test_users_orgs_tokens(tmp_path: Path) -> None:
    data = str(tmp_path / "reg")
    empty = _run("user", "list", "--data", data)
    assert empty.exit_code == 0 and "peftkit registry user add NAME" in empty.stderr  # not a silent nothing
    # accounts live in registry.db alone: no blob store (blobs/, tmp/) is opened for them
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["registry.db"]
    assert _run("user", "add", "alice", "--data", data).exit_code == 0
    assert _run("user", "add", "bob", "--data", data).exit_code == 0
    dup = _run("user", "add", "alice", "--data", data)
    assert dup.exit_code != 0 and "already exists" in dup.output
    bad = _run("user", "add", "../evil", "--data", data)
    assert bad.exit_code != 0 and "invalid user name" in bad.output
    org = _run("org", "add", "acme", "--member", "alice", "--member", "bob", "--data", data)
    assert org.exit_code == 0, org.output
    missing = _run("org", "add", "acme", "--member", "nobody", "--data", data)
    assert missing.exit_code != 0 and "user add nobody" in missing.output

    created = _run("token", "create", "alice", "--write", "--name", "laptop", "--data", data)
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("pkr_") and "not shown again" in created.stderr
    read_only = _run("token", "create", "bob", "--data", data)
    assert read_only.exit_code == 0 and "read-only" in read_only.stderr
    no_user = _run("token", "create", "nobody", "--data", data)
    assert no_user.exit_code != 0 and "user add nobody" in no_user.output

    listed = json.loads(_run("token", "list", "--json", "--data", data).stdout)
    assert [(t["user"], t["scope"], t["name"]) for t in listed] == [("alice", "write", "laptop"), ("bob", "read", "")]
    assert secret not in _run("token", "list", "--data", data).stdout  # secrets are never shown again
    unknown = _run("token", "list", "--user", "nobody", "--data", data)
    assert unknown.exit_code == 1 and "no user named 'nobody'" in unknown.output

    with RegistryStore(data) as store:
        principal = store.accounts.authenticate(secret)
        assert principal.user == "alice" and principal.write and principal.orgs == {"acme"}

    alice_id = listed[0]["id"]
    assert _run("token", "revoke", alice_id, "--data", data).exit_code == 0
    assert _run("token", "revoke", "ffffffff", "--data", data).exit_code != 0
    remaining = json.loads(_run("token", "list", "--json", "--data", data).stdout)
    assert [t["user"] for t in remaining] == ["bob"]
    accounts = json.loads(_run("user", "list", "--json", "--data", data).stdout)
    assert {a["name"]: a["kind"] for a in accounts} == {"alice": "user", "bob": "user", "acme": "org"}
    assert _run("fsck", "--data", data).exit_code == 0
    assert "removed 0" in _run("gc", "--data", data).output


def _quoted_command(text: str) -> list[str]:
    """The `peftkit registry ...` command a message quotes, as arguments of the registry group."""
    import shlex

    return shlex.split(text.split("`peftkit registry ", 1)[1].split("`", 1)[0])


def test_hints_repeat_the_options_that_locate_the_registry(tmp_path: Path) -> None:
    """A hint copied as printed acts on the registry the command acted on, not on the default data folder."""
    home, data = tmp_path / "home", str(tmp_path / "my registry")  # a space: the path is quoted for a shell
    env = {"PEFTKIT_HOME": str(home), "PEFTKIT_REGISTRY_DATABASE": None}
    empty = _run("user", "list", "--data", data, env=env)
    assert f"`peftkit registry user add NAME --data '{data}'`" in empty.stderr
    added = _run("user", "add", "alice", "--data", data, env=env)
    assert added.stdout.strip().endswith(f"`peftkit registry token create alice --write --data '{data}'`")
    followed = _run(*_quoted_command(added.stdout), env=env)  # the hint, run as printed
    assert followed.exit_code == 0 and "created write token" in followed.stderr
    assert not (home / "registry").exists()  # nothing went to the default data folder
    org = _run("org", "add", "acme", "--member", "nobody", "--data", data, env=env)
    assert org.exit_code == 1 and f"`peftkit registry user add nobody --data '{data}'`" in org.output
    revoke = _run("token", "revoke", "ffffffff", "--data", data, env=env)
    assert f"`peftkit registry token list --data '{data}'`" in revoke.output
    quota = _run("quota", "set", "nobody", "1GB", "--data", data, env=env)
    assert f"`peftkit registry quota show --data '{data}'`" in quota.output
    default = _run("user", "add", "bob", env=env)  # no --data given: the hint gives none either
    assert default.stdout.strip().endswith("`peftkit registry token create bob --write`")


def test_hints_take_only_the_options_the_suggested_command_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """--blobs goes to commands that take it (not to account commands); a --database typed on the command
    line is repeated without its password; one from PEFTKIT_REGISTRY_DATABASE is not repeated."""
    from peftkit.registry.cli_hints import with_registry_location

    text = "see `peftkit registry fsck` and `peftkit registry user add bob`"
    # The peftkit command's help options: click keeps a command's help option once made (see the last test).
    helps = {"help_option_names": ["-h", "--help"]}
    reindex = registry_group.commands["reindex"]
    ctx = reindex.make_context("reindex", ["--data", "/srv/reg", "--blobs", "/shared/blobs",
                                           "--database", "postgresql://reg:s3cret@db/reg"], **helps)
    assert with_registry_location(text, registry_group, ctx) == (
        "see `peftkit registry fsck --data /srv/reg --database 'postgresql://reg:***@db/reg' --blobs /shared/blobs` "
        "and `peftkit registry user add bob --data /srv/reg --database 'postgresql://reg:***@db/reg'`")
    add = registry_group.commands["user"].commands["add"]
    monkeypatch.setenv("PEFTKIT_REGISTRY_DATABASE", "postgresql://reg:s3cret@db/reg")
    with_env = add.make_context("add", ["carol"], **helps)
    assert with_env.params["database"] == "postgresql://reg:s3cret@db/reg"
    assert with_registry_location(text, registry_group, with_env) == text


def test_default_data_dir_follows_peftkit_home(tmp_path: Path) -> None:
    result = _run("user", "add", "carol", env={"PEFTKIT_HOME": str(tmp_path / "home")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "registry" / "registry.db").is_file()


def test_cli_and_server_import_no_torch() -> None:
    code = (
        "import sys, peftkit.registry.cli, peftkit.registry.server, peftkit.registry.store;"
        "print(sorted(m for m in ('torch', 'transformers', 'peftkit.core.model') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_process(tmp_path: Path) -> None:
    data = tmp_path / "reg"
    with RegistryStore(data) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
    proc, url, seconds = start_cli_server(data, "--max-upload-mb", "1")
    try:
        print(f"registry answered {seconds:.2f}s after the process started")  # informative, not asserted
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/api/repos/create", json.dumps({"name": "big"}), {"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["url"] == f"{url}/alice/big"
        body = b'{"key":"header","value":{"summary":"x"}}\n' + b"x" * (2 * 1024 * 1024)
        conn.request("POST", "/api/models/alice/big/commit/main", body,
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
        resp = conn.getresponse()
        assert resp.status == 413 and resp.headers["X-Error-Code"] == "PayloadTooLarge"
        resp.read()
        conn.close()

        # A second server on the same port fails with a clear message and a non-zero exit.
        second = subprocess.run(
            [sys.executable, "-m", "peftkit.registry", "serve", "--port", str(parts.port), "--data", str(data)],
            env=subprocess_env(), capture_output=True, text=True, timeout=60,
        )
        assert second.returncode != 0 and f"cannot listen on 127.0.0.1:{parts.port}" in second.stderr
    finally:
        stop_process(proc)



def test_registry_commands_have_the_peftkit_help_options_when_run_on_their_own() -> None:
    """Run on its own (python -m peftkit.registry, or a test's CliRunner) the group made '--help' only, and
    click keeps a command's help option once made: docs/cli.md then rendered differently after such a test."""
    result = CliRunner().invoke(registry_group, ["fsck", "-h"])
    assert result.exit_code == 0 and "-h, --help" in result.output
