"""The line protocol's pipelined client and its pool against the real server, pumped in memory
(chashd.memcache.client)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from chashd.commands import (
    Arith,
    Command,
    Delete,
    Get,
    Lease,
    Number,
    Quit,
    StatsCommand,
    StatsResult,
    Status,
    Store,
    Values,
    XApplied,
    XApply,
    XDeadline,
    XGet,
    XLease,
    XPut,
    XRelease,
)
from chashd.errors import DeadlinePassed, KeyLeased, NonNumericValue, StaleMap, UnknownCommand, ValueTooLarge
from chashd.interfaces import IReplySink
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.client import XGET_KEYS, XGET_LINE, KVClientPool, KVClientProtocol, KVConnectionLost, KVTimeout
from chashd.memcache.server import MemcacheServerFactory, MemcacheServerProtocol
from chashd.memcache.text import serialize_command
from chashd.record import Record
from chashd.storage.memory import MemoryEngine
from chashd.versions import Version
from tests.unit.test_memcache_server import T0, LaterBackend, RaisingBackend, make_factory


def recorded_writes(client: KVClientProtocol) -> list[bytes]:
    """The bytes ``client`` writes from now on, one item per write (they still go to its transport)."""
    writes: list[bytes] = []
    write = client.transport.write  # type: ignore[union-attr]

    def counting(data: bytes) -> None:
        writes.append(data)
        write(data)

    client.transport.write = counting  # type: ignore[union-attr,method-assign]
    return writes


def pair(
    server_factory: MemcacheServerFactory, clock: Clock | None = None, timeout: float | None = None
) -> tuple[KVClientProtocol, MemcacheServerProtocol, IOPump]:
    return connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: KVClientProtocol(clock, timeout),
    )


class ClientServerTests(SynchronousTestCase):
    """The gateway's client against the real server, pumped in memory."""

    def setUp(self) -> None:
        self.factory, self.clock = make_factory()
        self.client, self.server, self.pump = pair(self.factory)

    def send(self, command: Command) -> Any:
        d = self.client.send(command)
        self.pump.flush()
        return self.successResultOf(d)

    def test_round_trips(self) -> None:
        """Every key-value command and the extension come back as results."""
        assert self.send(Store("set", b"k", 3, 0, b"a\r\nb")) is Status.STORED
        values = self.send(Get((b"k", b"x"), cas=True))
        assert isinstance(values, Values) and values.items[0][1].value == b"a\r\nb"
        assert values.items[0][1].flags == 3
        assert self.send(Store("set", b"n", 0, 0, b"1")) is Status.STORED
        assert self.send(Arith(b"n", 41)) == Number(42)
        assert self.send(Delete(b"n", noreply=True)) is Status.DELETED
        record = Record(b"v", 1, 0, Version(5, "gw"))
        assert self.send(XPut(b"x", record)) is Status.STORED
        assert self.send(XGet((b"x", b"n"))) == Values(((b"x", record), (b"n", self._stored(b"n"))))
        applied = self.send(XApply(Version(10**15, "gw"), Store("append", b"x", 0, 0, b"w")))
        assert applied == XApplied(Status.STORED, Record(b"vw", 1, 0, Version(10**15, "gw")))
        stats = self.send(StatsCommand())
        assert isinstance(stats, StatsResult) and dict(stats.items)["curr_connections"] == "1"

    def _stored(self, key: bytes) -> Record:
        record = self.server.factory.backend.engine.get(key)
        assert record is not None
        return record  # type: ignore[no-any-return]

    def test_pipelined(self) -> None:
        """Many requests in flight are answered in order."""
        deferreds = [self.client.send(Store("set", b"k%d" % i, 0, 0, b"%d" % i)) for i in range(50)]
        deferreds += [self.client.send(Get((b"k%d" % i,))) for i in range(50)]
        assert self.client.pending == 100
        self.pump.flush()
        results: list[Any] = [self.successResultOf(d) for d in deferreds]
        assert results[:50] == [Status.STORED] * 50
        assert [r.items[0][1].value for r in results[50:]] == [b"%d" % i for i in range(50)]

    def test_errors_come_back_as_domain_errors(self) -> None:
        """An error reply fails the request's Deferred with the matching domain error."""
        self.send(Store("set", b"k", 0, 0, b"abc"))
        d = self.client.send(Arith(b"k", 1))
        self.pump.flush()
        self.failureResultOf(d, NonNumericValue)
        assert self.send(Get((b"k",))).items[0][1].value == b"abc"

    def test_connection_loss_fails_pending(self) -> None:
        """When the connection drops, every pending request fails with KVConnectionLost."""
        first = self.client.send(Get((b"a",)))
        second = self.client.send(Get((b"b",)))
        self.client.connectionLost(Failure(ConnectionDone()))
        assert "lost" in str(self.failureResultOf(first, KVConnectionLost).value)
        self.failureResultOf(second, KVConnectionLost)
        self.failureResultOf(self.client.send(Get((b"c",))), KVConnectionLost)
        assert not self.client.usable

    def test_unasked_bytes_drop_the_connection(self) -> None:
        """Bytes the client never asked for mean the pipeline lost step: the connection is dropped."""
        self.client.dataReceived(b"STORED\r\n")
        assert self.client.transport.disconnecting  # type: ignore[union-attr]

    def test_long_reads_go_out_in_several_lines(self) -> None:
        """An XGet of 2,048 keys of 250 bytes leaves as xget lines under XGET_LINE bytes and XGET_KEYS keys,
        in one write, and its Deferred fires with every record found, in request order."""
        keys = tuple(b"%0250d" % i for i in range(2048))
        for key in keys[::3]:
            self.send(Store("set", key, 0, 0, key[-4:]))
        d = self.client.send(XGet(keys))
        wire = b"".join(self.client.transport.stream)  # type: ignore[union-attr]
        lines = wire.split(b"\r\n")[:-1]
        assert len(lines) > 1 and all(line.startswith(b"xget ") for line in lines)
        assert max(len(line) + 2 for line in lines) <= XGET_LINE
        assert b" ".join(line[5:] for line in lines) == b" ".join(keys)
        self.pump.flush()
        found = self.successResultOf(d)
        assert isinstance(found, Values)
        assert [key for key, _ in found.items] == list(keys[::3])
        assert all(record.value == key[-4:] for key, record in found.items)
        many = tuple(b"k%d" % i for i in range(XGET_KEYS + 1))
        d = self.client.send(XGet(many))
        assert self.client.pending == 2
        self.pump.flush()
        assert self.successResultOf(d) == Values(())

    def test_a_failed_part_fails_the_read(self) -> None:
        """When the connection drops under a split read, its Deferred fails (once)."""
        d = self.client.send(XGet(tuple(b"%0250d" % i for i in range(200))))
        self.client.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, KVConnectionLost)

    def test_quit_is_not_a_request(self) -> None:
        """quit cannot be sent as a request."""
        from chashd.commands import Quit

        with pytest.raises(ValueError):
            self.client.send(Quit())


class ForwardGetTests(SynchronousTestCase):
    """``forward_get``: a plain get whose reply bytes go to a sink, in step with the other requests."""

    def test_replies_in_order_with_other_requests(self) -> None:
        """The sink gets the reply's bytes (a hit, a miss) in their place among Deferred requests."""
        factory, _ = make_factory()
        client, _, pump = pair(factory)
        sink = Sink()
        stored = client.send(Store("set", b"k", 3, 0, b"a\r\nb"))
        assert client.forward_get(b"k", sink)
        got = client.send(Get((b"k",)))
        assert client.forward_get(b"z", sink)
        assert b"".join(client.transport.stream).endswith(b"get k\r\nget k\r\nget z\r\n")  # type: ignore[union-attr]
        pump.flush()
        assert self.successResultOf(stored) is Status.STORED
        assert sink.replies == [b"VALUE k 3 4\r\na\r\nb\r\nEND\r\n", b"END\r\n"]
        assert isinstance(self.successResultOf(got), Values)

    def test_failures_reach_the_sink(self) -> None:
        """A timeout, a lost connection and a closed one reach the sink as send's Deferred would fail."""
        clock = Clock()
        factory, _ = make_factory(LaterBackend(clock))
        client, _, pump = pair(factory, clock=clock, timeout=5)
        sink = Sink()
        assert client.forward_get(b"a", sink) and client.forward_get(b"b", sink)
        pump.flush()
        clock.advance(5)
        assert [type(e) for e in sink.errors] == [KVTimeout, KVConnectionLost]
        assert not client.forward_get(b"c", sink)
        assert len(sink.errors) == 2 and not sink.replies

    def test_a_called_sink_is_skipped(self) -> None:
        """A sink whose reader gave up (``called``) gets nothing; the replies behind it stay in step."""
        factory, _ = make_factory()
        client, _, pump = pair(factory)
        gone, sink = Sink(), Sink()
        assert client.forward_get(b"a", gone) and client.forward_get(b"b", sink)
        gone.called = True
        pump.flush()
        assert gone.replies == [] and sink.replies == [b"END\r\n"]


@implementer(IReplySink)
class Sink:
    """An ``IReplySink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.called = False
        self.replies: list[bytes] = []
        self.errors: list[Any] = []

    def callback(self, reply: bytes) -> None:
        self.replies.append(reply)

    def errback(self, error: Any) -> None:
        self.errors.append(error)


class ClientTimeoutTests(SynchronousTestCase):
    """Per-request timeouts on the injected clock."""

    def test_timeout_fails_and_drops(self) -> None:
        """A request unanswered after its timeout fails with KVTimeout; the others behind it fail too."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        client, _, pump = pair(factory, clock=clock, timeout=5)
        first = client.send(Get((b"a",)))
        second = client.send(Get((b"b",)))
        pump.flush()
        clock.advance(5)
        self.failureResultOf(first, KVTimeout)
        self.failureResultOf(second, KVConnectionLost)
        pump.flush()
        assert clock.getDelayedCalls() == []

    def test_answered_in_time(self) -> None:
        """An answer before the timeout stands: the deadline check then finds nothing to fail and ends."""
        clock = Clock()
        factory, _ = make_factory()
        client, _, pump = pair(factory, clock=clock, timeout=5)
        d = client.send(Get((b"a",)))
        pump.flush()
        assert self.successResultOf(d) == Values(())
        clock.advance(5)
        assert client.usable
        assert clock.getDelayedCalls() == []

    def test_one_timer_per_connection(self) -> None:
        """Many pending requests share one deadline timer, not one timer each."""
        clock = Clock()
        factory, _ = make_factory(LaterBackend(clock))
        client, _, pump = pair(factory, clock=clock, timeout=5)
        for i in range(20):
            client.send(Get((b"k%d" % i,)))
        pump.flush()
        assert client.pending == 20
        assert len(clock.getDelayedCalls()) == 1

    def test_each_request_gets_its_whole_timeout(self) -> None:
        """A request sent after the first one fails only at its own deadline, not at the first one's."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        client, _, pump = pair(factory, clock=clock, timeout=5)
        first = client.send(Get((b"a",)))
        pump.flush()
        clock.advance(3)
        second = client.send(Get((b"b",)))
        pump.flush()
        backend.fire(0)
        pump.flush()
        assert self.successResultOf(first) == Values(())
        clock.advance(2)  # the first request's deadline: the second has 3 s left
        self.assertNoResult(second)
        assert client.usable
        clock.advance(2.9)
        self.assertNoResult(second)
        clock.advance(0.1)
        self.failureResultOf(second, KVTimeout)
        assert not client.usable
        pump.flush()
        assert clock.getDelayedCalls() == []

    def test_timer_restarts_after_an_idle_spell(self) -> None:
        """After the timer ended on an empty pipeline, a new request gets a timer again."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        client, _, pump = pair(factory, clock=clock, timeout=5)
        answered = client.send(Get((b"a",)))
        pump.flush()
        backend.fire(0)
        pump.flush()
        self.successResultOf(answered)
        clock.advance(5)
        assert clock.getDelayedCalls() == []
        d = client.send(Get((b"b",)))
        pump.flush()
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(5)
        self.failureResultOf(d, KVTimeout)

    def test_timeout_needs_a_clock(self) -> None:
        """A timeout without a clock is refused."""
        with pytest.raises(ValueError):
            KVClientProtocol(None, 5)


class AnnounceTests(SynchronousTestCase):
    """``KVClientProtocol.announce``: the map epoch a gateway routes by, named once per change."""

    def test_named_once_per_change(self) -> None:
        """An epoch is sent when newer than the last one named (not again, not an older one); the xapply
        commands after it carry it on the server, which refuses them once it knows a newer map."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        backend.execute(Store("set", b"n", 0, 0, b"1"))
        for epoch in (5, 5, 4, 6):
            client.announce(epoch)
        pump.flush()
        assert backend.stats()["cmd_xmap"] == 2 and backend.map_epoch == 6 and client.map_epoch == 6
        applied = client.send(XApply(Version(T0_MS + 10, "gw"), Arith(b"n", 1)))
        pump.flush()
        assert self.successResultOf(applied) == XApplied(Number(2), Record(b"2", 0, 0, Version(T0_MS + 10, "gw")))
        backend.know_epoch(7)
        refused = client.send(XApply(Version(T0_MS + 20, "gw"), Arith(b"n", 1)))
        pump.flush()
        assert self.failureResultOf(refused, StaleMap).value.known == 7

    def test_a_kvstore_of_an_earlier_version(self) -> None:
        """A server that answers ``xmap`` ERROR (an earlier version) is named no epoch again."""
        factory, _ = make_factory(RaisingBackend(UnknownCommand()))
        client, server, pump = pair(factory)
        client.announce(5)
        pump.flush()
        assert client.map_epoch is None
        client.announce(6)
        assert client.pending == 0

    def test_fenced_copy(self) -> None:
        """An XPut with an epoch goes as ``xfence <epoch>`` and the ``xput`` on the same connection: stored
        while the kvstore knows no newer map, refused (StaleMap, nothing stored) once it does."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        first = Record(b"1", 0, 0, Version(T0_MS + 10, "gw"))
        stored = client.send(XPut(b"n", first, epoch=5))
        pump.flush()
        assert self.successResultOf(stored) is Status.STORED and backend.map_epoch == 5
        backend.know_epoch(6)
        refused = client.send(XPut(b"n", Record(b"2", 0, 0, Version(T0_MS + 20, "gw")), epoch=5))
        pump.flush()
        assert self.failureResultOf(refused, StaleMap).value.known == 6
        assert backend.engine.get(b"n") == first
        assert backend.stats()["cmd_xfence"] == 2 and client.fences and client.pending == 0

    def test_fenced_copy_in_one_write(self) -> None:
        """The ``xfence`` and its ``xput`` leave in one write (one send on the socket, not two)."""
        writes: list[bytes] = []

        class Counting(StringTransport):
            def write(self, data: bytes) -> None:
                writes.append(data)
                super().write(data)

        client = KVClientProtocol(None, None)
        client.makeConnection(Counting())
        put = XPut(b"n", Record(b"1", 0, 0, Version(T0_MS + 10, "gw")), epoch=5)
        client.send(put)
        assert writes == [b"xfence 5\r\n" + serialize_command(put)] and client.pending == 2

    def test_fenced_copy_sent_to_a_sink(self) -> None:
        """``send_to`` fences an XPut with an epoch as ``send`` does (a plain one goes unfenced): the copy is
        refused (StaleMap to the sink, nothing stored) by a kvstore that knows a newer map."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        backend.know_epoch(6)
        sink = Sink()
        assert client.send_to(XPut(b"n", Record(b"1", 0, 0, Version(T0_MS + 10, "gw")), epoch=5), sink)
        assert client.send_to(XPut(b"m", Record(b"1", 0, 0, Version(T0_MS + 10, "gw"))), sink)
        pump.flush()
        (error,) = sink.errors
        assert isinstance(error, StaleMap) and error.known == 6
        assert sink.replies == [Status.STORED]  # type: ignore[comparison-overlap]  # a result, not bytes
        assert backend.engine.get(b"n") is None and backend.stats()["cmd_xfence"] == 1

    def test_fenced_copies_sent_many(self) -> None:
        """``send_many`` fences each XPut with an epoch as ``send`` does, in the group's one write (a plain
        one goes unfenced): a kvstore that knows a newer map refuses the fenced copies (their StaleMap in the
        group's results, nothing stored) and stores the plain one; the fences' answers are not the group's."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        writes = recorded_writes(client)
        backend.know_epoch(6)
        record = Record(b"1", 0, 0, Version(T0_MS + 10, "gw"))
        puts = [XPut(b"n", record, epoch=5), XPut(b"m", record), XPut(b"o", record, epoch=5)]
        d = client.send_many(puts)
        wire = [serialize_command(p) for p in puts]
        assert writes == [b"xfence 5\r\n" + wire[0] + wire[1] + b"xfence 5\r\n" + wire[2]]
        assert client.pending == 5
        pump.flush()
        refused, stored, refused_too = self.successResultOf(d)
        assert stored is Status.STORED
        for failure in (refused, refused_too):
            assert isinstance(failure, Failure) and isinstance(failure.value, StaleMap) and failure.value.known == 6
        assert backend.engine.get(b"n") is None and backend.engine.get(b"o") is None
        assert backend.engine.get(b"m") == record
        assert backend.stats()["cmd_xfence"] == 2 and client.fences and client.pending == 0

    def earlier_version_knowing(self, epoch: int) -> tuple[KVClientProtocol, LocalBackend, IOPump]:
        """A client connected to a kvstore whose parser does not know ``xfence`` (an earlier version) and
        that knows map ``epoch``."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        del server._parser._dispatch[b"xfence"]  # as the parser of an earlier version
        backend.know_epoch(epoch)
        return client, backend, pump

    def test_fenced_copies_sent_many_to_a_kvstore_of_an_earlier_version(self) -> None:
        """A kvstore that answers ``xfence`` ERROR stores the copies of a ``send_many`` unfenced; the group
        gets their answers in order, and the connection sends no more fences."""
        client, backend, pump = self.earlier_version_knowing(6)
        record = Record(b"1", 0, 0, Version(T0_MS + 10, "gw"))
        d = client.send_many([XPut(b"n", record, epoch=5), Get((b"n",))])
        pump.flush()
        stored, got = self.successResultOf(d)
        assert stored is Status.STORED and isinstance(got, Values) and got.items[0][1].value == b"1"
        assert not client.fences and client.pending == 0
        client.send_many([XPut(b"o", record, epoch=5)])
        assert client.pending == 1

    def test_fenced_copy_to_a_kvstore_of_an_earlier_version(self) -> None:
        """A kvstore that does not know ``xfence`` answers it ERROR and stores the xput after it unfenced; the
        connection sends its next copies as plain xputs (no ERROR per copy)."""
        client, backend, pump = self.earlier_version_knowing(6)
        for clock in (10, 20):
            put = client.send(XPut(b"n", Record(b"%d" % clock, 0, 0, Version(T0_MS + clock, "gw")), epoch=5))
            pump.flush()
            assert self.successResultOf(put) is Status.STORED
            assert not client.fences and client.pending == 0
        assert backend.stats()["cmd_xfence"] == 0 and backend.engine.get(b"n").value == b"20"

    def test_pool_names_it_on_each_connection(self) -> None:
        """A pool names its epoch on each connection once it is made (after the token), and again on each
        when it changes."""
        reactor = MemoryReactorClock()
        reactor.advance(T0)
        backend = LocalBackend(MemoryEngine(), "kv-1", reactor, 1024)
        reactor.listenTCP(4321, MemcacheServerFactory(backend, reactor, token=b"t0ken"))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 4321)
        pool = KVClientPool(reactor, "127.0.0.1", 4321, size=2, timeout=None, endpoint=endpoint, token="t0ken")
        completer = ConnectionCompleter(reactor)
        pool.announce(3)
        pool.startService()
        pumps = [completer.succeedOnce(), completer.succeedOnce()]
        for pump in pumps:
            assert pump is not None
            pump.flush()
        assert backend.stats()["cmd_xmap"] == 2 and backend.map_epoch == 3
        pool.announce(4)
        for pump in pumps:
            assert pump is not None
            pump.flush()
        assert backend.stats()["cmd_xmap"] == 4 and [c.map_epoch for c in pool.connections] == [4, 4]
        pool.stopService()


T0_MS = int(T0 * 1000) << 16


class PoolHarness(SynchronousTestCase):
    """A ``KVClientPool`` of 2 connections to a kvstore server on a ``MemoryReactorClock``; connections are
    completed by ``self.completer``."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        backend = LocalBackend(MemoryEngine(), "kv-1", self.reactor, 1024)
        self.reactor.listenTCP(4321, MemcacheServerFactory(backend, self.reactor))
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 4321)
        self.pool = KVClientPool(self.reactor, "127.0.0.1", 4321, size=2, timeout=None, endpoint=endpoint)
        self.completer = ConnectionCompleter(self.reactor)


class PoolTests(PoolHarness):
    """KVClientPool keeps connections to one kvstore and reconnects."""

    def test_fills_one_connection_then_spreads(self) -> None:
        """Requests go over the first connection (so that they leave together) until it has ``spill_at``
        pending, then over the least busy one."""
        self.pool.spill_at = 2
        self.pool.startService()
        pumps = [self.completer.succeedOnce(), self.completer.succeedOnce()]
        assert len(self.pool.connections) == 2
        d1 = self.pool.send(Store("set", b"k", 0, 0, b"v"))
        d2 = self.pool.send(Get((b"k",)))
        assert [c.pending for c in self.pool.connections] == [2, 0]
        d3 = self.pool.send(Get((b"k",)))
        d4 = self.pool.send(Get((b"k",)))
        d5 = self.pool.send(Get((b"k",)))
        assert [c.pending for c in self.pool.connections] == [3, 2]
        for pump in pumps:
            assert pump is not None
            pump.flush()
        assert self.successResultOf(d1) is Status.STORED
        for d in (d2, d3, d4, d5):
            assert isinstance(self.successResultOf(d), Values)
        self.pool.stopService()
        for pump in pumps:
            assert pump is not None
            pump.flush()
        assert self.pool.connections == []

    def test_skips_a_connection_that_failed(self) -> None:
        """After a request times out on one connection, the next request goes over another one."""
        reactor = MemoryReactorClock()
        reactor.listenTCP(4322, MemcacheServerFactory(LaterBackend(Clock()), reactor))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 4322)
        pool = KVClientPool(reactor, "127.0.0.1", 4322, size=2, timeout=1.0, endpoint=endpoint)
        pool.startService()
        completer = ConnectionCompleter(reactor)
        pumps = [completer.succeedOnce(), completer.succeedOnce()]
        first, second = pool.connections
        timed_out = pool.send(Get((b"a",)))
        for pump in pumps:
            assert pump is not None
            pump.flush()
        reactor.advance(1.0)
        self.failureResultOf(timed_out, KVTimeout)
        assert not first.usable
        pool.send(Get((b"b",)))
        assert (first.pending, second.pending) == (0, 1)
        pool.stopService()

    def test_waits_for_a_connection(self) -> None:
        """A request sent before any connection goes over the first one made."""
        self.pool.startService()
        d = self.pool.send(Get((b"k",)))
        pump = self.completer.succeedOnce()
        assert pump is not None
        pump.flush()
        assert self.successResultOf(d) == Values(())

    def test_unreachable(self) -> None:
        """When connecting fails the request fails with KVConnectionLost; the pool retries later."""
        self.pool.startService()
        d = self.pool.send(Get((b"k",)))
        self.completer.failOnce()
        self.completer.failOnce()
        self.failureResultOf(d, KVConnectionLost)
        assert self.reactor.getDelayedCalls()  # the retries
        self.pool.stopService()

    def test_stopped(self) -> None:
        """A stopped pool refuses requests at once."""
        self.failureResultOf(self.pool.send(Get((b"k",))), KVConnectionLost)

    def test_forward_get_needs_a_connection(self) -> None:
        """``forward_get`` declines while no connection is up (``send`` would wait), and forwards over one."""
        sink = Sink()
        assert not self.pool.forward_get(b"k", sink)
        self.pool.startService()
        assert not self.pool.forward_get(b"k", sink)
        pump = self.completer.succeedOnce()
        assert pump is not None and self.pool.forward_get(b"k", sink)
        pump.flush()
        assert sink.replies == [b"END\r\n"]
        self.pool.stopService()


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
        assert self.server.factory.backend.engine.get(b"a") is None

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


class EarlierKvstore:
    """A kvstore of an earlier version: ``xlease`` and ``xdeadline`` are unknown commands (``ERROR``), the
    rest runs on a real backend."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend

    def execute(self, command: Command) -> Any:
        if type(command) in (XLease, XDeadline, XRelease):
            raise UnknownCommand()
        if type(command) in (XPut, XApply):  # its parser stamps nothing on them
            command = replace(cast(XPut, command), lease=None)
        return self.backend.execute(command)


class LeaseClientTests(SynchronousTestCase):
    """A read-modify-write's reads go as ``xlease``, its command and copies after an ``xdeadline``; a kvstore of
    an earlier version answers both ``ERROR``: reads go as ``xget``, stores without a deadline."""

    def test_leased_read_and_stores(self) -> None:
        """An exclusive xlease is refused (KeyLeased, with the time the other lease ends) while another
        command's lease lasts; the xdeadline and its xapply leave in one write; a store past its deadline is
        refused (DeadlinePassed, nothing stored); the holder's copy ends its lease there."""
        factory, clock = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        backend.execute(Store("set", b"n", 0, 0, b"1"))
        deadline = int(T0 * 1000) + 2000
        read = client.send(XLease(b"n", Lease("gw1:1", deadline)))
        refused = client.send(XLease(b"n", Lease("gw2:1", deadline, True)))
        pump.flush()
        assert [r.value for _, r in cast(Values, self.successResultOf(read)).items] == [b"1"]
        assert self.failureResultOf(refused, KeyLeased).value.until == deadline + 500
        writes = recorded_writes(client)
        apply = XApply(Version(T0_MS + 10, "gw1"), Arith(b"n", 1), lease=Lease("gw1:1", deadline))
        applied = client.send(apply)
        assert client.leases  # it answered an xlease: the lease goes in the xapply's line
        assert writes == [serialize_command(apply)] and b" ~L%ds" % deadline in writes[0]
        pump.flush()
        assert self.successResultOf(applied).result == Number(2)  # type: ignore[union-attr]
        assert len(backend.leases) == 0  # its command ran: the lease ended
        clock.advance(2.001)
        late = client.send(
            XPut(b"n", Record(b"9", 0, 0, Version(T0_MS + 20, "gw1")), epoch=1, lease=Lease("gw1:1", deadline))
        )
        pump.flush()
        assert self.failureResultOf(late, DeadlinePassed).value.deadline == deadline
        assert backend.engine.get(b"n").value == b"2"
        stats = backend.stats()
        assert (stats["cmd_xlease"], stats["xlease_refused_total"], stats["rmw_deadline_refused_total"]) == (2, 1, 1)
        assert client.leases and client.deadlines and client.pending == 0
        assert backend.stats()["cmd_xdeadline"] == 0  # not one line more than without leases

    def test_before_the_kvstore_is_known_to_take_leases(self) -> None:
        """On a connection whose kvstore has answered no ``xlease`` yet, a lease goes as an ``xdeadline`` line
        before the ``xapply`` or the copy (which a kvstore of an earlier version answers ERROR, taking the
        command); once it has, in the xapply's extension token and the copy's ``xfence`` line."""
        factory, clock = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, server, pump = pair(factory)
        client.announce(3)
        pump.flush()
        backend.execute(Store("set", b"n", 0, 0, b"1"))
        lease = Lease("gw1:1", int(T0 * 1000) + 2000, True)
        writes = recorded_writes(client)
        apply = XApply(Version(T0_MS + 10, "gw1"), Arith(b"n", 1), lease=lease)
        copy = XPut(b"m", Record(b"1", 0, 0, Version(T0_MS + 10, "gw1")), epoch=3, lease=lease)
        first = [client.send(apply), client.send(copy)]
        plain = serialize_command(replace(apply, lease=None))
        assert writes == [
            b"xdeadline gw1:1 %d x\r\n" % lease.deadline + plain,
            b"xfence 3\r\n" + b"xdeadline gw1:1 %d x\r\n" % lease.deadline + serialize_command(copy),
        ]
        pump.flush()
        assert [self.successResultOf(d) for d in first][1] is Status.STORED
        assert backend.stats()["cmd_xdeadline"] == 2
        read = client.send(XLease(b"o", lease))
        pump.flush()
        assert self.successResultOf(read) == Values(()) and client.leases
        del writes[:]
        later = client.send(replace(copy, key=b"p"))
        assert writes == [b"xfence 3 gw1:1 %d x\r\n" % lease.deadline + serialize_command(replace(copy, key=b"p"))]
        pump.flush()
        assert self.successResultOf(later) is Status.STORED
        assert backend.stats()["cmd_xdeadline"] == 2 and backend.stats()["cmd_xfence"] == 2

    def test_releases(self) -> None:
        """``xrelease`` ends a lease (OK); a kvstore that answers it ERROR (a version that takes leases but not
        releases) is sent no more (answered OK at once, nothing written), and nor is one that takes no leases."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        client, _, pump = pair(factory)
        backend.execute(Store("set", b"n", 0, 0, b"1"))
        deadline = int(T0 * 1000) + 2000
        client.send(XLease(b"n", Lease("gw1:1", deadline)))
        released = client.send(XRelease(b"n", "gw1:1", deadline))
        pump.flush()
        assert self.successResultOf(released) is Status.OK and len(backend.leases) == 0

        class NoReleases(EarlierKvstore):
            def execute(self, command: Command) -> Any:
                if type(command) is XRelease:
                    raise UnknownCommand()
                return self.backend.execute(command)

        factory, _ = make_factory(NoReleases(backend))
        client, _, pump = pair(factory)
        client.send(XLease(b"n", Lease("gw1:2", deadline)))
        refused = client.send(XRelease(b"n", "gw1:2", deadline))
        pump.flush()
        self.failureResultOf(refused, UnknownCommand)
        assert not client.releases and client.leases
        writes = recorded_writes(client)
        assert self.successResultOf(client.send(XRelease(b"n", "gw1:2", deadline))) is Status.OK
        assert writes == []
        factory, _ = make_factory(EarlierKvstore(backend))
        client, _, pump = pair(factory)
        client.send(XLease(b"n", Lease("gw1:3", deadline)))
        pump.flush()
        assert client.leases is False and client.releases
        writes = recorded_writes(client)
        assert self.successResultOf(client.send(XRelease(b"n", "gw1:3", deadline))) is Status.OK
        assert writes == []

    def test_a_kvstore_of_an_earlier_version(self) -> None:
        """``xlease`` answered ERROR is sent again as ``xget`` (the read answers right), and the connection
        sends the next ones as ``xget``; ``xdeadline`` answered ERROR is not sent again, and the store after
        it is taken as any."""
        clock = Clock()
        clock.advance(T0)
        real = LocalBackend(MemoryEngine(), "kv-1", clock, 1024)
        real.execute(Store("set", b"n", 0, 0, b"1"))
        factory, _ = make_factory(EarlierKvstore(real))
        client, server, pump = pair(factory)
        read = client.send(XLease(b"n", Lease("gw1:1", 1)))
        pump.flush()
        first = cast(Values, self.successResultOf(read))
        assert [r.value for _, r in first.items] == [b"1"]
        assert not client.leases
        again = client.send(XLease(b"n", Lease("gw1:2", 1)))
        pump.flush()
        assert self.successResultOf(again) == first
        assert real.stats()["cmd_xget"] == 2
        put = client.send(XPut(b"n", Record(b"5", 0, 0, Version(T0_MS + 100, "gw1")), lease=Lease("gw1:2", 1)))
        pump.flush()
        assert self.successResultOf(put) is Status.STORED and not client.deadlines
        writes: list[bytes] = []
        client.transport.write = writes.append  # type: ignore[union-attr,method-assign]
        client.send(XPut(b"n", Record(b"6", 0, 0, Version(T0_MS + 101, "gw1")), lease=Lease("gw1:3", 1)))
        assert not writes[0].startswith(b"xdeadline")
