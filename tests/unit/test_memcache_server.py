"""The line protocol's server over a backend, on StringTransport (chashd.memcache.server)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

import chashd.memcache
from chashd.commands import (
    Arith,
    Command,
    Delete,
    Get,
    Lease,
    Result,
    Status,
    Store,
    XApply,
    XFence,
    XLease,
    XMap,
    XPut,
)
from chashd.errors import DomainError, NodeLeaving, QuorumNotReached, RequestError
from chashd.interfaces import IForwardedGet, IForwardedSet, IGroupedPuts, IKeyValue, IPlainGet
from chashd.kvstore.backend import LocalBackend
from chashd.memcache import client, server
from chashd.memcache.server import SERVER_VERSION, MemcacheServerFactory, MemcacheServerProtocol
from chashd.memcache.text import serialize_command
from chashd.metrics import FAMILIES, RequestMetrics
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
    replies: bytes = transport.value()
    return replies


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
        """version answers the version given (by default memcached's release, then chashd's, which
        libmemcached parses); verbosity answers OK."""
        assert "1.6.18-chashd-" + chashd.__version__ == SERVER_VERSION
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
        assert (stats[b"keys"], stats[b"value_bytes"], stats[b"get_hits"], stats[b"cmd_set"]) == (
            b"1",
            b"2",
            b"1",
            b"1",
        )
        for group, reply in [
            (b"detail on", b"OK\r\n"),
            (b"detail dump", b"END\r\n"),
            (b"detail", b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"),
            (b"sizes", b"STAT sizes_status disabled\r\nEND\r\n"),
            (b"cachedump", b"CLIENT_ERROR bad command line\r\n"),
            (b"cachedump 1", b"CLIENT_ERROR bad command line\r\n"),
            (b"cachedump x 1", b"CLIENT_ERROR bad command line format\r\n"),
            (b"cachedump 64 1", b"CLIENT_ERROR Illegal slab id\r\n"),
            (b"cachedump 2 1", b"END\r\n"),
            (b"cachedump 1 5", b"ITEM k [2 b; 0 s]\r\nEND\r\n"),
            (b"items", b"STAT items:1:number 1\r\n"),
            (b"slabs", b"STAT 1:used_chunks 1\r\n"),
            (b"nonsense", b"ERROR\r\n"),
        ]:
            transport.clear()
            protocol.dataReceived(b"stats " + group + b"\r\n")
            assert transport.value().startswith(reply), group
        transport.clear()
        protocol.dataReceived(b"stats settings\r\n")
        settings = transport.value()
        for line in (b"item_size_max 1024", b"maxbytes 0", b"evictions on", b"shutdown_command no", b"maxconns 1024"):
            assert b"STAT " + line + b"\r\n" in settings, line
        transport.clear()
        protocol.dataReceived(b"stats conns\r\n")
        conns = transport.value()
        assert conns.count(b":addr tcp:") == 2 and b":state conn_parse_cmd" in conns and conns.endswith(b"END\r\n")

    def test_stats_reset(self) -> None:
        """stats reset zeroes what memcached resets: the listener's totals and the backend's counters."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 2\r\nab\r\nget k\r\nstats reset\r\nstats\r\n")
        assert b"RESET\r\n" in transport.value()
        stats = dict(line.split(b" ", 2)[1:] for line in transport.value().split(b"\r\n") if line.startswith(b"STAT"))
        assert (stats[b"cmd_set"], stats[b"get_hits"], stats[b"total_connections"]) == (b"0", b"0", b"0")
        assert (stats[b"curr_items"], stats[b"curr_connections"]) == (b"1", b"1")

    def test_lru_crawler(self) -> None:
        """lru_crawler answers as memcached 1.6 does: its settings OK (there is no crawler to set), bad class ids
        BADCLASS, bad numbers CLIENT_ERROR, and metadump lists every live item of class 1 (all, hash or a list
        holding 1; another class is empty), one line each with the key URL-encoded, then END."""
        factory, clock = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set a%20b 0 0 2\r\nab\r\nset e 0 100 1\r\nx\r\nset gone 0 -1 1\r\nx\r\n")
        for request, reply in [
            (b"crawl all", b"OK\r\n"),
            (b"crawl 1,2", b"OK\r\n"),
            (b"crawl 64", b"BADCLASS invalid class id\r\n"),
            (b"crawl hash", b"BADCLASS invalid class id\r\n"),
            (b"sleep 10", b"OK\r\n"),
            (b"sleep 2000000", b"CLIENT_ERROR sleep must be one second or less\r\n"),
            (b"tocrawl -1", b"CLIENT_ERROR bad command line format\r\n"),
            (b"enable", b"OK\r\n"),
            (b"disable", b"OK\r\n"),
            (b"metadump", b"ERROR\r\n"),
            (b"metadump all extra", b"ERROR\r\n"),
            (b"metadump 0", b"BADCLASS invalid class id\r\n"),
            (b"metadump 1,x", b"BADCLASS invalid class id\r\n"),
            (b"metadump 63", b"END\r\n"),
            (b"bogus", b"ERROR\r\n"),
            (b"", b"ERROR\r\n"),
        ]:
            transport.clear()
            protocol.dataReceived(b"lru_crawler " + request + b"\r\n")
            assert transport.value() == reply, request
        now = int(clock.seconds())
        for classes in (b"all", b"hash", b"2,1"):
            transport.clear()
            protocol.dataReceived(b"lru_crawler metadump " + classes + b"\r\nget e\r\n")
            dump, _, rest = transport.value().partition(b"END\r\n")
            assert rest == b"VALUE e 0 1\r\nx\r\nEND\r\n"
            assert sorted(dump.split(b"\n")[:-1]) == [
                b"key=a%%2520b exp=-1 la=%d cas=%d fetch=no cls=1 size=7" % (now, self.cas(factory, b"a%20b")),
                b"key=e exp=%d la=%d cas=%d fetch=no cls=1 size=2" % (now + 100, now, self.cas(factory, b"e")),
            ], classes

    @staticmethod
    def cas(factory: MemcacheServerFactory, key: bytes) -> int:
        record = factory.backend.engine.get(key)  # type: ignore[attr-defined]
        return int(record.version.cas)

    def test_metadump_streams_while_the_client_reads(self) -> None:
        """A metadump of many items goes out a page at a time, each page once the transport has room (the
        reactor's other work runs between pages); the commands sent behind it wait for its END."""
        factory, clock = make_factory()
        engine = factory.backend.engine  # type: ignore[attr-defined]
        for i in range(1200):
            engine.put(b"k%d" % i, Record(b"v", 0, 0, Version((i + 1) << 16, "gw")))
        protocol, transport = connect(factory)
        protocol.dataReceived(b"lru_crawler metadump all\r\nversion\r\n")
        assert transport.value().count(b"\n") == 500
        protocol.pauseProducing()
        clock.advance(0)
        assert transport.value().count(b"\n") == 500
        protocol.resumeProducing()
        clock.advance(0)
        clock.advance(0)
        reply = transport.value()
        assert reply.count(b"key=") == 1200 and reply.endswith(b"END\r\nVERSION %s\r\n" % factory.version.encode())
        assert len({line.split(b" ")[0] for line in reply.split(b"\n") if line.startswith(b"key=")}) == 1200

    def test_cache_memlimit(self) -> None:
        """cache_memlimit changes a bounded memory engine's limit, with memcached's bounds and words."""
        clock = Clock()
        engine = MemoryEngine(limit_bytes=64 << 20)
        factory, _ = make_factory(LocalBackend(engine, "kv-1", clock, 1024))
        protocol, transport = connect(factory)
        protocol.dataReceived(
            b"cache_memlimit 50\r\ncache_memlimit 5\r\ncache_memlimit 2000000000\r\ncache_memlimit\r\n"
            b"cache_memlimit abc\r\ncache_memlimit 40 noreply\r\ncache_memlimit 30 x\r\n"
        )
        assert transport.value() == (
            b"OK\r\nMEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n"
            b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\nERROR\r\nERROR\r\nOK\r\n"
        )
        assert engine.limit_bytes == 30 << 20
        unbounded, _ = make_factory()
        protocol, transport = connect(unbounded)
        protocol.dataReceived(b"cache_memlimit 50\r\n")
        assert transport.value().startswith(
            b"MEMLIMIT_ADJUST_FAILED the engine was made without a limit: start the node with --memory-limit\r\n"
        )

    def test_shutdown(self) -> None:
        """shutdown is refused unless enabled; enabled, it closes the connection and calls the stopper once."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"shutdown\r\nshutdown graceful\r\nshutdown now\r\n")
        assert transport.value() == b"ERROR: shutdown not enabled\r\n" * 3
        stopped: list[bool] = []
        factory, _ = make_factory(shutdown=lambda: stopped.append(True))
        protocol, transport = connect(factory)
        protocol.dataReceived(b"shutdown now\r\n")
        assert transport.value() == b"CLIENT_ERROR invalid shutdown mode\r\n" and not stopped
        protocol.dataReceived(b"shutdown graceful\r\nget k\r\n")
        assert stopped == [True] and transport.disconnecting

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
    """A LocalBackend seen as a plain ``IKeyValue`` (not ``IPlainGet``): every get goes through ``execute``."""

    name = "general"

    def __init__(self, local: LocalBackend) -> None:
        self.execute = local.execute
        self.stats = local.stats


@implementer(IPlainGet)
class LaterPlainGetBackend(LaterBackend):
    """A backend that answers later, except plain gets: ``get_one`` reads its LocalBackend at once."""

    def get_one(self, key: bytes) -> tuple[int, bytes] | None:
        return self.local.get_one(key)


class PlainGetTests:
    """An ``IPlainGet`` backend's ``get_one`` answers plain gets (``get <key>``) without command objects."""

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

        @implementer(IPlainGet)
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
        backend = LaterPlainGetBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nget k\r\n")
        protocol.dataReceived(b"get k\r\n")
        assert transport.value() == b""
        backend.fire(0)
        assert transport.value() == b"STORED\r\nEND\r\nEND\r\n"


@implementer(IForwardedGet)
class ForwardingBackend(LaterBackend):
    """A backend that answers later and takes plain gets with ``forward_get`` (a gateway's shape): the test
    answers each sink; with ``declining`` set it declines them."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.sinks: list[tuple[bytes, Any]] = []
        self.declining = False
        self.forwarding = True

    def forward_get(self, key: bytes, sink: Any) -> bool:
        if self.declining:
            return False
        self.sinks.append((key, sink))
        return True


class ForwardedGetTests:
    """An ``IForwardedGet`` backend's ``forward_get`` takes plain gets; their replies keep their places."""

    def setup_method(self) -> None:
        self.backend = ForwardingBackend(Clock())
        self.factory, _ = make_factory(self.backend, requests=RequestMetrics())
        self.protocol, self.transport = connect(self.factory)

    def test_replies_keep_their_places(self) -> None:
        """Forwarded gets pipelined with other commands, in one read or one each, answer in request order;
        only plain gets are forwarded (a gets, a multi-key get and a get with two spaces are not)."""
        self.protocol.dataReceived(b"get a\r\nset b 0 0 1\r\nx\r\nget c\r\ngets a\r\nget a c\r\nget  a\r\n")
        self.protocol.dataReceived(b"get d\r\n")
        assert [key for key, _ in self.backend.sinks] == [b"a", b"c", b"d"]
        assert [type(c).__name__ for _, c in self.backend.waiting] == ["Store", "Get", "Get", "Get"]
        self.backend.sinks[2][1].callback(b"END\r\n")
        self.backend.sinks[1][1].callback(b"VALUE c 0 1\r\ny\r\nEND\r\n")
        for index in range(4):
            self.backend.fire(index)
        assert self.transport.value() == b""
        self.backend.sinks[0][1].callback(b"VALUE a 1 1\r\nz\r\nEND\r\n")
        assert self.transport.value() == (
            b"VALUE a 1 1\r\nz\r\nEND\r\nSTORED\r\nVALUE c 0 1\r\ny\r\nEND\r\n"
            + b"END\r\n" * 3 + b"END\r\n"
        )  # fmt: skip
        assert self.factory.latency is not None and sum(self.factory.latency[Get].counts) == 6  # every get timed

    @pytest.mark.parametrize("attribute", ["declining", "not forwarding"])
    def test_a_declined_get_takes_the_general_path(self, attribute: str) -> None:
        """A get the backend declines, or does not want offered (``forwarding`` False), is executed as a Get,
        alone in its read or among others."""
        if attribute == "declining":
            self.backend.declining = True
        else:
            self.backend.forwarding = False
        self.protocol.dataReceived(b"get a\r\n")
        self.protocol.dataReceived(b"get b\r\nget c\r\n")
        assert [c for _, c in self.backend.waiting] == [Get((b"a",)), Get((b"b",)), Get((b"c",))]
        for index in range(3):
            self.backend.fire(index)
        assert self.transport.value() == b"END\r\n" * 3

    def test_errors(self) -> None:
        """A domain error is its error line; any other error is SERVER_ERROR, logged; both counted."""
        self.protocol.dataReceived(b"get a\r\nget b\r\n")
        (_, first), (_, second) = self.backend.sinks
        with capturedLogs() as events:
            first.errback(Failure(NodeLeaving()))
            second.errback(RuntimeError("bug"))
        assert self.transport.value().startswith(b"SERVER_ERROR ") and self.transport.value().count(b"\r\n") == 2
        assert self.transport.value().endswith(b"SERVER_ERROR internal error\r\n")
        assert [e["log_level"] for e in events if e.get("log_failure")] == [LogLevel.critical]
        assert first.called and second.called

    def test_a_get_behind_a_pending_write_of_its_key_waits(self) -> None:
        """A plain get of a key a pending command of the connection writes is not forwarded at once: it waits
        for that write's reply and then takes the general path; a get of another key is forwarded."""
        self.protocol.dataReceived(b"delete k\r\nget j\r\nget k\r\n")
        assert [key for key, _ in self.backend.sinks] == [b"j"]
        assert [type(c).__name__ for _, c in self.backend.waiting] == ["Delete"]
        self.backend.sinks[0][1].callback(b"END\r\n")
        self.backend.fire(0)
        assert [c for _, c in self.backend.waiting[1:]] == [Get((b"k",))]
        self.backend.fire(1)
        assert self.transport.value() == b"NOT_FOUND\r\nEND\r\nEND\r\n"

    def test_pending_forwarded_gets_pause_reading(self) -> None:
        """``max_pending`` forwarded gets waiting stop the reading; it resumes once half have left."""
        factory, _ = make_factory(self.backend, max_pending=4)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get k\r\n" * 6)
        assert len(self.backend.sinks) == 4 and transport.producerState == "paused"
        for _, sink in self.backend.sinks[:2]:
            sink.callback(b"END\r\n")
        assert len(self.backend.sinks) == 6  # read again, and the last two were forwarded
        for _, sink in self.backend.sinks[2:]:
            sink.callback(b"END\r\n")
        assert transport.producerState == "producing" and transport.value() == b"END\r\n" * 6


@implementer(IForwardedSet)
class SetForwardingBackend(LaterBackend):
    """A backend that answers later and takes sets with ``forward_set`` (a gateway's shape): the test answers
    each sink; with ``declining`` set it declines them, with ``failing`` set ``forward_set`` raises it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.sinks: list[tuple[Store, Any]] = []
        self.declining = False
        self.failing: Exception | None = None

    def forward_set(self, command: Store, sink: Any) -> bool:
        if self.failing is not None:
            raise self.failing
        if self.declining:
            return False
        self.sinks.append((command, sink))
        return True


class ForwardedSetTests:
    """An ``IForwardedSet`` backend's ``forward_set`` takes sets; their results keep their places."""

    def setup_method(self) -> None:
        self.backend = SetForwardingBackend(Clock())
        self.factory, _ = make_factory(self.backend, requests=RequestMetrics())
        self.protocol, self.transport = connect(self.factory)

    def test_results_keep_their_places(self) -> None:
        """Forwarded sets pipelined with other commands answer in request order (a noreply set with
        nothing); only sets are forwarded; a get of a key a forwarded set writes waits for its result, then
        takes its turn; every set is timed."""
        self.protocol.dataReceived(b"get a\r\nset k 1 0 1\r\nx\r\nset j 0 0 1 noreply\r\ny\r\n")
        self.protocol.dataReceived(b"add m 0 0 1\r\nz\r\nget k\r\n")
        assert [(c.key, c.noreply) for c, _ in self.backend.sinks] == [(b"k", False), (b"j", True)]
        assert [type(c).__name__ for _, c in self.backend.waiting] == ["Get", "Store"]  # get a, add m
        self.backend.sinks[1][1].callback(Status.STORED)
        self.backend.fire(1)
        self.backend.fire(0)
        assert self.transport.value() == b"END\r\n"  # get a; the set of k holds the rest
        self.backend.sinks[0][1].callback(Status.STORED)
        assert [c for _, c in self.backend.waiting[2:]] == [Get((b"k",))]  # once k's set answered
        self.backend.fire(2)
        assert self.transport.value() == b"END\r\nSTORED\r\nSTORED\r\nEND\r\n"
        assert self.factory.latency is not None and sum(self.factory.latency[Store].counts) == 3

    @pytest.mark.parametrize("case", ["declining", "unauthenticated"])
    def test_the_general_path_otherwise(self, case: str) -> None:
        """A set the backend declines is executed as a Store; a connection that has not proved the token
        forwards none (refused, as every write), and forwards once it has."""
        if case == "declining":
            self.backend.declining = True
            self.protocol.dataReceived(b"set k 0 0 1\r\nx\r\n")
            assert [c for _, c in self.backend.waiting] == [Store("set", b"k", 0, 0, b"x")]
            self.backend.fire(0)
            assert self.transport.value() == b"STORED\r\n"
            return
        factory, _ = make_factory(self.backend, token=b"secret")
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\n")
        assert self.backend.sinks == [] and transport.value().startswith(b"CLIENT_ERROR authentication required")
        protocol.dataReceived(b"xauth secret\r\nset k 0 0 1\r\nx\r\n")
        assert [c.key for c, _ in self.backend.sinks] == [b"k"]

    def test_errors(self) -> None:
        """A domain error is its error line; any other error, or ``forward_set`` raising, is SERVER_ERROR,
        logged; the key is no longer counted as written (a get of it is forwarded at once again)."""
        self.protocol.dataReceived(b"set a 0 0 1\r\nx\r\nset b 0 0 1\r\nx\r\n")
        (_, first), (_, second) = self.backend.sinks
        self.backend.failing = RuntimeError("bug")
        with capturedLogs() as events:
            first.errback(QuorumNotReached(2, 1, "write"))
            second.errback(Failure(RuntimeError("bug")))
            self.protocol.dataReceived(b"set c 0 0 1\r\nx\r\n")
        assert self.transport.value() == (
            b"SERVER_ERROR write quorum not reached: 1 of 2 replicas answered\r\n"
            + b"SERVER_ERROR internal error\r\n" * 2
        )  # fmt: skip
        assert [e["log_level"] for e in events if e.get("log_failure")] == [LogLevel.critical] * 2
        assert first.called and second.called
        assert self.protocol._writing == {}


@implementer(IKeyValue)
class Undeclared:
    """A LocalBackend's methods, ``get_one`` and ``execute_puts`` included, without its optional interfaces."""

    name = "undeclared"

    def __init__(self, local: LocalBackend) -> None:
        self.local = local
        self.stats = local.stats
        self.calls: list[str] = []

    def execute(self, command: Command) -> Result:
        self.calls.append("execute")
        return self.local.execute(command)

    def get_one(self, key: bytes) -> tuple[int, bytes] | None:
        self.calls.append("get_one")
        return self.local.get_one(key)

    def execute_puts(self, commands: Sequence[XPut]) -> list[Status | DomainError]:
        self.calls.append("execute_puts")
        return self.local.execute_puts(commands)


@implementer(IGroupedPuts)
class Declared(Undeclared):
    """``Undeclared`` that declares ``IGroupedPuts`` (and not ``IPlainGet``)."""


class OptionalInterfaceTests:
    """The shortcuts are taken for what a backend declares (``providedBy``), not for the methods it has."""

    XPUTS = b"xput a 0 0 5-w 0 1\r\nx\r\nxput b 0 0 5-w 0 1\r\ny\r\n"

    def test_the_factory_asks_once(self) -> None:
        """The factory holds the backend as each interface it provides, or None."""
        clock = Clock()
        local = LocalBackend(MemoryEngine(), "kv-1", clock, 1024)
        factory = MemcacheServerFactory(local, clock)
        assert factory.plain_get is local and factory.grouped_puts is local
        general = MemcacheServerFactory(GeneralPathOnly(local), clock)
        assert general.plain_get is None and general.grouped_puts is None

    def test_undeclared_methods_are_not_used(self) -> None:
        """A backend with ``get_one`` and ``execute_puts`` that does not declare their interfaces gets every
        command through ``execute``, with the same replies."""
        backend = Undeclared(LocalBackend(MemoryEngine(), "kv-1", Clock(), 1024))
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(self.XPUTS)
        protocol.dataReceived(b"get a\r\n")
        protocol.dataReceived(b"get b\r\nget a\r\n")
        assert transport.value() == b"STORED\r\nSTORED\r\n" + b"VALUE a 0 1\r\nx\r\nEND\r\n" * 1 + (
            b"VALUE b 0 1\r\ny\r\nEND\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
        )
        assert backend.calls == ["execute"] * 5

    def test_declared_grouped_puts_are_used(self) -> None:
        """Declaring ``IGroupedPuts`` sends the XPuts of a read in one ``execute_puts``; gets still go
        through ``execute`` without ``IPlainGet``."""
        backend = Declared(LocalBackend(MemoryEngine(), "kv-1", Clock(), 1024))
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(self.XPUTS + b"get a\r\n")
        assert transport.value() == b"STORED\r\nSTORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
        assert backend.calls == ["execute_puts", "execute"]


class PackageTests:
    """``chashd.memcache`` exports the server's and the client's public names."""

    def test_exports(self) -> None:
        """Every name of ``__all__`` is the one of its module (the classes and the server's version)."""
        homes = {name: getattr(server, name, None) or getattr(client, name) for name in chashd.memcache.__all__}
        assert {name: getattr(chashd.memcache, name) for name in chashd.memcache.__all__} == homes
        assert sorted(chashd.memcache.__all__) == sorted([*server.__all__, *client.__all__])

    def test_the_parser_does_not_import_twisted(self) -> None:
        """Importing the pure parser through the package imports no Twisted module."""
        code = "import sys, chashd.memcache.text; print(sorted(m for m in sys.modules if m.startswith('twisted')))"
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
        assert found.stdout.strip() == "[]"


def test_every_command_has_a_latency_family() -> None:
    """Every command a server may run is timed into one of the histograms' families (a command without one
    would make the server fail on it once the histograms are on, as the daemons run)."""
    assert set(get_args(Command)) <= set(server._FAMILIES)
    assert set(server._FAMILIES.values()) <= set(FAMILIES)


class DeferredBackendTests:
    """Replies that come later still leave in request order; the queue is capped."""

    def test_replies_in_request_order(self) -> None:
        """Later answers wait for earlier ones; each is written once all before it are done."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nget j\r\nversion\r\nbogus\r\n")
        assert transport.value() == b""
        backend.fire(1)
        assert transport.value() == b""
        backend.fire(0)
        assert transport.value() == b"STORED\r\nEND\r\nVERSION %s\r\nERROR\r\n" % factory.version.encode()

    def test_spliced_reply_written_as_it_is(self) -> None:
        """A Deferred that fires with bytes (a gateway's reply spliced from a kvstore's) is written unchanged,
        in its place."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\nget b\r\n")
        backend.waiting[1][0].callback(b"END\r\n")  # type: ignore[arg-type]
        backend.waiting[0][0].callback(b"VALUE a 0 1\r\nx\r\nEND\r\n")  # type: ignore[arg-type]
        assert transport.value() == b"VALUE a 0 1\r\nx\r\nEND\r\nEND\r\n"

    def test_a_key_waits_for_its_pending_write(self) -> None:
        """As memcached runs a connection's commands one after the other: a command on a key that a pending
        command of the connection writes is sent to the backend only once that one is answered (a pipelined
        delete then get of the key through a gateway answered the deleted value); other keys do not wait."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\n")
        backend.fire(0)
        protocol.dataReceived(b"delete k\r\nget k\r\nget j\r\n")
        assert [type(c).__name__ for _, c in backend.waiting[1:]] == ["Delete"]
        backend.fire(1)
        assert [c for _, c in backend.waiting[2:]] == [Get((b"k",)), Get((b"j",))]
        backend.fire(2)
        backend.fire(3)
        assert transport.value() == b"STORED\r\nDELETED\r\nEND\r\nEND\r\n"

    def test_reads_share_a_key(self) -> None:
        """Pending reads of a key hold no read of it back, but a write of it waits for them (it must not change
        what they answer), with what follows it, until every reply before it is in; a pending flush_all holds
        every command."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get k\r\ngets k j\r\nincr j 1\r\nget a\r\n")
        assert len(backend.waiting) == 2
        backend.fire(1)
        assert len(backend.waiting) == 2
        backend.fire(0)
        assert [type(c).__name__ for _, c in backend.waiting[2:]] == ["Arith", "Get"]
        backend.fire(2)
        backend.fire(3)
        protocol.dataReceived(b"flush_all\r\nget zz\r\n")
        assert len(backend.waiting) == 5
        backend.fire(4)
        assert backend.waiting[5][1] == Get((b"zz",))
        backend.fire(5)
        assert transport.value() == b"END\r\nEND\r\nNOT_FOUND\r\nEND\r\nOK\r\nEND\r\n"

    def test_a_failed_sets_delete_takes_its_place(self) -> None:
        """The delete a too-large set makes (memcached drops the key's old value) waits for a pending write of the
        key and is waited for by a get of it, which then misses."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set k 0 0 1\r\nx\r\nset k 0 0 2000\r\n" + b"y" * 2000 + b"\r\nget k\r\n")
        assert len(backend.waiting) == 1
        backend.fire(0)
        assert backend.waiting[1][1] == Delete(b"k", True)
        backend.fire(1)
        backend.fire(2)
        assert transport.value() == b"STORED\r\nSERVER_ERROR object too large for cache\r\nEND\r\n"

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
        # Full again with nothing more buffered: the transport goes on reading until the client sends more.
        assert transport.producerState == "producing"
        protocol.dataReceived(b"get a\r\n")
        assert len(backend.waiting) == 6 and transport.producerState == "paused"
        backend.fire(2)
        backend.fire(3)
        assert len(backend.waiting) == 7 and transport.producerState == "producing"
        for index in range(4, 7):
            backend.fire(index)
        assert transport.value() == b"END\r\n" * 7

    def test_one_request_in_flight_never_pauses_the_transport(self) -> None:
        """A client that waits for each reply before it sends its next request never has its transport paused,
        although one get in flight alone reaches the byte cap (charged the value limit): pausing and resuming
        the transport cost a request two system calls."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend, max_value_size=1024 * 1024, max_pending_bytes=1024 * 1024)
        protocol, transport = connect(factory)
        for index in range(3):
            protocol.dataReceived(b"get a\r\n")
            assert protocol._paused and transport.producerState == "producing"
            backend.fire(index)
            assert not protocol._paused
        assert transport.value() == b"END\r\n" * 3 and factory.paused_for_memory == 0
        protocol.dataReceived(b"get a\r\nget b\r\n")  # pipelined: the second waits, and reading stops
        assert len(backend.waiting) == 4 and transport.producerState == "paused" and factory.paused_for_memory == 1
        backend.fire(3)
        assert len(backend.waiting) == 5 and transport.producerState == "producing"
        backend.fire(4)
        assert transport.value() == b"END\r\n" * 5

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


class HalfCloseTests:
    """A client that shuts its write side gets every reply to what it sent, then the connection closes."""

    def test_kvstore_answers_then_closes(self) -> None:
        """Replies written at once: all of them, then the close; an unfinished command is dropped."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.dataReceived(b"set a 0 0 1\r\n1\r\nget a\r\nget b\r\nset c 0 0 5\r\nab")
        assert not transport.disconnecting
        protocol.readConnectionLost()
        assert transport.value() == b"STORED\r\nVALUE a 0 1\r\n1\r\nEND\r\nEND\r\n"
        assert transport.disconnecting
        protocol.readConnectionLost()  # Twisted may tell twice: nothing more happens
        assert verifyObject(IHalfCloseableProtocol, protocol)

    def test_deferred_replies_come_first(self) -> None:
        """A gateway's replies that come later are all written, in order, before the close."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\nget b\r\n")
        protocol.readConnectionLost()
        assert not transport.disconnecting
        backend.fire(1)
        assert transport.value() == b"" and not transport.disconnecting
        backend.fire(0)
        assert transport.value() == b"END\r\nEND\r\n"
        assert transport.disconnecting

    def test_what_a_pause_held_back_is_answered(self) -> None:
        """Requests still buffered behind a full queue when the client half-closes are parsed and answered
        once the queue drains, and only then does the connection close."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend, max_pending=2)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"get a\r\n" * 5)
        protocol.readConnectionLost()
        for index in range(5):
            assert not transport.disconnecting
            backend.fire(index)
        assert transport.value() == b"END\r\n" * 5
        assert transport.disconnecting

    def test_write_side_lost(self) -> None:
        """When our own write side goes, the connection closes."""
        factory, _ = make_factory()
        protocol, transport = connect(factory)
        protocol.writeConnectionLost()
        assert transport.disconnecting


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


class MapFenceTests:
    """``xmap``: a kvstore refuses the ``xapply`` of a connection whose gateway routes by an older cluster map
    than the newest the kvstore knows (two such gateways may name two primaries for a key)."""

    @staticmethod
    def xapply(protocol: MemcacheServerProtocol, transport: StringTransport, clock: int) -> bytes:
        """Send ``incr n 1`` as an xapply of version ``clock``; the reply."""
        transport.clear()
        protocol.dataReceived(serialize_command(XApply(Version(clock, "gw"), Arith(b"n", 1))))
        reply: bytes = transport.value()
        return reply

    def test_older_map_refused(self) -> None:
        """Connections that named epochs 5 and 6: the one on 5 has its xapply refused with both epochs and
        nothing applied, the one on 6 applies; one that named nothing (a gateway of an earlier version) is
        not fenced; an epoch the ring watch brings (``know_epoch``) fences the one on 6 too."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        backend.execute(XPut(b"n", Record(b"1", 0, 0, Version(100, "gw"))))
        (old, old_t), (new, new_t), (plain, plain_t) = connect(factory), connect(factory), connect(factory)
        old.dataReceived(b"xmap 5\r\n")
        new.dataReceived(b"xmap 6\r\n")
        assert old_t.value() == new_t.value() == b"OK\r\n"
        refused = self.xapply(old, old_t, 200)
        assert refused == b"SERVER_ERROR stale cluster map: epoch 5 is older than epoch 6 known here\r\n"
        assert backend.engine.get(b"n") == Record(b"1", 0, 0, Version(100, "gw"))
        assert self.xapply(new, new_t, 300).startswith(b"XAPPLIED 2\r\n")
        assert self.xapply(plain, plain_t, 400).startswith(b"XAPPLIED 3\r\n")
        backend.know_epoch(7)
        assert self.xapply(new, new_t, 500).startswith(b"SERVER_ERROR stale cluster map: epoch 6 ")
        new.dataReceived(b"xmap 7\r\n")
        assert self.xapply(new, new_t, 600).startswith(b"XAPPLIED 4\r\n")
        stats = backend.stats()
        assert stats["xapply_stale_map"] == 2 and stats["cmd_xmap"] == 3 and backend.map_epoch == 7

    def test_leases_of_two_maps_conflict(self) -> None:
        """An ``xlease`` carries the epoch its connection named: connections on epoch 5 lease a key together,
        one on epoch 6 is refused while their leases last (shared leases of two maps conflict); a
        connection that named no epoch conflicts with none by epoch."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        backend.execute(XPut(b"n", Record(b"1", 0, 0, Version(100, "gw"))))
        (a, a_t), (b, b_t), (c, c_t), (plain, plain_t) = [connect(factory) for _ in range(4)]
        a.dataReceived(b"xmap 5\r\n")
        b.dataReceived(b"xmap 5\r\n")
        c.dataReceived(b"xmap 6\r\n")
        deadline = int(backend._seconds() * 1000) + 2000
        for protocol, transport, holder in ((a, a_t, "gw1:1"), (b, b_t, "gw2:1"), (c, c_t, "gw3:1")):
            transport.clear()
            protocol.dataReceived(serialize_command(XLease(b"n", Lease(holder, deadline))))
        assert a_t.value().startswith(b"XVALUE n ") and b_t.value().startswith(b"XVALUE n ")
        assert c_t.value().startswith(b"SERVER_ERROR key leased by another read-modify-write until ")
        plain_t.clear()
        plain.dataReceived(serialize_command(XLease(b"n", Lease("gw4:1", deadline))))
        assert plain_t.value().startswith(b"XVALUE n ")

    def test_fenced_copy(self) -> None:
        """``xfence <epoch>`` before an ``xput`` (a read-modify-write's copy): refused, nothing stored, when the
        kvstore knows a newer epoch; stored (and the epoch known) otherwise. Pipelined between plain xputs,
        which are grouped, the fenced one is answered in its place and the plain ones are stored."""
        factory, _ = make_factory()
        backend = factory.backend
        assert isinstance(backend, LocalBackend)
        backend.know_epoch(6)
        protocol, transport = connect(factory)

        def put(key: bytes, clock: int, epoch: int = 0) -> bytes:
            record = Record(b"%d" % clock, 0, 0, Version(clock, "gw"))
            fence = serialize_command(XFence(epoch)) if epoch else b""
            return fence + serialize_command(XPut(key, record))

        protocol.dataReceived(put(b"a", 100) + put(b"n", 100, epoch=5) + put(b"b", 100))
        assert transport.value() == (
            b"STORED\r\nOK\r\nSERVER_ERROR stale cluster map: epoch 5 is older than epoch 6 known here\r\nSTORED\r\n"
        )
        assert backend.engine.get(b"n") is None and backend.engine.get(b"b") is not None
        transport.clear()
        protocol.dataReceived(put(b"n", 200, epoch=6) + put(b"n", 300, epoch=7) + put(b"n", 400, epoch=6))
        assert transport.value() == (
            b"OK\r\nSTORED\r\nOK\r\nSTORED\r\nOK\r\n"
            b"SERVER_ERROR stale cluster map: epoch 6 is older than epoch 7 known here\r\n"
        )
        assert backend.engine.get(b"n") == Record(b"300", 0, 0, Version(300, "gw")) and backend.map_epoch == 7
        stats = backend.stats()
        assert stats["xput_stale_map"] == 2 and stats["cmd_xfence"] == 4

    def test_needs_the_token(self) -> None:
        """Before ``xauth``, ``xmap`` is refused like the rest of the extension."""
        factory, _ = make_factory(token=b"secret")
        protocol, transport = connect(factory)
        protocol.dataReceived(b"xmap 5\r\nxauth secret\r\nxmap 5\r\n")
        assert transport.value() == b"CLIENT_ERROR authentication required: send xauth <token> first\r\nOK\r\nOK\r\n"

    def test_a_backend_that_answers_later(self) -> None:
        """A backend that answers later (a gateway) answers ``xmap`` as any command: the gateway's router
        routes no ``xmap``, a CLIENT_ERROR; the connection keeps no epoch."""
        clock = Clock()
        backend = LaterBackend(clock)
        factory, _ = make_factory(backend)
        protocol, transport = connect(factory)
        protocol.dataReceived(b"xmap 5\r\n")
        (deferred, command) = backend.waiting[-1]
        assert command == XMap(5) and transport.value() == b""
        deferred.errback(RequestError("the gateway does not route XMap"))
        assert transport.value() == b"CLIENT_ERROR the gateway does not route XMap\r\n"
        assert protocol._parser.map_epoch == 0
