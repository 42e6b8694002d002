"""Behaviour of the storage engines: one suite run over every engine, plus each engine's own cases."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chashd.interfaces import IStorageEngine
from chashd.record import Record
from chashd.ring import HASH_SPACE, key_hash
from chashd.storage import MemoryEngine
from chashd.storage import memory as memory_module
from chashd.versions import Version

TOP = HASH_SPACE - 1
#: Two keys with the same ring hash (found by search), to check the order within one hash.
SAME_HASH = (b"c5373", b"c45389")
#: Keys hashing into the last 2**14 hashes of the ring.
NEAR_TOP = (b"t721013", b"t971136", b"t976581")
#: A tombstone grace of one hour, in seconds.
GRACE = 3600.0
#: "Now" in these tests, as a Unix time.
NOW = 1_800_000_000.0

Engine = MemoryEngine
EngineFactory = Callable[[], Engine]


def version(millis: int, writer: str = "w", counter: int = 0) -> Version:
    """A version at ``millis`` milliseconds."""
    return Version(millis << 16 | counter, writer)


def record(clock: int, value: bytes = b"v", writer: str = "w", **fields: object) -> Record:
    """A record whose version clock is ``clock``."""
    return Record(value, version=Version(clock, writer), **fields)  # type: ignore[arg-type]


def memory_engine(tmp_path: Path) -> Callable[[], Engine]:
    """A factory of fresh memory engines."""
    return MemoryEngine


ENGINES = {"memory": memory_engine}


@pytest.fixture(params=sorted(ENGINES))
def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EngineFactory]:
    """A factory of fresh, empty engines of one kind; every engine made is closed at the end."""
    factory = ENGINES[request.param](tmp_path)
    made: list[Engine] = []

    def make() -> Engine:
        engine = factory()
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engine(make_engine: EngineFactory) -> Engine:
    """A fresh, empty engine."""
    return make_engine()


def scan_all(engine: Engine, first: int = 0, last: int = TOP, limit: int = 7) -> list[tuple[bytes, Record]]:
    """Every pair in ``first..last``, paging ``limit`` at a time the way the handoff does."""
    pairs: list[tuple[bytes, Record]] = []
    after = None
    for _ in range(100_000):
        page = engine.scan(first, last, after, limit)
        assert len(page) <= limit
        pairs.extend(page)
        if len(page) < limit:
            return pairs
        after = (key_hash(page[-1][0]), page[-1][0])
    raise AssertionError("scan did not end")


def brute_force(keys: dict[bytes, Record], first: int, last: int) -> list[tuple[bytes, Record]]:
    """What a scan of ``first..last`` must return, worked out by sorting every key."""
    inside = [key for key in keys if first <= key_hash(key) <= last]
    return [(key, keys[key]) for key in sorted(inside, key=lambda k: (key_hash(k), k))]


class EngineInterfaceTests:
    """Every engine provides the interface."""

    def test_provides(self, engine: Engine) -> None:
        """The engine declares and implements ``IStorageEngine``."""
        from zope.interface.verify import verifyObject

        assert verifyObject(IStorageEngine, engine)


class PointTests:
    """get, put, apply and remove of single keys."""

    def test_missing(self, engine: Engine) -> None:
        """A key never written reads as None."""
        assert engine.get(b"nope") is None

    def test_put_get(self, engine: Engine) -> None:
        """A record put is read back equal, with every field."""
        stored = Record(b"\x00\r\nvalue\xff", flags=2**32 - 1, expires_at=2_000_000_000, version=version(5, "gw-1"))
        engine.put(b"k", stored)
        assert engine.get(b"k") == stored

    def test_put_replaces_regardless_of_version(self, engine: Engine) -> None:
        """``put`` replaces the stored record even with a lower version: the caller decided."""
        engine.put(b"k", record(10, b"new"))
        engine.put(b"k", record(5, b"old"))
        assert engine.get(b"k") == record(5, b"old")

    def test_apply_keeps_higher_version(self, engine: Engine) -> None:
        """``apply`` stores a higher version, refuses a lower or equal one, and says which it did."""
        assert engine.apply(b"k", record(5, b"five")) is True
        assert engine.apply(b"k", record(3, b"three")) is False
        assert engine.apply(b"k", record(5, b"five again")) is False
        assert engine.get(b"k") == record(5, b"five")
        assert engine.apply(b"k", record(6, b"six")) is True
        assert engine.get(b"k") == record(6, b"six")

    def test_apply_writer_breaks_ties(self, engine: Engine) -> None:
        """Between equal clocks, the higher writer id wins, in whatever order they arrive."""
        assert engine.apply(b"k", record(5, b"b", writer="b")) is True
        assert engine.apply(b"k", record(5, b"a", writer="a")) is False
        assert engine.apply(b"k", record(5, b"c", writer="c")) is True
        assert engine.get(b"k") == record(5, b"c", writer="c")

    def test_huge_clock(self, engine: Engine) -> None:
        """Version clocks use all 64 bits and keep their order at the top of the range."""
        assert engine.apply(b"k", record(2**64 - 2)) is True
        assert engine.apply(b"k", record(2**63 - 1)) is False
        assert engine.apply(b"k", record(2**64 - 1)) is True
        assert engine.get(b"k") == record(2**64 - 1)

    def test_tombstone_is_a_record(self, engine: Engine) -> None:
        """A tombstone is stored and read back like any record, and wins over an older write."""
        engine.put(b"k", record(1, b"alive"))
        assert engine.apply(b"k", Record.deleted(Version(2, "w"))) is True
        assert engine.get(b"k") == Record.deleted(Version(2, "w"))
        assert engine.apply(b"k", record(1, b"alive")) is False

    def test_remove(self, engine: Engine) -> None:
        """``remove`` forgets a key entirely (also from scans); removing a missing key does nothing."""
        engine.put(b"k", record(1))
        engine.put(b"other", record(1))
        engine.remove(b"k")
        engine.remove(b"never")
        assert engine.get(b"k") is None
        assert [key for key, _ in scan_all(engine)] == [b"other"]
        assert engine.apply(b"k", record(1)) is True

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        writes=st.lists(
            st.tuples(
                st.sampled_from([b"a", b"b", b"c"]),
                st.integers(min_value=0, max_value=2**64 - 1),
                st.sampled_from(["", "w1", "w2"]),
                st.booleans(),
            ),
            min_size=1,
            max_size=12,
        ),
        seed=st.randoms(use_true_random=False),
    )
    def test_apply_is_order_free(
        self, make_engine: EngineFactory, writes: list[tuple[bytes, int, str, bool]], seed: random.Random
    ) -> None:
        """Applying a set of records in any order, some twice, ends with the highest version of each key."""
        records = [
            (key, Record.deleted(Version(clock, writer)) if dead else record(clock, b"%d" % clock, writer))
            for key, clock, writer, dead in writes
        ]
        engines = []
        for _ in range(2):
            engine = make_engine()
            shuffled = records + records[: len(records) // 2]
            seed.shuffle(shuffled)
            for key, rec in shuffled:
                engine.apply(key, rec)
            engines.append(engine)
        for key in {key for key, _ in records}:
            best = max((rec for k, rec in records if k == key), key=lambda r: r.version)
            for engine in engines:
                got = engine.get(key)
                assert got is not None and got.version == best.version


class ScanTests:
    """Range scans in (hash, key) order, paged the way the handoff streams an arc."""

    def fill(self, engine: Engine, count: int = 200) -> dict[bytes, Record]:
        """Put ``count`` keys plus the special ones; the dict of what was put."""
        keys = {b"key-%d" % i: record(i + 1, b"v%d" % i) for i in range(count)}
        for i, key in enumerate(SAME_HASH + NEAR_TOP):
            keys[key] = record(10_000 + i)
        for key, rec in keys.items():
            engine.put(key, rec)
        return keys

    def test_order_and_paging(self, engine: Engine) -> None:
        """Paging through the whole ring returns every key once, in (hash, key) order."""
        keys = self.fill(engine)
        for limit in (1, 7, 1000):
            assert scan_all(engine, limit=limit) == brute_force(keys, 0, TOP)

    def test_same_hash_ordered_by_key(self, engine: Engine) -> None:
        """Keys with the same hash come in key order, and paging between them loses neither."""
        self.fill(engine)
        first, second = sorted(SAME_HASH)
        h = key_hash(first)
        assert key_hash(second) == h
        assert [key for key, _ in engine.scan(h, h)] == [first, second]
        assert [key for key, _ in engine.scan(h, h, None, 1)] == [first]
        assert [key for key, _ in engine.scan(h, h, (h, first), 1)] == [second]
        assert engine.scan(h, h, (h, second), 1) == []

    def test_bounds_are_inclusive(self, engine: Engine) -> None:
        """A key whose hash equals either bound is inside the range; one past it is outside."""
        keys = self.fill(engine)
        h = key_hash(b"key-7")
        assert (b"key-7", keys[b"key-7"]) in engine.scan(h, h)
        assert b"key-7" not in [key for key, _ in scan_all(engine, h + 1, TOP)]
        assert b"key-7" not in [key for key, _ in scan_all(engine, 0, h - 1)]
        assert b"key-7" in [key for key, _ in scan_all(engine, 0, h)]

    def test_top_of_hash_space(self, engine: Engine) -> None:
        """A range ending at the top hash includes the keys hashing just below it, paging included."""
        keys = self.fill(engine)
        lowest = min(key_hash(key) for key in NEAR_TOP)
        expected = brute_force(keys, lowest, TOP)
        assert {key for key, _ in expected} >= set(NEAR_TOP)
        assert scan_all(engine, lowest, TOP, limit=1) == expected
        assert scan_all(engine, lowest, TOP, limit=1000) == expected

    def test_after_outside_range(self, engine: Engine) -> None:
        """A position before the range starts at the range; one after it gives nothing."""
        keys = self.fill(engine)
        first, last = 2**30, 2**31
        assert engine.scan(first, last, (5, b"a")) == brute_force(keys, first, last)
        assert engine.scan(first, last, (last + 1, b"")) == []

    def test_bad_ranges(self, engine: Engine) -> None:
        """A wrapping or out-of-space range, or a non-positive limit, is refused."""
        for first, last, limit in [(5, 4, 10), (-1, 4, 10), (0, HASH_SPACE, 10), (0, 4, 0)]:
            with pytest.raises(ValueError):
                engine.scan(first, last, None, limit)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        keys=st.sets(st.binary(min_size=1, max_size=6), max_size=60),
        removed=st.sets(st.binary(min_size=1, max_size=6), max_size=10),
        bounds=st.tuples(st.integers(0, TOP), st.integers(0, TOP)).map(sorted),
        limit=st.integers(1, 9),
    )
    def test_agrees_with_brute_force(
        self,
        make_engine: EngineFactory,
        keys: set[bytes],
        removed: set[bytes],
        bounds: list[int],
        limit: int,
    ) -> None:
        """Paging through any range returns exactly what sorting all keys by (hash, key) gives."""
        engine = make_engine()
        stored = {key: record(i + 1) for i, key in enumerate(sorted(keys))}
        for key, rec in stored.items():
            engine.put(key, rec)
        for key in removed:
            engine.remove(key)
            stored.pop(key, None)
        first, last = bounds
        assert scan_all(engine, first, last, limit) == brute_force(stored, first, last)
        assert scan_all(engine, 0, TOP, limit) == brute_force(stored, 0, TOP)

    def test_scan_while_writing(self, engine: Engine) -> None:
        """A scan in another thread while this one writes sees ordered pages and every key that stayed put."""
        stable = {b"stable-%d" % i: record(1) for i in range(300)}
        for key, rec in stable.items():
            engine.put(key, rec)
        stop = threading.Event()
        failures: list[BaseException] = []
        scans = [0]

        def scanner() -> None:
            try:
                while not stop.is_set():
                    pairs = scan_all(engine, limit=50)
                    positions = [(key_hash(key), key) for key, _ in pairs]
                    assert positions == sorted(set(positions))
                    seen = {key for key, _ in pairs}
                    assert seen >= set(stable)
                    scans[0] += 1
            except BaseException as e:
                failures.append(e)

        thread = threading.Thread(target=scanner)
        thread.start()
        try:
            for i in itertools.count():
                if i >= 3000 and scans[0] >= 3 or failures or i > 200_000:
                    break
                key = b"churn-%d" % (i % 500)
                if i % 7 == 0:
                    engine.remove(key)
                elif i % 11 == 0:
                    with engine.batch():
                        engine.apply(key, record(i))
                        engine.put(b"other-%d" % (i % 97), record(i))
                else:
                    engine.put(key, record(i))
        finally:
            stop.set()
            thread.join(timeout=60)
        assert not thread.is_alive()
        assert failures == []
        assert scans[0] >= 3


class PurgeTests:
    """Forgetting expired records and old tombstones."""

    def test_purge(self, engine: Engine) -> None:
        """Expired records and tombstones past the grace go; the rest stays; the count is returned."""
        now_ms = int(NOW * 1000)
        engine.put(b"expired", Record(b"x", expires_at=int(NOW) - 1, version=version(now_ms - 10_000)))
        engine.put(b"expires-now", Record(b"x", expires_at=int(NOW), version=version(now_ms - 10_000)))
        engine.put(b"later", Record(b"x", expires_at=int(NOW) + 1, version=version(now_ms - 10_000)))
        engine.put(b"forever", Record(b"x", version=version(1)))
        engine.put(b"old-tomb", Record.deleted(version(now_ms - int(GRACE * 1000) - 1)))
        engine.put(b"edge-tomb", Record.deleted(version(now_ms - int(GRACE * 1000), counter=5)))
        engine.put(b"new-tomb", Record.deleted(version(now_ms - int(GRACE * 1000) + 1)))
        assert engine.purge(NOW, GRACE) == 4
        remaining = {key for key, _ in scan_all(engine)}
        assert remaining == {b"later", b"forever", b"new-tomb"}
        assert engine.get(b"expired") is None
        assert engine.stats() == {"keys": 3, "bytes": 2}
        assert engine.purge(NOW, GRACE) == 0

    def test_purge_many(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """A purge goes past its chunk size and removes every purgeable record, keeping the others."""
        monkeypatch.setattr(memory_module, "_PURGE_CHUNK", 7)
        for i in range(100):
            expires = int(NOW) - 1 if i % 3 == 0 else 0
            engine.put(b"k%d" % i, Record(b"x", expires_at=expires, version=version(1)))
        assert engine.purge(NOW, GRACE) == 34
        assert {key for key, _ in scan_all(engine)} == {b"k%d" % i for i in range(100) if i % 3}


class CounterTests:
    """``stats()`` keeps count of keys and value bytes as writes happen."""

    def test_counters(self, engine: Engine) -> None:
        """Counters follow puts, overwrites, applies (won and lost), tombstones, removes and clear."""
        assert engine.stats() == {"keys": 0, "bytes": 0}
        engine.put(b"a", record(1, b"12345"))
        engine.put(b"b", record(1, b"123"))
        assert engine.stats() == {"keys": 2, "bytes": 8}
        engine.put(b"a", record(2, b"1"))
        assert engine.stats() == {"keys": 2, "bytes": 4}
        engine.apply(b"b", record(0, b"lost, not counted"))
        engine.apply(b"c", record(1, b"12"))
        assert engine.stats() == {"keys": 3, "bytes": 6}
        engine.apply(b"b", Record.deleted(Version(5, "w")))
        assert engine.stats() == {"keys": 3, "bytes": 3}
        engine.remove(b"a")
        engine.remove(b"a")
        assert engine.stats() == {"keys": 2, "bytes": 2}
        engine.clear()
        assert engine.stats() == {"keys": 0, "bytes": 0}


class ClearAndBatchTests:
    """``clear`` and ``batch``."""

    def test_clear(self, engine: Engine) -> None:
        """``clear`` forgets every record, and the engine stays usable."""
        for i in range(50):
            engine.put(b"k%d" % i, record(1))
        engine.clear()
        assert engine.get(b"k1") is None
        assert scan_all(engine) == []
        engine.put(b"k1", record(2))
        assert scan_all(engine) == [(b"k1", record(2))]

    def test_batch(self, engine: Engine) -> None:
        """Writes made in a batch are all there after it, reads inside it see them, and batches nest."""
        with engine.batch():
            for i in range(20):
                engine.apply(b"k%d" % i, record(i + 1))
            assert engine.get(b"k3") == record(4)
            with engine.batch():
                engine.put(b"inner", record(1))
            engine.remove(b"k0")
        assert engine.get(b"k0") is None
        assert engine.get(b"inner") == record(1)
        assert engine.stats()["keys"] == 20
        assert len(scan_all(engine)) == 20


class MemoryEngineTests:
    """What is particular to ``MemoryEngine``."""

    @given(st.binary(min_size=1, max_size=250))
    def test_position_is_hash_then_key(self, key: bytes) -> None:
        """The index position of a key is its ring hash in big-endian bytes followed by the key."""
        assert memory_module._position(key) == key_hash(key).to_bytes(4, "big") + key
