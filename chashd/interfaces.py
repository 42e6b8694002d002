# -*- test-case-name: tests.unit.test_storage,tests.unit.test_kvstore_backend -*-
"""The interfaces that keep the layers apart.

- ``IStorageEngine``: a kvstore's synchronous store of records (``MemoryEngine``, ``SQLiteEngine``).
- ``IKeyValue``: a role's backend behind both surfaces (the kvstore's local backend, the gateway's router).
- ``IPlainGet``, ``IGroupedPuts``, ``IForwardedGet``: what a backend may offer besides ``IKeyValue`` for the
  line protocol's busiest requests (the kvstore's the first two, the gateway's router the third). The line
  protocol asks ``providedBy`` once, when its factory is built, and takes the general path without them.
- ``IServerAdmin``: what a role says and does for memcached's admin commands (``stats`` groups, ``stats
  reset``, ``cache_memlimit``, ``stats cachedump``): the kvstore's local backend provides it, and the gateway
  an adapter over its router and the cluster's figures. The line protocol asks once, as for the two above.
- ``IKVClient``: the gateway's (and the handoff's) way to send commands to one kvstore.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zope.interface import Attribute, Interface

from chashd.commands import Status, XPut
from chashd.errors import DomainError
from chashd.record import Record

__all__ = [
    "IForwardedGet",
    "IForwardedSet",
    "IGroupedPuts",
    "IKVClient",
    "IKeyValue",
    "IPlainGet",
    "IReplySink",
    "IServerAdmin",
    "IStorageEngine",
]


class IStorageEngine(Interface):
    """Records by key, ordered by (ring hash, key) so that a hash range is one range scan.

    Synchronous and fast: a point read or write costs microseconds. Engines do not resolve versions
    themselves except in ``apply``; they never read a clock (time comes in as ``now``).
    """

    def get(key: bytes) -> Any:
        """The stored ``Record`` for ``key`` (tombstones and expired records included), or None."""

    def get_live(key: bytes, now: float) -> Any:
        """``(flags, value)`` of the record for ``key`` when a read at ``now`` sees it (not a tombstone,
        not expired), else None: ``get`` for the line protocol's plain gets, without making a ``Record``."""

    def put(key: bytes, record: Any) -> None:
        """Store ``record`` for ``key``, replacing what is there (the caller decided it wins)."""

    def apply(key: bytes, record: Any) -> bool:
        """Store ``record`` only if its version is higher than the stored one; True if stored."""

    def apply_many(items: Any) -> list[bool]:
        """``apply`` each ``(key, Record)`` pair in order, as one group (one transaction where the engine
        has them; joining an open ``batch()``); True for each record stored. For bulk writers (the handoff
        receiver): a few statements for the group instead of a read and a write per record. Raises
        ``StorageError`` before storing anything when a record cannot be stored."""

    def remove(key: bytes) -> None:
        """Forget ``key`` entirely (after a handoff, or a purge)."""

    def remove_many_if(items: Any) -> list[bool]:
        """Compare-and-remove: forget each key of the ``(key, Version)`` pairs whose stored version is still
        that version, as one group; True for each key forgotten. The handoff's drop of what it pushed: a
        record rewritten since it was pushed stays."""

    def remove_rows_if(rows: Any) -> int:
        """``remove_many_if`` of the records of ``chashd.bulk.BulkRow`` tuples (a page the handoff pushed),
        as one group; the number forgotten."""

    def remove_run_if(first: bytes, last: bytes, digest: bytes) -> int:
        """Forget the run of records from ``first`` to ``last`` (both included, in (hash, key) order) if it
        still holds exactly the rows whose ``chashd.bulk.run_digest`` is ``digest`` (no record rewritten, added
        or removed since), as one group; the number forgotten: all of the run's records, or 0. The handoff's
        drop of a run it pushed earlier and kept only the digest of."""

    def scan(first_hash: int, last_hash: int, after: Any = None, limit: int = 1000) -> list[Any]:
        """Up to ``limit`` ``(key, Record)`` pairs with ``first_hash <= key_hash(key) <= last_hash``,
        in (hash, key) order, starting after the ``(hash, key)`` position ``after`` (None: from the start).
        Callers page through a range with the position of the last pair they got."""

    def scan_rows(first_hash: int, last_hash: int, after: Any = None, limit: int = 1000) -> list[Any]:
        """``scan``, with each record as the ``chashd.bulk.BulkRow`` tuple ``(key, value, flags, expires_at,
        clock, writer, tombstone)`` straight from the engine's rows: what the handoff encodes into a page."""

    def apply_rows(rows: Any) -> list[bool]:
        """``apply_many`` of ``chashd.bulk.BulkRow`` tuples (a page the handoff received), without making a
        ``Record`` of each: one group, committed when this returns; True for each row stored (the others were
        not newer than the stored record)."""

    def scan_versions(first_hash: int, last_hash: int, after: Any = None, limit: int = 1000) -> list[Any]:
        """``scan``'s pages as ``(hash, key, Version)`` triples, without the values (anti-entropy)."""

    def purge(now: float, tombstone_grace: float) -> int:
        """Forget expired records and tombstones older than the grace period; the number forgotten."""

    def clear() -> None:
        """Forget every record (``flush_all``)."""

    def stats() -> dict[str, int]:
        """At least ``keys`` (live and dead records held) and ``bytes`` (value bytes held)."""

    def batch() -> Any:
        """A context manager that groups writes into one commit: ``with engine.batch(): engine.apply(...)``.

        For the handoff receiver and other bulk writers: SQLite then commits once per batch instead of once
        per write (several times the write rate). Writes in the block are committed when it ends; if it
        raises, SQLite rolls them back (memory keeps those made), so the caller retries the batch (``apply``
        is idempotent). Other threads' writes wait while a batch is open: keep it short, never wait on
        the reactor inside it.
        """

    def close() -> None:
        """Flush and release files. The engine is unusable afterwards."""


class IKeyValue(Interface):
    """A role's backend: runs the commands of ``chashd.commands``.

    ``execute`` returns a result at once when it can (the kvstore) or a Deferred that fires with one
    (the gateway); faults are raised, or the Deferred fails, with the errors of ``chashd.errors``.
    """

    name = Attribute("The role and id, e.g. 'kvstore kvstore-A', for stats and logs.")

    def execute(command: Any) -> Any:
        """Run ``command``: a result, or a Deferred of one."""

    def stats() -> dict[str, Any]:
        """Counters and gauges for ``stats`` and ``GET /stats``: at least ``keys`` and ``bytes``."""


class IPlainGet(Interface):
    """Optional beside ``IKeyValue``: a ``get`` of one key answered without command and result objects.

    Only for a backend that answers at once (no Deferred): the line protocol replies to ``get <key>``
    with what ``get_one`` returns. Counters and errors are those of ``execute(Get((key,)))``.
    """

    def get_one(key: bytes) -> tuple[int, bytes] | None:
        """``(flags, value)`` of ``key`` when a read now sees it (not a tombstone, not expired), else None."""


class IReplySink(Interface):
    """Where the reply to a forwarded ``get`` (or the result of a command ``IKVClient.send_to`` sent) goes,
    in place of a Deferred: one of the two methods is called, once. A kvstore connection skips a sink whose
    ``called`` is set (its reader gave up on it)."""

    called = Attribute("True once the sink took its reply, or when its reader no longer wants it.")

    def callback(reply: Any) -> None:
        """The reply's bytes as memcached words them (``END``, or one ``VALUE`` block and ``END``), or the
        result of the command ``send_to`` sent."""

    def errback(error: Any) -> None:
        """The request failed: ``error`` is an exception (a domain error) or a ``Failure`` of one."""


class IForwardedGet(Interface):
    """Optional beside ``IKeyValue``, for a backend that answers later (the gateway's router): a ``get`` of
    one key whose reply comes as bytes to an ``IReplySink``, without command, result or Deferred.

    The line protocol offers it every plain ``get <key>``. Counters, errors and the reply are those of
    ``execute(Get((key,)))``; where the shortcut does not apply the backend declines and the protocol takes
    the general path.
    """

    forwarding = Attribute("False while the backend declines every get (the line protocol does not ask).")

    def forward_get(key: bytes, sink: IReplySink) -> bool:
        """Take the get of ``key`` (True), its reply to come to ``sink``; or decline it (False) and do
        nothing."""


class IForwardedSet(Interface):
    """Optional beside ``IKeyValue``, for a backend that answers later (the gateway's router): a ``set``
    (``Store`` of mode ``set``) whose result comes to an ``IReplySink``, without a Deferred.

    The line protocol offers it every ``set`` once the set may run (after the reads and writes of its key it
    waits for). Counters, errors and the result (``Status``) are those of ``execute(command)``; where the
    shortcut does not apply the backend declines and the protocol takes the general path.
    """

    def forward_set(command: Any, sink: IReplySink) -> bool:
        """Take the set (True), its result or error to come to ``sink``; or decline it (False) and do
        nothing."""


class IGroupedPuts(Interface):
    """Optional beside ``IKeyValue``: several ``XPut`` commands run as one group.

    For a backend that answers at once and stores a group at less than the cost of its parts (one
    transaction): the line protocol hands it the consecutive XPuts it has parsed (a handoff pipelines
    hundreds).
    """

    def execute_puts(commands: Sequence[XPut]) -> list[Status | DomainError]:
        """The result (``Status``) or the domain error (a ``DomainError``, returned, not raised) of each
        ``XPut`` in ``commands``, in order. Raises a ``DomainError`` when the group as a whole failed:
        then none of it may be taken as stored."""


class IServerAdmin(Interface):
    """A role's side of memcached's admin commands, which the line protocol answers."""

    def stats_extra() -> dict[str, Any]:
        """More ``stats`` figures beyond the backend's (a gateway: the cluster's totals)."""

    def settings() -> dict[str, Any]:
        """``stats settings`` figures of the role, memcached's names where memcached has them."""

    def reset_stats() -> None:
        """``stats reset``: zero the counters memcached resets (what is held stays)."""

    def set_memory_limit(limit_bytes: int) -> None:
        """``cache_memlimit``: change the memory limit, or raise ``ValueError`` saying why it cannot."""

    def dump_items(limit: int) -> list[tuple[bytes, int, int]]:
        """``stats cachedump``: up to ``limit`` live items as ``(key, value size, expires_at)``."""

    def dump_page(after: tuple[int, bytes] | None, limit: int) -> tuple[list[tuple[bytes, Record]], Any]:
        """``lru_crawler metadump``: the live items of the next page of at most ``limit`` records held, in ring
        order after the position ``after`` (None: from the start), and the position the page after it starts
        from (None: there is none)."""


class IKVClient(Interface):
    """Sends commands of ``chashd.commands`` to one kvstore and returns its answers."""

    def send(command: Any) -> Any:
        """A Deferred firing with the kvstore's result for ``command``, or failing with a domain error
        (the kvstore's own error) or a connection/timeout error."""

    def send_to(command: Any, sink: IReplySink) -> bool:
        """``send`` over a connection that is up now, the result to ``sink.callback`` (in place of a
        Deferred's); False, and nothing sent, when no connection is up."""

    def forward_get(key: bytes, sink: IReplySink) -> bool:
        """Send ``get <key>`` over a connection that is up now, its reply's bytes to go to ``sink`` (or the
        error ``send`` would fail with); False, and nothing sent, when no connection is up."""
