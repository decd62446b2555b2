"""peftkit.plugins: the built-in tuning methods, one folder each.

Each folder is a plugin registered through the ``peftkit`` entry-point group,
exactly as a third-party plugin would be.
"""
