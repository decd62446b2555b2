"""Options and helpers the hub-facing commands share (``peftkit hub``, ``compose``, ``merge``): ``--hub``,
``--token-file``, ``--quiet``, and warnings shown as one plain line. Torch-free at import."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import click

from peftkit.cli_output import echo_safe

HUB_HELP = ("Hub: 'local' (the embedded hub, default), 'local:/folder', a registry URL http://host:port, or "
            "'hf' (the Hugging Face Hub). Default: $PEFTKIT_HUB, else local.")


def hub_option(f: Any) -> Any:
    return click.option("--hub", default=None, metavar="HUB", help=HUB_HELP)(f)


def token_option(f: Any) -> Any:
    return click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                        help="Read the token from this file (else PEFTKIT_HUB_TOKEN, HF_TOKEN or `peftkit hub "
                             "login`). Tokens are never taken on the command line, where other users could see "
                             "them.")(f)


def quiet_option(f: Any) -> Any:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")(f)


def read_token(token_file: str | None) -> str | None:
    """The token in ``token_file`` (None: let the hub client find one)."""
    if token_file is None:
        return None
    from peftkit.hub_client.auth import read_token_file

    return read_token_file(token_file)


@contextlib.contextmanager
def plain_warnings(show_all: bool = True) -> Iterator[None]:
    """Show warnings as one 'Warning: ...' line on stderr, not Python's file:line form; ``show_all``
    also shows categories Python hides by default (DeprecationWarning), once per place."""
    with warnings.catch_warnings():
        if show_all:
            warnings.simplefilter("default")
        warnings.showwarning = lambda message, *args, **kwargs: echo_safe(f"Warning: {message}", err=True,
                                                                            multiline=True)
        yield
