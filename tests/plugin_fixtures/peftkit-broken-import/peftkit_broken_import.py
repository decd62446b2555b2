"""Fixture: a plugin whose import fails (a dependency that is not installed)."""

import peftkit_dependency_that_is_not_installed  # noqa: F401

PEFTKIT_PLUGIN_API = 1
