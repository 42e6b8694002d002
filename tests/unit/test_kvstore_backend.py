"""The kvstore's local backend (chashd.kvstore.backend), over the memory engine and, for grouped puts, SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from chashd.commands import (
    Arith,
    Command,
    Delete,
    FlushAll,
    Get,
    Lease,
    Number,
    StatsCommand,
    Status,
    Store,
    Touch,
    Values,
    VersionOf,
    XApplied,
    XApply,
    XGet,
    XLease,
    XPut,
    XRelease,
    XVer,
)
from chashd.errors import (
    BadCommand,
    DeadlinePassed,
    KeyLeased,
    NodeLeaving,
    NonNumericValue,
    StaleVersion,
    StorageError,
    StorageFull,
    ValueTooLarge,
    VersionTooNew,
)
from chashd.interfaces import IGroupedPuts, IKeyValue, IPlainGet
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.server import MemcacheServerFactory, MemcacheServerProtocol
from chashd.memcache.text import serialize_command
from chashd.record import Record
from chashd.storage import SQLiteEngine
from chashd.storage.memory import MemoryEngine
from chashd.versions import Version
from chashd.web import KeyValueHTTP

T0 = 1_700_000_000.0
T0_MILLIS = int(T0 * 1000)


def make(max_value_size: int = 1000) -> tuple[LocalBackend, MemoryEngine, Clock]:
    clock = Clock()
    clock.advance(T0)
    engine = MemoryEngine()
    return LocalBackend(engine, "kv-1", clock, max_value_size), engine, clock


def set_(key: bytes, value: bytes, flags: int = 0, exptime: int = 0) -> Store:
    return Store("set", key, flags, exptime, value)


class VersionBoundTests:
    """Versions from the wire more than max_clock_skew ahead are refused, never stored nor observed (without the
    bound, ``xput victim 0 0 18446744073709551615-x 0 4`` pinned a value forever and overflowed the clock)."""

    def _far(self, seconds_ahead: float) -> Version:
        return Version((int((T0 + seconds_ahead) * 1000)) << 16, "gw")

    @pytest.mark.parametrize("handoff", [False, True])
    def test_forged_xput_refused(self, handoff: bool) -> None:
        """An xput (or xmove) 301 s ahead with the default 300 s skew: VersionTooNew, nothing stored, the
        clock untouched, counted; later plain writes and reads behave."""
        backend, engine, clock = make()
        backend.execute(set_(b"victim", b"old"))
        before = engine.get(b"victim")
        with pytest.raises(VersionTooNew, match="more than 300s ahead"):
            backend.execute(XPut(b"victim", Record(b"pin!", 0, 0, self._far(301)), handoff=handoff))
        assert engine.get(b"victim") == before
        assert backend.stats()["versions_refused_total"] == 1
        assert backend.execute(set_(b"victim", b"new")) is Status.STORED
        stored = engine.get(b"victim")
        assert stored is not None and stored.value == b"new" and stored.version.millis == int(T0 * 1000)

    def test_group_refuses_only_the_forged(self) -> None:
        """In a group of xputs (execute_puts) only the forged one is refused; the others are stored."""
        backend, engine, _ = make()
        good = Record(b"ok", 0, 0, self._far(10))
        results = backend.execute_puts(
            [XPut(b"a", good), XPut(b"b", Record(b"x", 0, 0, self._far(3600))), XPut(b"c", good)]
        )
        assert results[0] is Status.STORED and results[2] is Status.STORED
        assert isinstance(results[1], VersionTooNew)
        assert engine.get(b"b") is None and engine.get(b"a") == good
        assert backend.execute(set_(b"d", b"v")) is Status.STORED
        stored = engine.get(b"d")
        assert stored is not None and stored.version < self._far(3600)

    def test_forged_xapply_refused(self) -> None:
        """xapply with a far-future version is refused before anything runs."""
        backend, engine, _ = make()
        backend.execute(set_(b"n", b"1"))
        with pytest.raises(VersionTooNew):
            backend.execute(XApply(Version(2**63 - 1, "gw"), Arith(b"n", 5)))
        stored = engine.get(b"n")
        assert stored is not None and stored.value == b"1"
        assert backend.execute(Arith(b"n", 1)) == Number(2)

    def test_skew_is_configurable(self) -> None:
        """max_clock_skew widens or narrows the bound; the clock follows admitted versions only."""
        clock = Clock()
        clock.advance(T0)
        backend = LocalBackend(MemoryEngine(), "kv-1", clock, 1000, max_clock_skew=3600)
        assert backend.execute(XPut(b"k", Record(b"v", 0, 0, self._far(3000)))) is Status.STORED
        strict = LocalBackend(MemoryEngine(), "kv-2", clock, 1000, max_clock_skew=1)
        with pytest.raises(VersionTooNew):
            strict.execute(XPut(b"k", Record(b"v", 0, 0, self._far(2))))

    def test_forged_version_already_stored(self) -> None:
        """A far-future record stored before this bound existed is not followed by the clock: a write
        replaces it with a version of now, and the clock stays sane."""
        backend, engine, _ = make()
        engine.put(b"k", Record(b"pinned", 0, 0, Version(2**63 - 1, "x")))
        assert backend.execute(Touch(b"k", 0)) is Status.TOUCHED
        touched = engine.get(b"k")
        assert touched is not None and touched.value == b"pinned" and touched.version.millis == int(T0 * 1000)
        assert backend.execute(set_(b"k", b"free")) is Status.STORED
        stored = engine.get(b"k")
        assert stored is not None and stored.value == b"free" and stored.version.millis == int(T0 * 1000)


class LocalBackendTests:
    """Commands run against the engine, synchronously."""

    def test_provides_ikeyvalue(self) -> None:
        """LocalBackend provides IKeyValue and the line protocol's two shortcuts, and names itself."""
        backend, _, _ = make()
        assert verifyObject(IKeyValue, backend)
        assert verifyObject(IPlainGet, backend)
        assert verifyObject(IGroupedPuts, backend)
        assert backend.name == "kvstore kv-1"

    def test_set_then_get(self) -> None:
        """A set is stored with a version from the node's clock and read back."""
        backend, engine, _ = make()
        assert backend.execute(set_(b"k", b"v", 5)) is Status.STORED
        stored = engine.get(b"k")
        assert stored is not None
        assert stored.version.writer == "kv-1"
        assert stored.version.millis == int(T0 * 1000)
        assert backend.execute(Get((b"k", b"missing"))) == Values(((b"k", stored),))

    def test_versions_increase(self) -> None:
        """Successive writes in the same millisecond get increasing versions."""
        backend, engine, _ = make()
        backend.execute(set_(b"k", b"1"))
        first = engine.get(b"k")
        backend.execute(set_(b"k", b"2"))
        second = engine.get(b"k")
        assert first is not None and second is not None
        assert second.version > first.version

    def test_write_beats_a_newer_stored_version(self) -> None:
        """A local write wins over a stored record whose version came from a clock ahead of ours."""
        backend, engine, _ = make()
        ahead = Version((int(T0 * 1000) + 60_000) << 16, "gw")
        engine.put(b"k", Record(b"old", 0, 0, ahead))
        backend.execute(set_(b"k", b"new"))
        stored = engine.get(b"k")
        assert stored is not None and stored.value == b"new" and stored.version > ahead

    def test_expiry_follows_the_clock(self) -> None:
        """A record with a TTL is read until it expires by the injected clock."""
        backend, _, clock = make()
        backend.execute(set_(b"k", b"v", exptime=10))
        clock.advance(9)
        assert len(backend.execute(Get((b"k",))).items) == 1  # type: ignore[union-attr]
        clock.advance(1)
        assert backend.execute(Get((b"k",))) == Values(())

    def test_gat_touches_with_a_new_version(self) -> None:
        """gat returns the hits with their new expiry and version, and stores them."""
        backend, engine, clock = make()
        backend.execute(set_(b"k", b"v", exptime=10))
        before = engine.get(b"k")
        result = backend.execute(Get((b"k", b"x"), cas=True, exptime=100))
        after = engine.get(b"k")
        assert before is not None and after is not None
        assert result == Values(((b"k", after),))
        assert after.expires_at == int(T0) + 100 and after.version > before.version
        clock.advance(50)
        assert len(backend.execute(Get((b"k",))).items) == 1  # type: ignore[union-attr]

    def test_memcached_results(self) -> None:
        """Each write answers memcached's result through apply_write."""
        backend, engine, _ = make()
        assert backend.execute(Store("add", b"k", 0, 0, b"1")) is Status.STORED
        assert backend.execute(Store("add", b"k", 0, 0, b"1")) is Status.NOT_STORED
        assert backend.execute(Arith(b"k", 41)) == Number(42)
        assert backend.execute(Arith(b"k", 50, incr=False)) == Number(0)
        assert backend.execute(Touch(b"k", 10)) is Status.TOUCHED
        record = engine.get(b"k")
        assert record is not None
        assert backend.execute(Store("cas", b"k", 0, 0, b"x", record.version.cas + 1)) is Status.EXISTS
        assert backend.execute(Store("cas", b"k", 0, 0, b"x", record.version.cas)) is Status.STORED
        assert backend.execute(Delete(b"k")) is Status.DELETED
        assert backend.execute(Delete(b"k")) is Status.NOT_FOUND
        tombstone = engine.get(b"k")
        assert tombstone is not None and tombstone.tombstone

    def test_errors_change_nothing(self) -> None:
        """NonNumericValue and ValueTooLarge are raised and the stored record stays."""
        backend, engine, _ = make(max_value_size=4)
        backend.execute(set_(b"k", b"abc"))
        before = engine.get(b"k")
        with pytest.raises(NonNumericValue):
            backend.execute(Arith(b"k", 1))
        with pytest.raises(ValueTooLarge):
            backend.execute(set_(b"k", b"12345"))
        assert engine.get(b"k") == before

    @staticmethod
    def expired_and_deleted() -> tuple[LocalBackend, MemoryEngine]:
        """A backend holding ``a``, expired, and ``b``, deleted (a tombstone)."""
        backend, engine, clock = make()
        backend.execute(set_(b"a", b"1", exptime=1))
        backend.execute(set_(b"b", b"2"))
        backend.execute(Delete(b"b"))
        clock.advance(5)
        return backend, engine

    def test_xget_returns_every_stored_record(self) -> None:
        """XGet returns tombstones and expired records too, with their versions."""
        backend, engine = self.expired_and_deleted()
        result = backend.execute(XGet((b"a", b"b", b"c")))
        assert result == Values(((b"a", engine.get(b"a")), (b"b", engine.get(b"b"))))  # type: ignore[arg-type]

    def test_xver_answers_the_stored_version(self) -> None:
        """XVer answers the version of the stored record, a tombstone's and an expired one's too; None for none."""
        backend, engine = self.expired_and_deleted()
        for key in (b"a", b"b"):
            record = engine.get(key)
            assert record is not None and backend.execute(XVer(key)) == VersionOf(record.version)
        assert backend.execute(XVer(b"c")) == VersionOf(None)
        assert backend.stats()["cmd_xver"] == 3

    def test_xput_keeps_the_newer(self) -> None:
        """XPut stores a newer record (STORED) and refuses an equal or older one (EXISTS)."""
        backend, engine, _ = make()
        newer = Record(b"n", 1, 0, Version(500, "gw"))
        older = Record(b"o", 1, 0, Version(400, "gw"))
        assert backend.execute(XPut(b"k", newer)) is Status.STORED
        assert backend.execute(XPut(b"k", older)) is Status.EXISTS
        assert backend.execute(XPut(b"k", newer)) is Status.EXISTS
        assert engine.get(b"k") == newer

    def test_xput_moves_the_clock(self) -> None:
        """After XPut of a version from the near future (within --max-clock-skew), local writes still get
        higher versions."""
        backend, engine, _ = make()
        future = Version((int(T0 * 1000) + 100_000) << 16, "gw")
        backend.execute(XPut(b"other", Record(b"x", 0, 0, future)))
        backend.execute(set_(b"k", b"v"))
        stored = engine.get(b"k")
        assert stored is not None and stored.version > future

    def test_xapply_uses_the_given_version(self) -> None:
        """XApply runs the write with the caller's version and returns the record it left."""
        backend, engine, _ = make()
        backend.execute(XPut(b"k", Record(b"10", 3, 0, Version(100, "gw"))))
        version = Version(200, "gw")
        result = backend.execute(XApply(version, Arith(b"k", 5)))
        assert result == XApplied(Number(15), Record(b"15", 3, 0, version))
        assert engine.get(b"k") == Record(b"15", 3, 0, version)
        assert backend.execute(XApply(Version(300, "gw"), Store("add", b"k", 0, 0, b"x"))) == XApplied(
            Status.NOT_STORED, None
        )

    def test_xapply_over_a_newer_record(self) -> None:
        """XApply over a record as new as its version or newer is refused with StaleVersion and changes
        nothing: a request a gateway gave up on must not undo the writes that came after it."""
        backend, engine, _ = make()
        stored = Record(b"1", 0, 0, Version(900, "other"))
        backend.execute(XPut(b"k", stored))
        for version in (Version(500, "gw"), Version(900, "other")):
            with pytest.raises(StaleVersion) as refused:
                backend.execute(XApply(version, Delete(b"k")))
            assert refused.value.stored == Version(900, "other")
        assert engine.get(b"k") == stored
        assert backend.stats()["xapply_stale"] == 2
        assert backend.execute(XApply(Version(901, "gw"), Arith(b"k", 1))) == XApplied(
            Number(2), Record(b"2", 0, 0, Version(901, "gw"))
        )

    def test_leaving_refuses_writes_but_xput(self) -> None:
        """While leaving, writes raise NodeLeaving; reads and XPut still work."""
        backend, _, _ = make()
        backend.execute(set_(b"k", b"v"))
        backend.leaving = True
        writes: list[Command] = [set_(b"k", b"w"), Delete(b"k"), Arith(b"k", 1), Touch(b"k", 1), FlushAll(),
                                 XApply(Version(1), Delete(b"k")), Get((b"k",), exptime=5)]  # fmt: skip
        for command in writes:
            with pytest.raises(NodeLeaving):
                backend.execute(command)
        assert len(backend.execute(Get((b"k",))).items) == 1  # type: ignore[union-attr]
        assert backend.execute(XPut(b"j", Record(b"x", 0, 0, Version(5)))) is Status.STORED

    def test_flush_all_now_and_later(self) -> None:
        """flush_all forgets everything now; with a delay, when the clock gets there; a new flush
        replaces a pending one; stop() cancels it."""
        backend, engine, clock = make()
        backend.execute(set_(b"k", b"v"))
        assert backend.execute(FlushAll()) is Status.OK
        assert engine.stats()["keys"] == 0
        backend.execute(set_(b"k", b"v"))
        backend.execute(FlushAll(10))
        clock.advance(9)
        assert engine.get(b"k") is not None
        backend.execute(FlushAll(20))
        clock.advance(15)
        assert engine.get(b"k") is not None
        clock.advance(5)
        assert engine.get(b"k") is None
        backend.execute(FlushAll(10))
        backend.stop()
        assert clock.getDelayedCalls() == []

    def test_stats(self) -> None:
        """stats() has keys, bytes, uptime and the command counters."""
        backend, engine, clock = make()
        backend.execute(set_(b"k", b"abc"))
        backend.execute(Get((b"k", b"x")))
        backend.execute(Arith(b"n", 1))
        backend.execute(Delete(b"k"))
        clock.advance(7)
        stats = backend.stats()
        assert stats["keys"] == stats["curr_items"] == 1 and stats["value_bytes"] == 0  # the tombstone
        assert stats["bytes"] == engine.stats()["used_bytes"] > 0
        assert (stats["limit_maxbytes"], stats["evictions"]) == (0, 0)
        assert stats["uptime"] == 7
        assert (stats["cmd_get"], stats["get_hits"], stats["get_misses"]) == (2, 1, 1)
        assert (stats["cmd_set"], stats["incr_misses"], stats["delete_hits"]) == (1, 1, 1)
        assert stats["total_items"] == 1

    def test_memcached_counters(self) -> None:
        """get_expired counts misses on expired records (within get_misses), total_items every live record
        written, by any path; evictions and limit_maxbytes come from a bounded engine."""
        clock = Clock()
        clock.advance(T0)
        engine = MemoryEngine(limit_bytes=4000)
        backend = LocalBackend(engine, "kv-1", clock, 1000)
        backend.execute(set_(b"e", b"x", exptime=5))
        backend.execute(set_(b"f", b"y", exptime=5))
        clock.advance(6)
        assert backend.get_one(b"e") is None and backend.get_one(b"nothing") is None
        assert backend.execute(Get((b"f", b"g"))) == Values(())
        assert backend.execute(Get((b"f",))) == Values(())
        backend.execute(Store("add", b"a", 0, 0, b"1"))
        backend.execute(Arith(b"a", 2))
        backend.execute(XPut(b"x", Record(b"v", version=Version(1, "gw"))))
        backend.execute(XPut(b"t", Record.deleted(Version(1, "gw"))))
        backend.execute_puts([XPut(b"p", Record(b"v", version=Version(1, "gw")))] * 2)
        backend.execute(XApply(Version((T0_MILLIS + 60_000) << 16, "gw"), Touch(b"a", 100)))
        for i in range(30):
            backend.execute(set_(b"fill%d" % i, b"z" * 50))
        stats = backend.stats()
        assert (stats["get_misses"], stats["get_expired"], stats["cmd_get"]) == (5, 3, 5)
        assert stats["total_items"] == 2 + 2 + 1 + 1 + 1 + 30  # sets, add+incr, xput, execute_puts, xapply
        assert stats["limit_maxbytes"] == 4000 and stats["bytes"] <= 4000 and stats["evictions"] > 0

    def test_reset_stats(self) -> None:
        """reset_stats() zeroes the counters and the evictions seen so far; what is held stays."""
        clock = Clock()
        engine = MemoryEngine(limit_bytes=2000)
        backend = LocalBackend(engine, "kv-1", clock, 1000)
        for i in range(20):
            backend.execute(set_(b"k%d" % i, b"z" * 50))
        backend.get_one(b"k19")
        assert backend.stats()["evictions"] > 0
        backend.reset_stats()
        stats = backend.stats()
        assert (stats["evictions"], stats["cmd_set"], stats["get_hits"], stats["total_items"]) == (0, 0, 0, 0)
        assert stats["curr_items"] == engine.stats()["keys"] > 0
        backend.execute(set_(b"more", b"z" * 50))
        assert backend.stats()["evictions"] == 1

    def test_out_of_memory(self) -> None:
        """A set refused by a full engine (evict=False) answers StorageFull and deletes the old value, as
        memcached does; other writes refused leave the record as it was."""
        clock = Clock()
        engine = MemoryEngine(limit_bytes=1000, evict=False)
        backend = LocalBackend(engine, "kv-1", clock, 1000)
        assert backend.execute(set_(b"k", b"old")) is Status.STORED
        assert backend.execute(set_(b"a", b"x" * 100)) is Status.STORED
        with pytest.raises(StorageFull, match="out of memory storing object"):
            backend.execute(set_(b"k", b"y" * 600))
        assert backend.get_one(b"k") is None and engine.get(b"k") is not None  # a tombstone
        with pytest.raises(StorageFull):
            backend.execute(Store("append", b"a", 0, 0, b"y" * 600))
        assert backend.get_one(b"a") == (0, b"x" * 100)

    def test_memory_limit_at_run_time(self) -> None:
        """set_memory_limit changes a bounded engine's limit; other engines say they have none."""
        clock = Clock()
        engine = MemoryEngine(limit_bytes=10_000)
        backend = LocalBackend(engine, "kv-1", clock, 1000)
        backend.set_memory_limit(20_000)
        assert backend.stats()["limit_maxbytes"] == 20_000
        unbounded, _, _ = make()
        with pytest.raises(ValueError, match="no memory limit|without a limit"):
            unbounded.set_memory_limit(20_000)

    def test_not_a_backend_command(self) -> None:
        """Commands the adapters answer themselves are a TypeError."""
        backend, _, _ = make()
        with pytest.raises(TypeError):
            backend.execute(StatsCommand())


class OutOfRoomSurfaceTests(SynchronousTestCase):
    """A write the engine has no room for, as each surface answers it."""

    def test_http_answers_507(self) -> None:
        """PUT /kv/{key} on a full engine that may not evict is a 507 problem with memcached's words."""
        clock = Clock()
        backend = LocalBackend(MemoryEngine(limit_bytes=1000, evict=False), "kv-1", clock, 10_000)
        stub = StubTreq(KeyValueHTTP(backend, role="kvstore").resource())
        ok = self.successResultOf(stub.put("http://kv/kv/a", data=b"x" * 100))  # type: ignore[attr-defined]
        assert ok.code in (200, 201, 204)
        response = self.successResultOf(stub.put("http://kv/kv/b", data=b"x" * 2000))  # type: ignore[attr-defined]
        body = json.loads(self.successResultOf(response.content()))
        assert response.code == 507 and body["title"] == "Insufficient Storage"
        assert body["detail"].startswith("out of memory storing object")


def xput(key: bytes, clock: int, handoff: bool = True, value: bytes = b"v") -> XPut:
    """A versioned write as a handoff sends it."""
    return XPut(key, Record(value, 0, 0, Version(clock, "w")), handoff=handoff)


class CountingEngine(MemoryEngine):
    """A memory engine that counts its transactions, and can fail their commit."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.fail_commit = False

    @contextmanager
    def batch(self) -> Iterator[None]:
        self.batches += 1
        with super().batch():
            yield
            if self.fail_commit:
                raise StorageError("the database kvstore.db failed: disk I/O error")


def server(engine: Any) -> tuple[LocalBackend, MemcacheServerProtocol, StringTransport]:
    clock = Clock()
    clock.advance(T0)
    backend = LocalBackend(engine, "kv-b", clock, 1 << 20)
    protocol = MemcacheServerFactory(backend, clock, idle_timeout=0).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return backend, protocol, transport


class ReceivedPutsTests:
    """The receiving side of a handoff through the line-protocol server: pipelined XPuts in one read go to the
    engine in one transaction (``execute_puts``), and records pushed by handoffs (``xmove``) are counted."""

    def test_one_transaction_for_the_xputs_of_a_read(self) -> None:
        """Five XPuts, a get, two XPuts in one read: two transactions, and the replies in request order."""
        engine = CountingEngine()
        _, protocol, transport = server(engine)
        engine.put(b"k1", Record(b"newer", 0, 0, Version(100, "w")))
        data = b"".join(serialize_command(xput(b"k%d" % i, 5)) for i in range(5))
        data += b"get k0\r\n" + serialize_command(xput(b"k5", 5)) + serialize_command(xput(b"k6", 5))
        protocol.dataReceived(data)
        assert engine.batches == 2
        assert transport.value() == (
            b"STORED\r\nEXISTS\r\nSTORED\r\nSTORED\r\nSTORED\r\n"
            + b"VALUE k0 0 1\r\nv\r\nEND\r\n"
            + b"STORED\r\nSTORED\r\n"
        )

    def test_a_single_xput_needs_no_transaction(self) -> None:
        """An XPut alone in its read is run as before, without a batch."""
        engine = CountingEngine()
        _, protocol, transport = server(engine)
        protocol.dataReceived(serialize_command(xput(b"k", 5)))
        assert engine.batches == 0 and transport.value() == b"STORED\r\n"

    def test_a_failed_commit_answers_every_xput_with_the_error(self) -> None:
        """When the transaction cannot commit, no XPut of the group is acknowledged."""
        engine = CountingEngine()
        engine.fail_commit = True
        _, protocol, transport = server(engine)
        protocol.dataReceived(b"".join(serialize_command(xput(b"k%d" % i, 5)) for i in range(3)))
        assert transport.value() == b"SERVER_ERROR the database kvstore.db failed: disk I/O error\r\n" * 3

    def test_a_refused_xput_does_not_spoil_its_group(self) -> None:
        """A value over the limit answers its own error; the others of the group are stored."""
        engine = CountingEngine()
        backend, protocol, transport = server(engine)
        backend.max_value_size = 1
        protocol.dataReceived(serialize_command(xput(b"a", 5)) + serialize_command(xput(b"b", 5, value=b"too long")))
        assert transport.value() == b"STORED\r\nSERVER_ERROR object too large for cache\r\n"
        assert engine.get(b"a") is not None and engine.get(b"b") is None

    def test_sqlite_stores_a_group(self, tmp_path: Path) -> None:
        """Over SQLite, a group of XPuts is committed and readable."""
        engine = SQLiteEngine(tmp_path / "kv.db")
        backend, protocol, transport = server(engine)
        protocol.dataReceived(b"".join(serialize_command(xput(b"k%d" % i, 5)) for i in range(50)))
        assert transport.value() == b"STORED\r\n" * 50
        assert backend.execute(Get((b"k49",))) == Values(((b"k49", Record(b"v", 0, 0, Version(5, "w"))),))
        assert engine.stats()["keys"] == 50
        engine.close()
        reopened = SQLiteEngine(tmp_path / "kv.db")
        assert reopened.stats()["keys"] == 50
        reopened.close()

    def test_a_record_the_engine_cannot_store_answers_alone(self, tmp_path: Path) -> None:
        """Over SQLite, an XPut whose expiry does not fit 64 bits gets its own error; the rest of its group is
        stored, and the counters hold the stored ones only."""
        engine = SQLiteEngine(tmp_path / "kv.db")
        try:
            backend, _, _ = server(engine)
            bad = XPut(b"bad", Record(b"v", 0, 2**64, Version(5, "w")), handoff=True)
            results = backend.execute_puts([xput(b"a", 5), bad, xput(b"b", 5), xput(b"a", 4)])
            assert results[0] == Status.STORED and results[2] == Status.STORED and results[3] == Status.EXISTS
            assert isinstance(results[1], StorageError)
            assert engine.get(b"bad") is None and engine.get(b"b") is not None
            assert (engine.stats()["keys"], engine.stats()["bytes"]) == (2, 2)
            assert backend.stats()["handoff_records_received_total"] == 4
        finally:
            engine.close()

    def test_a_group_is_one_engine_call(self) -> None:
        """The XPuts of a group reach the engine as one ``apply_many`` (not one ``apply`` each)."""
        calls: list[int] = []

        class Recording(MemoryEngine):
            def apply_many(self, items: Any) -> list[bool]:
                calls.append(len(items))
                return super().apply_many(items)

            def apply(self, key: bytes, record: Record) -> bool:
                raise AssertionError("apply called for a grouped XPut")

        backend, protocol, transport = server(Recording())
        protocol.dataReceived(b"".join(serialize_command(xput(b"k%d" % i, 5)) for i in range(40)))
        assert calls == [40] and transport.value() == b"STORED\r\n" * 40

    def test_results_match_single_puts(self) -> None:
        """``execute_puts`` answers as ``execute`` would, one result per command."""
        backend, _, _ = server(MemoryEngine())
        results = backend.execute_puts([xput(b"a", 5), xput(b"a", 4), xput(b"a", 6)])
        assert results == [Status.STORED, Status.EXISTS, Status.STORED]

    def test_received_records_are_counted(self) -> None:
        """The backend counts the records handoffs pushed to it, not the gateways' versioned writes."""
        backend, protocol, _ = server(MemoryEngine())
        protocol.dataReceived(serialize_command(xput(b"a", 1)) + serialize_command(xput(b"b", 1, handoff=False)))
        stats = backend.stats()
        assert stats["handoff_records_received_total"] == 1 and stats["cmd_xput"] == 2


class LeaseBackendTests(SynchronousTestCase):
    """A kvstore's side of the read leases (chashd.leases): xlease reads and leases, stores name their round."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.backend = LocalBackend(MemoryEngine(), "kv-1", self.clock, 1024)
        self.backend.execute(Store("set", b"n", 0, 0, b"1"))
        self.deadline = 1_700_000_002_000

    def lease(self, holder: str, exclusive: bool = False) -> Lease:
        return Lease(holder, self.deadline, exclusive)

    def test_xlease_reads_and_leases(self) -> None:
        """An xlease answers as xget does and leases the key; another holder's exclusive request is refused
        until the lease ends (KeyLeased, counted), a shared one is not; after the end it is granted."""
        values = self.backend.execute(XLease(b"n", self.lease("gw1:1")))
        assert isinstance(values, Values) and [r.value for _, r in values.items] == [b"1"]
        assert self.backend.execute(XLease(b"missing", self.lease("gw1:1"))) == Values(())
        assert self.backend.execute(XLease(b"n", self.lease("gw2:1"))).items  # type: ignore[union-attr]
        with pytest.raises(KeyLeased) as refused:
            self.backend.execute(XLease(b"n", self.lease("gw3:1", True)))
        assert refused.value.until == self.deadline + 500
        self.clock.advance(2.5)
        assert self.backend.execute(XLease(b"n", Lease("gw3:1", self.deadline + 2500, True))).items  # type: ignore[union-attr]
        assert self.backend.stats()["cmd_xlease"] == 5 and self.backend.stats()["xlease_refused_total"] == 1
        with pytest.raises(BadCommand):  # a deadline too far ahead: a lease this node could forget
            self.backend.execute(XLease(b"n", Lease("gw4:1", self.deadline + 10_000)))

    def test_xrelease_ends_a_lease(self) -> None:
        """An xrelease (a command that is over) ends its holder's lease at once (counted), or with a floor once
        the clock passes the floor plus half a second; answered OK."""
        backend = self.backend
        backend.execute(XLease(b"n", self.lease("gw1:1")))
        assert backend.execute(XRelease(b"n", "gw1:1", self.deadline)) is Status.OK
        assert len(backend.leases) == 0
        assert backend.execute(XLease(b"n", self.lease("gw2:1", True))).items  # type: ignore[union-attr]
        floor = 1_700_000_000_100
        assert backend.execute(XRelease(b"n", "gw2:1", self.deadline, floor)) is Status.OK
        with pytest.raises(KeyLeased) as refused:
            backend.execute(XLease(b"n", self.lease("gw3:1")))
        assert refused.value.until == floor + 500
        self.clock.advance(0.6)
        assert backend.execute(XLease(b"n", self.lease("gw3:1"))).items  # type: ignore[union-attr]
        assert backend.stats()["cmd_xrelease"] == 2

    def test_stores_meet_leases_and_deadlines(self) -> None:
        """A shared command's store meets another's exclusive lease, an exclusive one any other lease
        (KeyLeased, nothing stored); a store past its deadline, or an xapply whose version is past it, is
        refused (DeadlinePassed, counted); the holder's xapply and copy end its lease there."""
        backend = self.backend
        backend.execute(XLease(b"n", self.lease("gw1:1", True)))
        version = Version(1_700_000_000_500 << 16, "gw2")
        with pytest.raises(KeyLeased):
            backend.execute(XApply(version, Arith(b"n", 1), lease=self.lease("gw2:1")))
        with pytest.raises(KeyLeased):
            backend.execute(XPut(b"n", Record(b"9", 0, 0, version), lease=self.lease("gw2:1")))
        assert backend.engine.get(b"n").value == b"1"
        applied = backend.execute(XApply(version, Arith(b"n", 1), lease=self.lease("gw1:1", True)))
        assert applied.result == Number(2) and len(backend.leases) == 0  # type: ignore[union-attr]
        backend.execute(XLease(b"n", self.lease("gw2:1")))
        with pytest.raises(KeyLeased):  # an exclusive copy meets the shared lease
            backend.execute(
                XPut(
                    b"n", Record(b"3", 0, 0, version._replace(clock=version.clock + 1)), lease=self.lease("gw1:1", True)
                )
            )
        assert (
            backend.execute(
                XPut(b"n", Record(b"3", 0, 0, version._replace(clock=version.clock + 1)), lease=self.lease("gw2:1"))
            )
            is Status.STORED
        )
        assert len(backend.leases) == 0  # its copy taken: the lease ended
        ahead = Version(int(self.deadline + 1) << 16, "gw2")
        with pytest.raises(DeadlinePassed) as past:
            backend.execute(XApply(ahead, Arith(b"n", 1), lease=self.lease("gw2:2")))
        assert "the version" in str(past.value)
        self.clock.advance(2.001)
        with pytest.raises(DeadlinePassed):
            backend.execute(XPut(b"n", Record(b"4", 0, 0, ahead), lease=self.lease("gw2:2")))
        (refusal,) = backend.execute_puts([XPut(b"n", Record(b"4", 0, 0, ahead), lease=self.lease("gw2:2"))])
        assert isinstance(refusal, DeadlinePassed)
        assert backend.engine.get(b"n").value == b"3"
        stats = backend.stats()
        assert (stats["xlease_refused_total"], stats["rmw_deadline_refused_total"]) == (3, 3)

    def test_a_restarted_kvstore_grants_nothing_at_first(self) -> None:
        """A daemon's backend (``restarted``) may have forgotten leases: nothing granted, no store taken, for
        the longest a lease lasts (3.5 s)."""
        backend = LocalBackend(MemoryEngine(), "kv-2", self.clock, 1024, restarted=True)
        with pytest.raises(KeyLeased) as refused:
            backend.execute(XLease(b"n", self.lease("gw1:1")))
        assert refused.value.until == 1_700_000_003_500
        self.clock.advance(3.5)
        assert backend.execute(XLease(b"n", Lease("gw1:1", 1_700_000_005_000))) == Values(())
