"""Follow-up commands in ``peftkit registry`` messages that act on the same registry.

A hint such as "give them a token with `peftkit registry token create alice --write`"
is copied and run as printed. Printed without the ``--data`` the command was
given, it would act on the default data folder, where the user does not exist
(or, worse, a different registry does). So every `peftkit registry ...` command
quoted in a message gets the options that located the registry (``--data``,
``--database``, ``--blobs``), those the user typed and the quoted command takes.

A value that came from the environment (``PEFTKIT_REGISTRY_DATABASE``) is not
repeated: it applies to the next command too, and may hold a password. A
password typed on the command line is shown as ``***``, never printed.
"""

from __future__ import annotations

import re
import shlex

import click
from click.core import ParameterSource

#: The parameters (as click names them) that say where a registry's data lives, and their option.
LOCATING_OPTIONS = {"data_dir": "--data", "database": "--database", "blobs_dir": "--blobs"}
_QUOTED_COMMAND = re.compile(r"`(peftkit registry [^`]+)`")


def with_registry_location(text: str, root: click.Group, ctx: click.Context | None = None) -> str:
    """``text`` with each `peftkit registry ...` command in backticks completed with the locating options
    of ``ctx`` (default: the running command's) that the quoted command accepts; ``root`` is the
    ``registry`` group the quoted commands are looked up in."""
    ctx = ctx if ctx is not None else click.get_current_context(silent=True)
    given = locating_options(ctx) if ctx is not None else {}
    if not given:
        return text
    return _QUOTED_COMMAND.sub(lambda match: f"`{_completed(match.group(1), given, root)}`", text)


def locating_options(ctx: click.Context) -> dict[str, str]:
    """The locating options typed on the command line of ``ctx`` (option -> value, ready to print)."""
    from .pg_db import redact

    given = {}
    for name, option in LOCATING_OPTIONS.items():
        value = ctx.params.get(name)
        if value is None or ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        given[option] = redact(str(value)) if option == "--database" else str(value)
    return given


def _completed(command: str, given: dict[str, str], root: click.Group) -> str:
    """``command`` (``peftkit registry user add bob``) with those of ``given`` that it takes and lacks."""
    try:
        words = shlex.split(command)[2:]
    except ValueError:  # unbalanced quotes: not a command line to complete
        return command
    target: click.Command = root
    for word in words:
        if not isinstance(target, click.Group) or word not in target.commands:
            break
        target = target.commands[word]
    if target is root:
        return command
    takes = {opt for param in target.params for opt in param.opts}
    extra = [f"{option} {shlex.quote(value)}" for option, value in given.items()
             if option in takes and option not in words]
    return " ".join([command, *extra])
