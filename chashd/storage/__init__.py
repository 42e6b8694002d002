"""Storage engines behind one synchronous interface, ``chashd.interfaces.IStorageEngine``.

- ``MemoryEngine``: a dict and a sorted index, for caches and tests.
- ``SQLiteEngine``: one WAL-mode SQLite file, durable across a process crash.

Both keep records ordered by ``(key_hash(key), key)``, so that the keys of a ring arc are one range scan.
They are pure: no Twisted and no clock; anything that may block for long (scans, purges,
checkpoints) is run by the kvstore service in its thread pool.
"""

from chashd.storage.memory import MemoryEngine
from chashd.storage.sqlite import SQLiteEngine

__all__ = ["MemoryEngine", "SQLiteEngine"]
