"""Exceptions raised by peftkit. Every message names what is wrong and how to fix it."""

from __future__ import annotations


#: What to do about a damaged file in an adapter folder. A hub's copy is checked against the hash the hub
#: announced, so downloading again gives the same bytes: the file is damaged where it was made.
DAMAGED_FILE_FIX = ("save the adapter again; if it came from a hub, that is the file that was pushed (a download is "
                    "checked against the hub's hash), so its owner must push a fixed one")


class PeftkitError(Exception):
    """Base class of every error peftkit raises on purpose. ``exit_code``: the status the ``peftkit`` command
    exits with for it (1 unless a subclass says otherwise)."""

    exit_code = 1


class PushAfterTrainingError(PeftkitError):
    """Training finished and the adapter is saved, but publishing it failed: the ``peftkit train --push`` run
    exits 3, so a script can push the saved folder again rather than train again."""

    exit_code = 3


class ConfigError(PeftkitError, ValueError):
    """An adapter config or a shorthand spec is malformed (unknown key, wrong type, ...)."""


class TargetError(PeftkitError, ValueError):
    """Target modules (or insertion points) could not be found in the model."""


class AdapterError(PeftkitError, KeyError):
    """An adapter name is unknown, already taken, or used in the wrong state."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class AdapterLoadError(PeftkitError, ValueError):
    """An adapter folder cannot be loaded; the model is left exactly as it was."""


class PluginError(PeftkitError, RuntimeError):
    """A plugin is missing, broken or incompatible."""


class CompositionError(PeftkitError, ValueError):
    """A composition of adapters is malformed or not supported by a member's method."""


class MergeError(PeftkitError, ValueError):
    """Adapters cannot be merged (in weight space or into the base model)."""


class ModelSourceError(PeftkitError, ConnectionError):
    """A model or tokenizer given by hub id cannot be fetched: offline, or the hub cannot be reached."""
