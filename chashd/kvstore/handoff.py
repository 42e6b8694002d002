"""Rebalancing, the kvstore side: the data moves with the ring, and a drain on SIGTERM.

``Handoff`` keeps ``synced``, the ring this node's data conforms to, and moves data when the ring watch
(``chashd.kvstore.ringwatch``) brings a newer ring ``T`` that places replicas differently:

- plan: ``moved_arcs(synced, T, n)`` (in the thread pool), keeping the arcs this node held (it is in the
  arc's old list, or ``synced`` is the empty ring of a node that has data but no saved ring);
- for each arc, page by page (``engine.scan`` in the thread pool, ``page_size`` records, the next page
  read while the others are pushed): push the page as pipelined ``XPut(handoff=True)`` (wire verb
  ``xmove``) to each node that entered the arc's list (``arc.gained``, itself excepted, only nodes of the
  newest ring with an address), over one persistent ``KVClientPool`` per target, with ``send_many`` (one
  write and one Deferred per slice of records, not one per record). Back-pressure: at most ``window`` (2)
  pages pushed and not wholly acknowledged per target, so that the receiver always has the next page at
  hand and never a whole arc is in memory. A target that fails is retried with backoff (``0.5 s``
  doubling to ``max_backoff``); one that left the map is skipped (the newer map restarts the plan anyway);
- when this node is not in the arc's new list, each acknowledged record is dropped if the stored version
  is still the pushed one (compare-and-remove, ``engine.remove_many_if``: one query and one statement
  per chunk): a write that raced in keeps its record, and a final sweep of the dropped arcs pushes and
  drops what remains. Pages are dropped in page order. Records of an arc whose new list is empty (the
  last node leaves) are kept: there is nowhere to push them;
- then ``synced = T``, saved as JSON (``state_path``, next to a SQLite database) so that a restart knows it.

The reactor thread's share (serializing pushes, dropping) comes in units of about ``unit_budget`` (1 ms):
slices of records serialized and chunks dropped, sized by the time the last ones took (``_Sizer``), one
unit per reactor iteration whatever the number of pages and targets under way (``_Turns``), so that a
client request waits for one unit at most. The drops and the point writes stay on the reactor thread:
SQLite work in the thread pool next to a busy reactor thread crawls, each row's return to Python
waiting for the GIL (measured: 255-3,600 deletes/s against 126,000/s with the reactor idle, and the
move ran 2-4x slower with the drops in the pool); the scans go to the pool, a page at a time.

A newer ring arriving mid-handoff restarts the planning from ``synced`` to the newest ring (pushing a record
twice is harmless: versions decide); one with the same placement only moves the goal's epoch. Tombstones
are records like any other, so a deleted key stays deleted. A node that starts with an empty engine takes
the first ring it learns as ``synced``; one with data and no saved ring treats the old ring as empty, so it
pushes every record to every replica it belongs to under the new ring.

``Drain`` is what SIGTERM starts on a node registered with gateways: ask a gateway to mark the node
``leaving`` (``POST /ring/nodes/{id}/drain``), refuse writes and tell systemd ``STOPPING=1``, wait until the
handoff reached a ring without the node (it is in no arc's new list any more, so it pushes and drops
everything), deregister (``DELETE /ring/nodes/{id}``). It fails (the daemon then exits with status 1) when it
does not finish within its timeout or is aborted (a second SIGTERM), logging what was left.

Progress (``status()``, ``stats()``): ``pending`` is an estimate of the records still to send, computed at
the start of a plan as ``keys * width(arc) / width owned under synced`` for each arc left, times its
targets, less what was sent of the current arc (records spread evenly over the hash space).
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from chashd.commands import XPut
from chashd.errors import RequestError
from chashd.interfaces import IStorageEngine
from chashd.kvstore.ringwatch import NodeAddress, RingUpdate
from chashd.record import Record
from chashd.ring import HASH_SPACE, Arc, HashRing, key_hash, moved_arcs

__all__ = ["Drain", "Handoff", "load_synced", "save_synced", "treq_request"]

STATE_VERSION = 1


#: ``connect(host, line_port)``: a new (not started) connection to a node: a service with ``send(command)``
#: (a ``KVClientPool``).
Connect = Callable[[str, int], Any]
#: ``run_in_pool(fn, *args)``: run blocking work in the node's thread pool.
RunInPool = Callable[..., Deferred[Any]]


# -- the saved ring --------------------------------------------------------------------------------


def save_synced(path: str, update: RingUpdate) -> None:
    """Write ``update``'s ring and N to ``path`` (a new file renamed over the old one, synced to disk)."""
    body = {"version": STATE_VERSION, "replicas": update.replicas, "ring": update.ring.to_dict()}
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(body, f, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_synced(path: str) -> RingUpdate | None:
    """The ring saved at ``path``; None when there is no file. ``ValueError`` for a file that is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(body, dict) or body.get("version") != STATE_VERSION or not isinstance(body.get("ring"), dict):
        raise ValueError(f"{path} does not hold a saved ring of version {STATE_VERSION}")
    replicas = body.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"{path}: replicas {replicas!r} is not a positive integer")
    return RingUpdate(HashRing.from_dict(body["ring"]), replicas)


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    """One arc to hand off: where to push it and whether this node drops it afterwards."""

    arc: Arc
    targets: tuple[str, ...]
    drop: bool

    @property
    def width(self) -> int:
        return self.arc.end - self.arc.start + 1


def _plan(node_id: str, old: RingUpdate, new: RingUpdate) -> tuple[list[_Work], int]:
    """The arcs this node hands off between ``old`` and ``new``, and the width of the hash space it owned
    under ``old`` (for the estimate of pending records). Pure; runs in the thread pool."""
    n = max(old.replicas, new.replicas)
    empty = len(old.ring) == 0
    work = []
    for arc in moved_arcs(old.ring, new.ring, n):
        if not empty and node_id not in arc.old:
            continue  # this node held nothing there
        targets = tuple(t for t in arc.gained if t != node_id)
        drop = node_id not in arc.new and bool(arc.new)
        if targets or drop:
            work.append(_Work(arc, targets, drop))
    if empty:
        owned = HASH_SPACE
    else:
        nobody = HashRing({}, epoch=0, points_per_node=old.ring.points_per_node)
        owned = sum(a.end - a.start + 1 for a in moved_arcs(nobody, old.ring, old.replicas) if node_id in a.new)
    return work, max(1, owned)


class _Restart(Exception):
    """The plan under way is obsolete (a newer placement came) or the service stopped."""


def _drop_unchanged(engine: IStorageEngine, records: Sequence[tuple[bytes, Record]]) -> int:
    """Remove, as one group (``engine.remove_many_if``), each record whose stored version is still the one
    pushed; the number removed (compare-and-remove: a record rewritten since it was pushed stays)."""
    return sum(engine.remove_many_if([(key, record.version) for key, record in records]))


class _Turns:
    """Hands the reactor's turns to the handoff's units of work, one at a time.

    ``next()`` is a Deferred that fires in a later iteration of the reactor, after the I/O that came in
    meanwhile was served. Only one waiter is released per iteration, however many coroutines wait (the
    pushes to several targets, the drops), so that a client request waits for one unit of the
    handoff's work at most, not for one unit of each."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiting: deque[Deferred[None]] = deque()
        self._call: IDelayedCall | None = None

    def next(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        if self._call is None:
            self._call = self._clock.callLater(0, self._release)
        return waiter

    def _release(self) -> None:
        self._call = None
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.called:  # else cancelled
                waiter.callback(None)  # runs the unit
                break
        if self._waiting and self._call is None:
            self._call = self._clock.callLater(0, self._release)

    def cancel_all(self) -> None:
        """Fail every waiter with ``CancelledError`` (the handoff stops or starts over)."""
        waiting, self._waiting = self._waiting, deque()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for waiter in waiting:
            waiter.cancel()


class _Sizer:
    """How many records a unit of work takes so that it lasts about ``budget`` seconds: ``size`` starts at
    ``initial`` and moves halfway toward what the last unit's time per record allows, between 1 and
    ``maximum``. A unit measured as taking no time (a test's clock) doubles it."""

    def __init__(self, initial: int, maximum: int, budget: float) -> None:
        self.size = max(1, min(initial, maximum))
        self._maximum = maximum
        self._budget = budget

    def took(self, count: int, seconds: float) -> None:
        if count < self.size:  # a short tail says little
            return
        ideal = 2.0 * self.size if seconds <= 0 else self._budget * count / seconds
        self.size = max(1, min(self._maximum, round((self.size + ideal) / 2)))


class Handoff(MultiService):
    """Moves this node's data when the ring's placement changes (see the module docstring).

    ``ring_changed(update)`` is the ring watch's callback. ``connect(host, line_port)`` makes the
    connection to a target (a ``KVClientPool`` in production); ``run_in_pool`` runs scans, drops and the
    saving of the ring in the node's thread pool; ``state_path`` is where ``synced`` is saved (None: kept in
    memory only, for a memory engine).
    """

    _log = Logger()
    #: Records read per scan (a trip to the thread pool).
    page_size = 500
    #: Pages pushed and not yet acknowledged, per target.
    window = 2
    #: The work the handoff does on the reactor thread per turn, in seconds: the records serialized
    #: (``push_slice``) or dropped (``drop_chunk``) at a time start at these sizes and follow the time
    #: they take, up to the ``_max`` sizes.
    unit_budget = 0.001
    push_slice = 100
    push_slice_max = 500
    drop_chunk = 50
    drop_chunk_max = 500
    max_backoff = 10.0
    max_sweeps = 5

    def __init__(
        self,
        node_id: str,
        engine: IStorageEngine,
        run_in_pool: RunInPool,
        clock: IReactorTime,
        connect: Connect,
        state_path: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
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
        self._turns = _Turns(clock)
        self._push_size = _Sizer(self.push_slice, self.push_slice_max, self.unit_budget)
        self._drop_size = _Sizer(self.drop_chunk, self.drop_chunk_max, self.unit_budget)
        self._saving: Deferred[Any] = succeed(None)
        self._targets: dict[str, Any] = {}
        self._waiters: list[tuple[Callable[[RingUpdate], bool], Deferred[RingUpdate]]] = []
        # Progress.
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
        self._targets.clear()
        return super().stopService()  # type: ignore[return-value]  # stops the connections

    # -- the ring watch's side --------------------------------------------------------------------

    def ring_changed(self, update: RingUpdate) -> None:
        """A newer ring: hand off toward it, restarting a plan under way if the placement changed."""
        if self.target is not None and update.epoch <= self.target.epoch:
            return
        self.target = update
        self._forget_targets(update)
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
            for node_id in list(self._targets):
                self._targets.pop(node_id).service.disownServiceParent()

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
        """Cut the backoffs and the waits for a turn short: the plan under way is obsolete."""
        for sleep in list(self._sleeps):
            sleep.cancel()
        self._turns.cancel_all()

    async def _turn(self) -> None:
        """Wait for the next turn of the handoff (``_Turns``); ``_Restart`` when woken up."""
        try:
            await self._turns.next()
        except CancelledError:
            raise _Restart() from None
        self._check()

    async def _hand_off(self, old: RingUpdate, new: RingUpdate) -> None:
        started = self._clock.seconds()
        work, owned = await self._run_in_pool(_plan, self.node_id, old, new)
        self._check()
        keys = self._engine.stats()["keys"]
        self._estimates = [(keys * w.width / owned, len(w.targets)) for w in work]
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
        await self._arcs(work, new)
        for sweep in range(1, self.max_sweeps + 1):
            if not await self._arcs([w for w in work if w.drop], new, sweep):
                break
        else:
            self._log.warn("records kept coming into dropped arcs for {sweeps} sweeps", sweeps=self.max_sweeps)
        if work:
            self._log.info(
                "handoff to epoch {new} done: {sent} records pushed, {dropped} dropped in {seconds:.1f}s",
                new=new.epoch,
                sent=self.records_sent - sent,
                dropped=self.records_dropped - dropped,
                seconds=self._clock.seconds() - started,
            )

    async def _arcs(self, work: Sequence[_Work], new: RingUpdate, sweep: int = 0) -> int:
        """Push (and drop) ``work``'s arcs, page by page, arc after arc; the number of records found.

        The pages go through a pipeline: while pages are pushed, the next one (of this arc or the next)
        is read in the thread pool; up to ``window`` pages are pushed and not yet acknowledged (so that
        the receiver always has the next one at hand); each acknowledged page is dropped, in page order.
        At most ``window`` + 1 pages in memory."""
        found = 0
        index = 0
        scanning: Deferred[list[tuple[bytes, Record]]] | None = self._scan(work[0].arc, None) if work else None
        flying: deque[Deferred[None]] = deque()  # the pages pushed (and being dropped), oldest first
        gate: Deferred[None] = succeed(None)  # fires once the page before may be dropped no more
        arc = _ArcProgress(self._clock.seconds())
        try:
            while scanning is not None:
                page = await scanning
                scanning = None
                self._check()
                w = work[index]
                arc.found += len(page)
                found += len(page)
                last_page = len(page) < self.page_size
                if not last_page:
                    key = page[-1][0]
                    scanning = self._scan(w.arc, (key_hash(key), key))
                elif index + 1 < len(work):
                    scanning = self._scan(work[index + 1].arc, None)
                while len(flying) >= self.window:
                    await flying.popleft()
                self._check()
                following: Deferred[None] = Deferred()
                flying.append(Deferred.fromCoroutine(self._page(page, w, arc, last_page, new, sweep, gate, following)))
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
        page: list[tuple[bytes, Record]],
        w: _Work,
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
            if page and w.targets:
                pushes = [Deferred.fromCoroutine(self._push(target, page)) for target in w.targets]
                for ok, result in await DeferredList(pushes, consumeErrors=True):
                    if not ok:
                        assert isinstance(result, Failure)
                        result.raiseException()
                    refused.update(result)
            if last_page and not sweep:
                self.arcs_done += 1
                self._sent_in_arc = 0
            await gate
            self._check()
            if page and w.drop:
                await self._drop_chunks([item for item in page if item[0] not in refused], arc)
            if last_page and arc.found:
                self._arc_done(None, w, arc, new, sweep)
        finally:
            following.callback(None)

    def _arc_done(self, _: object, work: _Work, arc: _ArcProgress, new: RingUpdate, sweep: int) -> None:
        """One line per arc."""
        self._log.info(
            "handoff to epoch {epoch}{sweep}: arc {start:08x}-{end:08x} ({found} records) pushed to {targets}, "
            "{dropped} dropped, {kept} kept, in {seconds:.2f}s",
            epoch=new.epoch,
            sweep=f" (sweep {sweep})" if sweep else "",
            start=work.arc.start,
            end=work.arc.end,
            found=arc.found,
            targets=",".join(work.targets) or "nobody",
            dropped=arc.dropped,
            kept=arc.kept,
            seconds=self._clock.seconds() - arc.started,
        )

    def _scan(self, arc: Arc, after: tuple[int, bytes] | None) -> Deferred[list[tuple[bytes, Record]]]:
        return self._run_in_pool(self._engine.scan, arc.start, arc.end, after, self.page_size)

    async def _drop_chunks(self, records: list[tuple[bytes, Record]], arc: _ArcProgress) -> None:
        """Compare-and-remove ``records``, a chunk per turn of the handoff (``_drop_size`` records: about
        ``unit_budget`` of work); counts what went."""
        done = 0
        while done < len(records):
            await self._turn()  # serve what came in meanwhile
            chunk = records[done : done + self._drop_size.size]
            began = self._clock.seconds()
            removed = _drop_unchanged(self._engine, chunk)
            self._drop_size.took(len(chunk), self._clock.seconds() - began)
            done += len(chunk)
            self.records_dropped += removed
            arc.dropped += removed
            arc.kept += len(chunk) - removed

    async def _push(self, node_id: str, page: Sequence[tuple[bytes, Record]]) -> set[bytes]:
        """Push ``page`` to one target until it acknowledged every record; the keys it refused for good
        (a ``CLIENT_ERROR``: never dropped here). Retries with backoff; a target that left the map is skipped."""
        todo = list(page)
        refused: set[bytes] = set()
        failures = 0
        while todo:
            assert self.target is not None
            address = self.target.nodes.get(node_id)
            if address is None:
                self._log.info("{node} left the map: skipping it", node=node_id)
                return refused
            connection = self._connection(address)
            answers = []
            sent = 0
            while sent < len(todo):  # a slice per turn of the handoff: about unit_budget of serializing
                if sent:
                    await self._turn()
                part = todo[sent : sent + self._push_size.size]
                began = self._clock.seconds()
                answers.append(connection.service.send_many([XPut(key, record, handoff=True) for key, record in part]))
                self._push_size.took(len(part), self._clock.seconds() - began)
                sent += len(part)
            results = []
            for answer in answers:
                results.extend(await answer)
            retry = []
            error = ""
            for value, item in zip(results, todo):
                if not isinstance(value, Failure):
                    self.records_sent += 1
                    self._sent_in_arc += 1
                elif value.check(RequestError):
                    refused.add(item[0])
                    self._log.error(
                        "{node} refuses the record of {key!r}: {error}",
                        node=node_id,
                        key=item[0][:60],
                        error=value.getErrorMessage(),
                    )
                else:
                    retry.append(item)
                    error = error or value.getErrorMessage()
            if not retry:
                return refused
            self._check()
            failures += 1
            delay = min(self.max_backoff, 0.5 * 2 ** min(failures - 1, 16)) * (0.75 + self._rng.random() / 2)
            self._log.warn(
                "cannot push {count} records to {node} ({error}); retrying in {delay:.1f}s",
                count=len(retry),
                node=node_id,
                error=error,
                delay=delay,
            )
            sleep: Deferred[None] = deferLater(self._clock, delay)
            self._sleeps.add(sleep)
            try:
                await sleep
            except CancelledError:
                raise _Restart() from None
            finally:
                self._sleeps.discard(sleep)
            self._check()
            todo = retry
        return refused

    def _connection(self, address: NodeAddress) -> _Connection:
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
        }

    def stats(self) -> Mapping[str, Any]:
        """The handoff's counters and gauges for ``GET /stats`` and ``/metrics``."""
        return {
            "handoff_records_sent_total": self.records_sent,
            "handoff_records_dropped_total": self.records_dropped,
            "handoff_records_pending": self.pending,
            "handoff_running": int(self._busy),
            "handoff_arcs_total": self.arcs_total,
            "handoff_arcs_done": self.arcs_done,
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


@dataclass
class _Connection:
    address: tuple[str, int]
    service: Any


# -- the drain -------------------------------------------------------------------------------------

#: ``request(method, url, headers)`` fires with ``(HTTP status, body)``.
Requester = Callable[[str, str, dict[bytes, list[bytes]]], Deferred[tuple[int, bytes]]]


class Drain:
    """A node's drain (see the module docstring). ``start()`` returns a Deferred firing True once the node
    was handed off and deregistered, False when the timeout passed or ``abort()`` was called first.

    ``stop_registering`` stops the periodic announcements (which would add the node back after its
    removal); ``leaving`` makes the node refuse writes and tells systemd ``STOPPING=1``.
    """

    _log = Logger()
    max_backoff = 5.0

    def __init__(
        self,
        node_id: str,
        gateways: Sequence[str],
        request: Requester,
        handoff: Handoff,
        clock: IReactorTime,
        timeout: float,
        stop_registering: Callable[[], None],
        leaving: Callable[[], None],
        token: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self._gateways = [g.rstrip("/") for g in gateways]
        self._request = request
        self._handoff = handoff
        self._clock = clock
        self.timeout = timeout
        self._stop_registering = stop_registering
        self._leaving = leaving
        self._token = token
        self._rng = rng or random.Random()
        self._next = 0
        self._result: Deferred[bool] | None = None
        self._steps: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self.step = "not started"

    def start(self) -> Deferred[bool]:
        """Start the drain (once); the Deferred fires True when done, False when it failed."""
        if self._result is not None:
            raise RuntimeError("the drain was already started")
        self._result = Deferred()
        self._log.info("draining {node}: handing its data off before it stops", node=self.node_id)
        self._timer = self._clock.callLater(self.timeout, self._fail, f"not finished within {self.timeout:g}s")
        self._steps = Deferred.fromCoroutine(self._run())
        self._steps.addCallbacks(self._done, self._broke)
        return self._result

    def abort(self, reason: str) -> None:
        """Give up now (a second SIGTERM)."""
        self._fail(reason)

    async def _run(self) -> None:
        self._stop_registering()
        self.step = "asking to be marked leaving"
        answer = await self._ask("POST", f"/ring/nodes/{self.node_id}/drain")
        epoch = answer.get("epoch") if isinstance(answer, dict) else None
        if not isinstance(epoch, int):  # the map does not know the node: hand off to the newest ring
            target = self._handoff.target
            epoch = target.epoch if target is not None else 0
        self._leaving()
        self.step = f"handing off (to a ring of epoch {epoch} or later without this node)"
        self._log.info("{node} is leaving at epoch {epoch}; handing off", node=self.node_id, epoch=epoch)
        node_id = self.node_id
        await self._handoff.when_synced(lambda synced: synced.epoch >= epoch and node_id not in synced.ring)
        self.step = "deregistering"
        await self._ask("DELETE", f"/ring/nodes/{self.node_id}")

    async def _ask(self, method: str, path: str) -> Any:
        """Send a control-plane request to a gateway until one answers 2xx (or 404: the node is not in the
        map); the parsed JSON answer. Rotates through the gateways with backoff."""
        headers: dict[bytes, list[bytes]] = {b"Content-Type": [b"application/json"]}
        if self._token:
            headers[b"Authorization"] = [b"Bearer " + self._token.encode()]
        failures = 0
        while True:
            url = self._gateways[self._next % len(self._gateways)] + path
            try:
                code, body = await self._request(method, url, headers)
            except CancelledError:
                raise
            except Exception as e:
                code, body, error = 0, b"", f"{type(e).__name__}: {e}"
            else:
                error = f"HTTP {code}"
            if 200 <= code < 300 or code == 404:
                try:
                    return json.loads(body) if 200 <= code < 300 else None
                except ValueError:
                    return None
            failures += 1
            self._next += 1
            delay = min(self.max_backoff, 0.25 * 2 ** min(failures - 1, 16)) * (0.75 + self._rng.random() / 2)
            self._log.warn(
                "drain: {method} {url} failed ({error}); trying the next gateway in {delay:.1f}s",
                method=method,
                url=url,
                error=error,
                delay=delay,
            )
            await deferLater(self._clock, delay)

    def _done(self, _: object) -> None:
        if self._result is None or self._result.called:
            return
        self._cancel_timer()
        self._log.info("{node} drained and deregistered", node=self.node_id)
        self._result.callback(True)

    def _broke(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        self._log.failure("the drain failed", failure)
        self._fail(f"failed while {self.step}: {failure.getErrorMessage()}")

    def _fail(self, reason: str) -> None:
        if self._result is None or self._result.called:
            return
        self._cancel_timer()
        status = self._handoff.status()
        self._log.critical(
            "drain of {node} gave up ({reason}) while {step}: {arcs_left} of {arcs} arcs left, "
            "about {pending} records not pushed, {held} records held",
            node=self.node_id,
            reason=reason,
            step=self.step,
            arcs_left=status["arcs_total"] - status["arcs_done"],
            arcs=status["arcs_total"],
            pending=status["pending"],
            held=self._handoff.held,
        )
        result = self._result
        if self._steps is not None and not self._steps.called:
            self._steps.cancel()
        result.callback(False)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def treq_request(client: Any, clock: IReactorTime | None = None, timeout: float = 10.0) -> Requester:
    """A ``request`` for ``Drain`` over a ``treq.client.HTTPClient`` (its timeout runs on ``clock``)."""

    async def request(method: str, url: str, headers: dict[bytes, list[bytes]]) -> tuple[int, bytes]:
        response = await client.request(method, url, headers=headers, timeout=timeout, reactor=clock)
        content = await response.content()
        return response.code, content

    def send(method: str, url: str, headers: dict[bytes, list[bytes]]) -> Deferred[tuple[int, bytes]]:
        return Deferred.fromCoroutine(request(method, url, headers))

    return send
