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
