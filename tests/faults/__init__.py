"""A fault-injection suite of our own (Jepsen-style) for chashd.

``runner`` starts a cluster in a private network namespace (each daemon on its own 127.0.0.x), drives
clients through the gateways while ``nemesis`` injects faults from a seeded schedule, heals, settles, and
hands the history to ``checker``. See tests/faults/README.md.
"""

__all__: list[str] = []
