"""peftkit.hub_rules: what the hub client and the registry both follow.

The rules a hub applies to names (repo ids, branches, revisions), the fields
of an adapter's card (task maps, the files a download counts, front matter),
and peftkit's data folder. The registry enforces them on what clients send;
the hub client checks them before it asks, and reads cards by them.

Standard library (and PyYAML, for front matter) only: this package imports
nothing else of peftkit, so the registry server never loads the hub client
or the core, and the hub client never loads the registry server.
"""
