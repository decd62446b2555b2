"""Fixture: a hook implemented with the wrong argument name."""

import peftkit

PEFTKIT_PLUGIN_API = 1


@peftkit.hookimpl
def peftkit_register_methods(registry):
    raise AssertionError("never called: the signature is checked first")
