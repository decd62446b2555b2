"""Server-rendered web pages of the registry (search, adapter, user and organization pages, sign-in).

Served by the same process as the Hub API: :class:`WebSite` wraps a
:class:`~peftkit.registry.hub_api.HubApi`, answers the page routes and passes
every other request on. Needs jinja2 and markdown-it-py (the ``registry`` extra).
"""

from .site import PAGE_CSP, WebOptions, WebSite

__all__ = ["PAGE_CSP", "WebOptions", "WebSite"]
