"""The receiving side of a handoff: ``xmove`` (an XPut from a handoff) and the grouping of pipelined XPuts
into one engine transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chashd.commands import Get, Status, Values, XPut
from chashd.errors import StorageError
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.server import MemcacheServerFactory, MemcacheServerProtocol
from chashd.memcache.text import RequestParser, serialize_command
from chashd.record import Record
from chashd.storage import MemoryEngine, SQLiteEngine
from chashd.versions import Version

T0 = 1_700_000_000.0


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


class XMoveTests:
    """The wire verb of a handoff's push."""

    def test_round_trip(self) -> None:
        """``xmove`` is an xput with ``handoff`` set: serialized and parsed back equal."""
        command = xput(b"k", 7)
        wire = serialize_command(command)
        assert wire.startswith(b"xmove k 0 0 7-w 0 1\r\n")
        parser = RequestParser()
        parser.feed(wire + serialize_command(xput(b"k", 8, handoff=False)))
        assert parser.next() == command
        plain = parser.next()
        assert isinstance(plain, XPut) and not plain.handoff

    def test_received_records_are_counted(self) -> None:
        """The backend counts the records handoffs pushed to it, not the gateways' versioned writes."""
        backend, protocol, _ = server(MemoryEngine())
        protocol.dataReceived(serialize_command(xput(b"a", 1)) + serialize_command(xput(b"b", 1, handoff=False)))
        stats = backend.stats()
        assert stats["handoff_records_received_total"] == 1 and stats["cmd_xput"] == 2


class GroupedPutsTests:
    """Pipelined XPuts in one read go to the engine in one transaction."""

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
