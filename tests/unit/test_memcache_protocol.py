"""The line protocol on Twisted: server over a backend, pipelined client, pool (chashd.memcache.protocol)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from chashd.commands import (
    Arith,
    Command,
    Delete,
    Get,
    Number,
    Result,
    StatsCommand,
    StatsResult,
    Status,
    Store,
    Values,
    XApplied,
    XApply,
    XGet,
    XPut,
)
from chashd.errors import NodeLeaving, NonNumericValue
from chashd.interfaces import IKeyValue
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.protocol import (
    KVClientPool,
    KVClientProtocol,
    KVConnectionLost,
    KVTimeout,
    MemcacheServerFactory,
    MemcacheServerProtocol,
)
from chashd.record import Record
from chashd.storage.memory import MemoryEngine
from chashd.versions import Version

T0 = 1_700_000_000.0


def make_factory(backend: Any = None, **options: Any) -> tuple[MemcacheServerFactory, Clock]:
    clock = Clock()
    clock.advance(T0)
    if backend is None:
        backend = LocalBackend(MemoryEngine(), "kv-1", clock, options.get("max_value_size", 1024))
    options.setdefault("max_value_size", 1024)
    return MemcacheServerFactory(backend, clock, **options), clock


def connect(factory: MemcacheServerFactory) -> tuple[MemcacheServerProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def exchange(data: bytes, byte_at_a_time: bool = False, **options: Any) -> bytes:
    """What a fresh server connection answers to ``data``."""
    factory, _ = make_factory(**options)
    protocol, transport = connect(factory)
    if byte_at_a_time:
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
    else:
        protocol.dataReceived(data)
    return transport.value()


@implementer(IKeyValue)
class RaisingBackend:
    """A backend whose execute raises what it is told to (a backend bug, or a domain error)."""

    name = "raising"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def execute(self, command: Command) -> Result:
        raise self.error

    def stats(self) -> dict[str, Any]:
        return {"keys": 0, "bytes": 0}


@implementer(IKeyValue)
class LaterBackend:
    """A real LocalBackend whose answers come later, when the test fires them (a gateway's shape)."""

    name = "later"

    def __init__(self, clock: Clock) -> None:
        self.local = LocalBackend(MemoryEngine(), "kv-later", clock, 1024)
        self.waiting: list[tuple[Deferred[Result], Command]] = []

    def execute(self, command: Command) -> Deferred[Result]:
        d: Deferred[Result] = Deferred()
        self.waiting.append((d, command))
        return d

    def fire(self, index: int) -> None:
        d, command = self.waiting[index]
        try:
            d.callback(self.local.execute(command))
        except Exception as e:
            d.errback(e)

    def stats(self) -> dict[str, Any]:
        return self.local.stats()


SESSION = (
    b"set k 5 0 3\r\nabc\r\n",
    b"STORED\r\n",
    b"get k missing\r\n",
    b"VALUE k 5 3\r\nabc\r\nEND\r\n",
    b"append k 0 0 2\r\n\r\n\r\n",
    b"STORED\r\n",
    b"get k\r\n",
    b"VALUE k 5 5\r\nabc\r\n\r\nEND\r\n",
    b"incr k 1\r\n",
    b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
    b"set n 0 0 2\r\n10\r\n",
    b"STORED\r\n",
    b"decr n 3\r\n",
    b"7\r\n",
    b"touch n 100\r\n",
    b"TOUCHED\r\n",
    b"delete k\r\n",
    b"DELETED\r\n",
    b"delete k noreply\r\n",
    b"",
    b"get k\r\n",
    b"END\r\n",
    b"bogus\r\n",
    b"ERROR\r\n",
    b"flush_all\r\n",
    b"OK\r\n",
    b"get n\r\n",
    b"END\r\n",
)


class ServerTests:
    """The server over LocalBackend with StringTransport."""

    def test_session(self) -> None:
        """A session of commands answers as memcached, whole, pipelined and byte by byte."""
        request = b"".join(SESSION[0::2])
        expected = b"".join(SESSION[1::2])
        assert exchange(request) == expected
        assert exchange(request, byte_at_a_time=True) == expected

    def test_pipelined_replies_leave_in_one_write(self) -> None:
        """The replies to one read are written together."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign]
        protocol.dataReceived(b"set a 0 0 1\r\n1\r\nget a\r\nincr a 2\r\n")
        assert writes == [b"STORED\r\nVALUE a 0 1\r\n1\r\nEND\r\n3\r\n"]

    def test_gets_cas(self) -> None:
        """gets shows the version's cas unique, and cas with it stores."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\ngets k\r\n")
        line = transport.value().split(b"\r\n")[1]
        cas = int(line.split(b" ")[4])
        transport.clear()
        protocol.dataReceived(b"cas k 0 0 1 %d\r\ny\r\ncas k 0 0 1 %d\r\nz\r\n" % (cas, cas))
        assert transport.value() == b"STORED\r\nEXISTS\r\n"

    def test_noreply(self) -> None:
        """noreply silences results and the command's errors."""
        request = b"set k 0 0 1 noreply\r\nx\r\nincr k 1 noreply\r\nadd k 0 0 1 noreply\r\ny\r\nget k\r\n"
        assert exchange(request) == b"VALUE k 0 1\r\nx\r\nEND\r\n"

    def test_value_too_large_deletes_on_set(self) -> None:
        """A set over the value limit answers SERVER_ERROR, skips the block and deletes the old value."""
        big = b"x" * 2000
        request = b"set k 0 0 1\r\nv\r\nset k 0 0 2000\r\n" + big + b"\r\nget k\r\n"
        assert exchange(request) == b"STORED\r\nSERVER_ERROR object too large for cache\r\nEND\r\n"
        request = b"set k 0 0 1\r\nv\r\nappend k 0 0 2000\r\n" + big + b"\r\nget k\r\n"
        assert exchange(request) == b"STORED\r\nSERVER_ERROR object too large for cache\r\nVALUE k 0 1\r\nv\r\nEND\r\n"

    def test_bad_data_chunk_keeps_the_connection(self) -> None:
        """A bad data chunk answers CLIENT_ERROR and the connection goes on."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nxy\r\nset k 0 0 1\r\nz\r\n")
        assert transport.value() == b"CLIENT_ERROR bad data chunk\r\nERROR\r\nSTORED\r\n"
        assert not transport.disconnecting

    def test_long_line_closes(self) -> None:
        """2049 bytes without a newline close the connection without a reply."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get k\r\n" + b"x" * 2049)
        assert transport.value() == b"END\r\n"
        assert transport.disconnecting
        protocol.dataReceived(b"\r\nget k\r\n")
        assert transport.value() == b"END\r\n"

    def test_quit_closes_after_earlier_replies(self) -> None:
        """quit writes what came before it, then closes; nothing after it runs."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nquit\r\nset j 0 0 1\r\ny\r\n")
        assert transport.value() == b"STORED\r\n"
        assert transport.disconnecting

    def test_binary_protocol_answers_error_and_closes(self) -> None:
        """A binary request gets ERROR and the connection closes."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"\x80\x00\x00\x03" + b"\x00" * 20 + b"key")
        assert transport.value() == b"ERROR\r\n"
        assert transport.disconnecting

    def test_a_client_that_does_not_read_is_paused(self) -> None:
        """When the transport's buffer fills (the client does not read), the server stops reading and
        parsing; it goes on when the buffer drains, and no reply is lost or reordered."""

        class SlowReader(StringTransport):
            """Asks its producer to pause past 200 kB written, as a TCP transport does past its buffer."""

            def write(self, data: bytes) -> None:
                super().write(data)
                if len(self.value()) > 200_000 and self.producer is not None and not self.paused:
                    self.paused = True
                    self.producer.pauseProducing()

            paused = False

        factory, _ = make_factory(max_value_size=100_000)
        protocol = factory.buildProtocol(None)
        transport = SlowReader()
        protocol.makeConnection(transport)
        assert transport.producer is protocol
        protocol.dataReceived(b"set big 0 0 100000\r\n" + b"v" * 100_000 + b"\r\n")
        protocol.dataReceived(b"get big\r\n" * 20)
        written = transport.value().count(b"VALUE big")
        assert written < 5
        assert transport.producerState == "paused"
        transport.clear()
        transport.paused = False
        protocol.resumeProducing()
        while transport.paused:  # drain again and again, as the reactor would
            written += transport.value().count(b"VALUE big")
            transport.clear()
            transport.paused = False
            protocol.resumeProducing()
        written += transport.value().count(b"VALUE big")
        assert written == 20
        assert transport.producerState == "producing"

    def test_version_verbosity(self) -> None:
        """version answers chashd's version; verbosity answers OK."""
        factory, _ = make_factory(version="9.9")
        protocol, transport = connect(factory)
        protocol.dataReceived(b"version\r\nverbosity 1\r\nverbosity 1 noreply\r\n")
        assert transport.value() == b"VERSION 9.9\r\nOK\r\n"

    def test_stats(self) -> None:
        """stats merges the listener's counters with the backend's; groups answer as memcached."""
        factory, clock = make_factory()
        protocol, transport = connect(factory)
        other, _ = connect(factory)
        protocol.dataReceived(b"set k 0 0 2\r\nab\r\nget k\r\n")
        clock.advance(5)
        transport.clear()
        protocol.dataReceived(b"stats\r\n")
        lines = transport.value().split(b"\r\n")
        assert lines[-2:] == [b"END", b""]
        stats = dict(line.split(b" ", 2)[1:] for line in lines[:-2])
        assert stats[b"curr_connections"] == b"2"
        assert stats[b"total_connections"] == b"2"
        assert stats[b"uptime"] == b"5"
        assert (stats[b"keys"], stats[b"bytes"], stats[b"get_hits"], stats[b"cmd_set"]) == (b"1", b"2", b"1", b"1")
        for group, reply in [
            (b"reset", b"RESET\r\n"),
            (b"detail on", b"OK\r\n"),
            (b"detail dump", b"END\r\n"),
            (b"detail", b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"),
            (b"items", b"END\r\n"),
            (b"nonsense", b"ERROR\r\n"),
        ]:
            transport.clear()
            protocol.dataReceived(b"stats " + group + b"\r\n")
            assert transport.value() == reply, group
        transport.clear()
        protocol.dataReceived(b"stats settings\r\n")
        assert b"STAT item_size_max 1024\r\n" in transport.value()

    def test_backend_bug_is_server_error_and_logged(self) -> None:
        """An unexpected backend exception answers SERVER_ERROR, is logged, and the connection stays."""
        factory, _ = make_factory(RaisingBackend(ZeroDivisionError("boom")))
        protocol, transport = connect(factory)
        with capturedLogs() as events:
            protocol.dataReceived(b"get k\r\nget k\r\n")
        assert transport.value() == b"SERVER_ERROR internal error\r\n" * 2
        failures = [e for e in events if e.get("log_failure") is not None]
        assert len(failures) == 2 and failures[0]["log_level"] == LogLevel.critical
        assert failures[0]["command"] == "Get"
        assert not transport.disconnecting

    def test_domain_errors_from_the_backend(self) -> None:
        """A domain error from the backend answers its memcached line, without a logged failure."""
        factory, _ = make_factory(RaisingBackend(NodeLeaving()))
        protocol, transport = connect(factory)
        with capturedLogs() as events:
            protocol.dataReceived(b"set k 0 0 1\r\nx\r\n")
        assert transport.value() == b"SERVER_ERROR this node is leaving the ring and refuses writes\r\n"
        assert not [e for e in events if e.get("log_failure") is not None]

    def test_connections_are_independent(self) -> None:
        """A connection that errs or closes leaves another one untouched."""
        factory, _ = make_factory()
        bad, bad_transport = connect(factory)
        good, good_transport = connect(factory)
        good.dataReceived(b"set k 0 0 ")
        bad.dataReceived(b"x" * 5000)
        assert bad_transport.disconnecting
        bad.connectionLost(Failure(ConnectionDone()))
        good.dataReceived(b"1\r\nv\r\nget k\r\n")
        assert good_transport.value() == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
        assert factory.curr_connections == 1

    def test_max_connections(self) -> None:
        """Past max_connections a connection gets memcached's ERROR line and is closed."""
        factory, _ = make_factory(max_connections=2)
        first, _ = connect(factory)
        connect(factory)
        third, transport = connect(factory)
        assert transport.value() == b"ERROR Too many open connections\r\n"
        assert transport.disconnecting
        third.connectionLost(Failure(ConnectionDone()))
        assert (factory.curr_connections, factory.rejected_connections) == (2, 1)
        first.connectionLost(Failure(ConnectionDone()))
        _, transport = connect(factory)
        assert not transport.disconnecting

    def test_idle_timeout(self) -> None:
        """An idle connection closes after idle_timeout; traffic postpones it; closing cancels the timer."""
        factory, clock = make_factory(idle_timeout=10)
        protocol, transport = connect(factory)
        clock.advance(6)
        protocol.dataReceived(b"get k\r\n")
        clock.advance(6)
        assert not transport.disconnecting
        clock.advance(4)
        assert transport.disconnecting
        assert factory.idle_closed == 1
        protocol.connectionLost(Failure(ConnectionDone()))
        assert clock.getDelayedCalls() == []
        other, _ = connect(factory)
        other.connectionLost(Failure(ConnectionDone()))
        assert clock.getDelayedCalls() == []

    def test_no_idle_timeout(self) -> None:
        """idle_timeout 0 sets no timer."""
        factory, clock = make_factory(idle_timeout=0)
        connect(factory)
        assert clock.getDelayedCalls() == []


@implementer(IKeyValue)
class GeneralPathOnly:
    """A LocalBackend seen without its ``get_one``: every get goes through ``execute``."""

    name = "general"

    def __init__(self, local: LocalBackend) -> None:
        self.execute = local.execute
        self.stats = local.stats


class PlainGetTests:
    """A kvstore backend's ``get_one`` answers plain gets (``get <key>``) without command objects."""

    SCRIPT = (
        b"set k 7 0 3\r\nabc\r\nget k\r\nget missing\r\nget k missing\r\n"
        b"set t 0 10 1\r\nx\r\nget t\r\ndelete k\r\nget k\r\ngets t\r\n"
    )

    def run_script(self, backend_for: Any) -> tuple[bytes, bytes, dict[str, Any]]:
        clock = Clock()
        clock.advance(T0)
        local = LocalBackend(MemoryEngine(), "kv-1", clock, 1024)
        factory = MemcacheServerFactory(backend_for(local), clock, max_value_size=1024)
        protocol, transport = connect(factory)
        protocol.dataReceived(self.SCRIPT)
        first = transport.value()
        transport.clear()
        clock.advance(11)  # t expired
        protocol.dataReceived(b"get t\r\n")
        return first, transport.value(), local.stats()

    def test_answers_and_counts_like_the_general_path(self) -> None:
        """Hits, misses, expired and deleted records: the same bytes and the same counters either way."""
        plain = self.run_script(lambda local: local)
        general = self.run_script(GeneralPathOnly)
        assert plain[0] == general[0]
        assert plain[0].startswith(b"STORED\r\nVALUE k 7 3\r\nabc\r\nEND\r\nEND\r\nVALUE k 7 3\r\nabc\r\nEND\r\n")
        assert plain[1] == general[1] == b"END\r\n"
        counters = ("get_hits", "get_misses", "cmd_get")
        assert {c: plain[2][c] for c in counters} == {c: general[2][c] for c in counters}
        assert plain[2]["get_hits"] == 4 and plain[2]["get_misses"] == 4

    def test_one_get_per_read(self) -> None:
        """Reads holding one plain get each (answered without the parser's loop) and reads that only look
        like one get the same replies as on the general path, one write per read."""
        reads = [
            b"set k 3 0 2\r\nab\r\n",
            b"get k\r\n",
            b"get missing\n",
            b"get k\r\nget k\r\n",
            b"get " + b"x" * 251 + b"\r\n",
            b"get k",
            b"\r\n",
            b"get  k\r\n",
            b"get k\r\n",
        ]

        def replies(backend_for: Any) -> list[bytes]:
            clock = Clock()
            local = LocalBackend(MemoryEngine(), "kv-1", clock, 1024)
            protocol, transport = connect(MemcacheServerFactory(backend_for(local), clock, max_value_size=1024))
            writes: list[bytes] = []
            transport.write = writes.append  # type: ignore[method-assign]
            for data in reads:
                protocol.dataReceived(data)
            return writes

        plain = replies(lambda local: local)
        assert plain == replies(GeneralPathOnly)
        assert plain[1] == plain[-1] == b"VALUE k 3 2\r\nab\r\nEND\r\n"
        assert len(plain) == len(reads) - 1  # "get k" without its newline is answered with the next read

    def test_grouped_xputs_before_a_get_run_first(self) -> None:
        """A get after XPuts of the same read sees them: the group is run before the get is answered."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"xput k 3 0 5-w 0 2\r\nv1\r\nxput j 0 0 5-w 0 1\r\nx\r\nget k\r\n")
        assert transport.value() == b"STORED\r\nSTORED\r\nVALUE k 3 2\r\nv1\r\nEND\r\n"

    def test_a_failing_engine_answers_as_on_the_general_path(self) -> None:
        """An engine error in ``get_one`` gets the general path's reply and log line."""

        class FailingReads(RaisingBackend):
            def get_one(self, key: bytes) -> tuple[int, bytes] | None:
                raise self.error

        factory, _ = make_factory(FailingReads(ZeroDivisionError("boom")))
        protocol, transport = connect(factory)
        with capturedLogs() as events:
            protocol.dataReceived(b"get k\r\n")
        assert transport.value() == b"SERVER_ERROR internal error\r\n"
        assert [e["command"] for e in events if e.get("log_failure") is not None] == ["Get"]

    def test_waits_behind_a_pending_reply(self) -> None:
        """A plain get answered at once still leaves after the earlier replies still pending, whether it
        came in the same read or in one of its own."""
        clock = Clock()
        backend = LaterBackend(clock)
        backend.get_one = backend.local.get_one  # type: ignore[attr-defined]
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nget k\r\n")
        protocol.dataReceived(b"get k\r\n")
        assert transport.value() == b""
        backend.fire(0)
        assert transport.value() == b"STORED\r\nEND\r\nEND\r\n"


class DeferredBackendTests:
    """Replies that come later still leave in request order; the queue is capped."""

    def test_replies_in_request_order(self) -> None:
        """Later answers wait for earlier ones; each is written once all before it are done."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nget k\r\nversion\r\nbogus\r\n")
        assert transport.value() == b""
        backend.fire(1)
        assert transport.value() == b""
        backend.fire(0)
        assert transport.value() == b"STORED\r\nEND\r\nVERSION %s\r\nERROR\r\n" % factory.version.encode()

    def test_errors_in_order(self) -> None:
        """A failed Deferred answers its error line in its place."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nincr k 1\r\n")
        backend.fire(0)
        backend.fire(1)
        assert transport.value() == b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"

    def test_queue_cap_pauses_reading(self) -> None:
        """At max_pending pending replies the connection pauses, parses nothing more, and resumes
        (parsing what it had buffered) once half of them are written."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend, max_pending=4)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\n" * 6)
        assert len(backend.waiting) == 4
        assert transport.producerState == "paused"
        backend.fire(0)
        assert transport.producerState == "paused"
        backend.fire(1)
        assert len(backend.waiting) == 6  # resumed, parsed the two buffered gets, full again
        assert transport.producerState == "paused"
        backend.fire(2)
        backend.fire(3)
        assert transport.producerState == "producing"
        backend.fire(4)
        backend.fire(5)
        assert transport.value() == b"END\r\n" * 6

    def test_quit_waits_for_pending(self) -> None:
        """quit closes only after the pending replies before it are written."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\nquit\r\n")
        assert not transport.disconnecting
        backend.fire(0)
        assert transport.value() == b"END\r\n"
        assert transport.disconnecting

    def test_answers_after_the_connection_is_gone(self) -> None:
        """An answer that comes after the client left is dropped quietly."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        backend.fire(0)
        assert transport.value() == b""


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
        record = self.server.factory.backend.engine.get(key)  # type: ignore[attr-defined]
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

    def test_quit_is_not_a_request(self) -> None:
        """quit cannot be sent as a request."""
        from chashd.commands import Quit

        with pytest.raises(ValueError):
            self.client.send(Quit())


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


class ServerFuzzTests:
    """No input makes the server raise, and another connection keeps working."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=60) | st.sampled_from(list(SESSION[0::2])), max_size=20))
    def test_any_bytes(self, parts: list[bytes]) -> None:
        """Arbitrary bytes, byte by byte or whole, never raise; a second connection is unaffected."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        for part in parts:
            protocol.dataReceived(part)
        other, other_transport = connect(factory)
        other.dataReceived(b"set fuzz-check 0 0 1\r\nx\r\nget fuzz-check\r\n")
        assert other_transport.value() == b"STORED\r\nVALUE fuzz-check 0 1\r\nx\r\nEND\r\n"
        reply = transport.value()
        assert reply == b"" or reply.endswith(b"\r\n")
