"""Thin model layers over ``mmcore.ops``: Kosmos-2 (``mmcore.models.kosmos2``); shared blocks in ``layers``."""
