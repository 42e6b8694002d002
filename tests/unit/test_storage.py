"""Behaviour of the storage engines: one suite run over every engine, plus each engine's own cases."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chashd.errors import StorageError, StorageFull
from chashd.interfaces import IStorageEngine
from chashd.record import Record
from chashd.ring import HASH_SPACE, key_hash
from chashd.storage import MemoryEngine, SQLiteEngine
from chashd.storage import memory as memory_module
from chashd.storage import sqlite as sqlite_module
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

Engine = MemoryEngine | SQLiteEngine
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


def sqlite_engine(tmp_path: Path) -> Callable[[], Engine]:
    """A factory of SQLite engines, each on a new file under ``tmp_path``."""
    counter = itertools.count()
    return lambda: SQLiteEngine(tmp_path / f"db-{next(counter)}" / "chashd.sqlite3")


def bounded_memory_engine(tmp_path: Path) -> Callable[[], Engine]:
    """A factory of memory engines with a limit they never reach in the shared suite (so the bounded
    engine's bookkeeping runs through every shared case)."""
    return lambda: MemoryEngine(limit_bytes=1 << 30)


ENGINES = {"memory": memory_engine, "memory-bounded": bounded_memory_engine, "sqlite": sqlite_engine}


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


@contextmanager
def every_kind(tmp_path_factory: pytest.TempPathFactory, count: int = 1) -> Iterator[list[list[Engine]]]:
    """``count`` fresh engines of each kind, closed afterwards.

    For hypothesis tests: pytest-twisted rewraps a ``@given`` test once per parametrization (and then
    fails), so those tests take no parametrized fixture and loop over the kinds themselves.
    """
    made: list[list[Engine]] = []
    try:
        for kind in sorted(ENGINES):
            factory = ENGINES[kind](tmp_path_factory.mktemp(kind))
            made.append([])
            for _ in range(count):
                made[-1].append(factory())
        yield made
    finally:
        for engines in made:
            for engine in engines:
                engine.close()


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


def counts(engine: Engine) -> dict[str, int]:
    """The engine's ``keys`` and ``bytes`` (value bytes held), without its other figures."""
    stats = engine.stats()
    return {"keys": stats["keys"], "bytes": stats["bytes"]}


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

    def test_get_live(self, engine: Engine) -> None:
        """``get_live`` gives the flags and value a read at ``now`` sees: none for a missing key, a
        tombstone, or a record expired at ``now``."""
        engine.put(b"live", Record(b"v", flags=7, expires_at=int(NOW) + 1, version=version(1)))
        engine.put(b"dead", Record.deleted(version(2)))
        engine.put(b"old", Record(b"v", expires_at=int(NOW), version=version(3)))
        for _ in range(2):  # the second time from the SQLite engine's record cache
            assert engine.get_live(b"live", NOW) == (7, b"v")
            assert engine.get_live(b"live", NOW + 1) is None
            assert engine.get_live(b"dead", NOW) is None
            assert engine.get_live(b"old", NOW) is None
            assert engine.get_live(b"missing", NOW) is None
            engine.get(b"live")

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

    @settings(max_examples=40, deadline=None)
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
        self,
        tmp_path_factory: pytest.TempPathFactory,
        writes: list[tuple[bytes, int, str, bool]],
        seed: random.Random,
    ) -> None:
        """Applying a set of records in any order, some twice, ends with the highest version of each key."""
        records = [
            (key, Record.deleted(Version(clock, writer)) if dead else record(clock, b"%d" % clock, writer))
            for key, clock, writer, dead in writes
        ]
        with every_kind(tmp_path_factory, count=2) as kinds:
            for engines in kinds:
                for engine in engines:
                    shuffled = records + records[: len(records) // 2]
                    seed.shuffle(shuffled)
                    for key, rec in shuffled:
                        engine.apply(key, rec)
                for key in {key for key, _ in records}:
                    best = max((rec for k, rec in records if k == key), key=lambda r: r.version)
                    for engine in engines:
                        got = engine.get(key)
                        assert got is not None and got.version == best.version


class GroupTests:
    """``apply_many`` and ``remove_many_if``: a group of writes or compare-and-removes at once."""

    def test_apply_many_keeps_higher_versions(self, engine: Engine) -> None:
        """Each record of the group is stored only over a lower version, in order; one result each."""
        engine.put(b"old", record(5, b"stored"))
        engine.put(b"new", record(5, b"stored"))
        results = engine.apply_many(
            [(b"old", record(4, b"lost")), (b"new", record(6, b"won")), (b"fresh", record(1, b"first"))]
        )
        assert results == [False, True, True]
        assert engine.get(b"old") == record(5, b"stored")
        assert engine.get(b"new") == record(6, b"won")
        assert engine.get(b"fresh") == record(1, b"first")
        assert engine.apply_many([]) == []

    def test_apply_many_same_key_twice(self, engine: Engine) -> None:
        """A key twice in one group meets its own earlier record, as two ``apply`` calls would."""
        results = engine.apply_many(
            [(b"k", record(2, b"two")), (b"k", record(1, b"one")), (b"k", record(3, b"three")), (b"k", record(3))]
        )
        assert results == [True, False, True, False]
        assert engine.get(b"k") == record(3, b"three")
        assert counts(engine) == {"keys": 1, "bytes": 5}

    def test_apply_many_writer_breaks_ties(self, engine: Engine) -> None:
        """Between equal clocks the higher writer id wins, within a group as against the stored record."""
        engine.put(b"k", record(5, b"b", writer="b"))
        assert engine.apply_many([(b"k", record(5, b"a", writer="a")), (b"k", record(5, b"c", writer="c"))]) == [
            False,
            True,
        ]
        assert engine.get(b"k") == record(5, b"c", writer="c")

    def test_apply_many_counts_exactly(self, engine: Engine) -> None:
        """``keys`` and ``bytes`` follow a group of new keys, overwrites, lost records and tombstones."""
        engine.put(b"a", record(1, b"12345"))
        engine.apply_many(
            [
                (b"a", record(2, b"1")),  # -4 bytes
                (b"b", record(1, b"123")),  # a new key
                (b"b", record(0, b"lost, not counted")),
                (b"c", Record.deleted(Version(1, "w"))),  # a new key, no bytes
                (b"a", Record.deleted(Version(3, "w"))),  # -1 byte
            ]
        )
        assert counts(engine) == {"keys": 3, "bytes": 3}
        assert len(scan_all(engine)) == 3

    def test_apply_many_refuses_before_writing(self, engine: Engine) -> None:
        """A record the engine cannot hold makes the whole group fail with a StorageError, storing nothing."""
        with pytest.raises(StorageError):
            engine.apply_many([(b"a", record(1)), (b"b", Record(b"v", expires_at=2**64, version=version(1)))])
        assert engine.get(b"a") is None and engine.get(b"b") is None
        assert counts(engine) == {"keys": 0, "bytes": 0}

    def test_apply_many_joins_a_batch(self, engine: Engine) -> None:
        """Inside ``batch()`` the group is part of the batch's transaction, and reads see it."""
        with engine.batch():
            engine.put(b"a", record(1))
            assert engine.apply_many([(b"b", record(1)), (b"a", record(2))]) == [True, True]
            assert engine.get(b"a") == record(2)
        assert engine.stats()["keys"] == 2

    def test_apply_many_keys_sharing_a_hash(self, engine: Engine) -> None:
        """Two keys with the same ring hash in one group each get their own stored version."""
        first, second = SAME_HASH
        engine.put(first, record(5))
        assert engine.apply_many([(first, record(4)), (second, record(4))]) == [False, True]
        assert engine.apply_many([(second, record(3)), (first, record(6))]) == [False, True]

    def test_remove_many_if(self, engine: Engine) -> None:
        """Only keys whose stored version is exactly the given one are forgotten; counters follow."""
        engine.put(b"same", record(5, b"123"))
        engine.put(b"newer", record(6, b"12345"))
        engine.put(b"other-writer", record(5, b"1", writer="x"))
        engine.put(b"tomb", Record.deleted(Version(7, "w")))
        results = engine.remove_many_if(
            [
                (b"same", Version(5, "w")),
                (b"newer", Version(5, "w")),  # rewritten since: stays
                (b"other-writer", Version(5, "w")),
                (b"missing", Version(1, "w")),
                (b"tomb", Version(7, "w")),
                (b"same", Version(5, "w")),  # already gone
            ]
        )
        assert results == [True, False, False, False, True, False]
        assert engine.get(b"same") is None and engine.get(b"tomb") is None
        assert engine.get(b"newer") == record(6, b"12345")
        assert engine.get(b"other-writer") == record(5, b"1", writer="x")
        assert counts(engine) == {"keys": 2, "bytes": 6}
        assert [key for key, _ in scan_all(engine)] == sorted(
            [b"newer", b"other-writer"], key=lambda k: (key_hash(k), k)
        )
        assert engine.remove_many_if([]) == []

    def test_remove_many_if_keys_sharing_a_hash(self, engine: Engine) -> None:
        """Of two keys with the same ring hash, only the one named goes."""
        first, second = SAME_HASH
        engine.put(first, record(5))
        engine.put(second, record(5))
        assert engine.remove_many_if([(second, Version(5, "w"))]) == [True]
        assert engine.get(first) == record(5) and engine.get(second) is None

    @settings(max_examples=40, deadline=None)
    @given(
        groups=st.lists(
            st.lists(
                st.tuples(
                    st.sampled_from(["apply", "remove"]),
                    st.sampled_from([b"a", b"b", b"c", SAME_HASH[0], SAME_HASH[1]]),
                    st.integers(min_value=0, max_value=6),
                    st.sampled_from(["w1", "w2"]),
                    st.booleans(),
                ),
                max_size=8,
            ),
            max_size=6,
        )
    )
    def test_groups_do_what_single_calls_do(
        self,
        tmp_path_factory: pytest.TempPathFactory,
        groups: list[list[tuple[str, bytes, int, str, bool]]],
    ) -> None:
        """Any sequence of groups leaves the same records, counters and results as the same calls one by one
        (``apply``, and ``get`` plus ``remove`` for a compare-and-remove)."""
        with every_kind(tmp_path_factory, count=2) as kinds:
            for grouped, single in kinds:
                for group in groups:
                    got: list[bool] = []
                    want: list[bool] = []
                    applies = [(op, key, clock, writer, dead) for op, key, clock, writer, dead in group]
                    # Consecutive operations of one kind go in one call, as the backend and the handoff do.
                    for op, run in itertools.groupby(applies, key=lambda item: item[0]):
                        items = list(run)
                        if op == "apply":
                            pairs = [
                                (
                                    key,
                                    Record.deleted(Version(clock, writer))
                                    if dead
                                    else record(clock, b"%d" % clock, writer),
                                )
                                for _, key, clock, writer, dead in items
                            ]
                            got.extend(grouped.apply_many(pairs))
                            want.extend(single.apply(key, rec) for key, rec in pairs)
                        else:
                            versions = [(key, Version(clock, writer)) for _, key, clock, writer, _ in items]
                            got.extend(grouped.remove_many_if(versions))
                            for key, wanted in versions:
                                current = single.get(key)
                                hit = current is not None and current.version == wanted
                                if hit:
                                    single.remove(key)
                                want.append(hit)
                    assert got == want
                    assert grouped.stats() == single.stats()
                    assert scan_all(grouped) == scan_all(single)


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
            with pytest.raises(ValueError):
                engine.scan_versions(first, last, None, limit)

    def test_scan_versions_pages_as_scan(self, engine: Engine) -> None:
        """scan_versions gives (hash, key, version) of the same records in the same pages as scan, tombstones
        and writers included (anti-entropy compares them without reading values)."""
        keys = self.fill(engine)
        engine.put(b"gone", Record.deleted(Version(77, "gw-2")))
        keys[b"gone"] = Record.deleted(Version(77, "gw-2"))
        for first, last, limit in [(0, TOP, 7), (0, TOP, 1000), (2**30, 2**31, 3)]:
            pages: list[tuple[int, bytes, Version]] = []
            after: tuple[int, bytes] | None = None
            while True:
                page = engine.scan_versions(first, last, after, limit)
                assert page == [(key_hash(k), k, r.version) for k, r in engine.scan(first, last, after, limit)]
                pages.extend(page)
                if len(page) < limit:
                    break
                after = page[-1][:2]
            assert pages == [(key_hash(k), k, r.version) for k, r in brute_force(keys, first, last)]

    @settings(max_examples=30, deadline=None)
    @given(
        keys=st.sets(st.binary(min_size=1, max_size=6), max_size=60),
        removed=st.sets(st.binary(min_size=1, max_size=6), max_size=10),
        bounds=st.tuples(st.integers(0, TOP), st.integers(0, TOP)).map(sorted),
        limit=st.integers(1, 9),
    )
    def test_agrees_with_brute_force(
        self,
        tmp_path_factory: pytest.TempPathFactory,
        keys: set[bytes],
        removed: set[bytes],
        bounds: list[int],
        limit: int,
    ) -> None:
        """Paging through any range returns exactly what sorting all keys by (hash, key) gives."""
        first, last = bounds
        with every_kind(tmp_path_factory) as kinds:
            for (engine,) in kinds:
                stored = {key: record(i + 1) for i, key in enumerate(sorted(keys))}
                for key, rec in stored.items():
                    engine.put(key, rec)
                for key in removed:
                    engine.remove(key)
                    stored.pop(key, None)
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
        assert counts(engine) == {"keys": 3, "bytes": 2}
        assert engine.purge(NOW, GRACE) == 0

    def test_purge_many(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """A purge goes past its chunk size and removes every purgeable record, keeping the others."""
        monkeypatch.setattr(memory_module, "_PURGE_CHUNK", 7)
        monkeypatch.setattr(sqlite_module, "_PURGE_CHUNK", 7)
        for i in range(100):
            expires = int(NOW) - 1 if i % 3 == 0 else 0
            engine.put(b"k%d" % i, Record(b"x", expires_at=expires, version=version(1)))
        assert engine.purge(NOW, GRACE) == 34
        assert {key for key, _ in scan_all(engine)} == {b"k%d" % i for i in range(100) if i % 3}


class CounterTests:
    """``stats()`` keeps count of keys and value bytes as writes happen."""

    def test_counters(self, engine: Engine) -> None:
        """Counters follow puts, overwrites, applies (won and lost), tombstones, removes and clear."""
        assert counts(engine) == {"keys": 0, "bytes": 0}
        engine.put(b"a", record(1, b"12345"))
        engine.put(b"b", record(1, b"123"))
        assert counts(engine) == {"keys": 2, "bytes": 8}
        engine.put(b"a", record(2, b"1"))
        assert counts(engine) == {"keys": 2, "bytes": 4}
        engine.apply(b"b", record(0, b"lost, not counted"))
        engine.apply(b"c", record(1, b"12"))
        assert counts(engine) == {"keys": 3, "bytes": 6}
        engine.apply(b"b", Record.deleted(Version(5, "w")))
        assert counts(engine) == {"keys": 3, "bytes": 3}
        engine.remove(b"a")
        engine.remove(b"a")
        assert counts(engine) == {"keys": 2, "bytes": 2}
        engine.clear()
        assert counts(engine) == {"keys": 0, "bytes": 0}


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

    def test_records_escape_the_garbage_collector(self) -> None:
        """Nothing the engine holds per key is tracked by the cyclic GC, so a collection never visits its keys."""
        engine = MemoryEngine()
        engine.put(b"k", Record(b"v", 1, 2, version(5, "gw"), False))
        engine.put(b"t", Record.deleted(version(6, "gw")))
        engine.put(b"gone", Record(b"v", version=version(1)))
        engine.remove(b"gone")
        assert not gc.is_tracked(engine._records)
        # The dict of buckets is tracked (it holds dicts), but has at most 2**14 entries, all untracked.
        assert not any(gc.is_tracked(bucket) for bucket in engine._buckets.values())
        assert engine.get(b"k") == Record(b"v", 1, 2, version(5, "gw"), False)
        assert engine.get(b"t") == Record.deleted(version(6, "gw"))

    def test_refuses_what_it_cannot_pack(self) -> None:
        """Flags or an expiry beyond 64 bits are refused with a StorageError, storing nothing."""
        engine = MemoryEngine()
        with pytest.raises(StorageError):
            engine.put(b"k", Record(b"v", flags=2**64, version=version(1)))
        with pytest.raises(StorageError):
            engine.apply(b"k", Record(b"v", expires_at=2**63, version=version(1)))
        assert engine.get(b"k") is None
        assert counts(engine) == {"keys": 0, "bytes": 0}


def cost(key: bytes, record: Record) -> int:
    """What a record is accounted to cost in a memory engine: its key, its packed row, the overhead."""
    return len(key) + len(memory_module._encode(key_hash(key), record)) + memory_module.ITEM_OVERHEAD


def check_bookkeeping(engine: MemoryEngine) -> None:
    """The bounded engine's books agree with its records: the bytes used, and each live record in exactly
    the generation its bucket names (tombstones in none)."""
    records = {key: memory_module._decode(row) for key, row in engine._records.items()}
    assert engine.stats()["used_bytes"] == sum(cost(key, r) for key, r in records.items())
    in_gens = [key for gen in engine._gens.values() for key in gen]
    assert len(in_gens) == len(set(in_gens))
    assert set(in_gens) == {key for key, r in records.items() if not r.tombstone}
    assert list(engine._gens) == list(engine._order) and engine._order[-1] == engine._gen
    for key, r in records.items():
        gen = engine._buckets[key_hash(key) >> memory_module._BUCKET_SHIFT][key]
        assert (gen is None) if r.tombstone else key in engine._gens[gen]  # type: ignore[index]
    assert len(engine._order) <= memory_module._MAX_GENERATIONS


class BoundedMemoryEngineTests:
    """``MemoryEngine(limit_bytes=...)``: least recently used eviction, or refusal, at the limit."""

    def test_stays_within_its_limit(self) -> None:
        """Writing three times the limit keeps what is accounted at or under it, and counts the evictions."""
        limit = 64 * 1024
        engine = MemoryEngine(limit_bytes=limit)
        one = cost(b"key-0000", record(1, b"x" * 100))
        for i in range(3 * limit // one):
            engine.put(b"key-%04d" % i, record(i + 1, b"x" * 100))
            assert engine.stats()["used_bytes"] <= limit
        stats = engine.stats()
        assert stats["limit_bytes"] == limit and stats["used_bytes"] > limit - 2 * one
        assert stats["evictions"] == 3 * limit // one - stats["keys"] and stats["reclaimed"] == 0
        check_bookkeeping(engine)

    def test_evicts_the_least_recently_used(self) -> None:
        """Keys read since they were written survive a wave of new writes; the oldest unread ones go first."""
        item = record(1, b"x" * 200)
        per_key = cost(b"old-000", item)
        engine = MemoryEngine(limit_bytes=per_key * 320)
        old = [b"old-%03d" % i for i in range(160)]
        for i, key in enumerate(old):
            engine.put(key, record(i + 1, b"x" * 200))
        read = old[:40]  # the oldest writes, read afterwards: now among the most recent
        for key in read:
            assert engine.get_live(key, NOW) is not None
        for i in range(200):
            engine.put(b"new-%03d" % i, record(1000 + i, b"x" * 200))
        assert all(engine.get(key) is not None for key in read)
        assert sum(engine.get(key) is None for key in old[40:]) >= 40  # room came from the unread old keys
        assert engine.get(b"new-199") is not None
        check_bookkeeping(engine)

    def test_refuses_when_told_not_to_evict(self) -> None:
        """With evict=False a write past the limit raises StorageFull with memcached's words and stores
        nothing; replacing a record with a smaller one, a delete and a tombstone still go through."""
        limit = cost(b"a", record(1, b"x" * 100)) * 3
        engine = MemoryEngine(limit_bytes=limit, evict=False)
        for key in (b"a", b"b", b"c"):
            engine.put(key, record(1, b"x" * 100))
        with pytest.raises(StorageFull, match="^out of memory storing object$"):
            engine.put(b"d", record(1, b"x" * 100))
        with pytest.raises(StorageFull):
            engine.apply(b"a", record(2, b"y" * 101))
        assert engine.get(b"d") is None and engine.get(b"a") == record(1, b"x" * 100)
        assert engine.apply(b"a", record(3, b"small"))
        assert engine.apply(b"b", Record.deleted(Version(4, "w")))
        engine.remove(b"c")
        engine.put(b"d", record(5, b"x" * 100))
        assert engine.stats()["evictions"] == 0
        check_bookkeeping(engine)

    def test_tombstones_are_never_evicted(self) -> None:
        """Live records make room, tombstones stay until purged; a store holding only tombstones refuses."""
        one = cost(b"t-00", Record.deleted(version(1)))
        engine = MemoryEngine(limit_bytes=one * 10)
        for i in range(5):
            engine.put(b"t-%02d" % i, Record.deleted(version(1)))
        for i in range(20):
            engine.put(b"l-%02d" % i, record(i + 1, b""))
        assert all(engine.get(b"t-%02d" % i) == Record.deleted(version(1)) for i in range(5))
        for i in range(5, 10):
            engine.put(b"t-%02d" % i, Record.deleted(version(1)))
        assert [key for key in engine._records if key.startswith(b"l-")] == []
        with pytest.raises(StorageFull, match="nothing left to evict"):
            engine.put(b"l-99", record(1, b""))
        assert engine.purge(NOW, GRACE) == 10  # the grace period over, a purge makes the room
        engine.put(b"l-99", record(1, b""))
        check_bookkeeping(engine)

    def test_an_item_larger_than_the_limit(self) -> None:
        """A record that alone costs more than the limit is refused, evicting nothing."""
        engine = MemoryEngine(limit_bytes=1000)
        engine.put(b"small", record(1, b"x"))
        with pytest.raises(StorageFull, match="needs"):
            engine.put(b"big", record(1, b"x" * 1000))
        assert engine.get(b"small") is not None and engine.stats()["evictions"] == 0

    def test_a_rewrite_never_evicts_itself(self) -> None:
        """Growing a key's value evicts other keys, never the key being written, even the least recent one."""
        engine = MemoryEngine(limit_bytes=cost(b"k0", record(1, b"x" * 100)) * 4)
        for i in range(4):
            engine.put(b"k%d" % i, record(1, b"x" * 100))
        engine.put(b"k0", record(2, b"y" * 250))
        assert engine.get(b"k0") == record(2, b"y" * 250)
        assert engine.stats()["evictions"] >= 1
        check_bookkeeping(engine)

    def test_expired_victims_count_as_reclaimed(self) -> None:
        """An evicted record whose expiry passed (by the time reads brought) counts as reclaimed."""
        engine = MemoryEngine(limit_bytes=cost(b"e0", record(1, b"x" * 100, expires_at=10)) * 3)
        for i in range(3):
            engine.put(b"e%d" % i, record(1, b"x" * 100, expires_at=10))
        assert engine.get_live(b"e0", 20.0) is None  # a read at t=20 tells the engine the time
        for i in range(3):
            engine.put(b"n%d" % i, record(1, b"x" * 100))
        stats = engine.stats()
        assert (stats["reclaimed"], stats["evictions"]) == (3, 0)

    def test_set_limit(self) -> None:
        """A lower limit evicts at once down to it; a higher one lets more in; an unbounded engine refuses."""
        one = cost(b"k-000", record(1, b"x" * 100))
        engine = MemoryEngine(limit_bytes=one * 100)
        for i in range(100):
            engine.put(b"k-%03d" % i, record(1, b"x" * 100))
        engine.set_limit(one * 30)
        assert engine.stats()["keys"] == 30 and engine.stats()["used_bytes"] <= one * 30
        assert engine.get(b"k-099") is not None  # the newest stay
        engine.set_limit(one * 200)
        for i in range(100, 250):
            engine.put(b"k-%03d" % i, record(1, b"x" * 100))
        assert engine.stats()["keys"] == 180
        check_bookkeeping(engine)
        with pytest.raises(ValueError):
            MemoryEngine().set_limit(1000)
        with pytest.raises(ValueError):
            engine.set_limit(0)

    def test_reads_without_writes_keep_the_books(self) -> None:
        """A long run of reads (more than a note list holds) reorders the keys by itself."""
        one = cost(b"k-0000", record(1, b"x" * 10))
        engine = MemoryEngine(limit_bytes=one * 6000)
        for i in range(6000):
            engine.put(b"k-%04d" % i, record(1, b"x" * 10))
        for _ in range(3):
            for i in range(6000):
                engine.get_live(b"k-%04d" % i, NOW)
        assert len(engine._touched) <= memory_module._TOUCHED_LIMIT
        engine.put(b"k-0000", record(2, b"x" * 10))
        check_bookkeeping(engine)

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["put", "apply", "tomb", "get", "remove", "many", "purge", "limit"]),
                st.integers(0, 40),
                st.integers(0, 300),
            ),
            max_size=120,
        ),
        st.booleans(),
    )
    def test_books_agree_after_any_operations(self, ops: list[tuple[str, int, int]], evict: bool) -> None:
        """Whatever the mix of writes, reads, removals, purges and limit changes, the books stay exact and
        the engine never holds more than its limit once a write succeeded."""
        engine = MemoryEngine(limit_bytes=4000, evict=evict)
        clock = itertools.count(1)
        for op, n, size in ops:
            key = b"key-%d" % n
            try:
                if op == "put":
                    engine.put(key, record(next(clock), b"v" * size))
                elif op == "apply":
                    engine.apply(key, record(next(clock), b"w" * size, expires_at=size))
                elif op == "tomb":
                    engine.apply(key, Record.deleted(Version(next(clock), "w")))
                elif op == "get":
                    engine.get_live(key, float(size))
                elif op == "remove":
                    engine.remove(key)
                elif op == "many":
                    engine.apply_many([(b"key-%d" % (n + i), record(next(clock), b"m" * size)) for i in range(3)])
                elif op == "purge":
                    engine.purge(float(size), 0.0)
                elif op == "limit":
                    engine.set_limit(2000 + size * 10)
            except StorageFull:
                pass
            else:
                if op in ("put", "apply", "many"):
                    assert engine.stats()["used_bytes"] <= engine.limit_bytes
            check_bookkeeping(engine)


def filled_database(path: Path, count: int = 3000) -> dict[bytes, Record]:
    """Write ``count`` records into a new SQLite engine at ``path`` and close it; what was written."""
    written = {b"key-%d" % i: record(i + 1, b"value %d" % i * 10, flags=i) for i in range(count)}
    engine = SQLiteEngine(path)
    with engine.batch():
        for key, rec in written.items():
            engine.put(key, rec)
    engine.close()
    return written


def assert_refused(path: Path, *words: str) -> StorageError:
    """Opening ``path`` raises a StorageError naming the file and saying ``words``; the file is untouched."""
    before = path.read_bytes() if path.is_file() and os.access(path, os.R_OK) else None
    with pytest.raises(StorageError) as caught:
        SQLiteEngine(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message
    if before is not None:
        assert path.read_bytes() == before
    return caught.value


class SQLiteEngineTests:
    """What is particular to ``SQLiteEngine``: files, durability settings, refusals."""

    def test_reopen_keeps_data(self, tmp_path: Path) -> None:
        """Records and counters survive closing and reopening the file."""
        path = tmp_path / "chashd.sqlite3"
        written = filled_database(path, 500)
        engine = SQLiteEngine(path)
        try:
            assert engine.get(b"key-7") == written[b"key-7"]
            assert scan_all(engine, limit=100) == brute_force(written, 0, TOP)
            assert counts(engine) == {"keys": 500, "bytes": sum(len(r.value) for r in written.values())}
        finally:
            engine.close()

    def test_wal_mode(self, tmp_path: Path) -> None:
        """The file is in WAL mode and carries chashd's application id and schema version."""
        path = tmp_path / "chashd.sqlite3"
        engine = SQLiteEngine(path)
        engine.put(b"k", record(1))
        check = sqlite3.connect(path)
        try:
            assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert check.execute("PRAGMA application_id").fetchone()[0] == sqlite_module.APPLICATION_ID
            assert check.execute("PRAGMA user_version").fetchone()[0] == sqlite_module.SCHEMA_VERSION
            assert check.execute("SELECT count(*) FROM records").fetchone()[0] == 1
        finally:
            check.close()
            engine.close()

    def test_each_write_is_committed(self, tmp_path: Path) -> None:
        """Another connection sees every put, apply and remove as soon as the call returns."""
        path = tmp_path / "chashd.sqlite3"
        engine = SQLiteEngine(path)
        other = sqlite3.connect(path)

        def stored() -> set[bytes]:
            return {row[0] for row in other.execute("SELECT key FROM records")}

        try:
            engine.put(b"a", record(1))
            assert stored() == {b"a"}
            engine.apply(b"b", record(1))
            assert stored() == {b"a", b"b"}
            engine.remove(b"a")
            assert stored() == {b"b"}
        finally:
            other.close()
            engine.close()

    def test_out_of_range_integers(self, tmp_path: Path) -> None:
        """An expiry or flags beyond SQLite's 64-bit integers is refused with a StorageError, storing nothing."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3")
        try:
            with pytest.raises(StorageError):
                engine.put(b"k", Record(b"v", expires_at=2**64, version=Version(1, "w")))
            with pytest.raises(StorageError):
                engine.apply(b"k", Record(b"v", flags=2**63, version=Version(1, "w")))
            assert engine.get(b"k") is None
            assert counts(engine) == {"keys": 0, "bytes": 0}
        finally:
            engine.close()

    def test_batch_rolls_back(self, tmp_path: Path) -> None:
        """A batch that raises leaves neither its writes nor its counter changes behind."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3")
        try:
            engine.put(b"kept", record(1, b"abc"))
            with pytest.raises(RuntimeError), engine.batch():
                engine.put(b"new", record(1, b"12345"))
                engine.remove(b"kept")
                raise RuntimeError("handoff connection lost")
            assert engine.get(b"kept") == record(1, b"abc")
            assert engine.get(b"new") is None
            assert counts(engine) == {"keys": 1, "bytes": 3}
        finally:
            engine.close()

    def test_group_query_in_chunks(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A group larger than one query's worth of hashes reads every stored version."""
        monkeypatch.setattr(sqlite_module, "_GROUP_QUERY", 2)
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3", record_cache_mib=0)
        try:
            for i in range(7):
                engine.put(b"k%d" % i, record(5))
            items = [(b"k%d" % i, record(4 + i % 2)) for i in range(7)] + [(b"new", record(1))]
            assert engine.apply_many(items) == [False] * 7 + [True]
            assert engine.remove_many_if([(b"k%d" % i, Version(5, "w")) for i in range(7)]) == [True] * 7
            assert counts(engine) == {"keys": 1, "bytes": 1}
        finally:
            engine.close()

    def test_group_write_fails_whole(self, tmp_path: Path) -> None:
        """When the database refuses the group's write, no record of it stays and the counters are unchanged."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3")
        try:
            engine.put(b"kept", record(1, b"abc"))
            engine._db.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.key = x'626164'"
                " BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
            with pytest.raises(StorageError):
                engine.apply_many([(b"kept", record(2, b"x")), (b"new", record(1)), (b"bad", record(1))])
            assert engine.get(b"kept") == record(1, b"abc") and engine.get(b"new") is None
            assert counts(engine) == {"keys": 1, "bytes": 3}
        finally:
            engine.close()

    def test_disk_limit(self, tmp_path: Path) -> None:
        """Past disk_limit_bytes a write fails with StorageFull naming the limit and changes nothing (counters,
        cache, the other records of its group); deletes still work and their pages take new writes."""
        path = tmp_path / "chashd.sqlite3"
        engine = SQLiteEngine(path, page_size=4096, disk_limit_bytes=256 * 1024)
        value = b"v" * 3000
        try:
            stored = 0
            with pytest.raises(StorageFull, match="out of disk space storing object: .*limit of 0.25 MiB"):
                for i in range(200):
                    engine.put(b"k%03d" % i, record(i + 1, value))
                    stored += 1
            assert 40 < stored < 90
            assert engine.get(b"k%03d" % stored) is None
            assert counts(engine) == {"keys": stored, "bytes": stored * len(value)}
            stats = engine.stats()
            assert stats["disk_limit_bytes"] == 256 * 1024 and stats["disk_bytes"] <= 256 * 1024
            with pytest.raises(StorageFull):
                engine.apply_many(
                    [(b"k000", record(1000, b"x")), (b"new", record(1, value)), (b"new2", record(1, value))]
                )
            assert engine.get(b"k000") == record(1, value) and engine.get(b"new") is None
            assert counts(engine) == {"keys": stored, "bytes": stored * len(value)}
            engine.put(b"k000", record(1001, b"small"))  # a write that needs no new page goes through
            for i in range(1, 11):
                engine.remove(b"k%03d" % i)
            engine.put(b"after", record(1, value))
            assert engine.get(b"after") == record(1, value)
        finally:
            engine.close()
        reopened = SQLiteEngine(path, disk_limit_bytes=256 * 1024)
        try:
            with pytest.raises(StorageFull):
                for i in range(200):
                    reopened.put(b"again%03d" % i, record(1, value))
            assert reopened.stats()["disk_bytes"] <= 256 * 1024
        finally:
            reopened.close()

    def test_reads_do_not_wait_for_another_threads_batch(self, tmp_path: Path) -> None:
        """While another thread holds a batch open, ``get`` answers at once with the committed record (not
        the batch's uncommitted write) and caches nothing; the batch's thread reads its own writes."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3", record_cache_mib=1)
        engine.put(b"k", record(1, b"old"))
        engine._records.clear()
        opened = threading.Event()
        release = threading.Event()
        seen: list[Record | None] = []

        def hold() -> None:
            with engine.batch():
                engine.apply_many([(b"k", record(2, b"new"))])
                opened.set()
                release.wait(30)
                seen.append(engine.get(b"k"))  # on the write connection: its own write

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert opened.wait(30)
            started = time.monotonic()
            assert engine.get(b"k") == record(1, b"old")
            assert time.monotonic() - started < 5
            assert b"k" not in engine._records
        finally:
            release.set()
            thread.join(30)
        assert seen == [record(2, b"new")]
        assert engine.get(b"k") == record(2, b"new")
        engine.close()

    def test_a_read_caches_only_what_is_current(self, tmp_path: Path) -> None:
        """A row read while a change was committed is not cached; a row read in a quiet moment is."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3", record_cache_mib=1)
        try:
            engine.put(b"k", record(1))
            engine._records.clear()
            reader = engine._reader()
            real_generation = engine._generation

            class WriteDuringRead:
                def execute(self, sql: str, args: Any) -> Any:
                    cursor = reader.execute(sql, args)
                    engine.put(b"other", record(1))  # a change commits while the read is under way
                    return cursor

            engine._local.reader = WriteDuringRead()
            assert engine.get(b"k") == record(1)
            assert engine._generation > real_generation and b"k" not in engine._records
            engine._local.reader = reader
            assert engine.get(b"k") == record(1) and b"k" in engine._records
        finally:
            engine.close()

    def test_page_size(self, tmp_path: Path) -> None:
        """A new database gets 16 KiB pages (or ``page_size``); an existing file keeps its own."""
        for name, size, expected in (("default.db", None, 16384), ("small.db", 4096, 4096)):
            engine = SQLiteEngine(tmp_path / name) if size is None else SQLiteEngine(tmp_path / name, page_size=size)
            engine.put(b"k", record(1))
            engine.close()
            reopened = SQLiteEngine(tmp_path / name, page_size=8192)
            try:
                assert reopened._db.execute("PRAGMA page_size").fetchone()[0] == expected
                assert reopened.get(b"k") == record(1)
            finally:
                reopened.close()
        with pytest.raises(ValueError):
            SQLiteEngine(tmp_path / "bad.db", page_size=1000)

    def test_purge_spares_rewritten_records(self, tmp_path: Path) -> None:
        """A purge candidate rewritten between the purge's read and its delete is kept."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3")
        try:
            engine.put(b"k", Record(b"old", expires_at=1, version=Version(1, "w")))
            (row,) = engine._reader().execute("SELECT hash, key, value, clock, writer FROM records").fetchall()
            stale = (row[0], row[1], row[2], 0, 1, row[3], row[4])
            engine.put(b"k", record(2, b"new"))
            assert engine._delete_unchanged([stale]) == 0
            assert engine.get(b"k") == record(2, b"new")
            assert counts(engine) == {"keys": 1, "bytes": 3}
        finally:
            engine.close()

    def test_checkpoint(self, tmp_path: Path) -> None:
        """With automatic checkpoints off, ``checkpoint()`` copies the WAL into the file, and restarts a long one."""
        path = tmp_path / "chashd.sqlite3"
        engine = SQLiteEngine(path, autocheckpoint=0)
        try:
            for i in range(50):
                engine.put(b"k%d" % i, record(1))
            frames, done = engine.checkpoint()
            assert frames >= 50
            assert done == frames
        finally:
            engine.close()

    def test_wal_file_is_cut_back_once_writers_are_idle(self, tmp_path: Path) -> None:
        """A burst of writes grows the WAL file; the first ``checkpoint()`` that finds no change since the
        previous call truncates a file past ``wal_limit_mib``, never one during the burst."""
        path = tmp_path / "chashd.sqlite3"
        wal = Path(f"{path}-wal")
        engine = SQLiteEngine(path, autocheckpoint=0, wal_limit_mib=1)
        try:
            for i in range(400):
                engine.put(b"k%d" % i, record(1, b"x" * 8000))
            engine.checkpoint()  # writes since the start: not idle
            assert wal.stat().st_size > 3 * 1024 * 1024
            engine.checkpoint()  # nothing written since the previous call
            assert wal.stat().st_size == 0
            engine.put(b"after", record(1))
            assert wal.stat().st_size <= 1024 * 1024
            assert engine.get(b"k399") == record(1, b"x" * 8000)
        finally:
            engine.close()

    def test_checkpoint_restarts_a_busy_wal(self, tmp_path: Path) -> None:
        """Under a steady stream of writes, ``checkpoint()`` keeps the WAL near ``restart_frames`` pages.

        (With PASSIVE checkpoints alone it grew to every page written: 38,839 pages for 31,690 writes
        in 2 s when this was measured.)
        """
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3", autocheckpoint=0)
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            while not stop.is_set():
                written[0] += 1
                engine.put(b"k%d" % (written[0] % 5000), record(written[0], b"x" * 100))

        thread = threading.Thread(target=writer)
        thread.start()
        largest = 0
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and written[0] < 20_000:
                largest = max(largest, engine.checkpoint(restart_frames=200)[0])
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(timeout=60)
            engine.close()
        assert written[0] >= 20_000
        assert largest < 10_000

    def test_restart_waits_for_idle_writers(self, tmp_path: Path) -> None:
        """A WAL past ``restart_frames`` is restarted (under the write lock) only once no change was
        committed since the previous call, or once it holds 4x ``restart_frames`` pages."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3", autocheckpoint=0)
        statements: list[str] = []
        real = engine._db

        class Recording:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def execute(self, sql: str, *args: Any) -> Any:
                statements.append(sql)
                return real.execute(sql, *args)

        engine._db = Recording()  # type: ignore[assignment]
        try:
            restarts = lambda: sum("RESTART" in sql for sql in statements)  # noqa: E731
            for i in range(30):
                engine.put(b"k%d" % i, record(1, b"x" * 100))
            assert engine.checkpoint(restart_frames=20)[0] >= 20 and restarts() == 0  # writes since start
            for i in range(30):
                engine.put(b"j%d" % i, record(1, b"x" * 100))
            assert engine.checkpoint(restart_frames=20)[0] >= 20 and restarts() == 0  # still writing
            engine.checkpoint(restart_frames=20)
            assert restarts() == 1  # nothing written since the previous call
            for i in range(100):
                engine.put(b"m%d" % i, record(1, b"x" * 100))
            assert engine.checkpoint(restart_frames=20)[0] >= 80 and restarts() == 2  # past 4x: at once
        finally:
            engine._db = real
            engine.close()

    def test_readers_of_ended_threads_are_closed(self, tmp_path: Path) -> None:
        """The read connection of a thread that has ended is closed when another thread opens one."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3")
        try:
            engine.put(b"k", record(1))
            for _ in range(5):
                thread = threading.Thread(target=engine.scan, args=(0, TOP))
                thread.start()
                thread.join(timeout=60)
            engine.scan(0, TOP)
            assert len(engine._readers) == 1
        finally:
            engine.close()

    def test_closed(self, tmp_path: Path) -> None:
        """After ``close()`` (which may be called twice) the engine refuses to work, with a StorageError."""
        engine = SQLiteEngine(tmp_path / "chashd.sqlite3")
        engine.scan(0, TOP)
        engine.close()
        engine.close()
        with pytest.raises(StorageError):
            engine.get(b"k")
        with pytest.raises(StorageError):
            engine.scan(0, TOP)
        assert not (tmp_path / "chashd.sqlite3-wal").exists() or (tmp_path / "chashd.sqlite3-wal").stat().st_size == 0

    def test_creates_data_directory(self, tmp_path: Path) -> None:
        """Missing directories on the way to the file are created."""
        engine = SQLiteEngine(tmp_path / "a" / "b" / "chashd.sqlite3")
        engine.close()
        assert (tmp_path / "a" / "b" / "chashd.sqlite3").is_file()

    def test_random_bytes(self, tmp_path: Path) -> None:
        """A file of random bytes is refused as not a SQLite database."""
        path = tmp_path / "chashd.sqlite3"
        path.write_bytes(random.Random(7).randbytes(64 * 1024))
        assert_refused(path, "not a SQLite database")

    def test_text_file(self, tmp_path: Path) -> None:
        """A text file is refused as not a SQLite database."""
        path = tmp_path / "chashd.sqlite3"
        path.write_text("data_dir: /var/lib/chashd\n")
        assert_refused(path, "not a SQLite database")

    @pytest.mark.parametrize("keep", [50, 100, 4096, 0.5, -4096])
    def test_truncated(self, tmp_path: Path, keep: float) -> None:
        """A database cut short (inside its header, at a page, half way, one page short) is refused as corrupt."""
        path = tmp_path / "chashd.sqlite3"
        filled_database(path)
        data = path.read_bytes()
        cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
        path.write_bytes(data[:cut])
        assert_refused(path, "corrupt")

    def test_damaged_page(self, tmp_path: Path) -> None:
        """A database with a page overwritten by garbage is refused as corrupt."""
        path = tmp_path / "chashd.sqlite3"
        filled_database(path)
        data = bytearray(path.read_bytes())
        middle = len(data) // 4096 // 2 * 4096
        data[middle : middle + 4096] = random.Random(3).randbytes(4096)
        path.write_bytes(bytes(data))
        assert_refused(path, "corrupt")

    def test_other_application(self, tmp_path: Path) -> None:
        """A SQLite database of another application is refused, not taken over."""
        path = tmp_path / "chashd.sqlite3"
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE users (name TEXT)")
        other.commit()
        other.close()
        assert_refused(path, "not a chashd one", "users")

    def test_unknown_schema_version(self, tmp_path: Path) -> None:
        """A chashd database of a schema version this code does not know is refused."""
        path = tmp_path / "chashd.sqlite3"
        filled_database(path, 10)
        newer = sqlite3.connect(path)
        newer.execute(f"PRAGMA user_version = {sqlite_module.SCHEMA_VERSION + 1}")
        newer.close()
        assert_refused(path, f"schema version {sqlite_module.SCHEMA_VERSION + 1}")

    def test_directory_in_place_of_file(self, tmp_path: Path) -> None:
        """A directory where the database file should be is refused."""
        path = tmp_path / "chashd.sqlite3"
        path.mkdir()
        assert_refused(path, "is a directory")

    def test_directory_cannot_be_created(self, tmp_path: Path) -> None:
        """A data directory that cannot be created (a file is in the way) is refused, naming it."""
        blocker = tmp_path / "data"
        blocker.write_text("not a directory")
        with pytest.raises(StorageError) as caught:
            SQLiteEngine(blocker / "chashd.sqlite3")
        assert "cannot create the data directory" in str(caught.value)
        assert str(blocker) in str(caught.value)

    @pytest.mark.slow
    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A database file that cannot be read (mode 000) is refused as permission denied.

        Root reads any file, so as root the opening runs in a child process whose capabilities are
        dropped with setpriv (it stays uid 0, so it can still run the venv's Python).
        """
        path = tmp_path / "chashd.sqlite3"
        filled_database(path, 10)
        path.chmod(0)
        if os.geteuid() != 0:
            assert_refused(path, "cannot read", "permission denied")
            return
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        script = (
            "import sys\n"
            "from chashd.errors import StorageError, StorageFull\n"
            "from chashd.storage import SQLiteEngine\n"
            "try:\n"
            "    SQLiteEngine(sys.argv[1])\n"
            "except StorageError as e:\n"
            "    print(e)\n"
            "    sys.exit(3)\n"
        )
        child = subprocess.run(
            [setpriv, "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", script, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 3, child.stderr
        assert str(path) in child.stdout
        assert "cannot read" in child.stdout and "permission denied" in child.stdout


class RecordCacheTests:
    """``SQLiteEngine``'s record cache never answers differently from the database."""

    @settings(max_examples=80, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["put", "apply", "remove", "get", "clear", "batch-fail", "purge", "purge", "many", "drop"]
                ),
                st.integers(0, 7),
                st.integers(1, 9),
            ),
            max_size=40,
        )
    )
    def test_same_answers_as_the_file(self, operations: list[tuple[str, int, int]]) -> None:
        """After any sequence of operations, a cached engine, an uncached one and a reopened file agree."""
        with tempfile.TemporaryDirectory() as top:
            cached = SQLiteEngine(Path(top) / "a.db", record_cache_mib=1)
            plain = SQLiteEngine(Path(top) / "b.db", record_cache_mib=0)
            try:
                for op, k, clock in operations:
                    key = b"k%d" % k
                    # Every third record has expired and two of the nine are old tombstones: purge has work.
                    expired = int(NOW) - 1 if clock % 3 == 0 else 0
                    value = record(clock, b"v%d" % clock, expires_at=expired, tombstone=clock in (2, 5))
                    for engine in (cached, plain):
                        if op == "put":
                            engine.put(key, value)
                        elif op == "apply":
                            engine.apply(key, value)
                        elif op == "remove":
                            engine.remove(key)
                        elif op == "get":
                            engine.get(key)
                        elif op == "clear":
                            engine.clear()
                        elif op == "purge":
                            engine.purge(NOW, 60)
                        elif op == "many":
                            engine.apply_many([(key, value), (b"k%d" % ((k + 1) % 8), value)])
                        elif op == "drop":
                            engine.remove_many_if([(key, value.version), (b"k%d" % ((k + 3) % 8), value.version)])
                        else:
                            with contextlib.suppress(RuntimeError), engine.batch():
                                engine.put(key, value)
                                raise RuntimeError("rolled back")
                    keys = [b"k%d" % i for i in range(8)]
                    assert [cached.get(x) for x in keys] == [plain.get(x) for x in keys]
                    assert [cached.get_live(x, NOW) for x in keys] == [plain.get_live(x, NOW) for x in keys]
                    assert cached.stats() == plain.stats()
            finally:
                cached.close()
                plain.close()
            reopened = SQLiteEngine(Path(top) / "a.db", record_cache_mib=0)
            try:
                assert scan_all(reopened) == scan_all(SQLiteEngine(Path(top) / "b.db", record_cache_mib=0))
            finally:
                reopened.close()

    def test_groups_add_no_entries(self, tmp_path: Path) -> None:
        """``apply_many`` updates the entries the cache has and adds none; ``remove_many_if`` drops its keys."""
        engine = SQLiteEngine(tmp_path / "c.db", record_cache_mib=1)
        try:
            engine.put(b"cached", record(1))
            engine.apply_many([(b"cached", record(2, b"new")), (b"bulk", record(1))])
            assert set(engine._records) == {b"cached"}
            assert engine.get(b"cached") == record(2, b"new")
            engine.remove_many_if([(b"cached", Version(2, "w"))])
            assert b"cached" not in engine._records and engine.get(b"cached") is None
        finally:
            engine.close()

    def test_entries_escape_the_garbage_collector(self, tmp_path: Path) -> None:
        """Cached records are tuples of atomic values: after a collection neither they nor the cache are
        tracked, so a full collection does not visit the cached records."""
        engine = SQLiteEngine(tmp_path / "c.db")
        try:
            for i in range(100):
                engine.put(b"k%d" % i, Record(b"v", 1, 2, version(5, "gw"), i % 2 == 0))
            engine.get(b"k1")
            engine.get(b"missing")
            gc.collect()
            assert len(engine._records) == 101
            assert not any(gc.is_tracked(entry) for entry in engine._records.values())
            assert not gc.is_tracked(engine._records)
            assert engine.get(b"k1") == Record(b"v", 1, 2, version(5, "gw"), False)
        finally:
            engine.close()

    def test_bounded(self, tmp_path: Path) -> None:
        """The cache holds at most its limit in bytes, dropping the oldest entries first."""
        engine = SQLiteEngine(tmp_path / "c.db", record_cache_mib=1)
        try:
            for i in range(3000):
                engine.put(b"key-%d" % i, record(1, b"x" * 1000))
            assert engine._records_bytes <= 1024 * 1024
            assert b"key-2999" in engine._records and b"key-0" not in engine._records
            assert engine.get(b"key-0") == record(1, b"x" * 1000)
        finally:
            engine.close()
