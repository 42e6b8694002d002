"""``chashd.daemon.freeze_startup_objects``: the daemon's startup objects leave the garbage collector's sight
once the reactor runs (checked with a recording collector: freezing this test process would keep its
cycles for the rest of the run)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs

from chashd.daemon import freeze_startup_objects


class RecordingCollector:
    """Stands for the ``gc`` module: records what is asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def get_freeze_count(self) -> int:
        return 1234


class FreezeStartupObjectsTests:
    """What the daemons do with the garbage collector."""

    def test_collects_then_freezes_once_running(self) -> None:
        """Nothing happens before the reactor runs; then garbage is collected first, the rest frozen, and
        the count is logged."""
        reactor = MemoryReactor()
        collector = RecordingCollector()
        freeze_startup_objects(reactor, collector)
        assert collector.calls == []
        with capturedLogs() as events:
            reactor.run()
        assert collector.calls == ["collect", "freeze"]
        assert [e["count"] for e in events if "count" in e] == [1234]
