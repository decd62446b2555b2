"""A command given ``--json`` that fails prints the error as one JSON object on stdout (and the usual
message on stderr), with the exit code it has without ``--json``; without ``--json`` nothing changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from peftkit.cli import main, run
from peftkit.cli_output import json_option_given
from peftkit.core.errors import PeftkitError, PushAfterTrainingError
from tests.hub_helpers import hub_env  # noqa: F401
from tests.test_cli_terminal_safe import EVIL_ERROR, UNSAFE, hostile_hub  # noqa: F401


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error(out: str) -> dict:
    """The error object of a failed --json run, checking that stdout holds nothing else."""
    report = json.loads(out)
    assert list(report) == ["error"] and sorted(report["error"]) == ["exit_code", "message", "type"], report
    return report["error"]


def _assert_same_failure_without_json(capsys, argv: list[str], code: int, err: str) -> None:
    plain = [a for a in argv if a != "--json"]
    assert _cli(capsys, *plain) == (code, "", err)


def test_a_local_adapter_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["info", str(tmp_path / "empty"), "--json"]
    code, out, err = _cli(capsys, *argv)
    assert code == 1
    error = _error(out)
    assert error["type"] == "AdapterLoadError" and error["exit_code"] == 1
    assert "is not an adapter folder (no adapter_config.json)" in error["message"]
    assert err == f"Error: {error['message']}\n"
    _assert_same_failure_without_json(capsys, argv, code, err)


def test_an_unknown_method(capsys) -> None:
    code, out, err = _cli(capsys, "methods", "lroa", "--json")
    assert code == 1
    error = _error(out)
    assert error["type"] == "PluginError" and "Did you mean 'lora'?" in error["message"]
    assert err == f"Error: {error['message']}\n"


def test_a_hub_error_on_the_embedded_hub(hub_env: Path, capsys) -> None:  # noqa: F811
    for argv in (["hub", "info", "alice/nope", "--json"], ["hub", "pull", "alice/nope", "--json", "-q"]):
        code, out, err = _cli(capsys, *argv)
        assert code == 1, err
        error = _error(out)
        assert error["type"] == "RepoNotFound" and error["exit_code"] == 1
        assert "repository 'alice/nope' not found" in error["message"]
        assert err == f"Error: {error['message']}\n"
        _assert_same_failure_without_json(capsys, argv, code, err)


def test_a_registry_error(tmp_path: Path, capsys) -> None:
    argv = ["registry", "quota", "show", "nobody", "--data", str(tmp_path / "registry"), "--json"]
    code, out, err = _cli(capsys, *argv)
    assert code == 1
    error = _error(out)
    assert error["type"] == "NotFound"  # the registry's error code
    assert error["message"].startswith("no user, organization or repo namespace named 'nobody'")
    _assert_same_failure_without_json(capsys, argv, code, err)


def test_a_hubs_words_are_exact_in_the_json_and_escaped_on_stderr(hostile_hub: str, capsys) -> None:  # noqa: F811
    code, out, err = _cli(capsys, "hub", "info", "evil/broken", "--hub", hostile_hub, "--json")
    assert code == 1
    assert not set(out) & UNSAFE and not set(err) & UNSAFE
    assert _error(out)["message"].endswith(f"answered 400: {EVIL_ERROR}")
    assert "no such thing\\x1b[2J" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["merge", "--json"], "Missing argument 'BASE'."),
    (["info", "/no/such/folder", "--json"], "Invalid value for 'PATH': Directory '/no/such/folder' does not exist."),
    (["methods", "--bogus", "--json"], "No such option '--bogus'."),
])
def test_a_usage_error_exits_2_with_the_json(argv: list[str], message: str, capsys) -> None:
    code, out, err = _cli(capsys, *argv)
    assert code == 2
    assert _error(out) == {"message": message, "type": "UsageError", "exit_code": 2}
    assert err.startswith(f"Usage: peftkit {argv[0]} ") and err.endswith(f"Error: {message}\n")
    _assert_same_failure_without_json(capsys, argv, code, err)


def test_json_counts_only_as_the_failing_commands_own_flag() -> None:
    assert json_option_given(main, ["hub", "info", "a/b", "--json"])
    assert json_option_given(main, ["plugins", "--json"])
    assert json_option_given(main, ["info", "x", "--unknown", "--json"])
    assert not json_option_given(main, ["hub", "push", "folder", "a/b", "--message", "--json"])  # a value
    assert not json_option_given(main, ["plugins", "--json", "inspect", "lora"])  # the group's, not inspect's
    assert not json_option_given(main, ["hub", "delete", "a/b", "--json"])  # delete has no --json
    assert not json_option_given(main, ["info", "x", "--", "--json"])  # an argument after --


@pytest.mark.parametrize("argv", [["-h"], ["info", "-h"], ["hub", "info", "-h"]])
def test_reading_the_command_line_for_json_keeps_the_short_help_option(argv: list[str]) -> None:
    """A fresh process: click makes each command's help option once, from the first context it is given."""
    result = subprocess.run([sys.executable, "-m", "peftkit", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "-h, --help" in result.stdout


def test_a_value_that_reads_like_json_is_not_the_flag(tmp_path: Path, capsys) -> None:
    code, out, err = _cli(capsys, "hub", "push", str(tmp_path / "missing"), "a/b", "--message", "--json")
    assert (code, out) == (2, "") and "does not exist" in err


@pytest.fixture
def test_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands that fail after printing part of their output (none of peftkit's does today)."""

    @click.command("half-printed")
    @click.option("--json", "as_json", is_flag=True)
    @click.argument("failure")
    def half_printed(as_json: bool, failure: str) -> None:
        click.echo('{"partial": ')
        if failure == "bug":
            raise RuntimeError("a bug")
        if failure == "interrupt":
            raise KeyboardInterrupt
        if failure == "push":
            raise PushAfterTrainingError("trained and saved to out/, but the push failed: run `peftkit hub push`")
        raise PeftkitError("it failed")

    monkeypatch.setitem(main.commands, "half-printed", half_printed)


def test_output_printed_before_the_failure_goes_to_stderr(test_commands: None, capsys) -> None:
    code, out, err = _cli(capsys, "half-printed", "error", "--json")
    assert code == 1
    assert _error(out) == {"message": "it failed", "type": "PeftkitError", "exit_code": 1}
    assert err == '{"partial": \nError: it failed\n'
    assert _cli(capsys, "half-printed", "error") == (1, '{"partial": \n', "Error: it failed\n")


def test_an_errors_own_exit_code_and_an_interrupt(test_commands: None, capsys) -> None:
    code, out, _ = _cli(capsys, "half-printed", "push", "--json")
    assert code == 3 and _error(out)["type"] == "PushAfterTrainingError" and _error(out)["exit_code"] == 3
    code, out, err = _cli(capsys, "half-printed", "interrupt", "--json")
    assert code == 1 and _error(out) == {"message": "Aborted!", "type": "Abort", "exit_code": 1}
    assert err.endswith("Aborted!\n")


def test_a_bug_keeps_its_traceback_and_its_output(test_commands: None, capsys) -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        run(["half-printed", "bug", "--json"])
    assert capsys.readouterr().out == '{"partial": \n'


def test_a_fresh_process_reports_json_without_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    script = ("import sys; from peftkit.cli import run; code = run(sys.argv[1:]); "
              "assert 'torch' not in sys.modules, 'imported torch'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "info", str(tmp_path / "empty"), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert _error(result.stdout)["type"] == "AdapterLoadError"
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
