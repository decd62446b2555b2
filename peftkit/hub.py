"""``import peftkit.hub`` (and ``from peftkit.hub import push``): the hub client's API, ``peftkit.hub_client``.

``peftkit.hub`` has always been that package as an attribute (``peftkit.hub.push(...)``, ``from peftkit import
hub``); this module makes the import statement give the same object, so both spellings name one module.
"""

import sys

from peftkit import hub_client

sys.modules[__name__] = hub_client
