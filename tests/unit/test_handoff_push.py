"""The handoff's way of pushing a page: ``send_many`` of the line-protocol client and its pool (one write
and one Deferred for a group of commands), against the real server pumped in memory."""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from chashd.commands import Get, Quit, Status, Store, Values, XPut
from chashd.errors import ValueTooLarge
from chashd.memcache.client import KVConnectionLost, KVTimeout
from chashd.record import Record
from chashd.versions import Version
from tests.unit.test_memcache_client import PoolHarness, pair
from tests.unit.test_memcache_server import LaterBackend, make_factory


def xmove(key: bytes, clock: int, value: bytes = b"v") -> XPut:
    """A record as a handoff pushes it."""
    return XPut(key, Record(value, 0, 0, Version(clock, "w")), handoff=True)


class SendManyTests(SynchronousTestCase):
    """``KVClientProtocol.send_many``."""

    def setUp(self) -> None:
        self.factory, self.clock = make_factory()
        self.client, self.server, self.pump = pair(self.factory)

    def test_answers_in_order(self) -> None:
        """The Deferred fires with each command's result, or the Failure of its error, in order."""
        self.client.send(xmove(b"a", 5))
        self.pump.flush()
        d = self.client.send_many([xmove(b"a", 4), xmove(b"b", 1), xmove(b"c", 1, b"x" * 2000), xmove(b"a", 6)])
        self.pump.flush()
        results = self.successResultOf(d)
        assert results[0] is Status.EXISTS and results[1] is Status.STORED and results[3] is Status.STORED
        assert isinstance(results[2], Failure) and results[2].check(ValueTooLarge)
        assert self.client.pending == 0

    def test_one_write(self) -> None:
        """The group leaves in one write to the transport."""
        writes: list[bytes] = []
        write = self.client.transport.write  # type: ignore[union-attr]

        def counting(data: bytes) -> None:
            writes.append(data)
            write(data)

        self.client.transport.write = counting  # type: ignore[union-attr,method-assign]
        self.client.send_many([xmove(b"k%d" % i, 1) for i in range(30)])
        assert len(writes) == 1 and writes[0].count(b"xmove ") == 30

    def test_mixed_with_single_sends(self) -> None:
        """Groups and single requests pipelined together each get their own replies."""
        first = self.client.send(Store("set", b"k", 0, 0, b"1"))
        group = self.client.send_many([Get((b"k",)), xmove(b"x", 1), Get((b"x",))])
        last = self.client.send(Get((b"x",)))
        self.pump.flush()
        assert self.successResultOf(first) is Status.STORED
        got, stored, moved = self.successResultOf(group)
        assert isinstance(got, Values) and got.items[0][1].value == b"1"
        assert stored is Status.STORED and isinstance(moved, Values) and moved.items[0][0] == b"x"
        assert isinstance(self.successResultOf(last), Values)

    def test_noreply_is_dropped(self) -> None:
        """A noreply command of a group is sent expecting its reply, so the pipeline keeps step."""
        d = self.client.send_many([XPut(b"k", Record(b"v", version=Version(1, "w")), noreply=True), Get((b"k",))])
        self.pump.flush()
        stored, got = self.successResultOf(d)
        assert stored is Status.STORED and isinstance(got, Values)

    def test_connection_loss(self) -> None:
        """When the connection drops, each unanswered command of the group is a KVConnectionLost Failure."""
        d = self.client.send_many([xmove(b"a", 1), xmove(b"b", 1)])
        self.client.connectionLost(Failure(ConnectionDone()))
        results: list[Any] = self.successResultOf(d)
        assert [r.check(KVConnectionLost) for r in results] == [KVConnectionLost] * 2
        again: list[Any] = self.successResultOf(self.client.send_many([xmove(b"c", 1)]))
        assert again[0].check(KVConnectionLost)

    def test_empty(self) -> None:
        """An empty group is answered at once and sends nothing."""
        assert self.successResultOf(self.client.send_many([])) == []
        assert self.client.pending == 0

    def test_quit_is_refused_before_anything_is_sent(self) -> None:
        """A group with ``quit`` is refused whole: nothing is sent, nothing is pending."""
        with pytest.raises(ValueError):
            self.client.send_many([xmove(b"a", 1), Quit()])
        assert self.client.pending == 0
        self.pump.flush()
        assert self.server.factory.backend.engine.get(b"a") is None  # type: ignore[attr-defined]

    def test_cancelled_group(self) -> None:
        """A group cancelled by its caller takes its answers without raising; later requests are answered."""
        d = self.client.send_many([xmove(b"a", 1), xmove(b"b", 1)])
        d.cancel()
        self.failureResultOf(d)
        later = self.client.send(Get((b"a",)))
        self.pump.flush()
        assert isinstance(self.successResultOf(later), Values) and self.client.pending == 0

    def test_timeout(self) -> None:
        """A group unanswered within the timeout: its first command is a KVTimeout, the rest lost."""
        clock = Clock()
        factory, _ = make_factory(LaterBackend(clock))
        client, _, pump = pair(factory, clock=clock, timeout=5)
        d = client.send_many([Get((b"a",)), Get((b"b",))])
        pump.flush()
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(5)
        first, second = cast(list[Any], self.successResultOf(d))
        assert first.check(KVTimeout) and second.check(KVConnectionLost)
        pump.flush()
        assert clock.getDelayedCalls() == []


class PoolSendManyTests(PoolHarness):
    """``KVClientPool.send_many``."""

    def test_least_busy_connection(self) -> None:
        """A group goes whole over the connection with the fewest pending requests."""
        self.pool.startService()
        pumps = [self.completer.succeedOnce(), self.completer.succeedOnce()]
        self.pool.send(Get((b"k",)))
        d = self.pool.send_many([xmove(b"a", 1), xmove(b"b", 1), xmove(b"c", 1)])
        assert [c.pending for c in self.pool.connections] == [1, 3]
        for pump in pumps:
            assert pump is not None
            pump.flush()
        assert self.successResultOf(d) == [Status.STORED] * 3
        self.pool.stopService()

    def test_waits_for_a_connection(self) -> None:
        """A group sent before any connection goes over the first one made."""
        self.pool.startService()
        d = self.pool.send_many([xmove(b"a", 1)])
        pump = self.completer.succeedOnce()
        assert pump is not None
        pump.flush()
        assert self.successResultOf(d) == [Status.STORED]
        self.pool.stopService()

    def test_unreachable(self) -> None:
        """When connecting fails, each command of the group is a KVConnectionLost Failure."""
        self.pool.startService()
        d = self.pool.send_many([xmove(b"a", 1), xmove(b"b", 1)])
        self.completer.failOnce()
        self.completer.failOnce()
        results: list[Any] = self.successResultOf(d)
        assert [r.check(KVConnectionLost) for r in results] == [KVConnectionLost] * 2
        self.pool.stopService()

    def test_stopped(self) -> None:
        """A stopped pool answers each command with KVConnectionLost at once."""
        (result,) = cast(list[Any], self.successResultOf(self.pool.send_many([xmove(b"a", 1)])))
        assert result.check(KVConnectionLost)
