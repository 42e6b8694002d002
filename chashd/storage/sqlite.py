"""``SQLiteEngine``: records in one WAL-mode SQLite file, durable across a process crash.

Schema (version 1; ``PRAGMA application_id`` marks the file as chashd's, ``PRAGMA user_version`` holds
the schema version)::

    records(hash INTEGER, key BLOB, value BLOB, flags INTEGER, expires_at INTEGER,
            clock INTEGER, writer TEXT, tombstone INTEGER, PRIMARY KEY (hash, key)) WITHOUT ROWID

- The primary key is ``(key_hash(key), key)``: a ring arc is one range of the b-tree, and a scan page is
  an index seek plus ``limit`` rows. ``WITHOUT ROWID`` keeps one b-tree instead of a table plus an index;
  measured at 50k keys with 100-byte values: ~17k puts/s and ~119k gets/s, against ~13k and ~111k for a
  rowid table with a unique index (each commit writes one page instead of two).
- ``clock`` is the version clock, an unsigned 64-bit number, stored minus 2**63 so that it fits
  SQLite's signed integers and keeps its order.
- ``writer`` is TEXT: SQLite compares it with memcmp on UTF-8, which is code-point order, like Python.

Durability: ``journal_mode=WAL`` and ``synchronous=NORMAL``. Every write outside ``batch()`` is its
own transaction, committed to the WAL (with ``write()``, no fsync) before the method returns, so a
process crash (kill -9) loses nothing that was acknowledged; only a power loss could lose the last
transactions, which replication covers.

Pure: no Twisted, no clock; the caller decides which thread runs what (see the class docstring).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter, lt
from pathlib import Path
from typing import Any

from zope.interface import implementer

from chashd.bulk import BulkRow, run_digest_of
from chashd.errors import StorageError, StorageFull
from chashd.interfaces import IStorageEngine
from chashd.record import Record, purgeable
from chashd.ring import key_hash, key_hashes
from chashd.storage._common import check_range
from chashd.versions import Version

__all__ = ["SCHEMA_VERSION", "SQLiteEngine"]

#: The schema this code reads and writes (``PRAGMA user_version``).
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a chashd database: "chkv" in ASCII.
APPLICATION_ID = int.from_bytes(b"chkv", "big")
_HEADER = b"SQLite format 3\x00"
_CLOCK_BIAS = 1 << 63
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
#: Rows examined per write transaction while purging, so that writers wait at most a few ms.
_PURGE_CHUNK = 1000

_SCHEMA = """
CREATE TABLE records (
    hash INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    flags INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    clock INTEGER NOT NULL,
    writer TEXT NOT NULL,
    tombstone INTEGER NOT NULL,
    PRIMARY KEY (hash, key)
) WITHOUT ROWID
"""
_COLUMNS = "value, flags, expires_at, clock, writer, tombstone"
_GET = f"SELECT {_COLUMNS} FROM records WHERE hash = ? AND key = ?"
_CURRENT = "SELECT clock, writer, length(value) FROM records WHERE hash = ? AND key = ?"
_STORE = "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_DELETE = "DELETE FROM records WHERE hash = ? AND key = ?"
#: ``_STORE`` of ``(hash, *BulkRow)``: the clock as it is, biased here (``clock - 2**63`` without leaving SQLite's
#: 64-bit integers, for every clock up to ``MAX_CLOCK``).
_STORE_ROW = "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, (? - 9223372036854775807) - 1, ?, ?)"
_SCAN_FROM = f"SELECT key, {_COLUMNS} FROM records WHERE hash >= ? AND hash <= ? ORDER BY hash, key LIMIT ?"
_SCAN_AFTER = f"SELECT key, {_COLUMNS} FROM records WHERE (hash, key) > (?, ?) AND hash <= ? ORDER BY hash, key LIMIT ?"
_VERSIONS_FROM = "SELECT hash, key, clock, writer FROM records WHERE hash >= ? AND hash <= ? ORDER BY hash, key LIMIT ?"
_VERSIONS_AFTER = (
    "SELECT hash, key, clock, writer FROM records WHERE (hash, key) > (?, ?) AND hash <= ? ORDER BY hash, key LIMIT ?"
)
#: A ``BulkRow`` straight from SQLite: the stored clock is ``clock - 2**63`` (negative for every clock up to
#: ``MAX_CLOCK``, 2**63 - 1), so ``clock + (2**63 - 1) + 1`` is the clock itself and never leaves SQLite's
#: 64-bit integers; Python makes no new tuple per row.
_ROW_COLUMNS = "key, value, flags, expires_at, (clock + 9223372036854775807) + 1, writer, tombstone"
_SCAN_ROWS_FROM = f"SELECT {_ROW_COLUMNS} FROM records WHERE hash >= ? AND hash <= ? ORDER BY hash, key LIMIT ?"
_SCAN_ROWS_AFTER = (
    f"SELECT {_ROW_COLUMNS} FROM records WHERE (hash, key) > (?, ?) AND hash <= ? ORDER BY hash, key LIMIT ?"
)
#: The run of the table from ``(hash, key)`` to ``(hash, key)``, both included: its keys and versions as a
#: ``BulkRow`` has them (``remove_rows_if`` compares them with a page's), and its removal.
_RUN = "(hash, key) >= (?, ?) AND (hash, key) <= (?, ?)"
_RUN_VERSIONS = f"SELECT key, (clock + 9223372036854775807) + 1, writer FROM records WHERE {_RUN} ORDER BY hash, key"
_DELETE_RUN = f"DELETE FROM records WHERE {_RUN}"
#: The run's keys and versions as ``run_digest_of`` reads them, and its value bytes, in one row
#: (``remove_run_if``): the keys and writers in hex, the clocks in decimal, each joined with commas, all three
#: in the same order of the run's rows (whatever order SQLite aggregates them in).
_RUN_DIGEST = (
    "SELECT count(*), group_concat(hex(key)), group_concat((clock + 9223372036854775807) + 1),"
    f" group_concat(hex(writer)), total(length(value)) FROM records WHERE {_RUN}"
)
#: Whether the table holds a record in the run (``apply_rows``: a page of new keys).
_RUN_HOLDS = f"SELECT EXISTS (SELECT 1 FROM records WHERE {_RUN})"
#: The fewest rows ``apply_rows`` looks at as a run: a handoff's pages have hundreds, in scan order; a group of
#: clients' writes has a few, in no order, and mostly of keys held (the record cache often knows them), for
#: which that query would come on top of the stored versions' (16 keys in random order rise with odds 1/16!).
_RUN_ROWS = 16
_PURGE_CANDIDATES = (
    f"SELECT hash, key, {_COLUMNS} FROM records WHERE (hash, key) > (?, ?)"
    " AND ((tombstone = 0 AND expires_at != 0 AND expires_at <= ?) OR (tombstone != 0 AND clock < ?))"
    " ORDER BY hash, key LIMIT ?"
)
_PURGE_DELETE = "DELETE FROM records WHERE hash = ? AND key = ? AND clock = ? AND writer = ?"
#: The stored versions (and value sizes) of a group of keys: one statement for the hashes of the group
#: (``hash IN (...)`` is one index seek per hash; a row-value ``(hash, key) IN (VALUES ...)`` scans the
#: whole table in SQLite 3.40), keys filtered in Python (two keys rarely share a hash).
_CURRENT_OF_HASHES = "SELECT key, clock, writer, length(value) FROM records WHERE hash IN ({marks})"
#: Hashes per ``_CURRENT_OF_HASHES`` statement (SQLite allows 32766 parameters; fewer keep the text short).
_GROUP_QUERY = 500


#: Python 3.11's sqlite3 binds a ``bytes`` parameter (every key and value) only after looking for an adapter:
#: a miss in its registry, then an ``__adapt__`` lookup on its protocol type, which formats and clears an
#: ``AttributeError`` each time (``PyUnicode_FromFormatV`` was the costliest call of an ``executemany`` of
#: keys and values under perf). ``bytes`` itself as the adapter of ``bytes`` finds the registry entry and returns
#: the object as it is (a no-op for the whole process). Measured in process with the adapter registered and
#: removed page by page (3 runs of 40,000 rows, load 10-13): ``apply_rows`` 4.84-6.47 -> 4.36-5.77 us a row of
#: 1 KiB, 3.27-4.32 -> 3.00-3.66 of 100 B; a ``get`` the record cache misses 0-0.4 us less.
sqlite3.register_adapter(bytes, bytes)

_UNKNOWN = object()
_KEY_OF = itemgetter(0)
_VALUE_OF = itemgetter(1)
#: What a record cache entry costs beyond its key and value (dict slot, row tuple), roughly.
_ENTRY_OVERHEAD = 200

#: A record as the record cache keeps it: the row's columns ``value, flags, expires_at, clock - 2**63,
#: writer, tombstone``. A tuple of atomic values is untracked by the garbage collector (after the first
#: collection it survives), where a ``Record`` and its ``Version`` are two tracked objects for good.
_Row = tuple[bytes, int, int, int, str, int]


def _entry_size(key: bytes, row: _Row | None) -> int:
    return len(key) + _ENTRY_OVERHEAD + (len(row[0]) if row is not None else 0)


def _record(value: bytes, flags: int, expires_at: int, clock: int, writer: str, tombstone: int) -> Record:
    return Record(value, flags, expires_at, Version(clock + _CLOCK_BIAS, writer), bool(tombstone))


def _check_integers(record: Record) -> None:
    if not (_INT64_MIN <= record.expires_at <= _INT64_MAX and _INT64_MIN <= record.flags <= _INT64_MAX):
        raise StorageError(
            f"cannot store flags {record.flags} and expires_at {record.expires_at}: SQLite integers have 64 bits"
        )


def _row(hash_value: int, key: bytes, record: Record) -> tuple[Any, ...]:
    _check_integers(record)
    version = record.version
    return (
        hash_value,
        key,
        record.value,
        record.flags,
        record.expires_at,
        version.clock - _CLOCK_BIAS,
        version.writer,
        int(record.tombstone),
    )


@implementer(IStorageEngine)
class SQLiteEngine:
    """Records in the SQLite file ``path`` (its directory is created if missing).

    Opening refuses, with a ``StorageError`` naming the file and the problem, a file that cannot be read
    or written, is not a SQLite database, is another application's database, has a schema version this
    code does not know, or fails ``PRAGMA quick_check`` (when ``check`` is true; it reads the whole file:
    ~0.45 s for 1M keys of 100 bytes, a 150 MB file, measured on this project's machine). It never
    replaces or recreates an existing file; an empty (0-byte) file is taken as a new database.

    Threading: one write connection, shared under a lock, serves ``put``, ``apply``, ``apply_many``, ``remove``,
    ``remove_many_if``, ``clear``, ``batch`` and the deletes of ``purge``, from any thread. Point reads and
    writes cost tens of microseconds, so they may run on the reactor thread. ``scan``, ``purge`` and
    ``checkpoint`` read through a separate read-only connection per thread (WAL readers see the last committed
    state and never block the writer nor wait for it), so the thread pool can page through an arc while the
    reactor thread writes. ``get`` reads that way too when the record cache does not know the key (except inside
    its own thread's ``batch()``), so that a purge or a drop holding the write lock in another thread never
    stalls a read. A scan does not see the writes of a ``batch()`` still open. ``close()`` must not race with
    calls in other threads.

    Record cache: ``get`` answers from a write-through cache of recent records (``record_cache_mib``,
    first in first out; 0 turns it off) that every write, removal, purge and clear keeps exact, so a
    hot key costs a dict lookup and the making of a ``Record`` rather than a query (about 2 us against
    15-30 us), and a write needs no query to find what it replaces when the key is cached. The cache is
    filled and changed only under the write lock; scans read the database. It keeps each record as the
    tuple of its row's columns, which the garbage collector stops visiting: measured with 100,000 cached
    records of 1 KiB, a full collection took ~130 ms with ``Record`` objects in the cache and ~4 ms (what
    it takes with an empty cache) with tuples. The group writes (``apply_many``, ``remove_many_if``)
    keep the entries the cache has exact but add none: their records come from a bulk writer (a
    handoff) and are not the hot ones.

    Page size: a new database gets pages of ``page_size`` bytes (16 KiB by default; an existing file
    keeps its own). The table is a ``WITHOUT ROWID`` b-tree, whose rows spill into overflow pages past
    about a quarter of a page: with SQLite's default of 4 KiB, a record of a 1 KiB value took a page of
    its own beside its leaf (4.2 KB of file per record, 4x the data) and each write two random pages.
    With 16 KiB pages values up to ~4 KB stay in the leaf; measured applying 50,000 records of 1 KiB in
    hash order (``apply_many``, 60 a group): 15,000 against 32,000-40,000 records/s (8 and 16 KiB pages
    alike), a file of 211 MB against 53 MB; point writes of 100-byte values cost the same (12,000-13,000/s
    for 4, 8 and 16 KiB pages). The price: values from ~4 KB to ~20 KB spill into a 16 KiB overflow page
    each (with 4 KiB pages the same happens from ~1 KB to ~4.5 KB), so such values take up to 3x their
    size on disk.

    Page cache: SQLite's own cache of file pages is ``cache_mib`` (8 MiB by default) for the write
    connection and 8 MiB for each thread's read connection. The record cache is the read cache that
    counts; past the b-tree's inner pages, a bigger page cache bought nothing measurable (random gets of
    200,000 records of 1 KiB with the record cache off: 24,000-33,000/s with 64, 16 or 8 MiB) but memory:
    a daemon loaded with 100,000 records of 1 KiB grew by 136 MB with 64 MiB, 70 MB with 16 MiB and 36 MB
    with 8 MiB (the pages are malloc'ed one by one, and the heap keeps more than the cache holds).

    Disk limit: ``disk_limit_bytes`` (0: none; the kvstore's ``--disk-limit``) caps the database file with
    SQLite's ``max_page_count``: a write that would need a page past it fails with ``StorageFull`` ("out of
    disk space storing object: ...") and changes nothing, while reads, deletes and writes that fit (in pages
    freed by deletes and purges) go on. The cap is on the database file; the WAL file beside it adds up to the
    bound ``checkpoint()`` keeps (cut back once writers are idle past ``wal_limit_mib``). A file
    already larger than the cap keeps its size and takes no new pages. A disk that fills up before the cap
    gives ``StorageFull`` too, naming the disk.

    Checkpoints: by default SQLite copies the WAL back into the database file every ``autocheckpoint``
    pages (1000, ~16 MB), in the thread that commits, which costs that write a few tens of ms now and
    then (mostly an fsync). An owner with a thread pool can pass ``autocheckpoint=0`` and call
    ``checkpoint()`` from the pool every second or so instead: fewer, shorter stalls, and the WAL file
    grows to at most 256 MiB plus what is written between two calls (``checkpoint()``). A WAL file past
    ``wal_limit_mib`` (64 MiB by default) is cut back to nothing by the first ``checkpoint()`` that finds
    the writers idle: without that, the file stayed at the largest size a burst of writes ever gave it
    (455-758 MiB after 200,000 puts of 100-byte values). Not while they write: SQLite's own
    ``journal_size_limit`` truncates in the next commit after each restart, and that commit took 400-570 ms
    instead of 90-160 ms every ~20,000 puts.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check: bool = True,
        autocheckpoint: int = 1000,
        cache_mib: int = 8,
        record_cache_mib: int = 64,
        page_size: int = 16384,
        wal_limit_mib: int = 64,
        disk_limit_bytes: int = 0,
    ) -> None:
        if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two from 512 to 65536, not {page_size}")
        self._path = Path(path)
        self._cache_kib = cache_mib * 1024
        self._page_size = page_size
        self._wal_limit = wal_limit_mib * 1024 * 1024
        if disk_limit_bytes < 0:
            raise ValueError(f"disk_limit_bytes must be 0 (none) or positive, not {disk_limit_bytes}")
        self._disk_limit = disk_limit_bytes
        # The record cache: key -> row tuple (or None: known absent), first in first out, bounded in bytes.
        self._records: dict[bytes, _Row | None] = {}
        # Counts the changes made (bumped under the write lock, also when a transaction ends), so that a
        # get that read without the lock caches its row only if nothing changed meanwhile; and checkpoint
        # sees whether writers were idle since its last call.
        self._generation = 0
        self._checkpointed_generation = -1
        self._batch_thread: int | None = None  # the thread whose batch() is open
        self._records_bytes = 0
        self._records_limit = record_cache_mib * 1024 * 1024
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._readers_lock = threading.Lock()
        self._batch_depth = 0
        self._closed = False
        _check_file(self._path)
        try:
            self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the database {self._path}: {e}") from e
        try:
            self._open(check, autocheckpoint)
        except BaseException:
            self._db.close()
            raise

    # -- opening ----------------------------------------------------------------------------------

    def _open(self, check: bool, autocheckpoint: int) -> None:
        path = self._path
        db = self._db
        try:
            # Read-only checks first: a file that is refused is left exactly as it was.
            db.execute(f"PRAGMA cache_size = -{int(self._cache_kib)}")
            new = self._check_schema()
            if check and not new:
                problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise StorageError(f"the database {path} is corrupt ({'; '.join(problems)}); it was left as it is")
            if new:  # before WAL mode, which fixes the page size of the file
                db.execute(f"PRAGMA page_size = {int(self._page_size)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"cannot use WAL mode on {path} (journal mode stays {mode!r})")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
            if new:
                self._create_schema()
            if self._disk_limit:
                pages = max(self._disk_limit // db.execute("PRAGMA page_size").fetchone()[0], 1)
                db.execute(f"PRAGMA max_page_count = {int(pages)}")
            keys, size = db.execute("SELECT count(*), coalesce(sum(length(value)), 0) FROM records").fetchone()
        except sqlite3.DatabaseError as e:
            if "malformed" in str(e) or "not a database" in str(e):
                raise StorageError(f"the database {path} is corrupt ({e}); it was left as it is") from e
            raise StorageError(f"cannot use the database {path}: {e}") from e
        except sqlite3.Error as e:
            raise StorageError(f"cannot use the database {path}: {e}") from e
        self._keys: int = keys
        self._bytes: int = size

    def _check_schema(self) -> bool:
        """True for a new (empty) database; raise unless the file holds chashd's schema."""
        path = self._path
        db = self._db
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if application_id == 0 and version == 0:
            tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if tables:
                raise StorageError(
                    f"{path} is a SQLite database but not a chashd one (it has tables {', '.join(tables)})"
                )
            return True
        if application_id != APPLICATION_ID:
            raise StorageError(f"{path} is a SQLite database of another application (application_id {application_id})")
        if version != SCHEMA_VERSION:
            raise StorageError(
                f"the database {path} has schema version {version}; this chashd knows version {SCHEMA_VERSION} only"
            )
        return False

    def _create_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        reader: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if reader is None:
            if self._closed:
                raise StorageError("the database is closed", f"the database {self._path} is closed")
            try:
                reader = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                reader.execute("PRAGMA query_only = 1")
                reader.execute("PRAGMA cache_size = -8192")
            except sqlite3.Error as e:
                raise StorageError(
                    f"cannot open the database for reading: {self._public(e)}",
                    f"cannot open the database {self._path} for reading: {e}",
                ) from e
            with self._readers_lock:
                # Close the connections of threads that have ended (a pool may replace its threads).
                for thread, connection in self._readers:
                    if not thread.is_alive():
                        connection.close()
                self._readers = [(t, c) for t, c in self._readers if t.is_alive()]
                self._readers.append((threading.current_thread(), reader))
            self._local.reader = reader
        return reader

    def _failed(self, e: sqlite3.Error) -> StorageError | StorageFull:
        """The error of a failed statement: SQLite's words (or memcached's, for a full disk) for clients, the
        file's path only in the detail that goes to the logs (an answer names the problem, not the host's
        layout)."""
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            if self._disk_limit:
                limit = f"{self._disk_limit / 1048576:g} MiB"
                return StorageFull(f"out of disk space storing object: the database reached its limit of {limit}")
            return StorageFull(
                "out of disk space storing object: the disk is full",
                detail=f"out of disk space storing object: the disk holding {self._path} is full",
            )
        return StorageError(f"the database failed: {self._public(e)}", f"the database {self._path} failed: {e}")

    def _public(self, e: sqlite3.Error) -> str:
        path = str(self._path)
        directory = os.path.dirname(os.path.abspath(path))
        return str(e).replace(path, "the database file").replace(directory, "the data directory")

    # -- points -----------------------------------------------------------------------------------

    def get(self, key: bytes) -> Record | None:
        """The stored record for ``key`` (tombstones and expired records included), or None."""
        cached = self._records.get(key, _UNKNOWN)
        if cached is not _UNKNOWN:
            return None if cached is None else _record(*cached)  # type: ignore[misc]  # a _Row: _UNKNOWN is tested above
        hash_value = key_hash(key)
        if self._batch_thread == threading.get_ident():  # only the write connection sees this batch's writes
            with self._lock:
                try:
                    row = self._db.execute(_GET, (hash_value, key)).fetchone()
                except sqlite3.Error as e:
                    raise self._failed(e) from e
                self._remember(key, row)
            return None if row is None else _record(*row)
        # Outside a batch of its own, a thread reads on its read connection (the last committed state,
        # which holds every write this thread made), without the write lock: a batch or a checkpoint
        # holding it in another thread (a purge, a drop) does not stall the reactor's reads. The row
        # goes into the cache only if no change was made since the read began and the lock is free.
        generation = self._generation
        try:
            row = self._reader().execute(_GET, (hash_value, key)).fetchone()
        except sqlite3.Error as e:
            raise self._failed(e) from e
        if self._records_limit and self._lock.acquire(blocking=False):
            try:
                if self._generation == generation:
                    self._remember(key, row)
            finally:
                self._lock.release()
        return None if row is None else _record(*row)

    def get_live(self, key: bytes, now: float) -> tuple[int, bytes] | None:
        """``(flags, value)`` when a read at ``now`` sees the record for ``key``, else None; from the
        record cache's row without making a ``Record`` when the cache knows the key."""
        cached = self._records.get(key, _UNKNOWN)
        if cached is _UNKNOWN:
            record = self.get(key)
            return None if record is None or not record.live(now) else (record.flags, record.value)
        if cached is None:
            return None
        row: _Row = cached  # type: ignore[assignment]  # neither _UNKNOWN nor None, tested above
        value, flags, expires_at, _clock, _writer, tombstone = row
        if tombstone or (expires_at != 0 and expires_at <= now):
            return None
        return flags, value

    def _current(self, hash_value: int, key: bytes) -> tuple[int, str, int] | None:
        """``(clock, writer, value length)`` of the stored record, from the cache when it knows; lock held."""
        cached = self._records.get(key, _UNKNOWN)
        if cached is None:
            return None
        if cached is not _UNKNOWN:
            row: _Row = cached  # type: ignore[assignment]  # neither _UNKNOWN nor None, tested above
            return (row[3], row[4], len(row[0]))
        current: tuple[int, str, int] | None = self._db.execute(_CURRENT, (hash_value, key)).fetchone()
        return current

    def _currents(self, keys: Sequence[bytes], hashes: Sequence[int]) -> dict[bytes, tuple[int, str, int] | None]:
        """``_current`` of each of ``keys``: from the cache, the others in one query per ``_GROUP_QUERY``
        hashes; lock held."""
        currents: dict[bytes, tuple[int, str, int] | None] = {}
        records = self._records
        unknown: dict[bytes, int] = {}
        for key, hash_value in zip(keys, hashes):
            if key in currents or key in unknown:
                continue
            cached = records.get(key, _UNKNOWN)
            if cached is _UNKNOWN:
                unknown[key] = hash_value
            elif cached is None:
                currents[key] = None
            else:
                row: _Row = cached  # type: ignore[assignment]  # neither _UNKNOWN nor None, tested above
                currents[key] = (row[3], row[4], len(row[0]))
        if unknown:
            wanted = list(dict.fromkeys(unknown.values()))
            for i in range(0, len(wanted), _GROUP_QUERY):
                chunk = wanted[i : i + _GROUP_QUERY]
                query = _CURRENT_OF_HASHES.format(marks=",".join("?" * len(chunk)))
                for key, clock, writer, length in self._db.execute(query, chunk):
                    if key in unknown:
                        currents[key] = (clock, writer, length)
            for key in unknown:
                currents.setdefault(key, None)
        return currents

    def put(self, key: bytes, record: Record) -> None:
        """Store ``record`` for ``key``, replacing what is there; committed when this returns."""
        hash_value = key_hash(key)
        with self._lock:
            try:
                current = self._current(hash_value, key)
                row = _row(hash_value, key, record)
                self._db.execute(_STORE, row)
            except sqlite3.Error as e:
                raise self._failed(e) from e
            self._count(current, record)
            self._remember(key, row[2:])
            self._generation += 1

    def apply(self, key: bytes, record: Record) -> bool:
        """Store ``record`` only if its version is higher than the stored one's; True if stored (and committed)."""
        hash_value = key_hash(key)
        version = record.version
        with self._lock:
            try:
                current = self._current(hash_value, key)
                if current is not None and (version.clock, version.writer) <= (current[0] + _CLOCK_BIAS, current[1]):
                    return False
                row = _row(hash_value, key, record)
                self._db.execute(_STORE, row)
            except sqlite3.Error as e:
                raise self._failed(e) from e
            self._count(current, record)
            self._remember(key, row[2:])
            self._generation += 1
            return True

    def apply_many(self, items: Sequence[tuple[bytes, Record]]) -> list[bool]:
        """``apply`` each ``(key, record)`` in order, in one transaction (committed when this returns, or
        joining the open ``batch()``); True for each record stored.

        Three statements for the group instead of two per record (see ``apply_rows``, which does the work).
        Raises ``StorageError`` before writing anything when a record cannot be stored (integers past 64 bits).
        """
        rows: list[BulkRow] = []
        for key, record in items:
            _check_integers(record)
            version = record.version
            rows.append(
                (key, record.value, record.flags, record.expires_at, version.clock, version.writer, record.tombstone)
            )
        return self.apply_rows(rows)

    def apply_rows(self, rows: Sequence[BulkRow]) -> list[bool]:
        """``apply_many`` of ``BulkRow`` tuples (a received bulk page), without a ``Record`` each; True for
        each row stored. The rows come checked (``chashd.bulk.decode_rows``).

        A page a handoff brings is a run of the sender's table, in ``(hash, key)`` order, and to a node that
        did not hold the arc its keys are all new: when a page of at least ``_RUN_ROWS`` rows has hashes that
        rise strictly (so no key comes twice) and no record lies between its first key and its last (one
        index seek), the rows go in as they are, in one ``executemany`` with SQLite biasing the clock, with no
        query of the stored versions and no comparison in Python. Otherwise (a repair, a sweep, a node back
        with its data, clients' writes), three statements: the stored versions of the keys the record cache
        does not know in one query, the winners in one ``executemany``, the commit."""
        hashes = key_hashes([row[0] for row in rows])
        with self.batch():
            if len(rows) >= _RUN_ROWS and all(map(lt, hashes, hashes[1:])):
                first, last = rows[0][0], rows[-1][0]
                try:
                    held = self._db.execute(_RUN_HOLDS, (hashes[0], first, hashes[-1], last)).fetchone()[0]
                except sqlite3.Error as e:
                    raise self._failed(e) from e
                if not held:
                    return self._insert_new(rows, hashes)
            return self._apply_compared(rows, hashes)

    def _insert_new(self, rows: Sequence[BulkRow], hashes: Sequence[int]) -> list[bool]:
        """``apply_rows`` of rows whose keys are all new here, none twice: every row is stored, as it is; in
        the open batch, lock held."""
        try:
            self._db.executemany(_STORE_ROW, map(tuple.__add__, zip(hashes), rows))
        except sqlite3.Error as e:
            raise self._failed(e) from e
        self._keys += len(rows)
        self._bytes += sum(map(len, map(_VALUE_OF, rows)))
        self._generation += 1
        known = self._records.keys() & map(_KEY_OF, rows) if self._records else None
        if known:  # keys the cache knows as absent
            for key, value, flags, expires_at, clock, writer, tombstone in rows:
                if key in known:
                    self._remember(key, (value, flags, expires_at, clock - _CLOCK_BIAS, writer, tombstone))
        return [True] * len(rows)

    def _apply_compared(self, rows: Sequence[BulkRow], hashes: Sequence[int]) -> list[bool]:
        """``apply_rows`` comparing each row with the stored version; in the open batch, lock held. When no
        key is here yet (none twice), the rows go in as ``_insert_new`` stores them."""
        keys = [row[0] for row in rows]
        try:
            currents = self._currents(keys, hashes)
        except sqlite3.Error as e:
            raise self._failed(e) from e
        if len(currents) == len(rows) and not any(currents.values()):
            return self._insert_new(rows, hashes)
        results: list[bool] = []
        stored = []
        added_keys = added_bytes = 0
        for (key, value, flags, expires_at, clock, writer, tombstone), hash_value in zip(rows, hashes):
            current = currents[key]
            biased = clock - _CLOCK_BIAS
            size = len(value)
            if current is None:
                added_keys += 1
                added_bytes += size
            elif (biased, writer) <= current[:2]:
                results.append(False)
                continue
            else:
                added_bytes += size - current[2]
            stored.append((hash_value, key, value, flags, expires_at, biased, writer, tombstone))
            currents[key] = (biased, writer, size)
            results.append(True)
        if stored:
            try:
                self._db.executemany(_STORE, stored)
            except sqlite3.Error as e:
                raise self._failed(e) from e
            self._keys += added_keys
            self._bytes += added_bytes
            self._generation += 1
            records = self._records
            for row in stored:
                if row[1] in records:
                    self._remember(row[1], row[2:])
        return results

    def _remember(self, key: bytes, row: _Row | None) -> None:
        """Put ``row`` in the record cache, evicting the oldest entries past the limit; lock held."""
        limit = self._records_limit
        if not limit:
            return
        records = self._records
        size = _entry_size(key, row)
        old = records.pop(key, _UNKNOWN)
        if old is not _UNKNOWN:
            self._records_bytes -= _entry_size(key, old)  # type: ignore[arg-type]  # not _UNKNOWN, tested above
        records[key] = row
        self._records_bytes += size
        while self._records_bytes > limit and records:
            oldest = next(iter(records))
            self._records_bytes -= _entry_size(oldest, records.pop(oldest))

    def _forget(self, key: bytes) -> None:
        """Drop ``key`` from the record cache; lock held."""
        old = self._records.pop(key, _UNKNOWN)
        if old is not _UNKNOWN:
            self._records_bytes -= _entry_size(key, old)  # type: ignore[arg-type]  # not _UNKNOWN, tested above

    def _forget_all(self) -> None:
        self._records.clear()
        self._records_bytes = 0

    def _count(self, current: tuple[int, str, int] | None, record: Record) -> None:
        # Called with the lock held, once the write is done.
        if current is None:
            self._keys += 1
            self._bytes += len(record.value)
        else:
            self._bytes += len(record.value) - current[2]

    def remove(self, key: bytes) -> None:
        """Forget ``key`` entirely; committed when this returns."""
        hash_value = key_hash(key)
        with self._lock:
            try:
                current = self._current(hash_value, key)
                if current is None:
                    return
                self._db.execute(_DELETE, (hash_value, key))
            except sqlite3.Error as e:
                raise self._failed(e) from e
            self._keys -= 1
            self._bytes -= current[2]
            self._remember(key, None)
            self._generation += 1

    def remove_many_if(self, items: Sequence[tuple[bytes, Version]]) -> list[bool]:
        """Compare-and-remove: forget each ``key`` of the ``(key, version)`` pairs whose stored version is
        still ``version``, in one transaction (or the open ``batch()``); True for each key forgotten.

        The handoff's drop after a push: a record rewritten since it was pushed stays. Two statements for
        the group (the stored versions in one query, one ``executemany`` of deletes) and the commit.
        """
        keys = [key for key, _ in items]
        hashes = [key_hash(key) for key in keys]
        results: list[bool] = []
        with self.batch():
            try:
                currents = self._currents(keys, hashes)
            except sqlite3.Error as e:
                raise self._failed(e) from e
            doomed = []
            freed = 0
            for (key, version), hash_value in zip(items, hashes):
                current = currents[key]
                if current is None or current[0] + _CLOCK_BIAS != version.clock or current[1] != version.writer:
                    results.append(False)
                    continue
                doomed.append((hash_value, key))
                freed += current[2]
                currents[key] = None
                results.append(True)
            if doomed:
                try:
                    self._db.executemany(_DELETE, doomed)
                except sqlite3.Error as e:
                    raise self._failed(e) from e
                self._keys -= len(doomed)
                self._bytes -= freed
                self._generation += 1
                for _, key in doomed:
                    self._forget(key)
        return results

    def remove_rows_if(self, rows: Sequence[BulkRow]) -> int:
        """``remove_many_if`` of the records of ``rows`` (a page the handoff pushed): forget each row's key
        whose stored version is still the row's, in one transaction; the number forgotten.

        A page read by ``scan_rows`` is a run of the table in ``(hash, key)`` order, and is most often still
        one when it is dropped: then two statements do it, under the write lock, in the transaction (no write
        can come between them): the keys and versions of the run from the page's first key to its last,
        which must be exactly the page's (no record rewritten, added or removed since the scan), and one
        ``DELETE`` of that run, which seeks the b-tree once and hashes two keys instead of a seek and an md5
        per row (in process, 50,000 records of 1 KiB: ~2.5 us a record instead of ~3.8 for the statements,
        and no Python per row but the comparison's tuples). Otherwise, ``_remove_rows_each``.
        """
        if not rows:
            return 0
        with self.batch():
            first, last = rows[0][0], rows[-1][0]
            low, high = (key_hash(first), first), (key_hash(last), last)
            db = self._db
            if low <= high:
                try:
                    stored = db.execute(_RUN_VERSIONS, (*low, *high)).fetchall()
                    same = stored == [(row[0], row[4], row[5]) for row in rows]
                    if same:
                        removed = db.execute(_DELETE_RUN, (*low, *high)).rowcount
                except sqlite3.Error as e:
                    raise self._failed(e) from e
                if same:
                    if removed != len(rows):  # cannot be: the run was read in this transaction
                        raise StorageError(f"removed {removed} records of a run of {len(rows)}")
                    self._removed(rows)
                    return removed
            return self._remove_rows_each(rows)

    def remove_run_if(self, first: bytes, last: bytes, digest: bytes) -> int:
        """Forget the run of the table from ``first`` to ``last`` (both included) if ``run_digest`` of its rows
        is ``digest``, in one transaction; the number forgotten (all of the run or 0). Two statements under the
        write lock, as ``remove_rows_if``'s for a page still as scanned: the run's keys, versions and value
        bytes as one row (``_RUN_DIGEST``: one step of SQLite, where a row per record gave up the GIL and took
        it back at each), then one ``DELETE`` of the run."""
        low, high = (key_hash(first), first), (key_hash(last), last)
        if low > high:
            return 0
        with self.batch():
            db = self._db
            try:
                count, keys, clocks, writers, freed = db.execute(_RUN_DIGEST, (*low, *high)).fetchone()
                if not count or run_digest_of(count, keys, clocks, writers) != digest:
                    return 0
                removed = db.execute(_DELETE_RUN, (*low, *high)).rowcount
            except sqlite3.Error as e:
                raise self._failed(e) from e
            if removed != count:  # cannot be: the run was read in this transaction
                raise StorageError(f"removed {removed} records of a run of {count}")
            self._keys -= removed
            self._bytes -= int(freed)
            self._generation += 1
            if self._records:  # the cache holds few of a handoff's records, if any
                for key in self._records.keys() & set(map(bytes.fromhex, keys.split(","))):
                    self._forget(key)
        return removed

    def _remove_rows_each(self, rows: Sequence[BulkRow]) -> int:
        """``remove_rows_if`` row by row: one statement for the group when nothing raced (``DELETE ... AND
        clock = ? AND writer = ?`` for every row, which removes them all): a record of the same version is
        the same record, so the rows say what the removal frees. When fewer went (a record was rewritten since
        the push), the group is undone (a savepoint) and ``remove_many_if`` finds which to remove. In the open
        ``batch()``."""
        bias = _CLOCK_BIAS
        params = [(key_hash(key), key, clock - bias, writer) for key, _v, _f, _e, clock, writer, _t in rows]
        db = self._db
        try:
            db.execute("SAVEPOINT drop_rows")
            removed = db.executemany(_PURGE_DELETE, params).rowcount
            if removed != len(rows):
                db.execute("ROLLBACK TO drop_rows")
            db.execute("RELEASE drop_rows")
        except sqlite3.Error as e:
            raise self._failed(e) from e
        if removed != len(rows):
            return sum(self.remove_many_if([(row[0], Version(row[4], row[5])) for row in rows]))
        self._removed(rows)
        return removed

    def _removed(self, rows: Sequence[BulkRow]) -> None:
        """Count the records of ``rows`` gone; lock held, in the batch that removed them."""
        self._keys -= len(rows)
        self._bytes -= sum([len(row[1]) for row in rows])
        self._generation += 1
        if self._records:  # the cache holds few of a handoff's records, if any
            for row in rows:
                self._forget(row[0])

    # -- ranges -----------------------------------------------------------------------------------

    def scan(
        self,
        first_hash: int,
        last_hash: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
    ) -> list[tuple[bytes, Record]]:
        """Up to ``limit`` ``(key, Record)`` pairs with ``first_hash <= key_hash(key) <= last_hash``,
        in ``(hash, key)`` order, after the position ``after`` (the ``(hash, key)`` of the last pair of the
        previous page) or from the start of the range. Reads this thread's read connection."""
        check_range(first_hash, last_hash, limit)
        reader = self._reader()
        try:
            if after is None or after[0] < first_hash:
                rows = reader.execute(_SCAN_FROM, (first_hash, last_hash, limit)).fetchall()
            else:
                rows = reader.execute(_SCAN_AFTER, (after[0], after[1], last_hash, limit)).fetchall()
        except sqlite3.Error as e:
            raise self._failed(e) from e
        return [(row[0], _record(*row[1:])) for row in rows]

    def scan_versions(
        self,
        first_hash: int,
        last_hash: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
    ) -> list[tuple[int, bytes, Version]]:
        """Up to ``limit`` ``(hash, key, version)`` of the records in the range, as ``scan`` pages them,
        without reading their values into Python (anti-entropy's digests and key lists)."""
        check_range(first_hash, last_hash, limit)
        reader = self._reader()
        try:
            if after is None or after[0] < first_hash:
                rows = reader.execute(_VERSIONS_FROM, (first_hash, last_hash, limit)).fetchall()
            else:
                rows = reader.execute(_VERSIONS_AFTER, (after[0], after[1], last_hash, limit)).fetchall()
        except sqlite3.Error as e:
            raise self._failed(e) from e
        return [(row[0], row[1], Version(row[2] + _CLOCK_BIAS, row[3])) for row in rows]

    def scan_rows(
        self,
        first_hash: int,
        last_hash: int,
        after: tuple[int, bytes] | None = None,
        limit: int = 1000,
    ) -> list[BulkRow]:
        """``scan`` as ``BulkRow`` tuples, without making a ``Record`` of each (the handoff's bulk pages)."""
        check_range(first_hash, last_hash, limit)
        reader = self._reader()
        try:
            if after is None or after[0] < first_hash:
                rows = reader.execute(_SCAN_ROWS_FROM, (first_hash, last_hash, limit)).fetchall()
            else:
                rows = reader.execute(_SCAN_ROWS_AFTER, (after[0], after[1], last_hash, limit)).fetchall()
        except sqlite3.Error as e:
            raise self._failed(e) from e
        return rows

    def purge(self, now: float, tombstone_grace: float) -> int:
        """Forget expired records and tombstones older than ``tombstone_grace`` seconds; the number forgotten.

        SQL finds the candidates (a pass over the table, on this thread's read connection); each chunk is
        checked with ``chashd.record.purgeable`` and deleted in one short write transaction, only if the
        record was not rewritten meanwhile.
        """
        # Tombstones: purgeable when millis / 1000 + grace <= now. The SQL bound is a little loose
        # (one more millisecond) and purgeable() has the last word, so float rounding cannot differ.
        millis = int((now - tombstone_grace) * 1000) + 2
        clock_bound = min(max((millis << 16) - _CLOCK_BIAS, _INT64_MIN), _INT64_MAX) if millis > 0 else _INT64_MIN
        reader = self._reader()
        position: tuple[int, bytes] = (-1, b"")
        forgotten = 0
        while True:
            try:
                rows = reader.execute(_PURGE_CANDIDATES, (*position, now, clock_bound, _PURGE_CHUNK)).fetchall()
            except sqlite3.Error as e:
                raise self._failed(e) from e
            if not rows:
                return forgotten
            doomed = [row for row in rows if purgeable(_record(*row[2:]), now, tombstone_grace)]
            if doomed:
                forgotten += self._delete_unchanged(doomed)
            position = (rows[-1][0], rows[-1][1])

    def _delete_unchanged(self, rows: list[tuple[Any, ...]]) -> int:
        deleted = 0
        with self.batch():
            for row in rows:
                hash_value, key, value, _flags, _expires_at, clock, writer = row[:7]
                try:
                    changed = self._db.execute(_PURGE_DELETE, (hash_value, key, clock, writer)).rowcount
                except sqlite3.Error as e:
                    raise self._failed(e) from e
                if changed:
                    deleted += 1
                    self._keys -= 1
                    self._bytes -= len(value)
                    self._forget(key)
        return deleted

    def clear(self) -> None:
        """Forget every record (``flush_all``); committed when this returns."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM records")
            except sqlite3.Error as e:
                raise self._failed(e) from e
            self._keys = 0
            self._bytes = 0
            self._forget_all()
            self._generation += 1

    def stats(self) -> dict[str, int]:
        """``keys`` (records held, tombstones included) and ``bytes`` (value bytes held), both O(1);
        ``disk_bytes`` (the database file's pages, free ones included: what ``disk_limit_bytes`` caps)
        and ``disk_limit_bytes`` (0: none)."""
        try:
            reader = self._reader()
            pages = reader.execute("PRAGMA page_count").fetchone()[0] * reader.execute("PRAGMA page_size").fetchone()[0]
        except (sqlite3.Error, StorageError):
            pages = 0  # closed: the figures that matter are the counters
        return {"keys": self._keys, "bytes": self._bytes, "disk_bytes": pages, "disk_limit_bytes": self._disk_limit}

    # -- transactions and files -------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for every write in the block, committed when it ends, rolled back if it raises.

        Holds the write lock for the whole block. A batch opened inside a batch joins the outer one.
        """
        with self._lock:
            if self._batch_depth:
                self._batch_depth += 1
                try:
                    yield
                finally:
                    self._batch_depth -= 1
                return
            counters = (self._keys, self._bytes)
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._failed(e) from e
            self._batch_depth = 1
            self._batch_thread = threading.get_ident()
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._keys, self._bytes = counters
                self._forget_all()  # it may hold writes the rollback undid
                if isinstance(e, sqlite3.Error):
                    raise self._failed(e) from e
                raise
            finally:
                self._batch_depth = 0
                self._batch_thread = None
                self._generation += 1

    def checkpoint(self, restart_frames: int = 4096) -> tuple[int, int]:
        """Copy the WAL back into the database file; for a thread pool, with ``autocheckpoint=0``.

        First without waiting for anyone (PASSIVE), on this thread's read connection, again while writers
        added many pages during the previous pass. A steady stream of writes never lets the WAL start
        over, so once it holds ``restart_frames`` pages (64 MB with 16 KiB pages) the write lock is taken
        to copy the few pages written meanwhile and restart the WAL from its beginning (RESTART): writers
        wait for that, two fsyncs (measured: 75 ms on this project's loaded machine while a handoff was
        writing). So that no writer waits in the middle of a burst (a handoff), the restart waits until no
        change was committed since the previous call, or until the WAL holds 4x ``restart_frames`` pages.
        Once no change was committed since the previous call, a WAL file larger than ``wal_limit_mib`` is
        truncated (TRUNCATE) instead. Returns the WAL's pages and how many of them are in the database file.

        The bound this keeps during a sustained burst of writes: the WAL file never holds more than
        ``4 * restart_frames`` pages (256 MiB with 16 KiB pages) plus the pages written between two calls
        (bench/storage.py measures both and prints the WAL's largest size against that sum).
        """
        generation = self._generation
        reader = self._reader()
        try:
            copied = 0
            for _ in range(4):
                _busy, frames, done = reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if done - copied < 256:
                    break
                copied = done
            idle = generation == self._checkpointed_generation
            if idle and self._wal_size() > self._wal_limit:
                with self._lock:
                    _busy, frames, done = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            elif frames >= restart_frames and (idle or frames >= 4 * restart_frames):
                with self._lock:
                    _busy, frames, done = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error as e:
            raise self._failed(e) from e
        finally:
            self._checkpointed_generation = generation
        return frames, done

    def _wal_size(self) -> int:
        try:
            return os.stat(f"{self._path}-wal").st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close every connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                readers, self._readers = self._readers, []
            for _thread, reader in readers:
                reader.close()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                raise self._failed(e) from e
            finally:
                self._db.close()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path


def _check_file(path: Path) -> None:
    """Raise a ``StorageError`` that names the problem when ``path`` cannot be a database file for us.

    SQLite's own messages ("unable to open database file") do not say which of these it is.
    """
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the data directory {directory}: {e.strerror or e}") from e
    if not directory.is_dir():
        raise StorageError(f"cannot use {directory} as the data directory: not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write to the data directory {directory}: permission denied")
    if path.is_dir():
        raise StorageError(f"cannot use {path} as the database: it is a directory")
    try:
        with open(path, "rb") as f:
            header = f.read(len(_HEADER))
    except FileNotFoundError:
        return
    except OSError as e:
        reason = "permission denied" if e.errno in (errno.EACCES, errno.EPERM) else e.strerror or str(e)
        raise StorageError(f"cannot read the database {path}: {reason}") from e
    if not os.access(path, os.W_OK):
        raise StorageError(f"cannot write to the database {path}: permission denied")
    if header and header != _HEADER:
        raise StorageError(f"{path} is not a SQLite database (it does not start with the SQLite header)")
