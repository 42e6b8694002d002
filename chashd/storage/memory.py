"""``MemoryEngine``: records in dicts of bytes that Python's garbage collector never looks at.

Layout, chosen so that nothing the engine holds per key is a container the cyclic garbage collector
tracks (a full collection stops every thread, the reactor's included, and costs time in proportion to
what it visits):

- ``_records``: key to one ``bytes`` object per record, a packed header (ring hash, flags, expiry,
  version clock, tombstone, writer length) followed by the writer id and the value. A dict whose keys
  and values are all bytes is never tracked.
- ``_buckets``: the range index. Bucket ``hash >> 18`` maps to a dict ``{key: None}`` of the keys with
  that hash prefix (untracked too), and ``_bucket_ids`` is an ``array`` of the bucket numbers in use,
  sorted. A scan page bisects the array, then sorts the few keys of each bucket it reads by
  ``(hash, key)``: O(log n + page + bucket size), with about 60 keys a bucket at a million keys.

Measured at 1M keys of 16 bytes with 100-byte values on this project's (loaded) machine: a full
collection with the engine filled takes ~5 ms (it visits the 2**14 buckets, whatever the number of
keys), against ~0.7 s when the engine held ``Record`` objects and ~150 ms with GC-untracked tuples plus a
``sortedcontainers.SortedList`` index (whose lists it visits element by element); memory per key went
from ~470 to ~340 bytes (RSS). The price is decoding the record on each read (~2-3 us) and one copy of
the value on each write and read.

Bounded memory (``MemoryEngine(limit_bytes=...)``, the kvstore's ``--memory-limit``): every record is
accounted as its key, its packed row (header, writer id, value) and ``ITEM_OVERHEAD`` bytes for what
Python spends on it beyond that (the two bytes objects' headers and the dict slots that index it). Past
the limit a write first evicts live records, least recently used first, or with ``evict=False``
(``--memory-full=error``, memcached's ``-M``) is refused with ``StorageFull("out of memory storing
object")``. The recency order is memcached's kind of approximation: records sit in up to
``_MAX_GENERATIONS`` generations, dicts ``{key: None}`` (untracked by the GC too); a write puts its key in
the newest one, which is closed once ``limit / _GENERATIONS`` bytes went in; a read of a record of the
older half of the generations (the next victims) notes the key (a list append, no lock), and the next write
moves the noted keys to the newest generation. Eviction takes keys from the oldest generation (``popitem``:
O(1)), so a victim is among the least recently used ``1/_GENERATIONS`` of the data. The bucket index holds each key's
generation (``{key: generation}``; None for a tombstone). Tombstones are never evicted: they stay until
``purge`` forgets them after the tombstone grace period (the rule the handoff and read repair rely on),
so a store full of tombstones refuses writes. An expired record taken by eviction counts as
``reclaimed``, not as an eviction.

Pure: no Twisted, no clock; time comes in as ``now``.
"""

from __future__ import annotations

import struct
import threading
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

from zope.interface import implementer

from chashd.bulk import BulkRow, run_digest
from chashd.errors import StorageError, StorageFull
from chashd.interfaces import IStorageEngine
from chashd.record import Record, purgeable
from chashd.ring import key_hash
from chashd.storage._common import TOP_HASH, check_range
from chashd.versions import Version

__all__ = ["ITEM_OVERHEAD", "MemoryEngine"]

#: Bits of the ring hash below the bucket number: 2**14 buckets of 2**18 hashes. Fewer buckets make the
#: one tracked dict (of buckets) cheaper for the GC to visit, more make a scan page sort fewer keys;
#: measured at 1M keys, 2**12 / 2**14 / 2**16 buckets: a full GC 4.5 / 4.7 / 22 ms, a one-record scan
#: page 294 / 60 / 10 us, a full scan about the same (11-13 us a record on a loaded machine).
_BUCKET_SHIFT = 18
#: Keys examined per lock hold while purging, so that writers on the reactor thread wait at most a few
#: milliseconds behind a purge running in the thread pool.
_PURGE_CHUNK = 4096

#: Bytes a record costs beyond its key and its packed row, as accounted against the limit: the headers
#: of its two bytes objects (33 bytes each), its slots in the records dict, its bucket and its
#: generation (measured: RSS per record at 100k-1M records, see tests/unit/test_storage.py).
ITEM_OVERHEAD = 240
#: Generations the limit is split into: a victim is among the least recently used 1/16 of the data.
_GENERATIONS = 16
#: Past this many generations (sparse old ones left behind by reads) the two oldest are merged.
_MAX_GENERATIONS = 64
#: Reads noted for the next write to reorder; past this many, the read itself does it (or drops the note).
_TOUCHED_LIMIT = 4096

#: ring hash, flags, expires_at, version clock, tombstone, length of the writer id (UTF-8 bytes).
_HEADER = struct.Struct("<IqqQ?H")
_HEADER_SIZE = _HEADER.size
_TOMBSTONE_AT = struct.calcsize("<IqqQ")
_pack = _HEADER.pack
_unpack = _HEADER.unpack_from
_hash_of = struct.Struct("<I").unpack_from


def _encode(hash_value: int, record: Record) -> bytes:
    version = record.version
    writer = version.writer.encode()
    try:
        header = _pack(hash_value, record.flags, record.expires_at, version.clock, record.tombstone, len(writer))
    except struct.error as e:
        raise StorageError(
            f"cannot hold flags {record.flags}, expires_at {record.expires_at}, version {version}: {e}"
        ) from e
    return header + writer + record.value


def _decode(row: bytes) -> Record:
    _hash, flags, expires_at, clock, tombstone, writer_size = _unpack(row)
    end = _HEADER_SIZE + writer_size
    return Record(row[end:], flags, expires_at, Version(clock, row[_HEADER_SIZE:end].decode()), tombstone)


def _version_fields(row: bytes) -> tuple[int, int]:
    """The version clock and the writer id's length of a packed row."""
    fields = _unpack(row)
    return fields[3], fields[5]


def _value_size(row: bytes) -> int:
    writer_size: int = _unpack(row)[5]
    return len(row) - _HEADER_SIZE - writer_size


@implementer(IStorageEngine)
class MemoryEngine:
    """Records in memory, for caches and tests. Nothing survives ``close()`` or the process.

    ``limit_bytes`` (0: none) bounds what the records are accounted to cost (see the module docstring);
    past it a write evicts least recently used live records, or, with ``evict=False``, is refused with
    ``StorageFull``. ``set_limit`` changes the limit of a bounded engine at run time.

    Threading: every method may be called from any thread. ``get`` reads the dict without a lock (a
    dict read is atomic); writes, scans and purges take one lock, held for O(1) per write and
    O(log n + page) per scan page, so a scan running in the thread pool never sees a half-made write
    and never holds up the reactor thread for long. ``batch()`` holds the lock for its whole block.
    """

    __slots__ = (
        "_bucket_ids",
        "_buckets",
        "_bytes",
        "_evict",
        "_evictions",
        "_gen",
        "_gen_added",
        "_gen_span",
        "_gens",
        "_limit",
        "_lock",
        "_bump_below",
        "_next_gen",
        "_now",
        "_order",
        "_reclaimed",
        "_records",
        "_touched",
        "_used",
    )

    def __init__(self, limit_bytes: int = 0, evict: bool = True) -> None:
        if limit_bytes < 0:
            raise ValueError(f"limit_bytes must be 0 (none) or positive, not {limit_bytes}")
        self._records: dict[bytes, bytes] = {}
        # bucket id -> {key: generation}, the generation None for a tombstone and in an unbounded engine
        self._buckets: dict[int, dict[bytes, int | None]] = {}
        self._bucket_ids = array("I")
        self._lock = threading.RLock()
        self._bytes = 0
        self._used = 0
        self._limit = limit_bytes
        self._evict = evict
        self._evictions = 0
        self._reclaimed = 0
        self._touched: list[bytes] = []
        # The latest time a read or a purge came with: the engine reads no clock, and eviction tells an
        # expired victim (reclaimed) from a live one (evicted) by it.
        self._now = 0.0
        self._new_generations()

    def _new_generations(self) -> None:
        self._gens: dict[int, dict[bytes, None]] = {0: {}}
        self._order: deque[int] = deque([0])
        self._gen = 0
        self._bump_below = 0
        self._next_gen = 1
        self._gen_added = 0
        self._gen_span = max(self._limit // _GENERATIONS, 1)

    # -- reads --------------------------------------------------------------------------------------

    def get(self, key: bytes) -> Record | None:
        """The stored record for ``key`` (tombstones and expired records included), or None."""
        row = self._records.get(key)
        if row is None:
            return None
        if self._limit:
            bucket = self._buckets.get(_hash_of(row)[0] >> _BUCKET_SHIFT)
            gen = bucket.get(key) if bucket is not None else None
            if gen is not None and gen < self._bump_below:
                self._seen(key)
        return _decode(row)

    def get_live(self, key: bytes, now: float) -> tuple[int, bytes] | None:
        """``(flags, value)`` when a read at ``now`` sees the record for ``key``, else None."""
        row = self._records.get(key)
        if row is None:
            return None
        hash_value, flags, expires_at, _clock, tombstone, writer_size = _unpack(row)
        if tombstone or (expires_at != 0 and expires_at <= now):
            self._now = now
            return None
        if self._limit:  # the recency order, inlined: this is the hot path of a bounded engine
            self._now = now
            bucket = self._buckets.get(hash_value >> _BUCKET_SHIFT)
            gen = bucket.get(key) if bucket is not None else None
            if gen is not None and gen < self._bump_below:
                self._seen(key)
        return flags, row[_HEADER_SIZE + writer_size :]

    def _seen(self, key: bytes) -> None:
        """Note a read of ``key``, whose record is not in the newest generation (or is a tombstone, which
        ``_reorder`` skips), for the recency order."""
        touched = self._touched
        if len(touched) < _TOUCHED_LIMIT:
            touched.append(key)
        elif self._lock.acquire(blocking=False):  # a long run of reads without writes
            try:
                self._reorder()
            finally:
                self._lock.release()

    def _reorder(self) -> None:
        """Move the keys noted by reads to the newest generation. Called with the lock held."""
        touched, self._touched = self._touched, []
        records = self._records
        buckets = self._buckets
        gens = self._gens
        current = self._gen
        newest = gens[current]
        for key in touched:
            row = records.get(key)
            if row is None:
                continue
            bucket = buckets[_hash_of(row)[0] >> _BUCKET_SHIFT]
            gen = bucket.get(key)
            if gen is None or gen == current:
                continue
            del gens[gen][key]
            newest[key] = None
            bucket[key] = current
            self._gen_added += len(key) + len(row) + ITEM_OVERHEAD
        if self._gen_added >= self._gen_span:
            self._roll()

    # -- writes -------------------------------------------------------------------------------------

    def put(self, key: bytes, record: Record) -> None:
        """Store ``record`` for ``key``, replacing what is there."""
        with self._lock:
            current = self._records.get(key)
            hash_value = key_hash(key) if current is None else _unpack(current)[0]
            self._store(key, _encode(hash_value, record), len(record.value), current)

    def apply(self, key: bytes, record: Record) -> bool:
        """Store ``record`` only if its version is higher than the stored one's; True if stored."""
        version = record.version
        with self._lock:
            current = self._records.get(key)
            if current is None:
                hash_value = key_hash(key)
            else:
                hash_value, _flags, _expires_at, clock, _tombstone, writer_size = _unpack(current)
                writer = current[_HEADER_SIZE : _HEADER_SIZE + writer_size].decode()
                if (version.clock, version.writer) <= (clock, writer):
                    return False
            self._store(key, _encode(hash_value, record), len(record.value), current)
            return True

    def apply_many(self, items: Sequence[tuple[bytes, Record]]) -> list[bool]:
        """``apply`` each ``(key, record)`` in order, in one ``batch()``; True for each record stored.

        Raises ``StorageError`` before storing anything when a record cannot be held; ``StorageFull``
        when a bounded engine cannot make room for one (those before it are kept)."""
        encoded = [(key, _encode(key_hash(key), record), record.version) for key, record in items]
        results: list[bool] = []
        with self.batch():
            records = self._records  # read under the lock: clear() replaces it
            for key, row, version in encoded:
                current = records.get(key)
                if current is not None:
                    _hash, _flags, _expires_at, clock, _tombstone, writer_size = _unpack(current)
                    if (version.clock, version.writer) <= (
                        clock,
                        current[_HEADER_SIZE : _HEADER_SIZE + writer_size].decode(),
                    ):
                        results.append(False)
                        continue
                self._store(key, row, _value_size(row), current)
                results.append(True)
        return results

    def apply_rows(self, rows: Sequence[BulkRow]) -> list[bool]:
        """``apply_many`` of ``BulkRow`` tuples (a received bulk page), packed straight into rows."""
        results: list[bool] = []
        with self.batch():
            records = self._records
            for key, value, flags, expires_at, clock, writer, tombstone in rows:
                current = records.get(key)
                if current is None:
                    hash_value = key_hash(key)
                else:
                    hash_value, _flags, _expires_at, stored_clock, _tombstone, writer_size = _unpack(current)
                    if (clock, writer) <= (stored_clock, current[_HEADER_SIZE : _HEADER_SIZE + writer_size].decode()):
                        results.append(False)
                        continue
                writer_bytes = writer.encode()
                row = (
                    _pack(hash_value, flags, expires_at, clock, bool(tombstone), len(writer_bytes))
                    + writer_bytes
                    + value
                )
                self._store(key, row, len(value), current)
                results.append(True)
        return results

    def _store(self, key: bytes, row: bytes, size: int, current: bytes | None) -> None:
        # Called with the lock held.
        cost = len(key) + len(row) + ITEM_OVERHEAD
        old_cost = 0 if current is None else len(key) + len(current) + ITEM_OVERHEAD
        old_gen: int | None = None
        hash_value = _hash_of(row)[0]
        bucket_id = hash_value >> _BUCKET_SHIFT
        bucket = self._buckets.get(bucket_id)
        limit = self._limit
        gen: int | None = None
        if limit:
            if self._touched:
                self._reorder()
            if current is not None:  # out of the recency order while room is made (never its own victim)
                assert bucket is not None
                old_gen = bucket[key]
                if old_gen is not None:
                    del self._gens[old_gen][key]
                    bucket[key] = None
            excess = self._used - old_cost + cost - limit
            if excess > 0:
                try:
                    self._make_room(excess, cost)
                except StorageFull:
                    if current is not None and old_gen is not None:  # back where it was: still evictable
                        self._gens[self._gen][key] = None
                        bucket[key] = self._gen  # type: ignore[index]  # current is not None: it has a bucket
                    raise
            if not row[_TOMBSTONE_AT]:  # not a tombstone: evictable, in the newest generation
                gen = self._gen
                self._gens[gen][key] = None
                self._gen_added += cost
        if current is None:
            if bucket is None:
                bucket = self._buckets[bucket_id] = {}
                insort(self._bucket_ids, bucket_id)
            self._bytes += size
        else:
            self._bytes += size - _value_size(current)
        bucket[key] = gen  # type: ignore[index]  # made above when it was None
        self._used += cost - old_cost
        self._records[key] = row
        if gen is not None and self._gen_added >= self._gen_span:
            self._roll()

    def _make_room(self, excess: int, cost: int) -> None:
        """Evict least recently used live records until ``excess`` bytes are freed; raise ``StorageFull``
        (having evicted nothing, or what it could) when the engine may not evict or has nothing left to."""
        if not self._evict:
            raise StorageFull()
        if cost > self._limit:
            raise StorageFull(f"out of memory storing object: it needs {cost} bytes, the limit is {self._limit}")
        records = self._records
        gens = self._gens
        order = self._order
        freed = 0
        while freed < excess:
            oldest = gens[order[0]]
            if not oldest:
                if len(order) == 1:
                    raise StorageFull("out of memory storing object: nothing left to evict (tombstones fill it)")
                del gens[order.popleft()]
                continue
            victim = oldest.popitem()[0]
            row = records.pop(victim)
            hash_value, _flags, expires_at, _clock, _tombstone, writer_size = _unpack(row)
            size = len(victim) + len(row) + ITEM_OVERHEAD
            freed += size
            if expires_at != 0 and expires_at <= self._now:
                self._reclaimed += 1
            else:
                self._evictions += 1
            # What _forget does, with the row unpacked once (the victim is already out of its generation).
            del self._buckets[hash_value >> _BUCKET_SHIFT][victim]
            self._bytes -= len(row) - _HEADER_SIZE - writer_size
            self._used -= size

    def _roll(self) -> None:
        """Close the newest generation and open another; merge the two oldest past ``_MAX_GENERATIONS``."""
        gen = self._next_gen
        self._next_gen += 1
        self._gens[gen] = {}
        self._order.append(gen)
        self._gen = gen
        self._gen_added = 0
        if len(self._order) > _MAX_GENERATIONS:
            oldest = self._order.popleft()
            into = self._order[0]
            moved = self._gens.pop(oldest)
            self._gens[into].update(moved)
            records = self._records
            buckets = self._buckets
            for key in moved:
                buckets[_hash_of(records[key])[0] >> _BUCKET_SHIFT][key] = into
        # A read moves its record to the newest generation only from the older half: those are the next
        # victims; one in the newer half is far from eviction, and moving it would cost every read.
        self._bump_below = self._order[len(self._order) // 2]

    def set_limit(self, limit_bytes: int) -> None:
        """Change the limit of a bounded engine (``cache_memlimit``); a lower one evicts what is over it at
        once (with ``evict=False`` writes are refused until deletes and purges make room)."""
        if not self._limit:
            raise ValueError("the engine was made without a limit")
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be positive, not {limit_bytes}")
        with self._lock:
            self._limit = limit_bytes
            self._gen_span = max(limit_bytes // _GENERATIONS, 1)
            if self._evict and self._used > limit_bytes:
                if self._touched:
                    self._reorder()
                with suppress(StorageFull):  # what is left is tombstones: purges make the room
                    self._make_room(self._used - limit_bytes, 0)

    @property
    def limit_bytes(self) -> int:
        """The limit in bytes, 0 for none."""
        return self._limit

    @property
    def evicts(self) -> bool:
        """True when a write at the limit evicts, False when it is refused (``evict=False``)."""
        return self._evict

    def remove(self, key: bytes) -> None:
        """Forget ``key`` entirely."""
        with self._lock:
            current = self._records.get(key)
            if current is not None:
                self._forget(key, current)

    def remove_rows_if(self, rows: Sequence[BulkRow]) -> int:
        """``remove_many_if`` of the records of ``rows`` (a page the handoff pushed); the number forgotten."""
        return sum(self.remove_many_if([(row[0], Version(row[4], row[5])) for row in rows]))

    def remove_run_if(self, first: bytes, last: bytes, digest: bytes) -> int:
        """Forget the run from ``first`` to ``last`` if ``run_digest`` of its rows is ``digest``; the number
        forgotten (all of the run or 0)."""
        low, high = (key_hash(first), first), (key_hash(last), last)
        if low > high:
            return 0
        with self.batch():
            found = self._rows(low[0], high[0], None, len(self._records) + 1)
            run = [(key, row) for hash_value, key, row in found if low <= (hash_value, key) <= high]
            rows: list[BulkRow] = []
            for key, row in run:
                _h, flags, expires_at, clock, tombstone, writer_size = _unpack(row)
                end = _HEADER_SIZE + writer_size
                rows.append((key, b"", flags, expires_at, clock, row[_HEADER_SIZE:end].decode(), int(tombstone)))
            if not rows or run_digest(rows) != digest:
                return 0
            for key, row in run:
                self._forget(key, row)
        return len(run)

    def remove_many_if(self, items: Sequence[tuple[bytes, Version]]) -> list[bool]:
        """Compare-and-remove: forget each ``key`` of the ``(key, version)`` pairs whose stored version is
        still ``version``, in one ``batch()``; True for each key forgotten."""
        results: list[bool] = []
        with self.batch():
            records = self._records  # read under the lock: clear() replaces it
            for key, version in items:
                current = records.get(key)
                if current is not None:
                    _hash, _flags, _expires_at, clock, _tombstone, writer_size = _unpack(current)
                    if (
                        clock == version.clock
                        and current[_HEADER_SIZE : _HEADER_SIZE + writer_size].decode() == version.writer
                    ):
                        self._forget(key, current)
                        results.append(True)
                        continue
                results.append(False)
        return results

    def _forget(self, key: bytes, current: bytes) -> None:
        # Called with the lock held. Empty buckets stay: there are at most 2**14 of them.
        del self._records[key]
        gen = self._buckets[_unpack(current)[0] >> _BUCKET_SHIFT].pop(key)
        if gen is not None:
            del self._gens[gen][key]
        self._bytes -= _value_size(current)
        self._used -= len(key) + len(current) + ITEM_OVERHEAD

    def _rows(
        self, first_hash: int, last_hash: int, after: tuple[int, bytes] | None, limit: int
    ) -> list[tuple[int, bytes, bytes]]:
        """Up to ``limit`` ``(hash, key, row)`` in the range, after ``after``. Called with the lock held."""
        low = (first_hash, b"")
        inclusive = True
        if after is not None and after >= low:
            low, inclusive = after, False
        high = (last_hash + 1, b"")
        records = self._records
        buckets = self._buckets
        bucket_ids = self._bucket_ids
        low_bucket = low[0] >> _BUCKET_SHIFT
        last_bucket = last_hash >> _BUCKET_SHIFT
        found: list[tuple[int, bytes, bytes]] = []
        index = bisect_left(bucket_ids, low_bucket)
        while index < len(bucket_ids) and len(found) < limit:
            bucket_id = bucket_ids[index]
            if bucket_id > last_bucket:
                break
            index += 1
            entries = sorted([(_hash_of(records[key])[0], key) for key in buckets[bucket_id]])
            start = 0
            if bucket_id == low_bucket:
                start = bisect_left(entries, low) if inclusive else bisect_right(entries, low)
            stop = bisect_left(entries, high) if bucket_id == last_bucket else len(entries)
            stop = min(stop, start + limit - len(found))
            found.extend([(hash_value, key, records[key]) for hash_value, key in entries[start:stop]])
        return found

    def scan(
        self,
        first_hash: int,
        last_hash: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
    ) -> list[tuple[bytes, Record]]:
        """Up to ``limit`` ``(key, Record)`` pairs with ``first_hash <= key_hash(key) <= last_hash``,
        in ``(hash, key)`` order, after the position ``after`` (the ``(hash, key)`` of the last pair of the
        previous page) or from the start of the range."""
        check_range(first_hash, last_hash, limit)
        with self._lock:
            rows = self._rows(first_hash, last_hash, after, limit)
        return [(key, _decode(row)) for _hash, key, row in rows]

    def scan_versions(
        self,
        first_hash: int,
        last_hash: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
    ) -> list[tuple[int, bytes, Version]]:
        """Up to ``limit`` ``(hash, key, version)`` of the records in the range, as ``scan`` pages them,
        without reading their values (anti-entropy's digests and key lists)."""
        check_range(first_hash, last_hash, limit)
        with self._lock:
            rows = self._rows(first_hash, last_hash, after, limit)
        found = []
        for hash_value, key, row in rows:
            clock, writer_size = _version_fields(row)
            found.append((hash_value, key, Version(clock, row[_HEADER_SIZE : _HEADER_SIZE + writer_size].decode())))
        return found

    def scan_rows(
        self,
        first_hash: int,
        last_hash: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
    ) -> list[BulkRow]:
        """``scan`` as ``BulkRow`` tuples (the handoff's bulk pages)."""
        check_range(first_hash, last_hash, limit)
        with self._lock:
            rows = self._rows(first_hash, last_hash, after, limit)
        found: list[BulkRow] = []
        for _hash, key, row in rows:
            _h, flags, expires_at, clock, tombstone, writer_size = _unpack(row)
            end = _HEADER_SIZE + writer_size
            found.append((key, row[end:], flags, expires_at, clock, row[_HEADER_SIZE:end].decode(), int(tombstone)))
        return found

    def purge(self, now: float, tombstone_grace: float) -> int:
        """Forget expired records and tombstones older than ``tombstone_grace`` seconds; the number forgotten.

        Walks the ring in chunks, releasing the lock between them.
        """
        forgotten = 0
        after: tuple[int, bytes] | None = None
        self._now = max(self._now, now)
        while True:
            with self._lock:
                rows = self._rows(0, TOP_HASH, after, _PURGE_CHUNK)
                for _hash, key, row in rows:
                    _h, _flags, expires_at, _clock, tombstone, _size = _unpack(row)
                    # Only a tombstone or a record with an expiry time can go; purgeable() decides.
                    if (tombstone or expires_at) and purgeable(_decode(row), now, tombstone_grace):
                        self._forget(key, row)
                        forgotten += 1
            if len(rows) < _PURGE_CHUNK:
                return forgotten
            after = (rows[-1][0], rows[-1][1])

    def clear(self) -> None:
        """Forget every record (``flush_all``)."""
        with self._lock:
            self._records = {}
            self._buckets = {}
            self._bucket_ids = array("I")
            self._bytes = 0
            self._used = 0
            self._touched = []
            self._new_generations()

    def stats(self) -> dict[str, int]:
        """``keys`` (records held, tombstones included), ``bytes`` (value bytes held), ``used_bytes`` (what
        the records are accounted to cost: keys, rows and ``ITEM_OVERHEAD`` each), ``limit_bytes`` (0:
        none), ``evictions`` (live records evicted) and ``reclaimed`` (expired ones taken instead); O(1)."""
        return {
            "keys": len(self._records),
            "bytes": self._bytes,
            "used_bytes": self._used,
            "limit_bytes": self._limit,
            "evictions": self._evictions,
            "reclaimed": self._reclaimed,
        }

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group writes: other threads' writes and scans wait until the block ends.

        Nothing to commit in memory; writes made before an exception in the block are kept.
        """
        with self._lock:
            yield

    def close(self) -> None:
        """Forget everything: a memory engine holds no file."""
        self.clear()
