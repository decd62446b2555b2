"""How the CLI prints: JSON for ``--json``, aligned plain-text tables, and text made safe for a terminal.

Text a hub sends (repo ids, card facts, commit messages, server error
messages) may hold terminal control sequences; :func:`terminal_safe` shows
them as escapes instead of letting them act on the user's terminal. JSON
needs nothing: ``json.dumps`` already escapes every control character.

Under ``--json`` a failure is JSON too (:func:`error_report`), and stdout
carries one JSON document, the result or the error: :func:`hold_stdout`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import click


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (values JSON does not know, such as dates, as strings)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def json_option_given(command: click.Command, args: list[str]) -> bool:
    """Whether ``args`` (a command line for ``command``, without the program's name) give ``--json`` to the
    command they end in, ``command``'s subcommand or a subcommand of that.

    Only parses, as click does (an option's value such as ``--message --json`` is no flag): no value is
    converted and no callback runs, so a command line that fails later, on a missing folder or a bad value,
    reads the same, and an unknown option elsewhere on it does not hide ``--json``.
    """
    ctx = _parsing_context(command, None, None)
    while True:
        opts, rest, _ = command.make_parser(ctx).parse_args(args=list(args))
        if not isinstance(command, click.Group) or not rest:
            return any(isinstance(p, click.Option) and "--json" in p.opts and bool(opts.get(p.name))
                       for p in command.params)
        name, subcommand, args = command.resolve_command(ctx, rest)
        if subcommand is None:
            return False
        command = subcommand
        ctx = _parsing_context(command, ctx, name)


def _parsing_context(command: click.Command, parent: click.Context | None, name: str | None) -> click.Context:
    """A context that parses as ``command.make_context`` would (with the command's settings: click makes a
    command's help option once, from the first context it sees, so ``-h`` must be among its names here),
    yet reads past an unknown option or a bad value."""
    settings = {**command.context_settings, "resilient_parsing": True, "ignore_unknown_options": True}
    return click.Context(command, parent=parent, info_name=name, **settings)


#: What stderr says when a run is aborted (Ctrl-C, a declined confirmation), as click says it.
ABORTED = "Aborted!"


def error_report(error: click.ClickException | click.exceptions.Abort) -> dict[str, Any]:
    """What ``--json`` prints on stdout for a failure: ``{"error": {"message", "type", "exit_code"}}``.

    ``message`` is the text stderr shows after ``Error:`` (exact: JSON escapes control characters).
    ``type`` is the peftkit error's class name (``AdapterLoadError``, ``RepoNotFound``, ...) or the
    registry's error code (``NotFound``, ``QuotaExceeded``, ...) when one caused the failure,
    ``UsageError`` for a command line click refused (exit code 2), ``Abort`` for Ctrl-C or a declined
    confirmation, and ``Error`` for another failure a command reports.
    """
    if isinstance(error, click.exceptions.Abort):
        return {"error": {"message": ABORTED, "type": "Abort", "exit_code": 1}}
    return {"error": {"message": error.format_message(), "type": _error_type(error), "exit_code": error.exit_code}}


def _error_type(error: click.ClickException) -> str:
    """The name a script can match: the peftkit or registry error the CLI's message was made from (the
    handlers raise the click error from within their ``except``, so it is the click error's context)."""
    from peftkit.core.errors import PeftkitError
    from peftkit.registry.errors import RegistryError

    if isinstance(error, click.UsageError):
        return "UsageError"
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, PeftkitError):
            return type(cause).__name__
        if isinstance(cause, RegistryError):
            return cause.code
        cause = cause.__cause__ or cause.__context__
    return "Error"


@contextlib.contextmanager
def hold_stdout(divert_on: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Hold what the block prints on stdout until it ends, then print it there; when it ends with one of
    ``divert_on``, print it on stderr instead, so stdout is left to the error's JSON alone.

    For ``--json`` commands: a script reads one JSON document on stdout, the result or the error, never a
    result cut short by the failure that followed it. Whatever else ends the block (success, an exit
    status, a bug's traceback) leaves stdout as it would have been.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except divert_on:
        _release(held.getvalue(), err=True)
        raise
    except BaseException:
        _release(held.getvalue(), err=False)
        raise
    _release(held.getvalue(), err=False)


def _release(text: str, *, err: bool) -> None:
    if text:
        click.echo(text, nl=False, err=err)


#: C0 controls, DEL, C1 controls, the bidi marks (U+061C, U+200E, U+200F), the line and paragraph separators
#: (U+2028, U+2029: some terminals and pagers break the line there), and the bidi embeddings, overrides and
#: isolates (U+202A-202E, U+2066-2069).
_TERMINAL_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _visible_escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(text: str, *, multiline: bool = False) -> str:
    """``text`` with each character that could drive a terminal written as a visible escape.

    ESC becomes the four characters ``\\x1b``, U+202E becomes ``\\u202e``, and
    likewise CR, BEL, DEL, C1 controls (``\\x9b``), bidi marks, overrides and
    isolates, and the Unicode line separators, so a hub cannot move the cursor,
    retitle the window, reorder what a line shows or fake a line of output.
    ``multiline`` keeps newline and tab (for messages that span lines);
    otherwise they are escaped too. Other Unicode (accents, CJK, emoji) is
    left as it is.
    """
    keep = "\n\t" if multiline else ""
    return _TERMINAL_UNSAFE.sub(lambda m: m.group() if m.group() in keep else _visible_escape(m.group()), text)


def echo_safe(text: str, *, err: bool = False, multiline: bool = False) -> None:
    """Print ``text`` (which holds a hub's words) through :func:`terminal_safe`."""
    click.echo(terminal_safe(text, multiline=multiline), err=err)


def format_table(rows: list[list[str]], headers: list[str]) -> str:
    """Rows under headers, each column padded to its widest cell, trailing spaces dropped.

    Cells pass through :func:`terminal_safe` (one line each), since they often hold a hub's words.
    """
    headers = [terminal_safe(str(h)) for h in headers]
    rows = [[terminal_safe(str(c)) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
