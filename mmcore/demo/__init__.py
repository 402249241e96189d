"""``mmcore demo``: small models trained from scratch on synthetic data (``mmcore.demo.data``), on a CPU.

``mmcore.demo.kosmos2``: Kosmos-2 learns referring expressions and grounded captions of coloured shapes.
"""
