"""Rebalancing, the kvstore side: the node's data moves with the ring.

``Handoff`` keeps ``synced``, the ring this node's data conforms to, and moves data when the ring watch
(``chashd.kvstore.ringwatch``) brings a newer ring ``T`` that places replicas differently:

- plan (``chashd.kvstore.plan``, in the thread pool): the arcs this node held whose preference list changed
  between ``synced`` and ``T``, each with the nodes that entered its list (the targets) and whether this
  node drops it afterwards;
- for each arc, page by page (``engine.scan_rows`` in the thread pool, ``page_size`` records as the engine's
  rows, and their encoding into bulk pages of at most ``bulk_rows`` records and ``bulk_bytes`` bytes, the next
  page read while the others are pushed): push the page to each target that has an address in the newest ring,
  over one persistent connection per target (``connect(host, line_port)``, a ``KVClientPool`` that probes
  whether the target reads bulk pages): as ``xbulk`` pages (``chashd.bulk``; the target applies each in one
  grouped write and answers once it is committed) in one ``send_bulk``; to a target of an earlier version (the
  probe answered ``ERROR``; ``BulkUnsupported``), or for a page a target refused whole (``CLIENT_ERROR``), as
  pipelined ``XPut(handoff=True)`` (wire verb ``xmove``), a slice of records per ``send_many`` (one write and
  one Deferred per slice). Every bulk page and every slice follows an ``XEpoch`` naming the epoch of the ring
  it is pushed for. Back-pressure: at most ``window`` pages pushed and not yet wholly acknowledged (and,
  outside the main pass, dropped) per target, so that the receiver always has the next page at hand and no arc
  is ever held in memory whole. A record counts as delivered once the target answered it, which a kvstore does
  once the record is committed to its engine (a bulk page in one transaction; the SQLite engine's WAL survives
  a kill -9 of the receiver). A target that fails is retried with backoff (``0.5 s`` doubling to
  ``max_backoff``, with jitter); a record a target refuses for good (``CLIENT_ERROR`` to its ``xmove``) is
  logged and kept;
- a target marked down in the newest ring, or that failed ``attempts`` times in a row, is *owed* the arc
  (nothing of the arc is dropped meanwhile) and the plan goes on with the other arcs: a target that does not
  answer never stalls them. Owed arcs are pushed again (and dropped) once the other arcs are done, as soon as
  their targets are not marked down, with backoff between the rounds; a target that left the map gets
  nothing counted delivered (the newer map restarts the plan);
- the throttle (``rate``, ``--handoff-rate``: records and value bytes a second over every target, default
  unlimited): each push waits for its turn (``chashd.kvstore.pacing.RateBucket``), and under a records-a-second
  limit a page holds a tenth of a second's records;
- when the arc is dropped, each record every target acknowledged is removed if the stored version is still the
  pushed one, in page order: a write that raced in keeps its record, and sweeps of the dropped arcs (at most
  ``max_sweeps``) push and drop what remains until a sweep finds nothing. The main pass of a plan
  (``defer_drops``) drops nothing until every arc is pushed (``phase`` "push", then "drop"): it keeps, of each
  page acknowledged whole by every target, the first and last keys and ``chashd.bulk.run_digest`` of each run
  of ``drop_chunk`` records (made by the scan, in the thread pool; a few hundred bytes a run, not the
  records), then removes each run that still holds exactly those keys and versions (``engine.remove_run_if``,
  a transaction each, in the thread pool); a run where anything changed stays whole, for the sweeps. So the
  move's CPU goes to the pushes (and the clients' reads) until the receivers have everything, and the drops
  come after (bench/README.md: they were half the sender's CPU a record). The sweeps, owed arcs and a page a
  target refused records of drop each page once acknowledged (compare-and-remove of its rows,
  ``engine.remove_rows_if``, a transaction of ``drop_chunk`` records each). ``dropping`` counts the records
  waiting for their drop;
- then, once nothing is owed and every drop is done, ``synced = T``, saved
  (``chashd.kvstore.placement.save_synced``, at ``state_path``, in the thread pool) so that a restart knows
  it; ``when_synced(predicate)`` fires once ``synced`` satisfies it.

Records pushed for a newer ring are never dropped by a plan for an older one: a peer names the epoch it
pushes for (``XEpoch``, ``newer_ring_seen``); when that is newer than every ring this node knows, the node's
own plan is for a ring the peer has already left behind (a node removed and back, whose ring watch lags),
and its drops and sweeps would remove what the peer delivers for the ring that makes this node an owner
again. The plan under way stops at once (before the records after the ``XEpoch`` are stored), and no plan
runs, nothing is dropped and ``synced`` does not move, until the ring watch brings that epoch; then the node
plans from its synced ring to that one, in which it keeps what it was sent.

The SQLite work of a move runs in the thread pool: the scans (a page read and encoded into bulk pages in
one job) and the drops (one job per page, ``drop_chunk`` records per transaction; the main pass's once every
arc is pushed). The reactor thread only
sends the encoded pages (one write each) and reads the answers, so that it stays free for clients' requests
(bench/README.md, bench/handoff.py: with the drops on the reactor thread, they took a third of it and the
sender's own reads waited behind them; in the pool, each row's return from SQLite waits for the GIL only
when the reactor thread is busy, which it no longer is with the move's work). Serializing ``xmove`` pushes
(to a target of an earlier version) stays on the reactor thread, in units sized to take about
``unit_budget`` seconds, one unit per reactor iteration whatever the number of pages and targets under way
(``chashd.kvstore.pacing``), so that a client request waits for one unit at most. The receiver applies one
bulk page per connection per reactor turn (``chashd.memcache.server``), on its reactor thread: applied in
its thread pool, each row's return from SQLite waited for the GIL the reactor held, and the move cost the
receiver more CPU for no better reads (bench/README.md).

A newer ring arriving mid-handoff restarts the planning from ``synced`` to the newest ring (pushing a record
twice is harmless: versions decide); one with the same placement only moves the goal's epoch. Tombstones
are records like any other, so a deleted key stays deleted. A node that starts with an empty engine takes
the first ring it learns as ``synced``; one with data and no saved ring treats the old ring as empty, so it
pushes every record to every replica it belongs to under the new ring.

Progress (``status()``, ``stats()``): ``pending`` is an estimate of the records still to send, computed at
the start of a plan (``Plan.estimates``: the node's records spread evenly over the hash space it owned)
for each arc left, times its targets, less what was sent of the current arc.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from chashd.bulk import BulkRow, encode_rows, run_digest, split_rows
from chashd.commands import Command, Result, XBulk, XEpoch, XPut
from chashd.errors import BulkUnsupported, RequestError
from chashd.interfaces import IStorageEngine
from chashd.kvstore.pacing import Pacer, Rate, RateBucket, Sizer, sized_units
from chashd.kvstore.placement import RingUpdate, load_synced, save_synced
from chashd.kvstore.plan import ArcWork, plan
from chashd.kvstore.registration import backoff_delay
from chashd.node import NodeInfo, NodeState
from chashd.record import Record
from chashd.ring import Arc, HashRing, key_hash
from chashd.versions import Version

__all__ = ["Connect", "Handoff", "PushTarget", "RunInPool"]


class PushTarget(Protocol):
    """A connection to a target node, as the handoff uses it (a ``KVClientPool`` in production): a service
    (its parent is the handoff) that sends a group of commands in one write."""

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Result | Failure]]:
        """Each command's result, or the ``Failure`` of its error, in order."""

    # A target may also have ``send_bulk(pages: Sequence[XBulk | XEpoch]) -> Deferred[list[Result | Failure]]``
    # (``KVClientPool.send_bulk``): then the pages go as bulk pages, each after its ``XEpoch``, else (or where
    # it fails with ``BulkUnsupported``) as one ``xmove`` per record.

    def setServiceParent(self, parent: IServiceCollection) -> object:
        """Start with the handoff."""

    def disownServiceParent(self) -> object:
        """Stop and close the connection."""


#: ``connect(host, line_port)``: a new (not started) connection to a node.
Connect = Callable[[str, int], PushTarget]
#: ``run_in_pool(fn, *args)``: run blocking work in the node's thread pool.
RunInPool = Callable[..., Deferred[Any]]


class _Restart(Exception):
    """The plan under way is obsolete (a newer placement came) or the service stopped."""


class Handoff(MultiService):
    """Moves this node's data when the ring's placement changes (see the module docstring).

    ``ring_changed(update)`` is the ring watch's callback. ``connect(host, line_port)`` makes the
    connection to a target (a ``KVClientPool`` in production); ``run_in_pool`` runs the planning, the scans
    and the saving of the ring in the node's thread pool; ``state_path`` is where ``synced`` is saved (None:
    kept in memory only, for a memory engine).
    """

    _log = Logger()
    #: Records read per scan (a trip to the thread pool).
    page_size = 500
    #: Pages pushed and not yet acknowledged (outside the main pass: or dropped), per target. Three, so that the
    #: receiver still has a page at hand while the sender drops the one it acknowledged last and pushes the
    #: next: with two, a traced move (bench/README.md) found the receiver with no page of the move for 8-12% of
    #: the time, the oldest page's drop holding the window (5-20 ms a page on a loaded machine); with three,
    #: 5-8%. The main pass drops after every arc is pushed (``defer_drops``), so its pages leave the window
    #: once acknowledged.
    window = 3
    #: The work the handoff does on the reactor thread per reactor iteration, in seconds: the records
    #: serialized (``push_slice``) for ``xmove`` in a unit start at this size and follow the time they take,
    #: up to ``push_slice_max``.
    unit_budget = 0.001
    push_slice = 100
    push_slice_max = 500
    #: Records dropped per transaction, in the thread pool (a client's write waits for one at most: ~1-2 ms;
    #: a 16 KiB page holds ~14 records of 1 KiB, so smaller ones would rewrite the same pages more often).
    drop_chunk = 250
    #: Records the deferred drops remove per job of the thread pool (a transaction of ``drop_chunk`` each): a
    #: job a page took a round trip through the pool and the reactor per 500 records, most of the drops' time
    #: on a loaded machine (bench/README.md).
    drop_job = 5000
    max_backoff = 10.0
    max_sweeps = 5
    #: The main pass of a plan drops nothing until every arc is pushed (see the module docstring).
    defer_drops = True
    #: A page goes to a target as bulk pages of at most these many rows and bytes (or one row).
    bulk_rows = 250
    bulk_bytes = 256 * 1024
    #: Failed pushes of a page to a target before the page is owed to it (pushed after the other arcs).
    attempts = 2

    def __init__(
        self,
        node_id: str,
        engine: IStorageEngine,
        run_in_pool: RunInPool,
        clock: IReactorTime,
        connect: Connect,
        state_path: str | None = None,
        rng: random.Random | None = None,
        rate: Rate | None = None,
    ) -> None:
        super().__init__()
        #: The throttle (``--handoff-rate``): records and value bytes a second, over every target.
        self.rate = rate or Rate()
        self._bucket = RateBucket()
        self.node_id = node_id
        self._engine = engine
        self._run_in_pool = run_in_pool
        self._clock = clock
        #: Makes the connection to a target node (tests put their own).
        self.connect = connect
        self._state_path = state_path
        self._rng = rng or random.Random()
        #: The ring this node's data conforms to (None before the first ring is known).
        self.synced: RingUpdate | None = None
        #: The newest ring learned.
        self.target: RingUpdate | None = None
        self._started_empty = False
        self._busy = False  # a handoff is under way (set and cleared by _run itself, which may end at once)
        self._retry_call: IDelayedCall | None = None
        self._goal: RingUpdate | None = None
        self._restart = False
        self._sleeps: set[Deferred[Any]] = set()  # the backoffs under way (one per target at most)
        self._pacer = Pacer(clock)
        self._push_size = Sizer(self.push_slice, self.push_slice_max, self.unit_budget)
        self._saving: Deferred[Any] = succeed(None)
        self._targets: dict[str, _Connection] = {}
        self._waiters: list[tuple[Callable[[RingUpdate], bool], Deferred[RingUpdate]]] = []
        #: The newest epoch a peer pushed for (``newer_ring_seen``); while it is newer than ``target``, no plan
        #: runs: the ring it names may make this node an owner of what a plan for an older ring would drop.
        self.awaited_epoch = 0
        self._awaiting: Deferred[None] | None = None
        #: The arcs of the plan under way that a target did not get (it was down or failed): pushed again,
        #: and dropped, once the other arcs are done.
        self._owed: dict[Arc, ArcWork] = {}
        #: Targets that failed ``attempts`` times in a row in this plan: the main pass owes them their pages
        #: at once instead of waiting for them page after page.
        self._unreachable: set[str] = set()
        #: The runs the main pass pushed to every target, a list per page, in page order: dropped once every
        #: arc is pushed (``defer_drops``); ``_dropping`` counts their records.
        self._deferred: list[list[_Run]] = []
        self._dropping = 0
        # Progress.
        #: What the plan under way does: "push" (the main pass), "drop" (its deferred drops), "sweep" (the
        #: sweeps and the owed arcs); None when no plan runs.
        self.phase: str | None = None
        self.records_sent = 0
        self.records_dropped = 0
        self.arcs_total = 0
        self.arcs_done = 0
        self._estimates: list[tuple[float, int]] = []  # (records, targets) of each arc of the plan
        self._sent_in_arc = 0

    # -- life -------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        saved = None
        if self._state_path is not None:
            try:
                saved = load_synced(self._state_path)
            except (OSError, ValueError) as e:
                self._log.warn(
                    "cannot read the saved ring {path} ({error}); handing off as if no ring was saved",
                    path=self._state_path,
                    error=str(e),
                )
        if saved is not None:
            self.synced = saved
            self._log.info("the data conforms to the saved ring of epoch {epoch}", epoch=saved.epoch)
        self._started_empty = saved is None and self._engine.stats()["keys"] == 0

    def stopService(self) -> Deferred[None]:
        self._restart = True
        self._wake_up()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.cancel()
        if self._awaiting is not None:
            self._awaiting.cancel()
        self._targets.clear()
        stopped: Deferred[None] = super().stopService()  # stops the connections
        return stopped

    # -- the ring watch's side --------------------------------------------------------------------

    def ring_changed(self, update: RingUpdate) -> None:
        """A newer ring: hand off toward it, restarting a plan under way if the placement changed."""
        if self.target is not None and update.epoch <= self.target.epoch:
            return
        self.target = update
        self._forget_targets(update)
        if self._awaiting is not None and update.epoch >= self.awaited_epoch:
            awaiting, self._awaiting = self._awaiting, None
            awaiting.callback(None)
        if self.synced is None:
            if self._started_empty:
                self._log.info("empty at start: taking the ring of epoch {epoch} as synced", epoch=update.epoch)
                self._set_synced(update)
                return
            self._log.info("data but no saved ring: every record goes to its replicas under the new ring")
            self.synced = RingUpdate(HashRing({}, epoch=0, points_per_node=update.ring.points_per_node), 1)
        if self._busy:
            if self._goal is not None and not self._goal.same_placement(update):
                self._log.info(
                    "epoch {epoch} changes the placement again: planning anew from epoch {synced}",
                    epoch=update.epoch,
                    synced=self.synced.epoch,
                )
                self._restart = True
                self._wake_up()
            return
        if self.synced.same_placement(update):
            self._set_synced(update)
            return
        Deferred.fromCoroutine(self._run()).addErrback(self._crashed)

    def newer_ring_seen(self, epoch: int) -> None:
        """A peer pushes records for the ring of ``epoch`` (``XEpoch``). When that is newer than every ring this
        node knows, the plan under way (if any) is for an older ring, whose drops and sweeps could remove what
        the peer pushes (records of arcs this node owns again in the newer ring): it stops at once, and no
        plan runs, nothing is dropped, until the ring watch brings that epoch."""
        known = self.target.epoch if self.target is not None else 0
        if epoch <= known or epoch <= self.awaited_epoch:
            return
        self.awaited_epoch = epoch
        self._log.info(
            "a peer pushes records for epoch {epoch}, newer than this node's {known}: nothing is dropped until "
            "that ring is known",
            epoch=epoch,
            known=known,
        )
        if self._busy:
            self._restart = True
            self._wake_up()

    def _forget_targets(self, update: RingUpdate) -> None:
        """Close the connections to nodes that left the map or moved."""
        for node_id in list(self._targets):
            connection = self._targets[node_id]
            address = update.nodes.get(node_id)
            if address is None or (address.host, address.line_port) != connection.address:
                del self._targets[node_id]
                connection.service.disownServiceParent()

    def _set_synced(self, update: RingUpdate) -> None:
        self.synced = update
        if self._state_path is not None:
            path = self._state_path
            self._saving.addCallback(lambda _: self._run_in_pool(save_synced, path, update)).addErrback(
                lambda f: self._log.failure("cannot save the synced ring to {path}", f, path=path)
            )
        waiters = []
        for predicate, waiter in self._waiters:
            if predicate(update):
                waiter.callback(update)
            else:
                waiters.append((predicate, waiter))
        self._waiters = waiters

    def when_synced(self, predicate: Callable[[RingUpdate], bool]) -> Deferred[RingUpdate]:
        """A Deferred that fires with ``synced`` once ``predicate(synced)`` holds (at once if it does)."""
        if self.synced is not None and predicate(self.synced):
            return succeed(self.synced)
        waiter: Deferred[RingUpdate] = Deferred(self._drop_waiter)
        self._waiters.append((predicate, waiter))
        return waiter

    def _drop_waiter(self, waiter: Deferred[RingUpdate]) -> None:
        self._waiters = [(p, w) for p, w in self._waiters if w is not waiter]

    # -- the handoff ------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._busy = True
        try:
            while self.running:
                assert self.synced is not None and self.target is not None
                if self.awaited_epoch > self.target.epoch:
                    try:
                        await self._newer_ring()
                    except _Restart:
                        return
                    continue
                goal = self._goal = self.target
                self._restart = False
                try:
                    await self._hand_off(self.synced, goal)
                except _Restart:
                    if not self.running:
                        return
                    continue
                newest = self.target
                self._set_synced(newest if newest.same_placement(goal) else goal)
                if newest.same_placement(goal):
                    return
        finally:
            self._busy = False
            self._goal = None
            self.arcs_total = self.arcs_done = 0
            self._estimates = []
            self._deferred = []
            self._dropping = 0
            self.phase = None
            for node_id in list(self._targets):
                self._targets.pop(node_id).service.disownServiceParent()

    async def _newer_ring(self) -> None:
        """Wait until the ring watch brings ``awaited_epoch`` (``_Restart`` if the service stops meanwhile)."""
        self._awaiting = Deferred()
        try:
            await self._awaiting
        except CancelledError:
            raise _Restart() from None

    def _crashed(self, failure: Failure) -> None:
        self._log.failure("the handoff failed; retrying in {delay}s", failure, delay=self.max_backoff)
        if self.running and self.target is not None:
            self._retry_call = self._clock.callLater(self.max_backoff, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        if self.running and not self._busy and self.target is not None:
            target, self.target = self.target, None
            self.ring_changed(target)

    def _check(self) -> None:
        if self._restart or not self.running:
            raise _Restart()

    def _wake_up(self) -> None:
        """Cut the backoffs and the units of work waiting for their turn short: the plan under way is
        obsolete."""
        for sleep in list(self._sleeps):
            sleep.cancel()
        self._pacer.stop_all()

    async def _paced(self, units: Iterator[None]) -> None:
        """Run ``units`` a unit per turn of the handoff (``Pacer``); ``_Restart`` when woken up."""
        try:
            await self._pacer.run(units)
        except CancelledError:
            raise _Restart() from None

    async def _hand_off(self, old: RingUpdate, new: RingUpdate) -> None:
        started = self._clock.seconds()
        planned = await self._run_in_pool(plan, self.node_id, old, new)
        self._check()
        work = planned.work
        self._estimates = planned.estimates(self._engine.stats()["keys"])
        self.arcs_total, self.arcs_done, self._sent_in_arc = len(work), 0, 0
        self._log.emit(
            LogLevel.info if work else LogLevel.debug,
            "handoff from epoch {old} to {new}: {arcs} arcs to hand off, about {pending} records to push",
            old=old.epoch,
            new=new.epoch,
            arcs=len(work),
            pending=self.pending,
        )
        sent, dropped = self.records_sent, self.records_dropped
        self._owed = {}
        self._unreachable = set()
        try:
            self.phase = "push"
            await self._arcs(work, new)
            self.phase = "drop"
            await self._drop_deferred(new)
            self.phase = "sweep"
        finally:  # a plan that stops drops nothing more: the next one pushes (and drops) what is left
            self._deferred = []
            self._dropping = 0
        for sweep in range(1, self.max_sweeps + 1):
            await self._pay_owed(new)
            if not await self._arcs([w for w in work if w.drop], new, sweep) and not self._owed:
                break
        else:
            self._log.warn("records kept coming into dropped arcs for {sweeps} sweeps", sweeps=self.max_sweeps)
        await self._pay_owed(new)  # what the last sweep could not deliver: never synced without it
        if work:
            self._log.info(
                "handoff to epoch {new} done: {sent} records pushed, {dropped} dropped in {seconds:.1f}s",
                new=new.epoch,
                sent=self.records_sent - sent,
                dropped=self.records_dropped - dropped,
                seconds=self._clock.seconds() - started,
            )

    async def _pay_owed(self, new: RingUpdate) -> None:
        """Push again the arcs a target did not get (and drop them once every target has), each as soon as
        none of its targets is marked down in the newest ring, with backoff between the attempts."""
        failures = 0
        while self._owed:
            assert self.target is not None
            nodes = self.target.nodes
            ready = [
                w
                for w in self._owed.values()
                if all(t not in nodes or nodes[t].state != NodeState.DOWN for t in w.targets)
            ]
            if ready:
                for w in ready:
                    del self._owed[w.arc]
                self._unreachable.clear()  # each round tries every target again
                self._log.info(
                    "handoff to epoch {epoch}: pushing {arcs} owed arcs again", epoch=new.epoch, arcs=len(ready)
                )
                await self._arcs(ready, new, retry=True)
                if not self._owed:
                    return
            failures += 1
            await self._sleep(backoff_delay(failures, 0.5, self.max_backoff, self._rng))

    async def _arcs(self, work: Sequence[ArcWork], new: RingUpdate, sweep: int = 0, retry: bool = False) -> int:
        """Push (and drop) ``work``'s arcs, page by page, arc after arc; the number of records found.

        The pages go through a pipeline: while pages are pushed, the next one (of this arc or the next)
        is read in the thread pool; up to ``window`` pages are pushed and not yet acknowledged or dropped (so
        that the receiver always has the next one at hand); each acknowledged page is dropped, in page order.
        At most ``window`` + 1 pages in memory."""
        found = 0
        index = 0
        defer = self.defer_drops and sweep == 0 and not retry
        scan = partial(self._scan, defer=defer)
        scanning: Deferred[_Page] | None = scan(work[0], None) if work else None
        flying: deque[Deferred[None]] = deque()  # the pages pushed (and being dropped), oldest first
        gate: Deferred[None] = succeed(None)  # fires once the page before may be dropped no more
        arc = _ArcProgress(self._clock.seconds())
        try:
            while scanning is not None:
                page = await scanning
                scanning = None
                self._check()
                w = work[index]
                arc.found += len(page.rows)
                found += len(page.rows)
                last_page = len(page.rows) < self._page_rows
                if not last_page:
                    key = page.rows[-1][0]
                    scanning = scan(w, (key_hash(key), key))
                elif index + 1 < len(work):
                    scanning = scan(work[index + 1], None)
                while len(flying) >= self.window:
                    await flying.popleft()
                self._check()
                following: Deferred[None] = Deferred()
                round_ = -1 if retry else sweep  # -1: owed arcs pushed again
                flying.append(Deferred.fromCoroutine(self._page(page, w, arc, last_page, new, round_, gate, following)))
                gate = following
                if last_page:
                    index += 1
                    arc = _ArcProgress(self._clock.seconds())
            while flying:
                await flying.popleft()
        finally:
            if scanning is not None:  # abandoned: a newer ring, or stopping
                scanning.addErrback(lambda _: None)
            while flying:  # abandoned too: let them see it and end
                try:
                    await flying.popleft()
                except (_Restart, CancelledError):
                    continue
                except Exception:
                    self._log.failure("a page of an abandoned handoff failed")
        return found

    async def _page(
        self,
        page: _Page,
        w: ArcWork,
        arc: _ArcProgress,
        last_page: bool,
        new: RingUpdate,
        sweep: int,
        gate: Deferred[None],
        following: Deferred[None],
    ) -> None:
        """Push one page to every target of its arc, then (once the pages before it are dropped) drop
        what they all acknowledged; fires ``following`` when done, whatever happened."""
        try:
            refused: set[bytes] = set()
            owed = False
            if page.rows and w.targets:
                pushes = [Deferred.fromCoroutine(self._push(target, page)) for target in w.targets]
                for ok, result in await DeferredList(pushes, consumeErrors=True):
                    if not ok:
                        assert isinstance(result, Failure)
                        result.raiseException()
                    if result is None:
                        owed = True
                    else:
                        refused.update(result)
            if owed:  # a target did not get the page: the arc is pushed again (and dropped) later
                self._owed[w.arc] = w
            if last_page and sweep == 0:
                self.arcs_done += 1
                self._sent_in_arc = 0
            await gate
            self._check()
            acknowledged = [row for row in page.rows if row[0] not in refused] if w.drop and not owed else []
            if acknowledged and page.runs and not refused:  # dropped once every page is pushed
                self._deferred.append(page.runs)
                self._dropping += len(acknowledged)
                arc.deferred += len(acknowledged)
            elif acknowledged:
                removed = await self._run_in_pool(self._drop_rows, acknowledged)
                self.records_dropped += removed
                arc.dropped += removed
                arc.kept += len(acknowledged) - removed
                self._check()
            if last_page and arc.found:
                self._arc_done(None, w, arc, new, sweep)
        finally:
            following.callback(None)

    def _arc_done(self, _: object, work: ArcWork, arc: _ArcProgress, new: RingUpdate, sweep: int) -> None:
        """One line per arc."""
        self._log.info(
            "handoff to epoch {epoch}{sweep}: arc {start:08x}-{end:08x} ({found} records) pushed to {targets}, "
            "{dropped} dropped, {kept} kept{deferred}, in {seconds:.2f}s",
            epoch=new.epoch,
            sweep=f" (sweep {sweep})" if sweep > 0 else " (owed)" if sweep < 0 else "",
            start=work.arc.start,
            end=work.arc.end,
            found=arc.found,
            targets=",".join(work.targets) or "nobody",
            dropped=arc.dropped,
            kept=arc.kept,
            deferred=f", {arc.deferred} to drop once every arc is pushed" if arc.deferred else "",
            seconds=self._clock.seconds() - arc.started,
        )

    def _scan(self, work: ArcWork, after: tuple[int, bytes] | None, defer: bool = False) -> Deferred[_Page]:
        """Read the next page of ``work``'s arc in the thread pool; with the digests of its runs when the arc is
        dropped and ``defer`` (the main pass of a plan: its drops wait until every arc is pushed)."""
        return self._run_in_pool(self._read_page, work.arc, after, defer and work.drop)

    @property
    def _page_rows(self) -> int:
        """Records per page: ``page_size``, or fewer under a records-a-second limit, so that the throttle
        spaces out pieces of a tenth of a second at most."""
        if self.rate.records:
            return max(1, min(self.page_size, int(self.rate.records / 10)))
        return self.page_size

    def _read_page(self, arc: Arc, after: tuple[int, bytes] | None, runs: bool = False) -> _Page:
        """A page of ``arc`` after ``after``: the engine's rows and their bulk pages, and with ``runs`` the
        first and last keys, size and ``run_digest`` of each run of ``drop_chunk`` rows; in the thread pool."""
        rows = self._engine.scan_rows(arc.start, arc.end, after, self._page_rows)
        found = []
        if runs:
            chunk = self.drop_chunk
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                found.append(_Run(part[0][0], part[-1][0], len(part), run_digest(part)))
        return _Page(rows, self._frames(rows), found)

    def _frames(self, rows: Sequence[BulkRow]) -> list[_Frame]:
        """``rows`` as bulk pages of at most ``bulk_rows`` rows and ``bulk_bytes`` bytes each."""
        frames = []
        start = 0
        for part in split_rows(rows, self.bulk_rows, self.bulk_bytes):
            count, block = encode_rows(part)
            frames.append(_Frame(start, start + count, XBulk(count, block)))
            start += count
        return frames

    def _drop_rows(self, rows: Sequence[BulkRow]) -> int:
        """Remove each acknowledged record of ``rows`` whose stored version is still the one pushed
        (compare-and-remove, ``engine.remove_rows_if``: a record rewritten since it was pushed stays), a
        transaction of ``drop_chunk`` records at a time; the number removed. In the thread pool.

        Each chunk checks, under the engine's write lock, that the plan still holds: a peer's ``XEpoch`` for a
        newer ring stops the plan on the reactor thread before the records after it are stored, and storing
        them takes that lock, so they land after a chunk under way and no chunk starts after them."""
        removed = 0
        engine = self._engine
        for start in range(0, len(rows), self.drop_chunk):
            with engine.batch():
                if self._restart or not self.running:
                    break
                removed += engine.remove_rows_if(rows[start : start + self.drop_chunk])
        return removed

    def _drop_runs(self, runs: Sequence[_Run]) -> int:
        """Remove each run of ``runs`` that still holds exactly the records pushed (``engine.remove_run_if``:
        a run where a record was rewritten, added or removed since stays whole, for the sweeps), a transaction
        each, with ``_drop_rows``' check of the plan under the engine's write lock; the number removed. In the
        thread pool."""
        removed = 0
        engine = self._engine
        for run in runs:
            with engine.batch():
                if self._restart or not self.running:
                    break
                removed += engine.remove_run_if(run.first, run.last, run.digest)
        return removed

    async def _drop_deferred(self, new: RingUpdate) -> None:
        """Drop the runs the main pass pushed to every target of their arcs, in page order, a job of the thread
        pool per ``drop_job`` records or so (see the module docstring)."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return
        started = self._clock.seconds()
        dropped = kept = 0
        jobs: list[list[_Run]] = [[]]
        for runs in deferred:
            if sum(run.count for run in jobs[-1]) >= self.drop_job:
                jobs.append([])
            jobs[-1].extend(runs)
        for runs in jobs:
            removed = await self._run_in_pool(self._drop_runs, runs)
            self._check()
            count = sum(run.count for run in runs)
            self.records_dropped += removed
            self._dropping -= count
            dropped += removed
            kept += count - removed
        self._log.info(
            "handoff to epoch {epoch}: {dropped} records pushed dropped, {kept} kept (changed since: the sweeps "
            "push and drop them again), in {seconds:.2f}s",
            epoch=new.epoch,
            dropped=dropped,
            kept=kept,
            seconds=self._clock.seconds() - started,
        )

    def _send_slice(
        self,
        target: PushTarget,
        answers: list[Deferred[list[Result | Failure]]],
        part: Sequence[BulkRow],
    ) -> None:
        """Send a slice of a page to a target as ``xmove`` commands in one ``send_many`` (a unit of the
        handoff), after the epoch of the ring it is pushed for (``XEpoch``: a target that does not know that
        ring yet drops nothing meanwhile); the answers to the records go to ``answers``."""
        self._check()
        commands: list[Command] = [self._epoch()]
        commands.extend(
            XPut(key, Record(value, flags, expires_at, Version(clock, writer), bool(tombstone)), handoff=True)
            for key, value, flags, expires_at, clock, writer, tombstone in part
        )
        answers.append(target.send_many(commands).addCallback(_after_the_epoch))

    def _epoch(self) -> XEpoch:
        """The ``XEpoch`` a push goes after: the epoch of the ring the plan under way is for."""
        assert self._goal is not None
        return XEpoch(self._goal.epoch)

    async def _push(self, node_id: str, page: _Page) -> set[bytes] | None:
        """Push ``page`` to one target until it acknowledged every record; the keys it refused for good
        (a ``CLIENT_ERROR``: never dropped here). Retries with backoff. None when the target left the map
        (nothing counts delivered: the newer map restarts the plan), is marked down in the newest ring or
        failed ``attempts`` times: the page is owed to it (pushed again once the other arcs are done), so
        that a target that does not answer never holds up the other arcs.

        As bulk pages to a target that reads them (``send_bulk``); record by record (``xmove``) to one that
        does not (a kvstore of an earlier version), and for a bulk page the target refused whole (which of
        its records it refuses, if any, then shows)."""
        todo: Sequence[BulkRow] = page.rows
        frames = page.frames
        refused: set[bytes] = set()
        failures = 0
        while todo:
            assert self.target is not None
            address = self.target.nodes.get(node_id)
            if address is None:  # the newer map restarts the plan: nothing is delivered meanwhile
                self._log.info("{node} left the map: not pushing to it", node=node_id)
                return None
            if address.state == NodeState.DOWN or node_id in self._unreachable:
                return None
            connection = self._connection(address)
            await self._throttle(todo)
            send_bulk = getattr(connection.service, "send_bulk", None)
            retry: list[BulkRow] = []
            error = ""
            singles: Sequence[BulkRow] = todo
            if send_bulk is not None and not connection.old:
                singles = []
                epoch = self._epoch()
                commands: list[XBulk | XEpoch] = []
                for frame in frames:
                    commands += (epoch, frame.command)
                results = await send_bulk(commands)
                self._check()
                for frame, value in zip(frames, results[1::2]):  # the pages' answers (an XEpoch's tells nothing)
                    rows = todo[frame.start : frame.end]
                    if not isinstance(value, Failure):
                        self._sent(len(rows))
                    elif value.check(BulkUnsupported):
                        if not connection.old:
                            connection.old = True
                            self._log.info("{node} reads no bulk pages (an earlier version): pushing record by record",
                                           node=node_id)  # fmt: skip
                        singles.extend(rows)
                    elif value.check(RequestError):
                        self._log.warn("{node} refuses a bulk page ({error}); pushing its records one by one",
                                       node=node_id, error=value.getErrorMessage())  # fmt: skip
                        singles.extend(rows)
                    else:
                        retry.extend(rows)
                        error = error or value.getErrorMessage()
            if singles:
                error = await self._push_records(node_id, connection, singles, refused, retry) or error
            if not retry:
                return refused
            self._check()
            failures += 1
            if failures >= self.attempts:
                self._unreachable.add(node_id)
                self._log.warn(
                    "cannot push {count} records to {node} ({error}); it is owed them after the other arcs",
                    count=len(retry),
                    node=node_id,
                    error=error,
                )
                return None
            delay = backoff_delay(failures, 0.5, self.max_backoff, self._rng)
            self._log.warn(
                "cannot push {count} records to {node} ({error}); retrying in {delay:.1f}s",
                count=len(retry),
                node=node_id,
                error=error,
                delay=delay,
            )
            await self._sleep(delay)
            todo = retry
            frames = self._frames(retry)
        return refused

    async def _push_records(
        self, node_id: str, connection: _Connection, rows: Sequence[BulkRow], refused: set[bytes], retry: list[BulkRow]
    ) -> str:
        """Push ``rows`` as ``xmove`` commands, a paced slice per ``send_many``; adds the keys refused for good
        to ``refused`` and the rows to send again to ``retry``; the first error of those."""
        answers: list[Deferred[list[Result | Failure]]] = []
        send = partial(self._send_slice, connection.service, answers)
        await self._paced(sized_units(rows, self._push_size, self._clock, send))
        results: list[Result | Failure] = []
        for answer in answers:
            results.extend(await answer)
        error = ""
        for value, row in zip(results, rows):
            if not isinstance(value, Failure):
                self._sent(1)
            elif value.check(RequestError):
                refused.add(row[0])
                self._log.error(
                    "{node} refuses the record of {key!r}: {error}",
                    node=node_id,
                    key=row[0][:60],
                    error=value.getErrorMessage(),
                )
            else:
                retry.append(row)
                error = error or value.getErrorMessage()
        return error

    def _sent(self, count: int) -> None:
        self.records_sent += count
        self._sent_in_arc += count

    async def _sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds; ``_Restart`` when woken up or if the plan became obsolete meanwhile."""
        sleep: Deferred[None] = deferLater(self._clock, delay)
        self._sleeps.add(sleep)
        try:
            await sleep
        except CancelledError:
            raise _Restart() from None
        finally:
            self._sleeps.discard(sleep)
        self._check()

    async def _throttle(self, rows: Sequence[BulkRow]) -> None:
        """Wait for ``rows``' turn under ``rate`` (records and value bytes a second, over every target)."""
        rate = self.rate
        if rate.unlimited:
            return
        delay = self._bucket.take(rate, len(rows), sum(len(row[1]) for row in rows), self._clock.seconds())
        if delay > 0:
            await self._sleep(delay)

    def _connection(self, address: NodeInfo) -> _Connection:
        connection = self._targets.get(address.id)
        if connection is None:
            service = self.connect(address.host, address.line_port)
            connection = self._targets[address.id] = _Connection((address.host, address.line_port), service)
            service.setServiceParent(self)
        return connection

    # -- progress ---------------------------------------------------------------------------------

    @property
    def running_handoff(self) -> bool:
        """True while a handoff is under way."""
        return self._busy

    @property
    def held(self) -> int:
        """Records (tombstones included) this node holds."""
        return int(self._engine.stats()["keys"])

    @property
    def pending(self) -> int:
        """An estimate of the records still to push (see the module docstring)."""
        if not self._busy:
            return 0
        left = self._estimates[self.arcs_done :]
        total = sum(records * targets for records, targets in left)
        return max(0, round(total) - self._sent_in_arc)

    def status(self) -> dict[str, Any]:
        """The handoff part of ``GET /health`` (``records_received`` is the backend's, added by the node)."""
        return {
            "synced_epoch": self.synced.epoch if self.synced is not None else None,
            "target_epoch": self.target.epoch if self.target is not None else None,
            "running": self._busy,
            "arcs_total": self.arcs_total,
            "arcs_done": self.arcs_done,
            "records_sent": self.records_sent,
            "records_dropped": self.records_dropped,
            "pending": self.pending,
            "dropping": self._dropping,
            "phase": self.phase,
            "rate_limit": str(self.rate),
        }

    def stats(self) -> Mapping[str, Any]:
        """The handoff's counters and gauges for ``GET /stats`` and ``/metrics``."""
        return {
            "handoff_records_sent_total": self.records_sent,
            "handoff_records_dropped_total": self.records_dropped,
            "handoff_records_pending": self.pending,
            "handoff_records_dropping": self._dropping,
            "handoff_running": int(self._busy),
            "handoff_arcs_total": self.arcs_total,
            "handoff_arcs_done": self.arcs_done,
            "handoff_rate_limit_records_per_second": self.rate.records,
            "handoff_rate_limit_bytes_per_second": self.rate.bytes,
            "handoff_synced_epoch": self.synced.epoch if self.synced is not None else None,
            "handoff_target_epoch": self.target.epoch if self.target is not None else None,
        }


@dataclass
class _ArcProgress:
    """What one arc's handoff did, for its log line."""

    started: float
    found: int = 0
    dropped: int = 0
    kept: int = 0
    deferred: int = 0


@dataclass
class _Connection:
    """The connection to a target, and the address it goes to (a node that moves gets a new one); ``old``
    once the target showed it reads no bulk pages."""

    address: tuple[str, int]
    service: PushTarget
    old: bool = False


@dataclass(frozen=True)
class _Frame:
    """A bulk page of a page: the rows ``start`` to ``end`` of it."""

    start: int
    end: int
    command: XBulk


@dataclass(frozen=True)
class _Run:
    """A run of a page kept for its deferred drop: its first and last keys, its size and ``run_digest``."""

    first: bytes
    last: bytes
    count: int
    digest: bytes


@dataclass(frozen=True)
class _Page:
    """A page read from an arc: the engine's rows, the bulk pages they go in, and the runs of ``drop_chunk``
    rows its drop waits with (none when dropped at once)."""

    rows: list[BulkRow]
    frames: list[_Frame]
    runs: list[_Run]


def _after_the_epoch(results: list[Result | Failure]) -> list[Result | Failure]:
    """The answers to a slice's records: those after the answer to its ``XEpoch`` (which a node of an earlier
    version refuses with ``ERROR``: it only tells the receiver more)."""
    return results[1:]
