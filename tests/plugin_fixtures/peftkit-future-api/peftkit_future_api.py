"""Fixture: a plugin written for a plugin API this peftkit does not implement."""

import peftkit

PEFTKIT_PLUGIN_API = 2


@peftkit.hookimpl
def peftkit_register_methods(register):
    raise AssertionError("never called: the plugin API version is checked first")
