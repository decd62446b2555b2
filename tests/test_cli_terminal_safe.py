"""Text from a hub reaches the terminal with its control characters escaped; ``--json`` keeps it exact.

A hostile server (a real HTTP server on 127.0.0.1, answering the Hub API calls
that `peftkit hub info` and `hub search` make) puts terminal control sequences
in repo ids, card facts, branch names, file names and an error message.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import pytest

from peftkit.cli import run
from peftkit.cli_output import format_table, terminal_safe
from tests.hub_helpers import hub_env  # noqa: F401

TITLE = "\x1b]0;pwned\x07"  # sets the window title
CLEAR = "\x1b[2J"  # clears the screen
CSI_C1 = "\x9b31m"  # C1 CSI: red text on terminals that take 8-bit controls
RLO = "\u202e"  # right-to-left override: shows text backwards
FAKE_LINE = "\rDone: all adapters verified"  # CR: overwrites what was printed before on the line
HOSTILE = [TITLE, CLEAR, CSI_C1, RLO, FAKE_LINE, "\x7f", "\x00", "\x1b"]
SHA = "a" * 40

#: Characters that must never reach a terminal raw (newline and tab are checked where they are not allowed).
UNSAFE = {chr(c) for c in range(0x20) if chr(c) not in "\n\t"} | {chr(c) for c in range(0x7F, 0xA0)} | {
    chr(c) for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))}


@pytest.mark.parametrize(("text", "shown"), [
    (TITLE, "\\x1b]0;pwned\\x07"),
    (CLEAR, "\\x1b[2J"),
    ("ok\rDone", "ok\\x0dDone"),
    ("bell\x07", "bell\\x07"),
    ("del\x7f", "del\\x7f"),
    (CSI_C1, "\\x9b31m"),
    ("\x85next", "\\x85next"),
    ("abc" + RLO + "gpj.exe", "abc\\u202egpj.exe"),
    ("\u2066isolate\u2069", "\\u2066isolate\\u2069"),
    ("\x00nul", "\\x00nul"),
    ("v1\u200fmain", "v1\\u200fmain"),  # right-to-left mark: reorders the neutral characters around it
    ("\u200eleft\u061c", "\\u200eleft\\u061c"),  # left-to-right and Arabic letter marks
    ("one\u2028two\u2029three", "one\\u2028two\\u2029three"),  # line and paragraph separators
])
def test_terminal_safe_escapes_each_control_class(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown
    assert terminal_safe(text, multiline=True) == shown


@pytest.mark.parametrize("text", ["é", "日本語", "🙂", "naïve café — “quoted” ∑", "plain ascii 0-9 ~!@#"])
def test_terminal_safe_keeps_ordinary_unicode(text: str) -> None:
    assert terminal_safe(text) == text
    assert terminal_safe(text, multiline=True) == text


def test_newline_and_tab_stay_only_in_multiline_text() -> None:
    assert terminal_safe("line one\n\tline two") == "line one\\x0a\\x09line two"
    assert terminal_safe("line one\n\tline two", multiline=True) == "line one\n\tline two"
    assert terminal_safe("a\r\nb", multiline=True) == "a\\x0d\nb"


def test_terminal_safe_is_idempotent() -> None:
    once = terminal_safe("".join(HOSTILE))
    assert terminal_safe(once) == once and not set(once) & UNSAFE


def test_table_cells_are_escaped_and_aligned() -> None:
    table = format_table([[CLEAR + "x", "1"], ["y", "2"]], ["NAME", "N"])
    assert table.splitlines() == ["NAME      N", "\\x1b[2Jx  1", "y         2"]


# -- a hostile hub, end to end ----------------------------------------------------------------------

EVIL_REPO = f"evil/repo{TITLE}"
EVIL_ERROR = f"no such thing{CLEAR}{TITLE}{RLO}{CSI_C1}"  # no CR: hub_client keeps a message's last line only


def _model(repo_id: str) -> dict[str, Any]:
    return {
        "id": repo_id, "modelId": repo_id, "sha": SHA, "private": False, "downloads": 7,
        "tags": ["peftkit", f"peft:lora{CSI_C1}", f"tag{RLO}"], "pipeline_tag": f"text-classification{CLEAR}",
        "library_name": f"peftkit{chr(0x7F)}", "lastModified": "2026-01-02T03:04:05.000Z",
        "cardData": {"base_model": f"org/base{FAKE_LINE}", "datasets": [f"data{TITLE}"],
                     "license": f"mit{CLEAR}", "tags": [f"tag{RLO}"]},
        "siblings": [{"rfilename": f"adapter{CLEAR}.safetensors", "size": 12}],
    }


class _HostileHub(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = unquote(urlsplit(self.path).path)
        if path == "/api/models":
            return self._answer(200, [_model(EVIL_REPO)])
        if path.startswith("/api/models/evil/broken"):
            return self._answer(400, {"error": EVIL_ERROR})
        if path.endswith("/refs"):
            return self._answer(200, {"branches": [{"name": f"main{TITLE}", "ref": "refs/heads/main",
                                                    "targetCommit": SHA}], "tags": [], "converts": []})
        if path.startswith("/api/models/"):
            return self._answer(200, _model(EVIL_REPO))
        return self._answer(404, {"error": "not here"})

    do_HEAD = do_GET  # noqa: N815

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hostile_hub(hub_env: Path) -> Iterator[str]:  # noqa: F811
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_terminal_safe(text: str) -> None:
    raw = sorted({f"U+{ord(c):04X}" for c in text if c in UNSAFE})
    assert not raw, f"raw control characters reached the terminal: {raw}\n{text!r}"


def test_hub_search_table_escapes_hostile_fields(hostile_hub: str, capsys) -> None:
    code, out, err = _cli(capsys, "hub", "search", "--hub", hostile_hub)
    assert code == 0, err
    _assert_terminal_safe(out + err)
    assert "evil/repo\\x1b]0;pwned\\x07" in out
    assert "org/base\\x0dDone: all adapters verified" in out and "text-classification\\x1b[2J" in out


def test_hub_info_escapes_hostile_fields(hostile_hub: str, capsys) -> None:
    code, out, err = _cli(capsys, "hub", "info", "evil/repo", "--hub", hostile_hub)
    assert code == 0, err
    _assert_terminal_safe(out + err)
    for shown in ("evil/repo\\x1b]0;pwned\\x07", "org/base\\x0dDone", "text-classification\\x1b[2J",
                  "peftkit\\x7f", "data\\x1b]0;pwned\\x07", "tag\\u202e", "main\\x1b]0;pwned\\x07 -> " + SHA,
                  "adapter\\x1b[2J.safetensors (12 bytes)"):
        assert shown in out, shown


def test_hub_error_message_is_escaped(hostile_hub: str, capsys) -> None:
    code, out, err = _cli(capsys, "hub", "info", "evil/broken", "--hub", hostile_hub)
    assert code == 1
    _assert_terminal_safe(out + err)
    assert "answered 400: no such thing\\x1b[2J\\x1b]0;pwned\\x07\\u202e\\x9b31m" in err


def test_json_output_round_trips_the_hub_text_exactly(hostile_hub: str, capsys) -> None:
    code, out, err = _cli(capsys, "hub", "search", "--hub", hostile_hub, "--json")
    assert code == 0, err
    _assert_terminal_safe(out)  # json.dumps escapes every control character (and ensure_ascii the rest)
    [hit] = json.loads(out)
    assert hit["repo_id"] == EVIL_REPO and hit["base_model"] == f"org/base{FAKE_LINE}"

    code, out, err = _cli(capsys, "hub", "info", "evil/repo", "--hub", hostile_hub, "--json")
    assert code == 0, err
    _assert_terminal_safe(out)
    data = json.loads(out)
    assert data["repo_id"] == EVIL_REPO and data["task"] == f"text-classification{CLEAR}"
    assert data["branches"] == {f"main{TITLE}": SHA} and data["tags"][2] == f"tag{RLO}"
