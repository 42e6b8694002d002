"""The kvstore's backend: every command of ``chashd.commands`` run at once against the local engine.

``LocalBackend`` is the ``IKeyValue`` both surfaces of a kvstore (the line protocol and ``/kv``) call.
It answers synchronously: an engine's point read or write costs microseconds, less than a hop to a
thread and back, so it stays on the reactor thread (measured in bench/kvstore.py; scans and purges,
which can take long, belong to the service's thread pool, not here).

Writes get a version from a hybrid logical clock (``HybridClock(node_id)``) ticked with the injected
clock's time in milliseconds; the clock first observes the stored record's version, so a write always
wins over what it replaces even when another node's clock is ahead. The versioned extension stores what
it is given (``XPut``, keeping the newer version) or runs a write with the caller's version (``XApply``).
A version from the wire more than ``max_clock_skew`` seconds ahead of this node's clock is refused
(``VersionTooNew``, counted in ``versions_refused_total``): never stored, never observed by the clock.
While ``leaving`` is set (the node drains), every write but ``XPut`` raises ``NodeLeaving``. An ``XApply``
whose connection named an older cluster map (``XMap``, stamped on it as ``XApply.epoch``) than the newest this
node knows (``map_epoch``: from ``XMap``, ``XEpoch`` and the ring watch, ``know_epoch``) raises ``StaleMap``:
its gateway may route the key to another primary than the current map names. So does the copy of a
read-modify-write's result (an ``XPut`` with an ``epoch``: ``XFence`` before it on the wire) whose map is older
than that: a primary that a newer map no longer names gets no result acknowledged by this replica.
Read-modify-writes lease the keys they read (``XLease``, ``chashd.leases``: an in-memory ``LeaseTable``), and
their stores name their round (``XApply.lease``, ``XPut.lease``): a store past its deadline raises
``DeadlinePassed``, one that meets another command's conflicting lease ``KeyLeased``. A command's lease ends
when its store is taken here, or when its gateway says it is over (``XRelease``).

A bounded memory engine (``--memory-limit``) evicts or refuses at its limit (``StorageFull``, memcached's
``SERVER_ERROR out of memory storing object``); a ``set`` refused that way deletes the key's old value
(a tombstone, which costs less than the value it replaces), as memcached does, so that a failed set never
leaves a stale value. ``stats()`` speaks memcached's names for what the engine holds: ``bytes`` is what
counts against the limit (``used_bytes`` of a memory engine: keys, values and per-item overhead),
``limit_maxbytes`` the limit (0: none), ``evictions``; ``reset_stats()`` zeroes the counters ``stats
reset`` names.

A storage failure reaches the client as the engine's public words (no path); its detail is logged here
and counted in ``storage_errors_total``.

This is the hot path of the kvstore: one dict dispatch per command, one engine read and at most one
engine write, counters in a plain dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from chashd.bulk import BULK_FORMAT, BulkError, decode_rows
from chashd.commands import (
    Arith,
    Bulked,
    BulkFormat,
    BulkProbe,
    Command,
    Delete,
    Digests,
    FlushAll,
    Get,
    KeyVersions,
    Lease,
    Number,
    Result,
    Status,
    Store,
    Touch,
    Values,
    VersionOf,
    WriteCommand,
    XApplied,
    XApply,
    XBulk,
    XDeadline,
    XDigest,
    XEpoch,
    XFence,
    XGet,
    XLease,
    XList,
    XMap,
    XPut,
    XRelease,
    XVer,
)
from chashd.errors import (
    BadCommand,
    DeadlinePassed,
    DomainError,
    KeyLeased,
    NodeLeaving,
    ServiceUnavailable,
    StaleMap,
    StaleVersion,
    StorageError,
    StorageFull,
    ValueTooLarge,
    VersionTooNew,
)
from chashd.interfaces import IGroupedPuts, IKeyValue, IPlainGet, IServerAdmin, IStorageEngine
from chashd.leases import CLOCK_BOUND, MAX_LEASE, LeaseTable
from chashd.record import Record, expires_at_from_exptime
from chashd.ring import HASH_SPACE, key_hash
from chashd.semantics import apply_write
from chashd.versions import DEFAULT_MAX_SKEW_MS, HybridClock, Version

__all__ = ["COUNTERS", "LocalBackend", "RangeServer"]


class RangeServer(Protocol):
    """What answers the anti-entropy commands on a kvstore (``chashd.kvstore.antientropy.AntiEntropy``)."""

    def digest(self, command: XDigest) -> Deferred[Digests]:
        """The digests of the sub-ranges asked for."""

    def list_keys(self, command: XList) -> Deferred[KeyVersions]:
        """A page of ``(hash, key, version)`` of the range asked for."""


_NO_VALUES = Values(())

#: The per-command counters ``stats()`` reports, with memcached's names where memcached has them.
COUNTERS = (
    "get_hits",
    "get_misses",
    "get_expired",
    "cmd_set",
    "total_items",
    "cmd_touch",
    "touch_hits",
    "touch_misses",
    "delete_hits",
    "delete_misses",
    "incr_hits",
    "incr_misses",
    "decr_hits",
    "decr_misses",
    "cas_hits",
    "cas_misses",
    "cas_badval",
    "cmd_flush",
    "outofmemory",
    "cmd_xget",
    "cmd_xver",
    "cmd_xput",
    "cmd_xapply",
    "cmd_xbulk",
    "cmd_xdigest",
    "cmd_xlist",
    "cmd_xepoch",
    "cmd_xmap",
    "cmd_xfence",
    "xapply_stale",
    "xapply_stale_map",
    "xput_stale_map",
    "cmd_xlease",
    "cmd_xdeadline",
    "cmd_xrelease",
    "xlease_refused_total",
    "rmw_deadline_refused_total",
    "handoff_records_received_total",
    "versions_refused_total",
    "storage_errors_total",
)


@implementer(IKeyValue, IPlainGet, IGroupedPuts, IServerAdmin)
class LocalBackend:
    """A kvstore's ``IKeyValue`` over its ``IStorageEngine``; every result is returned at once.

    It also offers the line protocol's two shortcuts: ``get_one`` (``IPlainGet``) and ``execute_puts``
    (``IGroupedPuts``).

    ``clock`` gives the time (``seconds()``) for versions and expiry, and runs a delayed ``flush_all``;
    ``max_clock_skew`` (seconds) bounds the versions the extension accepts. ``restarted``: this process may
    follow one that granted leases (the daemon's case): it grants none for the longest one lasts.
    """

    _log = Logger()

    def __init__(
        self,
        engine: IStorageEngine,
        node_id: str,
        clock: IReactorTime,
        max_value_size: int,
        max_clock_skew: float = DEFAULT_MAX_SKEW_MS / 1000,
        restarted: bool = False,
    ) -> None:
        self.name = f"kvstore {node_id}"
        self.engine = engine
        self.node_id = node_id
        self.max_value_size = max_value_size
        #: Set while the node drains: writes other than XPut raise NodeLeaving.
        self.leaving = False
        self._clock = clock
        self._seconds = clock.seconds
        self._hlc = HybridClock(node_id, int(max_clock_skew * 1000))
        self._started = clock.seconds()
        self._flush_call: IDelayedCall | None = None
        self._counts = dict.fromkeys(COUNTERS, 0)
        #: The engine's own counters at the last ``reset_stats()``, subtracted from what it reports.
        self._engine_offsets: dict[str, int] = {}
        #: More ``stats()`` fields from the node's other parts (the handoff's progress), read at each call.
        self.stats_sources: list[Callable[[], Mapping[str, Any]]] = []
        self._engine_get = engine.get
        self._engine_get_live = engine.get_live
        self._dispatch: dict[type, Callable[[Any], Result]] = {
            Get: self._get,
            Store: self._write,
            Delete: self._write,
            Arith: self._write,
            Touch: self._write,
            FlushAll: self._flush_all,
            XGet: self._xget,
            XVer: self._xver,
            XPut: self._xput,
            XApply: self._xapply,
            XBulk: self._xbulk,
            BulkProbe: self._bulk_probe,
            XDigest: self._xdigest,
            XList: self._xlist,
            XEpoch: self._xepoch,
            XMap: self._xmap,
            XFence: self._xfence,
            XLease: self._xlease,
            XDeadline: self._xdeadline,
            XRelease: self._xrelease,
        }
        #: The read-modify-writes' leases on keys (``chashd.leases``), in memory. ``restarted`` (a daemon:
        #: it may have granted leases before it started, now forgotten): none granted for the longest one
        #: lasts after the start.
        self.leases = LeaseTable(self._started if restarted else self._started - 3600)
        #: The newest cluster map epoch this node knows: its ring watch's, and what gateways (``XMap``) and
        #: handoffs (``XEpoch``) named. An ``XApply`` from a connection that announced an older map is refused
        #: (``StaleMap``): its gateway may route the key to another primary than the current map names; so is
        #: the copy of a read-modify-write's result run by an older map (``XPut.epoch``, ``_stale_copy``).
        self.map_epoch = 0
        #: Told the epoch a handoff pushes for (``XEpoch``; the node's handoff, which stops dropping records
        #: when a peer pushes for a newer ring than it knows).
        self.on_epoch: Callable[[int], object] = lambda epoch: None
        #: Answers the anti-entropy commands (``chashd.kvstore.antientropy``; None: refused).
        self.ranges: RangeServer | None = None

    def execute(self, command: Command) -> Result:
        """Run ``command``; raises the errors of ``chashd.errors`` (and TypeError for a command that is
        not a key-value command, such as ``stats``, which the adapters answer themselves). The
        anti-entropy commands (``XDigest``, ``XList``) answer a Deferred of their result: they scan in the
        thread pool."""
        try:
            if type(command) is Get:  # the most common command, without the table lookup
                return self._get(command)
            handler = self._dispatch.get(type(command))
            if handler is None:
                raise TypeError(f"{type(command).__name__} is not run by a backend")
            return handler(command)
        except StorageError as e:
            self._storage_failed(e, type(command).__name__)
            raise
        except StorageFull as e:
            self._counts["outofmemory"] += 1
            if e.detail is not None:  # a full disk (a memory engine at its limit is no failure to log)
                self._storage_failed(e, type(command).__name__)
            raise

    def _storage_failed(self, error: StorageError | StorageFull, what: str) -> None:
        """Log a storage failure with its detail (the client gets the public words only)."""
        self._counts["storage_errors_total"] += 1
        self._log.error("storage failed on {command}: {detail}", command=what, detail=error.detail)

    def stats(self) -> dict[str, Any]:
        """What the engine holds (``keys``; ``curr_items``, ``bytes``, ``limit_maxbytes``, ``evictions`` as
        memcached names them; ``value_bytes``, the values alone), the command counters, ``uptime``."""
        now = self._seconds()
        stats: dict[str, Any] = {"uptime": int(now - self._started), "time": int(now)}
        engine = self.engine.stats()
        stats.update(engine)
        stats["curr_items"] = engine["keys"]
        stats["value_bytes"] = engine["bytes"]
        stats["bytes"] = engine.get("used_bytes", engine["bytes"])
        stats["limit_maxbytes"] = engine.get("limit_bytes", 0)
        for name in ("evictions", "reclaimed"):
            stats[name] = engine.get(name, 0) - self._engine_offsets.get(name, 0)
        stats["limit_item_size"] = self.max_value_size
        stats["leaving"] = int(self.leaving)
        stats.update(self._counts)
        stats["cmd_get"] = stats["get_hits"] + stats["get_misses"]  # counted once per key, not twice
        for source in self.stats_sources:
            stats.update(source())
        return stats

    def reset_stats(self) -> None:
        """``stats reset``: zero the command counters and the engine's eviction counters, as memcached
        resets its own (what the engine holds and the handoff's figures stay)."""
        self._counts = dict.fromkeys(COUNTERS, 0)
        engine = self.engine.stats()
        self._engine_offsets = {name: engine.get(name, 0) for name in ("evictions", "reclaimed")}

    def set_memory_limit(self, limit_bytes: int) -> None:
        """``cache_memlimit``: change a bounded memory engine's limit; ``ValueError`` saying why not when the
        engine has no limit to change (the SQLite engine, a memory engine started without one)."""
        set_limit = getattr(self.engine, "set_limit", None)
        if set_limit is None:
            raise ValueError(f"the {type(self.engine).__name__} has no memory limit")
        try:
            set_limit(limit_bytes)
        except ValueError as e:
            raise ValueError(f"{e}: start the node with --memory-limit") from None

    def stats_extra(self) -> dict[str, Any]:
        """``IServerAdmin``: nothing beyond ``stats()``."""
        return {}

    def settings(self) -> dict[str, Any]:
        """``IServerAdmin``: the engine and its limits, by memcached's names (``maxbytes`` 0: no limit)."""
        engine = self.engine.stats()
        evicts = getattr(self.engine, "evicts", None)
        settings: dict[str, Any] = {
            "maxbytes": engine.get("limit_bytes", 0),
            "evictions": "off" if evicts is False else "on",
            "engine": type(self.engine).__name__,
            "node_id": self.node_id,
        }
        if "disk_limit_bytes" in engine:
            settings["disk_limit_bytes"] = engine["disk_limit_bytes"]
        return settings

    def dump_items(self, limit: int) -> list[tuple[bytes, int, int]]:
        """``IServerAdmin``: up to ``limit`` live items, in ring order (a scan of the first records held)."""
        items: list[tuple[bytes, int, int]] = []
        after: tuple[int, bytes] | None = None
        while len(items) < limit:
            page, after = self.dump_page(after, min(limit * 2, 1000))
            items.extend((key, len(record.value), record.expires_at) for key, record in page)
            if after is None:
                break
        return items[:limit]

    def dump_page(
        self, after: tuple[int, bytes] | None, limit: int
    ) -> tuple[list[tuple[bytes, Record]], tuple[int, bytes] | None]:
        """``IServerAdmin``: the live items of the next ``limit`` records in ring order after ``after``, and
        where the page after it starts (None: the end). A scan of one page on the calling thread: pages are
        small, as the engine's own scan pages are."""
        now = self._seconds()
        page = self.engine.scan(0, HASH_SPACE - 1, after, limit)
        items = [(key, record) for key, record in page if record.live(now)]
        return items, ((key_hash(page[-1][0]), page[-1][0]) if len(page) == limit else None)

    # -- reads ---------------------------------------------------------------------------------------

    def get_one(self, key: bytes) -> tuple[int, bytes] | None:
        """``IPlainGet``: the flags and value of ``key`` when a read sees the record, else None; counted like
        ``execute(Get((key,)))``, without the command and the result."""
        now = self._seconds()
        try:
            found: tuple[int, bytes] | None = self._engine_get_live(key, now)
        except StorageError as e:
            self._storage_failed(e, "Get")
            raise
        if found is None:
            self._missed(key, now)
        else:
            self._counts["get_hits"] += 1
        return found

    def _missed(self, key: bytes, now: float) -> None:
        """Count a get miss, and whether what was there had expired (``get_expired``, as memcached)."""
        counts = self._counts
        counts["get_misses"] += 1
        record = self._engine_get(key)
        if record is not None and not record.tombstone and record.expires_at and record.expires_at <= now:
            counts["get_expired"] += 1

    def _get(self, command: Get) -> Values:
        keys = command.keys
        counts = self._counts
        if len(keys) == 1 and command.exptime is None:  # the hot path: get of one key
            key = keys[0]
            record = self._engine_get(key)
            if record is None or record.tombstone:
                counts["get_misses"] += 1
                return _NO_VALUES
            if record.expires_at and record.expires_at <= self._seconds():
                counts["get_misses"] += 1
                counts["get_expired"] += 1
                return _NO_VALUES
            counts["get_hits"] += 1
            return Values(((key, record),))
        engine_get = self._engine_get
        now = self._seconds()
        items = []
        expired = 0
        for key in command.keys:
            record = engine_get(key)
            if record is None or record.tombstone:
                continue
            if record.expires_at and record.expires_at <= now:
                expired += 1
                continue
            items.append((key, record))
        if command.exptime is None:
            counts["get_hits"] += len(items)
            counts["get_misses"] += len(command.keys) - len(items)
            counts["get_expired"] += expired
        else:  # gat/gats: touch every hit with a new version
            counts["cmd_touch"] += len(command.keys)
            counts["touch_hits"] += len(items)
            counts["touch_misses"] += len(command.keys) - len(items)
            if items:
                if self.leaving:
                    raise NodeLeaving()
                expires_at = expires_at_from_exptime(command.exptime, now)
                touched = []
                for key, record in items:
                    new = Record(record.value, record.flags, expires_at, self._version(record, now), False)
                    self.engine.put(key, new)
                    touched.append((key, new))
                counts["total_items"] += len(touched)
                items = touched
        return Values(tuple(items))

    def _xget(self, command: XGet) -> Values:
        self._counts["cmd_xget"] += 1
        engine_get = self.engine.get
        items = []
        for key in command.keys:
            record = engine_get(key)
            if record is not None:
                items.append((key, record))
        return Values(tuple(items))

    def _xver(self, command: XVer) -> VersionOf:
        self._counts["cmd_xver"] += 1
        record = self._engine_get(command.key)
        return VersionOf(None if record is None else record.version)

    # -- writes --------------------------------------------------------------------------------------

    def _version(self, current: Record | None, now: float) -> Version:
        now_ms = int(now * 1000)
        if current is not None:
            self._hlc.observe(current.version, now_ms)  # a stored version too far ahead is not followed
        return self._hlc.tick(now_ms)

    def _admit(self, version: Version, now_ms: int) -> VersionTooNew | None:
        """None when the clock admits ``version`` (and has observed it); else the error, counted."""
        if self._hlc.observe(version, now_ms):
            return None
        self._counts["versions_refused_total"] += 1
        return VersionTooNew(version, self._hlc.max_skew_ms)

    def _write(self, command: WriteCommand) -> Status | Number:
        if self.leaving:
            raise NodeLeaving()
        key = command.key
        now = self._seconds()
        if type(command) is Store and command.mode == "set":
            # A set does not depend on what is stored: write with a fresh version, and read the stored
            # record only in the rare case that it carries a newer version (from a clock ahead of ours).
            record, result = apply_write(None, command, self._hlc.tick(int(now * 1000)), now, self.max_value_size)
            self._counts["cmd_set"] += 1
            assert record is not None
            try:
                if not self.engine.apply(key, record):
                    record = record.with_version(self._version(self.engine.get(key), now))
                    self.engine.put(key, record)
            except StorageFull:
                self._drop_stale(key, now)
                raise
            self._counts["total_items"] += 1
            return result
        current = self.engine.get(key)
        version = self._version(current, now)
        record, result = apply_write(current, command, version, now, self.max_value_size)
        self._count(command, result)
        if record is not None:
            self.engine.put(key, record)
            if not record.tombstone:
                self._counts["total_items"] += 1
        return result

    def _drop_stale(self, key: bytes, now: float) -> None:
        """A set the engine had no room for: replace the key's old value by a tombstone, as memcached
        unlinks it (a tombstone costs less than the value it replaces, so it fits)."""
        current = self.engine.get(key)
        if current is None or current.tombstone:
            return
        with suppress(StorageFull):
            self.engine.put(key, Record.deleted(self._version(current, now)))

    def _count(self, command: WriteCommand, result: Status | Number) -> None:
        counts = self._counts
        kind = type(command)
        if kind is Store:
            counts["cmd_set"] += 1
            if command.mode == "cas":  # type: ignore[union-attr]  # a Store: ``kind`` does not narrow ``command``
                if result is Status.STORED:
                    counts["cas_hits"] += 1
                elif result is Status.EXISTS:
                    counts["cas_badval"] += 1
                elif result is Status.NOT_FOUND:
                    counts["cas_misses"] += 1
        elif kind is Delete:
            counts["delete_hits" if result is Status.DELETED else "delete_misses"] += 1
        elif kind is Arith:
            prefix = "incr" if command.incr else "decr"  # type: ignore[union-attr]  # an Arith, as above
            counts[prefix + ("_misses" if result is Status.NOT_FOUND else "_hits")] += 1
        else:
            counts["cmd_touch"] += 1
            counts["touch_hits" if result is Status.TOUCHED else "touch_misses"] += 1

    def _flush_all(self, command: FlushAll) -> Status:
        """Forget every record now, or ``delay`` seconds from now (replacing a pending flush)."""
        if self.leaving:
            raise NodeLeaving()
        self._counts["cmd_flush"] += 1
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        now = self._seconds()
        delay = expires_at_from_exptime(command.delay, now) - now if command.delay > 0 else 0
        if delay <= 0:
            self._flush()
        else:
            self._flush_call = self._clock.callLater(delay, self._flush)
        return Status.OK

    def _flush(self) -> None:
        self._flush_call = None
        self.engine.clear()
        self._log.info("flush_all: every record forgotten on {node_id}", node_id=self.node_id)

    def stop(self) -> None:
        """Cancel a pending delayed ``flush_all`` (when the service stops)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    # -- the versioned extension ---------------------------------------------------------------------

    def execute_puts(self, commands: Sequence[XPut]) -> list[Status | DomainError]:
        """``IGroupedPuts``: run several ``XPut`` as one group (``engine.apply_many``: one transaction, a few
        statements): a result or the domain error for each, in order. The line protocol groups the XPuts a
        connection has ready (a handoff pipelines hundreds): one SQLite commit for all of them instead of one
        each, and one query for their stored versions instead of one each. If the group fails, nothing of it
        may be taken as stored, so the error is raised for the caller to answer every command with it. A
        record the engine cannot store (a ``StorageError`` raised before anything is written) sends the group
        through ``apply`` one by one, so that only that command gets the error.
        """
        counts = self._counts
        results: list[Status | DomainError] = []
        items: list[tuple[bytes, Record]] = []
        places: list[int] = []  # where each of items answers in results
        admit = self._admit
        now_ms = int(self._seconds() * 1000)
        for command in commands:
            counts["cmd_xput"] += 1
            if command.handoff:
                counts["handoff_records_received_total"] += 1
            if command.epoch:
                stale = self._stale_copy(command.epoch)
                if stale is not None:
                    results.append(stale)
                    continue
            if command.lease is not None:
                stop = self._store_stop(command.key, command.lease, now_ms / 1000, command.epoch)
                if stop is not None:
                    results.append(stop)
                    continue
            record = command.record
            if len(record.value) > self.max_value_size:
                results.append(ValueTooLarge(len(record.value), self.max_value_size))
                continue
            refused = admit(record.version, now_ms)
            if refused is not None:
                results.append(refused)
                continue
            places.append(len(results))
            results.append(Status.STORED)
            items.append((command.key, record))
        if not items:
            return results
        stored: list[bool | DomainError]
        try:
            try:
                stored = list(self.engine.apply_many(items))
            except StorageError:  # a record it cannot store: find which, one by one, in one transaction
                with self.engine.batch():
                    stored = [self._apply_one(key, record) for key, record in items]
        except StorageFull:
            counts["outofmemory"] += 1
            raise
        except StorageError as e:
            self._storage_failed(e, "XPut")
            raise
        for place, outcome, (key, record) in zip(places, stored, items):
            lease = commands[place].lease
            if lease is not None and (outcome is True or outcome is False):  # taken (see _xput)
                self.leases.release(key, lease.holder)
            if outcome is False:
                results[place] = Status.EXISTS
            elif outcome is not True:
                results[place] = outcome
            elif not record.tombstone:
                counts["total_items"] += 1
        return results

    def _apply_one(self, key: bytes, record: Record) -> bool | DomainError:
        try:
            return bool(self.engine.apply(key, record))
        except StorageError as e:
            self._storage_failed(e, "XPut")
            return e

    def _xput(self, command: XPut) -> Status:
        self._counts["cmd_xput"] += 1
        if command.handoff:
            self._counts["handoff_records_received_total"] += 1
        if command.epoch:
            stale = self._stale_copy(command.epoch)
            if stale is not None:
                raise stale
        if command.lease is not None:
            stop = self._store_stop(command.key, command.lease, self._seconds(), command.epoch)
            if stop is not None:
                raise stop
        record = command.record
        if len(record.value) > self.max_value_size:
            raise ValueTooLarge(len(record.value), self.max_value_size)
        refused = self._admit(record.version, int(self._seconds() * 1000))
        if refused is not None:
            raise refused
        stored = self.engine.apply(command.key, record)
        if command.lease is not None:  # the copy is taken (stored, or a newer record is): its lease here ends
            self.leases.release(command.key, command.lease.holder)
        if not stored:
            return Status.EXISTS
        if not record.tombstone:
            self._counts["total_items"] += 1
        return Status.STORED

    def _xbulk(self, command: XBulk) -> Bulked:
        """A page of records (``chashd.bulk``) kept where newer than the stored ones, in one grouped write
        (``engine.apply_rows``: one transaction, committed before the answer leaves, so that an answered page
        is durable here). The whole page is refused (``CLIENT_ERROR``) when it does not decode, or when its
        newest version is further ahead of this node's clock than the skew allows: the sender then pushes
        it record by record (``xmove``), which tells the records refused from the others. Taken while the
        node drains, as ``xmove`` is."""
        counts = self._counts
        counts["cmd_xbulk"] += 1
        try:
            rows = decode_rows(command.block, command.count, self.max_value_size)
        except BulkError as e:
            raise BadCommand(f"bad bulk page: {e}") from None
        if not rows:
            return Bulked(0, 0)
        counts["handoff_records_received_total"] += len(rows)
        clock = max([row[4] for row in rows])  # the newest version, without a tuple per row
        writer = max([row[5] for row in rows if row[4] == clock])
        refused = self._admit(Version(clock, writer), int(self._seconds() * 1000))
        if refused is not None:
            raise refused
        stored = self.engine.apply_rows(rows)
        kept = stored.count(False)
        if kept:
            items = sum(1 for row, done in zip(rows, stored) if done and not row[6])
        else:
            items = [row[6] for row in rows].count(0)
        counts["total_items"] += items
        return Bulked(len(rows) - kept, kept)

    def _bulk_probe(self, command: BulkProbe) -> BulkFormat:
        """The bulk page format this node reads (a server of an earlier version answers ``ERROR``)."""
        return BulkFormat(BULK_FORMAT)

    def _xepoch(self, command: XEpoch) -> Status:
        self._counts["cmd_xepoch"] += 1
        self.know_epoch(command.epoch)
        self.on_epoch(command.epoch)
        return Status.OK

    def _xmap(self, command: XMap) -> Status:
        self._counts["cmd_xmap"] += 1
        self.know_epoch(command.epoch)
        return Status.OK

    def _xfence(self, command: XFence) -> Status:
        """The parser stamped the epoch on the next ``xput`` (``XPut.epoch``): nothing else to do here."""
        self._counts["cmd_xfence"] += 1
        return Status.OK

    def _stale_copy(self, epoch: int) -> StaleMap | None:
        """The refusal of a read-modify-write's copy run by the map of ``epoch``, when this node knows a newer
        one (its primary may not be the current map's: another primary may answer the same command), else
        None (and the epoch is known from now on)."""
        if epoch < self.map_epoch:
            self._counts["xput_stale_map"] += 1
            return StaleMap(epoch, self.map_epoch)
        self.map_epoch = epoch
        return None

    def _xlease(self, command: XLease) -> Values:
        """``XGet`` of one key that also leases it to the command (``chashd.leases``); ``KeyLeased`` while
        another command's conflicting lease lasts (nothing leased)."""
        counts = self._counts
        counts["cmd_xlease"] += 1
        lease = command.lease
        now = self._seconds()
        if lease.deadline > (now + MAX_LEASE + CLOCK_BOUND) * 1000:
            raise BadCommand(f"a deadline is at most {MAX_LEASE:g}s ahead")
        refused = self.leases.request(
            command.key, lease.holder, lease.deadline / 1000, lease.exclusive, now, command.epoch
        )
        if refused is not None:
            counts["xlease_refused_total"] += 1
            raise KeyLeased(_ms(refused))
        record = self._engine_get(command.key)
        return Values(((command.key, record),)) if record is not None else Values(())

    def _xdeadline(self, command: XDeadline) -> Status:
        """The parser stamped the lease on the next ``xapply`` or ``xput``: nothing else to do here."""
        self._counts["cmd_xdeadline"] += 1
        return Status.OK

    def _xrelease(self, command: XRelease) -> Status:
        """The read-modify-write ``holder`` is over: its lease on the key ends (``LeaseTable.release``)."""
        self._counts["cmd_xrelease"] += 1
        floor = command.floor / 1000 if command.floor else None
        self.leases.release(command.key, command.holder, floor, command.deadline / 1000)
        return Status.OK

    def _store_stop(self, key: bytes, lease: Lease, now: float, epoch: int) -> DomainError | None:
        """Why a store of ``lease``'s round, run by the map of ``epoch``, may not go on (past its deadline, or
        a conflicting lease), else None; counted."""
        if now * 1000 > lease.deadline:
            self._counts["rmw_deadline_refused_total"] += 1
            return DeadlinePassed(lease.deadline)
        refused = self.leases.conflict(key, lease.holder, lease.exclusive, now, epoch)
        if refused is not None:
            self._counts["xlease_refused_total"] += 1
            return KeyLeased(_ms(refused))
        return None

    def know_epoch(self, epoch: int) -> None:
        """A cluster map of ``epoch`` exists (the ring watch brought it, a gateway or a handoff named it):
        read-modify-writes of older maps are refused from now on."""
        self.map_epoch = max(self.map_epoch, epoch)

    def _xdigest(self, command: XDigest) -> Result:
        self._counts["cmd_xdigest"] += 1
        if self.ranges is None:
            raise ServiceUnavailable("this node does not serve anti-entropy")
        return cast(Result, self.ranges.digest(command))  # a Deferred: the server waits for it

    def _xlist(self, command: XList) -> Result:
        self._counts["cmd_xlist"] += 1
        if self.ranges is None:
            raise ServiceUnavailable("this node does not serve anti-entropy")
        return cast(Result, self.ranges.list_keys(command))

    def _xapply(self, command: XApply) -> XApplied:
        """Run the write with the caller's version, on top of the stored record. A stored record as new as
        that version or newer raises ``StaleVersion`` with the stored version: another write got here first
        (the gateway moves its clock past it and sends the command again), or this is a request the gateway
        gave up on (this node was paused: applied now, it would undo the writes acknowledged since)."""
        if self.leaving:
            raise NodeLeaving()
        self._counts["cmd_xapply"] += 1
        if command.epoch and command.epoch < self.map_epoch:  # its gateway's primary may not be the current one
            self._counts["xapply_stale_map"] += 1
            raise StaleMap(command.epoch, self.map_epoch)
        now = self._seconds()
        now_ms = int(now * 1000)
        version = command.version
        refused = self._admit(version, now_ms)
        if refused is not None:
            raise refused
        write = command.command
        if command.lease is not None:
            lease = command.lease
            if version.millis > lease.deadline:  # a version the command that comes next may not pass
                self._counts["rmw_deadline_refused_total"] += 1
                raise DeadlinePassed(lease.deadline, f": the version {version} is past it (clocks too far apart)")
            stop = self._store_stop(write.key, lease, now, command.epoch)
            if stop is not None:
                raise stop
        current = self.engine.get(write.key)
        if current is not None and current.version >= version:
            self._counts["xapply_stale"] += 1
            raise StaleVersion(current.version)
        self._hlc.observe(version, now_ms)
        record, result = apply_write(current, write, version, now, self.max_value_size)
        self._count(write, result)
        if record is not None:
            self.engine.put(write.key, record)
            if not record.tombstone:
                self._counts["total_items"] += 1
        if command.lease is not None:  # its command ran: its lease here ends
            self.leases.release(write.key, command.lease.holder)
        return XApplied(result, record)


def _ms(seconds: float) -> int:
    """Unix milliseconds, rounded up: a time to wait until."""
    return -int(-seconds * 1000 // 1)
