"""Anti-entropy: the replicas of each arc compare digests and exchange only what differs.

Every ``interval`` seconds (and a few seconds after the ring shows a node back up), a kvstore makes a *pass*
over the ring its data conforms to (the handoff's ``synced``; no pass while a handoff is under way): for
each other node it shares arcs with (``shared_ranges``: the arcs whose preference list holds both, adjacent
ones merged), it compares every shared range with that peer:

- both sides compute the digest of ``parts`` (64) equal sub-ranges of the range (``chashd.digests``: the
  number of records and the sum of their ``(key, version)`` fingerprints), this node from its engine's
  ``scan_versions`` pages in the thread pool, the peer the same way when asked ``XDigest``;
- a sub-range whose digests are equal holds the same records on both: done. One that differs is compared
  the same way, cut into as many parts as make pieces of about ``leaf`` (2,000) records, down to sub-ranges
  of at most ``leaf`` records on either side (a difference costs two or three scans of its range, and so
  do differences spread over the whole range: a node that missed many writes);
- there, both sides list ``(hash, key, version)`` (``XList``), and this node pushes what the peer lacks or
  holds older (``XPut`` of its records) and pulls what the peer holds newer or this node lacks (``XGet``,
  then stored through the backend's ``execute_puts``, which keeps the newer version and checks the
  versions' bounds). Versions decide, as everywhere: pushing or pulling a record twice is harmless.

Of two nodes, the one with the smaller id starts the comparison (the other answers); a node that has not
heard from a smaller peer for ``2 * interval`` starts it too, so a pair is compared while either side runs.
A peer whose data conforms to another placement, or that hands off, refuses (``SERVER_ERROR not synced
to placement ...``): the pass is then incomplete, and the next one comes sooner. The placement is named
by ``placement_id`` (a digest of the ring's nodes, weights and points, and N: the same for every epoch of
one placement).

Cost: scanning dominates (``scan_versions`` pages, a CRC per record), in the thread pool a page at a time
(a range's digests serve again for ``reuse_digests`` seconds: the same ranges shared with several peers),
and every page this node scans, to start a comparison or to answer one, takes ``page_size`` tokens from a
bucket refilled at ``rate`` keys a second (one second's worth at most): a full pass over ``K`` records
shared with ``P`` peers scans about ``2 * K`` of this node's records when it starts every comparison (its
own side, and digests it answers), which bounds it to about ``2 * K / rate`` seconds of scanning, spread out.
Exchanges read and write at most a few ``leaf`` records at a time on the reactor thread.

``stats()`` (``/metrics``): ``antientropy_arcs_compared_total`` (shared ranges compared with a peer to the
end), ``antientropy_keys_compared_total`` (records this node scanned to start comparisons),
``antientropy_keys_scanned_total`` (every record scanned, answers to peers included),
``antientropy_keys_repaired_total`` (records a peer stored from this node's push, or this node stored
from its pull), ``antientropy_passes_total``, ``antientropy_last_full_pass`` (the Unix time at the end of
the last pass that compared every shared range with every peer it starts comparisons with; 0: none yet)
``antientropy_last_pass_seconds``, and ``antientropy_cpu_seconds_total``: the CPU time of this node's
scans for anti-entropy (in the thread pool, its own side and its answers to peers) and of its comparisons,
pushes and pulls (on the reactor thread), read with ``time.thread_time`` around each piece of work, so that
the CPU a key compared costs can be read off a running node (``cpu_seconds / keys_compared``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.commands import Command, Digests, KeyVersions, Result, Status, Values, XDigest, XGet, XList, XPut
from chashd.digests import MAX_PARTS, RangeDigest, compare_versions, digest_parts, split_range
from chashd.errors import DomainError, ServiceUnavailable
from chashd.interfaces import IStorageEngine
from chashd.kvstore.placement import RingUpdate
from chashd.node import NodeInfo, NodeState
from chashd.record import Record
from chashd.ring import HashRing, moved_arcs
from chashd.versions import Version

__all__ = ["AntiEntropy", "NotSynced", "placement_id", "shared_ranges"]

#: ``(hash, key, version)`` of a record, as ``scan_versions`` gives them.
Entry = tuple[int, bytes, Version]


class Peer(Protocol):
    """A connection to a peer node (a ``KVClientPool`` in production): a service (its parent is the
    anti-entropy service) that sends commands."""

    def send(self, command: Command) -> Deferred[Result]:
        """The result, or a failure with the peer's error."""

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Result | Failure]]:
        """Each command's result, or the ``Failure`` of its error, in order."""

    def setServiceParent(self, parent: IServiceCollection) -> object:
        """Start with the anti-entropy service."""

    def disownServiceParent(self) -> object:
        """Stop and close the connection."""


#: ``connect(host, line_port)``: a new (not started) connection to a peer.
Connect = Callable[[str, int], Peer]
#: ``run_in_pool(fn, *args)``: run blocking work in the node's thread pool.
RunInPool = Callable[..., Deferred[Any]]


class Synced(Protocol):
    """What anti-entropy needs of the handoff: the ring the data conforms to, and whether it moves."""

    @property
    def synced(self) -> RingUpdate | None:
        """The ring this node's data conforms to."""

    @property
    def running_handoff(self) -> bool:
        """True while the data moves toward another ring."""


class NotSynced(ServiceUnavailable):
    """This node's data does not conform to the placement a peer compares (another ring, or a handoff)."""

    def __init__(self, placement: str) -> None:
        super().__init__(f"not synced to placement {placement}")


def placement_id(update: RingUpdate) -> str:
    """A name for ``update``'s placement: 16 hex digits of a digest of its nodes and weights, its points per
    node and its N (not its epoch: every epoch of one placement has the same name)."""
    ring = update.ring.to_dict()
    body = {
        "nodes": sorted((node["id"], node["weight"]) for node in ring["nodes"]),
        "points_per_node": ring["points_per_node"],
        "replicas": update.replicas,
    }
    return hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def shared_ranges(update: RingUpdate, node_id: str) -> dict[str, list[tuple[int, int]]]:
    """For each other node whose arcs' preference lists include ``node_id`` too in ``update``'s ring, the hash
    ranges they share, adjacent arcs merged, in hash order. Pure; runs in the thread pool."""
    ring = update.ring
    if not len(ring):
        return {}
    nobody = HashRing({}, epoch=0, points_per_node=ring.points_per_node)
    n = max(1, min(update.replicas, len(ring)))
    shared: dict[str, list[tuple[int, int]]] = {}
    for arc in moved_arcs(nobody, ring, n):
        if node_id not in arc.new:
            continue
        for peer in arc.new:
            if peer == node_id:
                continue
            ranges = shared.setdefault(peer, [])
            if ranges and ranges[-1][1] + 1 == arc.start:
                ranges[-1] = (ranges[-1][0], arc.end)
            else:
                ranges.append((arc.start, arc.end))
    return shared


def _scan_digests(
    engine: IStorageEngine, first: int, last: int, parts: int, after: tuple[int, bytes] | None, limit: int
) -> tuple[list[RangeDigest], int, tuple[int, bytes] | None]:
    """One page of a range's digests, in the thread pool: the digests of the page's records per sub-range,
    how many records it read, and the position after its last (None: the range is done)."""
    entries: list[Entry] = engine.scan_versions(first, last, after, limit)
    digests = digest_parts(entries, first, last, parts)
    following = (entries[-1][0], entries[-1][1]) if len(entries) == limit else None
    return digests, len(entries), following


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the CPU time the calling thread spent in it (in the thread pool)."""
    started = time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - started


class _Stop(Exception):
    """The service stops, or the ring this pass compares is not the one the data conforms to any more."""


class _Rate:
    """A bucket of tokens (records to scan) refilled at ``rate`` a second, holding one second's worth at most."""

    def __init__(self, clock: IReactorTime, rate: float) -> None:
        self._clock = clock
        self.rate = rate
        self._tokens = rate
        self._at = clock.seconds()

    def take(self, count: int) -> float:
        """Take ``count`` tokens; the seconds to wait before the work they pay for (0: at once)."""
        now = self._clock.seconds()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= count
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@dataclass
class _PeerConnection:
    address: tuple[str, int]
    service: Peer


class AntiEntropy(MultiService):
    """Compares this node's data with its peers' and repairs both sides (see the module docstring).

    ``handoff`` tells the ring the data conforms to; ``store`` stores pulled records (the backend's
    ``execute_puts``); ``connect(host, line_port)`` makes the connection to a peer; ``run_in_pool`` runs the
    scans in the node's thread pool. ``interval`` is the time between passes (0: no pass of its own; it still
    answers its peers), ``rate`` the records a second it scans at most.
    """

    _log = Logger()
    #: Sub-ranges of a shared range's first digest; records up to which a sub-range is listed rather than cut
    #: again (a sub-range that differs is cut into as many parts as make pieces of about that size, at most
    #: ``MAX_PARTS``); records per scan page and per ``XList`` page.
    parts = 64
    leaf = 2000
    page_size = 200
    list_size = 2000
    #: Seconds a digest this node computed serves again for the same range (a node shares the same ranges
    #: with several peers, which ask for them in the same pass).
    reuse_digests = 10.0
    #: Seconds after the start of the service, and after a ring shows a node back up, before a pass.
    first_delay = 5.0
    kick_delay = 2.0

    def __init__(
        self,
        node_id: str,
        engine: IStorageEngine,
        handoff: Synced,
        store: Callable[[Sequence[XPut]], Sequence[Status | DomainError]],
        run_in_pool: RunInPool,
        clock: IReactorTime,
        connect: Connect,
        interval: float = 60.0,
        rate: float = 20_000.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.node_id = node_id
        self._engine = engine
        self._handoff = handoff
        self._store = store
        self._run_in_pool = run_in_pool
        self._clock = clock
        self.connect = connect
        self.interval = interval
        self._rate = _Rate(clock, rate)
        self._rng = rng or random.Random()
        self._peers: dict[str, _PeerConnection] = {}
        self._heard_from: dict[str, float] = {}
        self._started = clock.seconds()
        self._call: IDelayedCall | None = None
        self._busy = False
        self._sleeps: set[Deferred[None]] = set()
        self._placements: tuple[RingUpdate | None, str] = (None, "")
        self._recent: dict[tuple[int, int, int], tuple[float, list[RangeDigest]]] = {}
        self._ring: RingUpdate | None = None
        # Progress.
        self.passes = 0
        self.arcs_compared = 0
        self.ranges_compared = 0
        self.keys_compared = 0
        self.keys_scanned = 0
        self.keys_pushed = 0
        self.keys_pulled = 0
        self.last_full_pass = 0.0
        self.cpu_seconds = 0.0
        self.last_pass_seconds = 0.0

    # -- life -------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._started = self._clock.seconds()
        if self.interval > 0:
            self._schedule(self.first_delay * (0.5 + self._rng.random()))

    def stopService(self) -> Deferred[None]:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for sleep in list(self._sleeps):
            sleep.cancel()
        self._peers.clear()
        stopped: Deferred[None] = super().stopService()  # stops the connections
        return stopped

    def ring_changed(self, update: RingUpdate) -> None:
        """A newer ring: close the connections to peers that left or moved; when a node is back up (or new),
        the next pass comes in ``kick_delay`` seconds."""
        previous, self._ring = self._ring, update
        for node_id in list(self._peers):
            address = update.nodes.get(node_id)
            connection = self._peers[node_id]
            if address is None or (address.host, address.line_port) != connection.address:
                del self._peers[node_id]
                connection.service.disownServiceParent()
        if previous is None or self.interval <= 0:
            return
        for node_id, address in update.nodes.items():
            before = previous.nodes.get(node_id)
            if address.state == NodeState.UP and (before is None or before.state != NodeState.UP):
                self._schedule(self.kick_delay)
                return

    def _schedule(self, delay: float) -> None:
        """The next pass in ``delay`` seconds, unless one is due sooner."""
        if not self.running:
            return
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self._clock.seconds() + delay:
                return
            self._call.cancel()
        self._call = self._clock.callLater(delay, self._start_pass)

    def _start_pass(self) -> None:
        self._call = None
        if self._busy or not self.running:
            return
        self._busy = True
        Deferred.fromCoroutine(self._pass()).addErrback(self._pass_failed).addBoth(self._pass_over)

    def _pass_failed(self, failure: Failure) -> bool:
        if not failure.check(_Stop, CancelledError):
            self._log.failure("an anti-entropy pass failed", failure)
        return False

    def _pass_over(self, complete: bool | Failure) -> None:
        self._busy = False
        if self.interval > 0:
            self._schedule(self.interval if complete is True else min(self.interval, self.first_delay))

    # -- the side that answers ----------------------------------------------------------------------

    def _placement(self) -> str | None:
        """The placement id of the ring the data conforms to, None while a handoff runs or before a ring."""
        synced = self._handoff.synced
        if synced is None or self._handoff.running_handoff:
            return None
        cached, name = self._placements
        if cached is not synced:
            name = placement_id(synced)
            self._placements = (synced, name)
        return name

    def digest(self, command: XDigest) -> Deferred[Digests]:
        """Answer a peer's ``XDigest``."""
        if command.sender:
            self._heard_from[command.sender] = self._clock.seconds()
        return Deferred.fromCoroutine(self._answer_digest(command))

    async def _answer_digest(self, command: XDigest) -> Digests:
        if self._placement() != command.placement:
            raise NotSynced(command.placement)
        digests = await self._digests(command.first, command.last, command.parts)
        return Digests(tuple(digests))

    def list_keys(self, command: XList) -> Deferred[KeyVersions]:
        """Answer a peer's ``XList``."""
        return Deferred.fromCoroutine(self._answer_list(command))

    async def _answer_list(self, command: XList) -> KeyVersions:
        if self._placement() != command.placement:
            raise NotSynced(command.placement)
        await self._pace(command.limit)
        entries, cpu = await self._run_in_pool(
            _timed, self._engine.scan_versions, command.first, command.last, command.after, command.limit
        )
        self.cpu_seconds += cpu
        self.keys_scanned += len(entries)
        return KeyVersions(tuple(entries))

    # -- scanning ---------------------------------------------------------------------------------

    async def _pace(self, count: int) -> None:
        """Wait until ``count`` records may be scanned (the rate limit); ``_Stop`` when the service stops."""
        delay = self._rate.take(count)
        if delay <= 0:
            return
        sleep: Deferred[None] = deferLater(self._clock, delay)
        self._sleeps.add(sleep)
        try:
            await sleep
        except CancelledError:
            raise _Stop() from None
        finally:
            self._sleeps.discard(sleep)

    async def _digests(self, first: int, last: int, parts: int) -> list[RangeDigest]:
        """This node's digests of ``parts`` sub-ranges of ``[first, last]``, scanned a page at a time, or the
        same digests computed less than ``reuse_digests`` seconds ago. A digest a little out of date is
        harmless: a difference it shows is listed afresh, one it hides shows in the next pass."""
        now = self._clock.seconds()
        self._recent = {k: v for k, v in self._recent.items() if v[0] > now - self.reuse_digests}
        recent = self._recent.get((first, last, parts))
        if recent is not None:
            return recent[1]
        digests = await self._scan_digests(first, last, parts)
        self._recent[(first, last, parts)] = (self._clock.seconds(), digests)
        return digests

    async def _scan_digests(self, first: int, last: int, parts: int) -> list[RangeDigest]:
        totals = [RangeDigest()] * len(split_range(first, last, parts))
        after: tuple[int, bytes] | None = None
        while True:
            await self._pace(self.page_size)
            (page, count, after), cpu = await self._run_in_pool(
                _timed, _scan_digests, self._engine, first, last, parts, after, self.page_size
            )
            self.cpu_seconds += cpu
            self.keys_scanned += count
            totals = [total.add(part) for total, part in zip(totals, page)]
            if after is None:
                return totals

    async def _entries(self, first: int, last: int) -> list[Entry]:
        """This node's ``(hash, key, version)`` in ``[first, last]``."""
        found: list[Entry] = []
        after: tuple[int, bytes] | None = None
        while True:
            await self._pace(self.page_size)
            page, cpu = await self._run_in_pool(_timed, self._engine.scan_versions, first, last, after, self.page_size)
            self.cpu_seconds += cpu
            self.keys_scanned += len(page)
            found.extend(page)
            if len(page) < self.page_size:
                return found
            after = (page[-1][0], page[-1][1])

    # -- a pass -----------------------------------------------------------------------------------

    def _initiates(self, peer: str) -> bool:
        """True when this node starts the comparisons with ``peer``: the smaller id does, and the other one
        when the smaller has not asked for ``2 * interval`` seconds."""
        if self.node_id < peer:
            return True
        heard = self._heard_from.get(peer, self._started)
        return self._clock.seconds() - heard > 2 * max(self.interval, self.first_delay)

    def _check(self, synced: RingUpdate) -> None:
        if not self.running or self._handoff.synced is not synced and not self._same(synced):
            raise _Stop()

    def _same(self, synced: RingUpdate) -> bool:
        current = self._handoff.synced
        return current is not None and not self._handoff.running_handoff and current.same_placement(synced)

    async def _pass(self) -> bool:
        """One pass over every range shared with a peer this node starts comparisons with; True when every
        one was compared to the end."""
        synced = self._handoff.synced
        if synced is None or self._handoff.running_handoff:
            return False
        started = self._clock.seconds()
        placement = placement_id(synced)
        shared: dict[str, list[tuple[int, int]]] = await self._run_in_pool(shared_ranges, synced, self.node_id)
        complete = True
        pushed, pulled = self.keys_pushed, self.keys_pulled
        for peer_id in sorted(shared):
            if not self._initiates(peer_id):
                continue
            self._check(synced)
            address = synced.nodes.get(peer_id)
            if address is None or address.state != NodeState.UP:
                complete = False
                continue
            peer = self._peer(address)
            try:
                for first, last in shared[peer_id]:
                    await self._compare(peer, placement, synced, first, last)
                    self.arcs_compared += 1
            except _Stop:
                raise
            except Exception as e:
                complete = False
                self._log.info(
                    "anti-entropy with {peer} stopped: {error}", peer=peer_id, error=str(e) or type(e).__name__
                )
        self.passes += 1
        self.last_pass_seconds = self._clock.seconds() - started
        repaired = self.keys_pushed - pushed + self.keys_pulled - pulled
        if complete:
            self.last_full_pass = self._clock.seconds()
        if repaired or not complete:
            self._log.info(
                "anti-entropy pass {how} in {seconds:.1f}s: {pushed} records pushed, {pulled} pulled",
                how="done" if complete else "incomplete",
                seconds=self.last_pass_seconds,
                pushed=self.keys_pushed - pushed,
                pulled=self.keys_pulled - pulled,
            )
        return complete

    def _peer(self, address: NodeInfo) -> Peer:
        connection = self._peers.get(address.id)
        if connection is None:
            service = self.connect(address.host, address.line_port)
            connection = self._peers[address.id] = _PeerConnection((address.host, address.line_port), service)
            service.setServiceParent(self)
        return connection.service

    async def _compare(self, peer: Peer, placement: str, synced: RingUpdate, first: int, last: int) -> None:
        """Compare ``[first, last]`` with ``peer`` down to the sub-ranges that differ, and repair those."""
        todo = [(first, last, self.parts)]
        while todo:
            start, end, parts = todo.pop()
            self._check(synced)
            asked = peer.send(XDigest(placement, start, end, parts, self.node_id))
            try:
                scanned = self.keys_scanned
                mine = await self._digests(start, end, parts)
                self.keys_compared += self.keys_scanned - scanned
            except BaseException:
                asked.addErrback(lambda _: None)
                raise
            theirs = await asked
            if not isinstance(theirs, Digests) or len(theirs.items) != len(mine):
                raise ServiceUnavailable(f"an answer to xdigest that does not fit: {theirs!r}"[:200])
            self.ranges_compared += 1
            for (low, high), own, other in zip(split_range(start, end, parts), mine, theirs.items):
                if own == other:
                    continue
                most = max(own.records, other.records)
                if most <= self.leaf or low == high:
                    await self._exchange(peer, placement, synced, low, high)
                else:  # pieces of about ``leaf`` records: listed at the next level when they differ
                    todo.append((low, high, min(MAX_PARTS, -(-most // self.leaf) + 1)))

    async def _exchange(self, peer: Peer, placement: str, synced: RingUpdate, first: int, last: int) -> None:
        """List ``[first, last]`` on both sides; push what the peer lacks or holds older, pull the reverse."""
        asked = Deferred.fromCoroutine(self._their_entries(peer, placement, first, last))
        try:
            mine = await self._entries(first, last)
        except BaseException:
            asked.addErrback(lambda _: None)
            raise
        theirs = await asked
        self._check(synced)
        started = time.thread_time()
        push, pull = compare_versions([(k, v) for _, k, v in mine], [(k, v) for _, k, v in theirs])
        records: list[tuple[bytes, Record]] = []
        for key in push:
            record = self._engine.get(key)
            if record is not None:
                records.append((key, record))
        self.cpu_seconds += time.thread_time() - started
        if records:
            results = await peer.send_many([XPut(key, record) for key, record in records])
            self.keys_pushed += sum(1 for result in results if result is Status.STORED)
        for chunk in _chunks(pull, 256):
            answer = await peer.send(XGet(tuple(chunk)))
            if not isinstance(answer, Values):
                raise ServiceUnavailable(f"an answer to xget that does not fit: {answer!r}"[:200])
            self._check(synced)
            started = time.thread_time()
            stored = self._store([XPut(key, record) for key, record in answer.items])
            self.cpu_seconds += time.thread_time() - started
            self.keys_pulled += sum(1 for result in stored if result is Status.STORED)

    async def _their_entries(self, peer: Peer, placement: str, first: int, last: int) -> list[Entry]:
        """The peer's ``(hash, key, version)`` in ``[first, last]``, a page of ``XList`` at a time."""
        found: list[Entry] = []
        after: tuple[int, bytes] | None = None
        while True:
            answer = await peer.send(XList(placement, first, last, self.list_size, after))
            if not isinstance(answer, KeyVersions):
                raise ServiceUnavailable(f"an answer to xlist that does not fit: {answer!r}"[:200])
            found.extend(answer.items)
            if len(answer.items) < self.list_size:
                return found
            after = (answer.items[-1][0], answer.items[-1][1])

    # -- progress ---------------------------------------------------------------------------------

    @property
    def running_pass(self) -> bool:
        """True while a pass is under way."""
        return self._busy

    def stats(self) -> Mapping[str, Any]:
        """The counters and gauges for ``GET /stats`` and ``/metrics``."""
        return {
            "antientropy_passes_total": self.passes,
            "antientropy_arcs_compared_total": self.arcs_compared,
            "antientropy_ranges_compared_total": self.ranges_compared,
            "antientropy_keys_compared_total": self.keys_compared,
            "antientropy_keys_scanned_total": self.keys_scanned,
            "antientropy_keys_pushed_total": self.keys_pushed,
            "antientropy_keys_pulled_total": self.keys_pulled,
            "antientropy_keys_repaired_total": self.keys_pushed + self.keys_pulled,
            "antientropy_last_full_pass": self.last_full_pass,
            "antientropy_last_pass_seconds": round(self.last_pass_seconds, 3),
            "antientropy_cpu_seconds_total": round(self.cpu_seconds, 6),
            "antientropy_running": int(self._busy),
        }


def _chunks(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
