"""peftkit.hub_client: push, pull, search and compose adapters on a hub."""
