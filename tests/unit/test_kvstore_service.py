"""The kvstore's periodic jobs (chashd.kvstore.service.Housekeeping) on the clock they are given."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from chashd.kvstore.service import Housekeeping
from chashd.record import Record
from chashd.storage.memory import MemoryEngine
from chashd.versions import Version


def in_pool(fn: Any, *args: Any) -> Deferred[Any]:
    """The thread pool's stand-in: the job runs at once on the calling thread."""
    return maybeDeferred(fn, *args)


def test_purge_runs_on_the_given_clock() -> None:
    """The purge runs when the given clock reaches its interval (not on the global reactor): a record that
    expired by then is forgotten and counted in ``purged_total``; stopping cancels the clock's calls."""
    clock = Clock()
    clock.advance(1_000)
    engine = MemoryEngine()
    engine.put(b"gone", Record(b"v", 0, 1_010, Version(1 << 16, "gw")))
    engine.put(b"kept", Record(b"v", 0, 0, Version(1 << 16, "gw")))
    housekeeping = Housekeeping(engine, in_pool, clock)
    housekeeping.startService()
    assert housekeeping.stats() == {"purged_total": 0}  # the first run, at 1,000 s: nothing expired yet
    assert clock.getDelayedCalls()
    clock.advance(Housekeeping.purge_interval)
    assert housekeeping.stats() == {"purged_total": 1}
    assert engine.get(b"gone") is None
    assert engine.get(b"kept") is not None
    housekeeping.stopService()
    assert not clock.getDelayedCalls()
