"""Render the CLI reference (docs/cli.md) from the click commands themselves.

``python -m peftkit.cli_docs > docs/cli.md`` regenerates it; a test checks
that the file equals what this renders, so the reference never drifts from
``--help``.
"""

from __future__ import annotations

import click

HEADER = """# CLI reference

Generated from the commands' own `--help` by `python -m peftkit.cli_docs > docs/cli.md`
(a test keeps this file in sync). Exit codes: 0 success, 1 an error peftkit
reports (the message says what is wrong and how to fix it), 2 a usage error;
`peftkit train --push` exits 3 when the adapter is trained and saved but the
push failed, and 130 / 143 when interrupted (Ctrl-C / SIGTERM).

A command given `--json` that fails prints, besides the usual message on stderr
and with the same exit code, the error as one JSON object on stdout, and nothing
else there (what it had printed before failing goes to stderr):

```json
{"error": {"message": "...", "type": "AdapterLoadError", "exit_code": 1}}
```

`message` is the text stderr shows after `Error:`, exact (hub's words included,
JSON-escaped). `type` is the peftkit error's class (`AdapterLoadError`,
`RepoNotFound`, `PushAfterTrainingError`, ...) or the registry's error code
(`NotFound`, `QuotaExceeded`, ...); `UsageError` for a command line click refuses
(exit code 2: a missing argument, a bad value, an unknown option), `Abort` for
Ctrl-C, `Error` for any other failure a command reports. A run that ends with a
status of its own prints no error object (`registry fsck --json` exits 1 after its
report; `train` exits 130 / 143 when interrupted), and a crash (a bug in peftkit)
shows its traceback.
"""


def _walk(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            found.extend(_walk(command.commands[name], [*path, name]))
    return found


def render() -> str:
    from peftkit.cli import add_builtin_commands, main

    add_builtin_commands()
    parts = [HEADER]
    for path, command in _walk(main, ["peftkit"]):
        ctx = click.Context(command, info_name=" ".join(path), terminal_width=100, max_content_width=100,
                            help_option_names=["-h", "--help"])
        title = " ".join(path)
        parts.append(f"\n## `{title}`\n\n```text\n{command.get_help(ctx).rstrip()}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
