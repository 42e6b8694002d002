"""Bulk pages: the page format (chashd.bulk), the xbulk command on the wire, the engines' row reads and grouped
applies, the kvstore's answer, and a handoff that moves records as pages, or as xmove to a kvstore of an
earlier version."""

from __future__ import annotations

import gc
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chashd.bulk import ROW_HEAD_SIZE, BulkError, BulkRow, decode_rows, encode_rows, run_digest, split_rows
from chashd.commands import Bulked, BulkFormat, BulkProbe, XBulk
from chashd.config import KVStoreConfig, load_config
from chashd.errors import BadCommand, BadDataChunk, BulkUnsupported, ConfigError, UnknownCommand
from chashd.gcwatch import GCWatch
from chashd.interfaces import IStorageEngine
from chashd.kvstore.backend import LocalBackend
from chashd.kvstore.pacing import Rate, RateBucket
from chashd.memcache.client import KVClientProtocol
from chashd.memcache.server import MemcacheServerFactory, MemcacheServerProtocol
from chashd.memcache.text import FailedRequest, ReplyParser, RequestParser, serialize_command, serialize_result
from chashd.record import Record
from chashd.ring import key_hash
from chashd.storage import MemoryEngine, SQLiteEngine
from chashd.versions import Version
from tests.unit.test_handoff import Cluster, all_records
from tests.unit.test_storage import SAME_HASH

T0 = 1_700_000_000.0
CLOCK = int(T0 * 1000) << 16


def rows(count: int, clock: int = CLOCK, prefix: bytes = b"k", value: bytes = b"v") -> list[BulkRow]:
    """``count`` rows with increasing versions."""
    return [(prefix + b"-%d" % i, value + b"%d" % i, i, 0, clock + i, "w1", 0) for i in range(count)]


class FormatTests:
    """The page layout: what encode_rows writes, decode_rows reads back, and nothing else."""

    def test_round_trip(self) -> None:
        """Every field of every row survives, tombstones, empty values and writers included."""
        page = [
            *rows(3),
            (b"gone", b"", 0, 0, CLOCK, "", 1),
            (b"big", b"x" * 70000, 2**32 - 1, 2**32 - 1, 2**63 - 1, "a.b-c", 0),
        ]
        count, block = encode_rows(page)
        assert count == 5
        assert decode_rows(block, count, 1 << 20) == page

    def test_the_layout(self) -> None:
        """Heads first (24 bytes each, little-endian), then key, writer and value of each row."""
        count, block = encode_rows([(b"ab", b"xyz", 7, 9, 5, "w", 1)])
        assert count == 1 and ROW_HEAD_SIZE == 24
        assert block == struct.pack("<HBIIQBI", 2, 1, 7, 9, 5, 1, 3) + b"ab" + b"w" + b"xyz"

    @pytest.mark.parametrize(
        ("row", "words"),
        [
            ((b"", b"v", 0, 0, 1, "w", 0), "bad key"),
            ((b"a b", b"v", 0, 0, 1, "w", 0), "bad key"),
            ((b"a\r\nset", b"v", 0, 0, 1, "w", 0), "bad key"),
            ((b"k" * 251, b"v", 0, 0, 1, "w", 0), "bad key"),
            ((b"k", b"v", 0, 0, 2**63, "w", 0), "bad version"),
            ((b"k", b"v", 0, 0, 1, "w", 2), "tombstone"),
            ((b"k", b"v", 0, 0, 1, "-w", 0), "bad writer"),
            ((b"k", b"v" * 11, 0, 0, 1, "w", 0), "over the limit of 10"),
        ],
    )
    def test_bad_rows(self, row: BulkRow, words: str) -> None:
        """A row the versioned extension would refuse makes the page undecodable, saying which and why."""
        count, block = encode_rows([rows(1)[0], row])
        with pytest.raises(BulkError, match=f"row 1: .*{words}"):
            decode_rows(block, count, 10)

    def test_lengths_must_add_up(self) -> None:
        """A block shorter or longer than its rows, or with fewer heads than announced, is refused."""
        count, block = encode_rows(rows(2))
        for bad, announced in ((block[:-1], count), (block + b"x", count), (block, count + 1), (block, 1)):
            with pytest.raises(BulkError):
                decode_rows(bad, announced, 100)

    def test_split_rows(self) -> None:
        """Pages of at most max_rows rows and max_bytes bytes; a row larger than that alone."""
        page = rows(5)
        assert [len(p) for p in split_rows(page, 2, 1 << 20)] == [2, 2, 1]
        big = [(b"a", b"x" * 100, 0, 0, 1, "w", 0), (b"b", b"y", 0, 0, 1, "w", 0), (b"c", b"z" * 100, 0, 0, 1, "w", 0)]
        assert [len(p) for p in split_rows(big, 10, 60)] == [1, 1, 1]
        assert split_rows([], 10, 60) == []


class WireTests:
    """``xbulk`` in the parser, the serializer and the client's reply parser."""

    def test_parse_and_serialize(self) -> None:
        """serialize_command(XBulk) parses back to the same command; a bare xbulk is the probe."""
        count, block = encode_rows(rows(3))
        parser = RequestParser(1 << 20)
        parser.feed(serialize_command(XBulk(count, block)) + serialize_command(BulkProbe()))
        assert parser.next() == XBulk(count, block)
        assert parser.next() == BulkProbe()
        assert parser.next() is None

    def test_pages_split_anywhere(self) -> None:
        """Pages split in two or three reads at any bytes (inside the line and its length prefix, inside the
        block, inside its CRLF, between two pages), parsed between the reads or only after the last one, come
        out whole and exact, and the next command after them."""
        first = serialize_command(XBulk(*encode_rows(rows(3))))
        second = serialize_command(XBulk(*encode_rows(rows(2, prefix=b"n"))))
        data = first + second + b"xbulk\r\n"
        expected = [XBulk(*encode_rows(rows(3))), XBulk(*encode_rows(rows(2, prefix=b"n"))), BulkProbe()]

        def parsed(pieces: list[bytes], drain_between: bool) -> list[object]:
            parser = RequestParser(1 << 20)
            got: list[object] = []
            for piece in pieces:
                parser.feed(piece)
                while drain_between and (event := parser.next()) is not None:
                    got.append(event)
            while (event := parser.next()) is not None:
                got.append(event)
            assert parser.buffered == 0 and not parser.in_request
            return got

        for i in range(1, len(data)):
            for drain in (True, False):
                assert parsed([data[:i], data[i:]], drain) == expected, (i, drain)
        for i in range(1, len(first) + 3):
            for j in range(i + 1, len(first) + 4):
                for drain in (True, False):
                    assert parsed([data[:i], data[i:j], data[j:]], drain) == expected, (i, j, drain)
        assert parsed([data[i : i + 1] for i in range(len(data))], True) == expected

    def test_a_page_without_its_crlf(self) -> None:
        """A page whose block is not followed by CRLF is a bad data chunk, however it was split; the bytes after
        its announced size are read as the next command."""
        count, block = encode_rows(rows(3))
        data = b"xbulk %d %d\r\n%sXYxbulk\r\n" % (count, len(block), block)
        for i in range(1, len(data)):
            parser = RequestParser(1 << 20)
            parser.feed(data[:i])
            got = [parser.next()]
            parser.feed(data[i:])
            got += [parser.next(), parser.next(), parser.next()]
            got = [event for event in got if event is not None]
            assert len(got) == 2, i
            assert isinstance(got[0], FailedRequest) and isinstance(got[0].error, BadDataChunk), i
            assert got[1] == BulkProbe(), i

    def test_bad_lines(self) -> None:
        """A bad count or size is a CLIENT_ERROR; a page over the limit is skipped unread and refused."""
        parser = RequestParser(1024)
        parser.feed(b"xbulk 1\r\nxbulk x 3\r\nxbulk 1 99999999999\r\n")
        for _ in range(3):
            failed = parser.next()
            assert isinstance(failed, FailedRequest) and isinstance(failed.error, BadCommand)
        assert "too large" in str(failed.error)  # type: ignore[union-attr]
        parser.feed(b"x" * 1000 + b"\r\nversion\r\n")  # the rest of the huge page is swallowed
        assert parser.next() is None

    def test_replies(self) -> None:
        """XBULKED and XBULK lines become Bulked and BulkFormat; ERROR (an older server) UnknownCommand."""
        assert serialize_result(XBulk(0, b""), Bulked(3, 2)) == b"XBULKED 3 2\r\n"
        assert serialize_result(BulkProbe(), BulkFormat(1)) == b"XBULK 1\r\n"
        replies = ReplyParser()
        replies.feed(b"XBULKED 3 2\r\nXBULK 1\r\nERROR\r\n")
        assert replies.next(XBulk(0, b"")) == Bulked(3, 2)
        assert replies.next(BulkProbe()) == BulkFormat(1)
        assert isinstance(replies.next(BulkProbe()), UnknownCommand)


@pytest.fixture(params=["memory", "sqlite"])
def engine(request: Any, tmp_path: Path) -> Any:
    """Each engine."""
    made: IStorageEngine = MemoryEngine() if request.param == "memory" else SQLiteEngine(tmp_path / "db.sqlite")
    yield made
    made.close()


class EngineTests:
    """``scan_rows`` and ``apply_rows``."""

    def test_scan_rows_is_scan_as_rows(self, engine: Any) -> None:
        """The same records in the same order as scan, as BulkRow tuples, paging by the same positions."""
        for i in range(30):
            engine.put(b"k-%d" % i, Record(b"v%d" % i, i, 5, Version(CLOCK + i, "w"), i % 7 == 0))
        records = engine.scan(0, 2**32 - 1, None, 1000)
        found = engine.scan_rows(0, 2**32 - 1, None, 1000)
        assert [
            (k, r.value, r.flags, r.expires_at, r.version.clock, r.version.writer, int(r.tombstone)) for k, r in records
        ] == found
        after = (key_hash(found[9][0]), found[9][0])
        assert engine.scan_rows(0, 2**32 - 1, after, 5) == found[10:15]

    def test_apply_rows_keeps_the_newest(self, engine: Any) -> None:
        """A row is stored only if newer than the stored record (clock, then writer); counts follow."""
        engine.put(b"k-0", Record(b"newer", 0, 0, Version(CLOCK + 100, "w1")))
        engine.put(b"k-1", Record(b"older", 0, 0, Version(CLOCK, "a")))
        engine.put(b"k-2", Record(b"same", 0, 0, Version(CLOCK + 2, "w1")))
        stored = engine.apply_rows(rows(4))
        assert stored == [False, True, False, True]
        assert engine.get(b"k-0").value == b"newer"
        assert engine.get(b"k-1") == Record(b"v1", 1, 0, Version(CLOCK + 1, "w1"))
        assert engine.get(b"k-2").value == b"same"
        assert engine.get(b"k-3").value == b"v3"
        assert engine.stats()["keys"] == 4
        assert engine.stats()["bytes"] == len(b"newer") + 2 + len(b"same") + 2

    def test_apply_rows_of_new_keys(self, engine: Any) -> None:
        """Rows of keys not held (one known absent to the record cache) are all stored, their versions exact
        (clocks 0 and 2**63 - 1 included); a page that names a key twice keeps the newer row."""
        assert engine.get(b"k-1") is None  # the record cache, if any, knows it absent
        page = [(b"k-0", b"a", 1, 2, 0, "w", 0), (b"k-1", b"bb", 3, 4, 2**63 - 1, "w", 1), *rows(3, prefix=b"n")]
        assert engine.apply_rows(page) == [True] * 5
        assert engine.get(b"k-0") == Record(b"a", 1, 2, Version(0, "w"))
        assert engine.get(b"k-1") == Record(b"bb", 3, 4, Version(2**63 - 1, "w"), True)
        assert engine.stats()["keys"] == 5 and engine.stats()["bytes"] == 3 + sum(len(row[1]) for row in page[2:])
        assert engine.scan_rows(0, 2**32 - 1, None, 10) == sorted(page, key=lambda row: (key_hash(row[0]), row[0]))
        twice = [(b"t", b"newer", 0, 0, CLOCK + 9, "w", 0), (b"t", b"older", 0, 0, CLOCK, "w", 0)]
        assert engine.apply_rows(twice) == [True, False]
        assert engine.get(b"t").value == b"newer" and engine.stats()["keys"] == 6

    def test_apply_rows_of_a_scanned_page(self, engine: Any) -> None:
        """A page in scan order (what a handoff pushes) is stored whole where none of its keys is held; where one
        is (a record between its first key and its last), each row is compared with what is stored and the
        newer version wins; a key the record cache knows as absent is stored and read back; two keys of one
        hash are both stored."""
        source = MemoryEngine()
        scanned = self.scanned(source)
        page = [row for row in scanned if row[0] not in SAME_HASH]
        assert engine.apply_rows(page[:10]) == [True] * 10
        assert engine.scan_rows(0, 2**32 - 1, None, 1000) == page[:10]
        newer = (page[15][0], b"newer", 0, 0, page[15][4] + 1, "w", 0)
        older = (page[17][0], b"older", 0, 0, page[17][4] - 1, "w", 0)
        engine.apply_rows([newer, older])
        assert engine.get(page[20][0]) is None  # the record cache, if any, knows it absent
        assert engine.apply_rows(page[10:]) == [True] * 5 + [False] + [True] * 12
        assert engine.get(page[20][0]).value == page[20][1]
        assert engine.apply_rows([row for row in scanned if row[0] in SAME_HASH]) == [True, True]
        stored = engine.scan_rows(0, 2**32 - 1, None, 1000)
        assert stored == [newer if row[0] == newer[0] else row for row in scanned]
        assert engine.stats()["keys"] == 30 and engine.stats()["bytes"] == sum(len(row[1]) for row in stored)

    def test_a_page_of_new_keys_is_one_insert(self, tmp_path: Path) -> None:
        """SQLite: a page in scan order whose keys are all new here (and whose hashes rise strictly: two keys of
        one hash take the general path) goes in with one ``executemany`` after one query of its run, without a
        query of the stored versions (the handoff's receiver: bench/README.md); a short group (clients' writes)
        does not query its run."""
        source = SQLiteEngine(tmp_path / "source.sqlite")
        engine = SQLiteEngine(tmp_path / "db.sqlite")
        try:
            page = [row for row in self.scanned(source) if row[0] not in SAME_HASH]  # hashes that rise strictly
            statements: list[str] = []
            engine._db.set_trace_callback(statements.append)
            assert engine.apply_rows(page) == [True] * 28
            assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", *["INSERT"] * 28, "COMMIT"]
            assert "IN (" not in statements[1]
            statements.clear()
            newer = [(row[0], b"newer", 0, 0, row[4] + 1, "w", 0) for row in page[3:5]]  # a few writes, in order
            assert engine.apply_rows(newer) == [True, True]
            assert not [s for s in statements if "EXISTS" in s]  # no query of a run for a short group
            engine._db.set_trace_callback(None)
            assert engine.scan_rows(0, 2**32 - 1, None, 1000) == [*page[:3], *newer, *page[5:]]
        finally:
            source.close()
            engine.close()

    def test_remove_rows_if(self, engine: Any) -> None:
        """The rows' records go when their stored version is still the row's; a rewritten one stays (the
        whole group then takes the record-by-record path); counts and the record cache follow."""
        page = rows(6)
        engine.apply_rows(page)
        engine.get(b"k-0")  # in the record cache, if the engine has one
        assert engine.remove_rows_if(page[:3]) == 3
        assert engine.get(b"k-0") is None and engine.stats()["keys"] == 3
        engine.put(b"k-4", Record(b"rewritten", 0, 0, Version(CLOCK + 99, "w1")))
        assert engine.remove_rows_if(page[3:]) == 2
        assert engine.get(b"k-4").value == b"rewritten"
        assert engine.stats()["keys"] == 1 and engine.stats()["bytes"] == len(b"rewritten")
        assert engine.remove_rows_if([]) == 0

    @staticmethod
    def scanned(engine: Any, count: int = 30) -> list[BulkRow]:
        """``count`` records put into ``engine`` (clocks at both ends of the range, a tombstone, two keys of one
        ring hash), read back in the order a handoff scans them."""
        engine.put(SAME_HASH[0], Record(b"same-0", 0, 0, Version(CLOCK, "w")))
        engine.put(SAME_HASH[1], Record(b"same-1", 0, 0, Version(CLOCK, "w")))
        engine.put(b"k-0", Record(b"v0", 0, 0, Version(0, "w")))
        engine.put(b"k-1", Record(b"v1", 0, 0, Version(2**63 - 1, "w"), True))
        for i in range(2, count - 2):
            engine.put(b"k-%d" % i, Record(b"v%d" % i, i, 0, Version(CLOCK + i, "w")))
        found: list[BulkRow] = engine.scan_rows(0, 2**32 - 1, None, 1000)
        assert len(found) == count
        return found

    def test_remove_rows_if_drops_a_scanned_page(self, engine: Any) -> None:
        """A page as scanned goes whole, and nothing before or after it; counts and the record cache follow."""
        found = self.scanned(engine)
        engine.get(found[6][0])  # in the record cache, if the engine has one
        assert engine.remove_rows_if(found[5:25]) == 20
        assert engine.scan_rows(0, 2**32 - 1, None, 1000) == found[:5] + found[25:]
        assert engine.get(found[6][0]) is None
        assert engine.stats()["keys"] == 10
        assert engine.stats()["bytes"] == sum(len(row[1]) for row in found[:5] + found[25:])

    def test_remove_rows_if_keeps_what_changed_in_the_page(self, engine: Any) -> None:
        """Between the scan and the drop, a record of the page was rewritten, one that the page does not have
        was written among its records, one was removed: the first two stay, the others go."""
        found = self.scanned(engine)
        engine.put(found[7][0], Record(b"rewritten", 0, 0, Version(CLOCK + 1000, "w")))
        engine.remove(found[12][0])
        page = found[5:10] + found[11:20]  # found[10] came after the scan
        assert engine.remove_rows_if(page) == len(page) - 2
        left = engine.scan_rows(0, 2**32 - 1, None, 1000)
        assert [row[0] for row in left] == [row[0] for row in found[:5] + [found[7], found[10]] + found[20:]]
        assert engine.get(found[7][0]).value == b"rewritten"
        assert engine.stats()["keys"] == len(left)
        assert engine.stats()["bytes"] == sum(len(row[1]) for row in left)

    def test_remove_run_if_drops_an_unchanged_run(self, engine: Any) -> None:
        """A run as scanned (clocks 0 and 2**63 - 1, a tombstone, keys of one hash) goes whole, and nothing
        before or after it; counts and the record cache follow."""
        found = self.scanned(engine)
        engine.get(found[6][0])  # in the record cache, if the engine has one
        assert engine.remove_run_if(found[0][0], found[24][0], run_digest(found[:25])) == 25
        assert engine.scan_rows(0, 2**32 - 1, None, 1000) == found[25:]
        assert engine.get(found[6][0]) is None
        assert engine.stats()["keys"] == 5 and engine.stats()["bytes"] == sum(len(row[1]) for row in found[25:])
        assert engine.remove_run_if(found[25][0], found[29][0], run_digest(found[25:])) == 5
        assert engine.stats()["keys"] == 0 and engine.stats()["bytes"] == 0

    def test_remove_run_if_keeps_a_run_that_changed(self, engine: Any) -> None:
        """A run where, since its digest, a record was rewritten (a newer clock; the same clock by another
        writer; writers whose names joined with commas read the same: "a,b" and "c" against "a" and "b,c"), a
        record was written among its records or one was removed, stays whole; a run whose first key comes
        after its last is no run."""
        found = self.scanned(engine)
        engine.put(found[12][0], Record(b"twelve", 0, 0, Version(CLOCK + 500, "a,b")))
        engine.put(found[13][0], Record(b"thirteen", 0, 0, Version(CLOCK + 501, "c")))
        found = engine.scan_rows(0, 2**32 - 1, None, 1000)
        runs = [found[i : i + 5] for i in range(0, 30, 5)]
        digests = [run_digest(run) for run in runs]
        engine.put(found[1][0], Record(b"newer", 0, 0, Version(found[1][4] + 1, "w")))
        engine.put(found[7][0], Record(b"other writer", 0, 0, Version(found[7][4], "x")))
        engine.put(found[12][0], Record(b"twelve again", 0, 0, Version(CLOCK + 500, "a")))
        engine.put(found[13][0], Record(b"thirteen again", 0, 0, Version(CLOCK + 501, "b,c")))
        engine.remove(found[17][0])
        between = next(b"new-%d" % i for i in range(100_000) if self.between(b"new-%d" % i, found, 21))
        engine.put(between, Record(b"added", 0, 0, Version(CLOCK, "w")))
        keys, size = engine.stats()["keys"], engine.stats()["bytes"]
        for run, digest in zip(runs[:5], digests[:5]):
            assert engine.remove_run_if(run[0][0], run[-1][0], digest) == 0
        assert engine.stats()["keys"] == keys and engine.stats()["bytes"] == size
        assert engine.remove_run_if(runs[5][-1][0], runs[5][0][0], digests[5]) == 0
        assert engine.remove_run_if(runs[5][0][0], runs[5][-1][0], digests[5]) == 5
        assert engine.stats()["keys"] == keys - 5

    @staticmethod
    def between(key: bytes, found: list[BulkRow], index: int) -> bool:
        """Whether ``key`` sorts (by ring hash, then key) between ``found[index]`` and the row after it."""
        position = (key_hash(key), key)
        after = found[index + 1][0]
        return (key_hash(found[index][0]), found[index][0]) < position < (key_hash(after), after)

    def test_remove_rows_if_rows_out_of_order(self, engine: Any) -> None:
        """Rows not in scan order go too (record by record)."""
        found = self.scanned(engine)
        assert engine.remove_rows_if(found[10:20][::-1]) == 10
        assert engine.scan_rows(0, 2**32 - 1, None, 1000) == found[:10] + found[20:]

    def test_a_scanned_page_goes_in_one_delete(self, tmp_path: Path) -> None:
        """SQLite: an unchanged page (clocks 0 and 2**63 - 1, keys of one hash) is one ``DELETE`` of its run of
        the table, not one per row (the handoff's drop: bench/README.md)."""
        engine = SQLiteEngine(tmp_path / "db.sqlite")
        found = self.scanned(engine)
        statements: list[str] = []
        engine._db.set_trace_callback(statements.append)
        try:
            assert engine.remove_rows_if(found) == 30
        finally:
            engine._db.set_trace_callback(None)
            engine.close()
        assert len([s for s in statements if s.startswith("DELETE")]) == 1


class BackendTests:
    """A kvstore answers xbulk through its line protocol."""

    def serve(self, engine: IStorageEngine | None = None) -> tuple[LocalBackend, Any, StringTransport]:
        clock = Clock()
        clock.advance(T0)
        backend = LocalBackend(engine or MemoryEngine(), "n1", clock, 100)
        protocol = MemcacheServerFactory(backend, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return backend, protocol, transport

    def test_a_page_is_applied(self) -> None:
        """The rows newer than the stored ones are kept; the answer counts stored and kept rows."""
        backend, protocol, transport = self.serve()
        backend.engine.put(b"k-1", Record(b"newest", 0, 0, Version(CLOCK + 50, "w1")))
        count, block = encode_rows(rows(3))
        protocol.dataReceived(serialize_command(XBulk(count, block)))
        protocol.dataReceived(b"xbulk\r\n")
        assert transport.value() == b"XBULKED 2 1\r\nXBULK 1\r\n"
        assert backend.engine.get(b"k-1").value == b"newest"
        assert backend.engine.get(b"k-2").value == b"v2"
        stats = backend.stats()
        assert stats["cmd_xbulk"] == 1 and stats["handoff_records_received_total"] == 3
        assert stats["total_items"] == 2  # the rows stored
        transport.clear()
        count, block = encode_rows([*rows(3, prefix=b"n"), (b"gone", b"", 0, 0, CLOCK, "w1", 1)])
        protocol.dataReceived(serialize_command(XBulk(count, block)))
        assert transport.value() == b"XBULKED 4 0\r\n"
        assert backend.stats()["total_items"] == 5  # a tombstone is no item

    def test_a_bad_page_is_refused_whole(self) -> None:
        """A page that does not decode, or whose newest version is too far ahead, stores nothing."""
        backend, protocol, transport = self.serve()
        count, block = encode_rows(rows(2, value=b"v" * 200))  # over the 100-byte limit
        protocol.dataReceived(serialize_command(XBulk(count, block)))
        assert transport.value().startswith(b"CLIENT_ERROR bad bulk page: row 0")
        transport.clear()
        ahead = (int(T0 + 3600) * 1000) << 16
        count, block = encode_rows([*rows(2), (b"future", b"x", 0, 0, ahead, "w1", 0)])
        protocol.dataReceived(serialize_command(XBulk(count, block)))
        assert transport.value().startswith(b"CLIENT_ERROR version")
        assert backend.engine.stats()["keys"] == 0

    def test_pages_need_the_token(self) -> None:
        """A kvstore given the cluster token refuses pages and the probe until the connection proved it
        (the page's bytes are read as its block, not as commands); after xauth they run."""
        clock = Clock()
        clock.advance(T0)
        backend = LocalBackend(MemoryEngine(), "n1", clock, 100)
        factory = MemcacheServerFactory(backend, clock, token="s3cret")
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        page = serialize_command(XBulk(*encode_rows(rows(2))))
        protocol.dataReceived(page + b"xbulk\r\n")
        refused = b"CLIENT_ERROR authentication required: send xauth <token> first\r\n"
        assert transport.value() == refused * 2
        assert backend.engine.stats()["keys"] == 0 and factory.commands_refused == 2
        transport.clear()
        protocol.dataReceived(b"xauth s3cret\r\n" + page)
        assert transport.value() == b"OK\r\nXBULKED 2 0\r\n"

    def test_sqlite_page_is_durable_when_answered(self, tmp_path: Path) -> None:
        """With SQLite, the answer leaves after the commit: another connection to the file sees the rows."""
        engine = SQLiteEngine(tmp_path / "db.sqlite")
        try:
            _backend, protocol, transport = self.serve(engine)
            count, block = encode_rows(rows(50))
            protocol.dataReceived(serialize_command(XBulk(count, block)))
            assert transport.value() == b"XBULKED 50 0\r\n"
            other = SQLiteEngine(tmp_path / "db.sqlite", check=False)
            assert other.stats()["keys"] == 50
            other.close()
        finally:
            engine.close()


class ClientTests:
    """The client sends pages only on a connection whose server said it reads them."""

    def connect(self) -> tuple[KVClientProtocol, StringTransport]:
        client = KVClientProtocol(probe_bulk=True)
        transport = StringTransport()
        client.makeConnection(transport)
        return client, transport

    def test_pages_wait_for_the_probe(self) -> None:
        """The probe goes first; pages leave once it is answered XBULK 1."""
        client, transport = self.connect()
        assert transport.value() == b"xbulk\r\n"
        count, block = encode_rows(rows(2))
        answered = client.send_bulk([XBulk(count, block)])
        assert transport.value() == b"xbulk\r\n"  # nothing more before the answer
        client.dataReceived(b"XBULK 1\r\n")
        assert transport.value() == b"xbulk\r\n" + serialize_command(XBulk(count, block))
        client.dataReceived(b"XBULKED 2 0\r\n")
        assert answered.result == [Bulked(2, 0)]

    def test_an_older_server_gets_no_page(self) -> None:
        """A server that answers the probe ERROR (an earlier version) is sent no page bytes: each page
        fails with BulkUnsupported, now and later."""
        client, transport = self.connect()
        waiting = client.send_bulk([XBulk(1, b"x" * 30)])
        client.dataReceived(b"ERROR\r\n")
        assert transport.value() == b"xbulk\r\n"
        results: list[Any] = []
        waiting.addCallback(results.extend)
        assert len(results) == 1 and results[0].check(BulkUnsupported)
        later: list[Any] = []
        client.send_bulk([XBulk(1, b"x" * 30)]).addCallback(later.extend)
        assert len(later) == 1 and later[0].check(BulkUnsupported)
        assert transport.value() == b"xbulk\r\n" and client.bulk is False


class _OldServer(MemcacheServerFactory):
    """A kvstore of the version before bulk pages: its parser knows no xbulk (it answers ERROR, and would
    read a page's bytes as commands)."""

    def buildProtocol(self, addr: Any) -> MemcacheServerProtocol:
        protocol = super().buildProtocol(addr)
        del protocol._parser._dispatch[b"xbulk"]
        return protocol


class HandoffTests:
    """A handoff moves records as bulk pages, or as xmove to a kvstore of an earlier version."""

    def move(self, old_target: bool) -> tuple[Cluster, dict[bytes, Record]]:
        cluster = Cluster(page_size=20)
        a = cluster.add("A")
        b = cluster.add("B")
        if old_target:
            for index, (port, factory, backlog, interface) in enumerate(cluster.reactor.tcpServers):
                if port == b.port:
                    old = _OldServer(factory.backend, cluster.reactor)  # type: ignore[attr-defined]
                    cluster.reactor.tcpServers[index] = (port, old, backlog, interface)
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 200)
        a.handoff.bulk_rows = 7  # several pages per scan page
        two = cluster.ring(2, "B")
        cluster.announce(two)
        cluster.settle()
        assert all_records(b.engine) == written
        assert all_records(a.engine) == {}
        return cluster, written

    def test_records_move_as_bulk_pages(self) -> None:
        """To a kvstore that reads pages, every record goes in a page (no xmove), and is dropped after."""
        cluster, written = self.move(old_target=False)
        stats = cluster.nodes["B"].backend.stats()
        assert stats["cmd_xput"] == 0
        assert stats["cmd_xbulk"] >= len(written) // 7
        assert stats["handoff_records_received_total"] == len(written)
        assert cluster.nodes["A"].handoff.records_sent == len(written)
        cluster.stop()

    def test_an_older_target_gets_xmove(self) -> None:
        """A kvstore of an earlier version (xbulk unknown) gets one xmove per record and no page."""
        cluster, written = self.move(old_target=True)
        stats = cluster.nodes["B"].backend.stats()
        assert stats["cmd_xbulk"] == 0
        assert stats["cmd_xput"] == len(written)
        assert stats["handoff_records_received_total"] == len(written)
        cluster.stop()

    def test_a_refused_page_goes_record_by_record(self) -> None:
        """A page the target refuses (a record too far ahead of its clock) is pushed as xmove: the other
        records move and are dropped, the refused one stays on the sender."""
        cluster = Cluster(page_size=50)
        a = cluster.add("A")
        b = cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 30)
        future = Record(b"f", 0, 0, Version((int(T0 + 3600) * 1000) << 16, "w"))
        a.engine.put(b"future", future)
        cluster.announce(cluster.ring(2, "B"))
        cluster.settle()
        assert all_records(b.engine) == written
        assert all_records(a.engine) == {b"future": future}
        stats = b.backend.stats()
        # the first push: one page refused, then 31 xmove; each sweep finds the refused record again
        assert stats["cmd_xbulk"] >= 1 and stats["cmd_xput"] >= 31 and stats["versions_refused_total"] >= 2
        cluster.stop()


class RateTests:
    """``--handoff-rate``: its syntax and its pace."""

    @pytest.mark.parametrize(
        ("text", "rate"),
        [
            ("unlimited", Rate()),
            ("0", Rate()),
            ("5000", Rate(5000)),
            ("5000 records/s", Rate(5000)),
            ("20MiB/s", Rate(0, 20 * 1024**2)),
            ("1.5GiB", Rate(0, 1.5 * 1024**3)),
            ("5000,10MB", Rate(5000, 10e6)),
        ],
    )
    def test_parse(self, text: str, rate: Rate) -> None:
        """Records a second, bytes a second with a unit, or both."""
        assert Rate.parse(text) == rate

    @pytest.mark.parametrize("text", ["fast", "-3", "5 parsecs", "10 MiB/h"])
    def test_parse_refuses(self, text: str) -> None:
        """Anything else is a ValueError (the config names the option)."""
        with pytest.raises(ValueError, match="not a rate"):
            Rate.parse(text)

    def test_str(self) -> None:
        """What /health and chash status show."""
        assert str(Rate()) == "unlimited"
        assert str(Rate(5000, 20 * 1024**2)) == "5000 records/s, 20 MiB/s"

    def test_bucket(self) -> None:
        """Each piece of work waits for the time the work before it takes at the rate; the slower of the two
        limits decides."""
        bucket = RateBucket()
        rate = Rate(100, 1000)
        assert bucket.take(rate, 50, 0, 10.0) == 0.0
        assert bucket.take(rate, 50, 0, 10.0) == pytest.approx(0.5)
        assert bucket.take(rate, 10, 2000, 10.0) == pytest.approx(1.0)  # 2 s for the bytes
        assert bucket.take(rate, 1, 0, 20.0) == 0.0  # idle time is not saved up

    def test_a_throttled_handoff(self) -> None:
        """With a limit of 100 records/s a move of 200 records takes about 2 s of the clock."""
        cluster = Cluster(page_size=20)
        a = cluster.add("A")
        b = cluster.add("B")
        a.handoff.rate = Rate(100)
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 200)
        started = cluster.reactor.seconds()
        cluster.announce(cluster.ring(2, "B"))
        cluster.settle()
        assert all_records(b.engine) == written
        assert 1.7 <= cluster.reactor.seconds() - started <= 2.5
        assert a.handoff.status()["rate_limit"] == "100 records/s"
        assert a.handoff.stats()["handoff_rate_limit_records_per_second"] == 100
        cluster.stop()

    def test_the_option(self) -> None:
        """--handoff-rate reaches the config parsed; a bad one is a config error naming the option."""
        config = load_config(KVStoreConfig, {"node_id": "a", "handoff_rate": "20MiB/s"}, environ={})
        assert config.handoff_rate == Rate(0, 20 * 1024**2)
        assert load_config(KVStoreConfig, {"node_id": "a"}, environ={}).handoff_rate == Rate()
        with pytest.raises(ConfigError, match="handoff-rate"):
            load_config(KVStoreConfig, {"node_id": "a", "handoff_rate": "fast"}, environ={})


class GCWatchTests:
    """Full garbage collections are timed through gc.callbacks."""

    def test_full_collections_are_counted_and_timed(self) -> None:
        """Each full collection adds one to the count and its pause to the total; younger ones do not."""
        watch = GCWatch()
        watch.install()
        try:
            gc.collect(0)
            assert watch.stats()["gc_full_collections_total"] == 0
            gc.collect()
            gc.collect()
        finally:
            watch.uninstall()
        gc.collect()  # no longer watched
        stats = watch.stats()
        assert stats["gc_full_collections_total"] == 2
        assert 0 < stats["gc_full_pause_max_seconds"] <= stats["gc_full_pause_seconds_total"]

    def test_frozen_objects_are_counted_after_full_collections_only(self) -> None:
        """``gc_frozen_objects`` (a walk of the whole frozen list) is counted at the first call and again only
        after a full collection: a freeze shows once one ran, not in the calls before it."""
        watch = GCWatch()
        watch.install()
        try:
            before = watch.stats()["gc_frozen_objects"]
            gc.freeze()
            try:
                assert watch.stats()["gc_frozen_objects"] == before
                gc.collect()
                after = watch.stats()["gc_frozen_objects"]
            finally:
                gc.unfreeze()
        finally:
            watch.uninstall()
        assert after > before


class TurnTests:
    """A connection runs one bulk page per reactor turn."""

    def test_one_page_per_turn(self) -> None:
        """Two pages in one read: the first is applied and answered, the second waits for the next turn of
        the reactor (the connection stops reading meanwhile), then runs."""
        clock = Clock()
        clock.advance(T0)
        backend = LocalBackend(MemoryEngine(), "n1", clock, 100)
        protocol = MemcacheServerFactory(backend, clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        first, second = encode_rows(rows(2)), encode_rows(rows(3, prefix=b"j"))
        protocol.dataReceived(serialize_command(XBulk(*first)) + serialize_command(XBulk(*second)) + b"version\r\n")
        assert transport.value() == b"XBULKED 2 0\r\n"
        assert transport.producerState == "paused"
        clock.advance(0)
        assert transport.value().startswith(b"XBULKED 2 0\r\nXBULKED 3 0\r\nVERSION ")
        assert transport.producerState == "producing"
        assert backend.engine.stats()["keys"] == 5
        assert [call.func.__name__ for call in clock.getDelayedCalls()] == ["_idle_check"]  # type: ignore[attr-defined]
