"""The gateway's data plane: every key command routed to the kvstores that own the key, with replication.

- Plain writes (``set``) get a version here and go to every up replica of the key's preference list as a
  versioned ``XPut``; the client hears ``STORED`` once ``W`` replicas stored it, else a
  ``QuorumNotReached`` error. Nothing is written to nodes outside the preference list (no sloppy quorum).
- Reads ask ``R`` up replicas (the first ones of the preference list, then the next on a failure) with
  ``XGet``, answer with the newest record, and write it back to the asked replicas that answered an older
  version or nothing (read repair). A read of one key asks the first of them for its record and the others
  for their version only (``XVer``): one whose version is newer than the record is then asked for its record
  (a kvstore of an earlier version answers ``XVer`` with ``ERROR``: it is asked with ``XGet``, and so are
  its next reads until the placement changes).
- Read-modify-write commands (``add``, ``replace``, ``append``, ``prepend``, ``cas``, ``incr``, ``decr``,
  ``touch``, ``gat``, ``delete``) are applied by the key's primary (its first up replica) on top of the
  newest record of the key (``_ReadModifyWrite``): the router first reads the key from ``max(N - W + 1, R)``
  up replicas, the primary among them (every acknowledged write is on ``W`` of the ``N``, so these reads
  meet each one), and when the primary's own record is older than the newest read (it missed writes: it
  was down, paused or cut off), it first gets the newest with an ``XPut``. Then ``XApply`` runs the command
  there with a version newer than every version read, and returns the record it left; that record goes to
  the other up replicas, and ``W`` acknowledgements in all (the primary's included) make the command
  succeed. A kvstore refuses an ``XApply`` whose version is not newer than what it stores
  (``StaleVersion``, with the stored version: another write got there first): the router moves its clock
  past that version and sends the command again.
- While a ring change is handed off (``Placement.previous`` set), reads of keys whose preference list
  changed also ask the previous owners, and so do the reads before a read-modify-write, so no
  acknowledged write is missed during a move.
- A read-modify-write runs by one map. While this router's map may be stale (``map_current`` False: its
  Raft gateway heard from no leader within the election timeout) it is refused at once (``MapNotCurrent``),
  as another gateway may name another primary. The connections name the map's epoch to the kvstores
  (``xmap``, ``Connections.announce``); a primary that knows a newer one refuses the command (``StaleMap``,
  nothing applied), and it starts over once this router's placement reaches that epoch (``map_wait``); a
  placement that changes between the read and the command starts it over too. The copies of the result
  name the command's epoch (``XPut.epoch``, ``xfence`` on the wire): a replica that knows a newer map
  refuses its copy, so a primary that a newer map no longer names (and that knows no newer map itself)
  gets no command acknowledged. Copies refused for the next map (epoch + 1) go again fenced by it once
  this router's map reaches it, when every gateway on that map reads the primary first (the primary up
  and among the replicas that map's preference list reads first, whatever the ring change): a node that
  comes back and takes the primary role back, or a join, does not fail the commands a gateway one
  heartbeat behind sent to the old primary. What this closes, and what it leaves, is in USAGE.md
  ("Failures and consistency").

A slow replica does not slow the cluster:

- Hedging: a read that an asked replica has not answered within ``hedge_after`` seconds also asks the
  next up replica (for the ones still missing of R; with R=1 the request is cancelled and the next
  replica asked in its place, so that the common read needs no object of its own); the replica that kept
  it waiting is *slow*: reads ask it last until it answers something (or ``suspect_for`` seconds pass).
  One timer serves every pending read (``_hedge_later``): a read is a deque entry, not a delayed call.
- Failover of the primary: a read-modify-write whose primary has not answered (its read, or the command)
  within ``primary_timeout`` seconds (much less than the request timeout) goes to the next up replica as
  primary, with a new version; the late primary is *stalled*: it is not a primary (nor asked first) until
  it answers something. Whatever the late primary does with the abandoned request cannot undo what came
  after: the ``XApply`` it may still run carries an older version than the failover's record, which wins
  on every replica, and it is refused over any newer write (``StaleVersion``).
- A timer that fires late (the reactor was busy) first lets the replies that came meanwhile in: it acts one
  reactor turn later.

N, W and R are capped at the number of nodes in the ring, so a one-node ring works.

The common cases take short paths that do the same thing with fewer objects per request: a single-key
``get`` with R=1 is one ``XGet`` whose Deferred the client protocol gets back (a failure, or the hedging
timer, which cancels it, moves on to the next up replica); any other single-key ``get`` is one ``_KeyRead``
whose Deferred is the answer, or, from the line protocol (``forward_get``), whose reply goes to the protocol's
sink; the commonest of those, R=2 with no node suspect and no move under way, is a ``_PairRead`` (the first
replica's record and the second's version in two slots), which hands itself over to a ``_KeyRead`` on anything
else (a newer version, a failure, the hedging timer); a ``set``'s replicas answer one ``_Write`` (no Deferred
for each, no quorum object), whose result goes to the line protocol's sink (``forward_set``) or to one
Deferred.
Preference lists are memoized per placement (the ring is immutable, so a key's list only changes with a
new placement), and which nodes are down is worked out once per placement rather than per request.
Callbacks are bound methods with arguments, not closures.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chashd.commands import (
    Arith,
    Delete,
    FlushAll,
    Get,
    Lease,
    SplicedGet,
    Status,
    Store,
    Touch,
    Values,
    VersionOf,
    XApplied,
    XApply,
    XGet,
    XLease,
    XPut,
    XRelease,
    XVer,
)
from chashd.errors import (
    DeadlinePassed,
    KeyLeased,
    MapNotCurrent,
    NoNodes,
    QuorumNotReached,
    RequestError,
    ServiceUnavailable,
    StaleMap,
    StaleVersion,
    UnknownCommand,
)
from chashd.interfaces import IForwardedGet, IForwardedSet, IKeyValue, IKVClient, IReplySink
from chashd.leases import LEASE_FOR
from chashd.memcache.text import plain_get_reply
from chashd.node import NodeState
from chashd.record import Record, expires_at_from_exptime
from chashd.ring import HashRing
from chashd.versions import HybridClock, Version

__all__ = ["Placement", "Router"]


@dataclass(frozen=True)
class Placement:
    """What the router routes by: the ring, each node's state, and the ring being handed off from."""

    ring: HashRing
    states: Mapping[str, NodeState] = field(default_factory=dict)
    previous: HashRing | None = None

    def is_up(self, node: str) -> bool:
        """True when ``node`` takes requests."""
        return self.states.get(node, NodeState.UP) == NodeState.UP


#: Preference lists memoized per placement, at most this many keys (then the memo starts over).
_PREFS_MEMO_SIZE = 65536
_NO_VALUES = Values(())


class _Hedged(Protocol):
    """A read the hedging timer looks at once ``hedge_after`` passed (``Router._hedge_later``)."""

    key: bytes

    def hedge(self) -> str | None:
        """Ask one more replica if the read still waits: the node to send ``XGet(key)`` to (the router
        groups them per node), or None (nothing to ask, or the read asked by itself)."""

    def answered(self, node: str, record: Record | None) -> None:
        """``node`` answered the hedged ``XGet`` with ``record``."""

    def failed_on(self, node: str) -> None:
        """The hedged ``XGet`` to ``node`` failed."""


def _quorum(attempts: Sequence[Deferred[Any]], needed: int, what: str) -> Deferred[list[Any]]:
    """Fires with the first ``needed`` results, or fails with ``QuorumNotReached`` once that is impossible."""
    total = len(attempts)
    if total < needed:
        return _fail(QuorumNotReached(needed, total, what))
    return _Quorum(attempts, needed, what).done


class _Quorum:
    """The state of one ``_quorum``: results and failures counted as the attempts fire."""

    __slots__ = ("done", "failures", "needed", "results", "total", "what")

    def __init__(self, attempts: Sequence[Deferred[Any]], needed: int, what: str) -> None:
        self.done: Deferred[list[Any]] = Deferred()
        self.results: list[Any] = []
        self.failures = 0
        self.needed = needed
        self.total = len(attempts)
        self.what = what
        for attempt in attempts:
            attempt.addCallbacks(self._ok, self._bad)
        if needed == 0:
            self.done.callback([])

    def _ok(self, result: Any) -> None:
        self.results.append(result)
        if len(self.results) == self.needed and not self.done.called:
            self.done.callback(list(self.results))

    def _bad(self, failure: Failure) -> None:
        self.failures += 1
        left = self.total - self.failures
        if left < self.needed and not self.done.called:
            error = QuorumNotReached(self.needed, left, self.what)
            error.__cause__ = failure.value
            self.done.errback(Failure(error))


def _fail(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d


@implementer(IKeyValue, IForwardedGet, IForwardedSet)
class Router:
    """Routes ``chashd.commands`` to kvstores; the gateway's ``IKeyValue`` backend.

    ``clients(node_id)`` gives the ``IKVClient`` for a node (the service keeps the connections).
    """

    _log = Logger()

    def __init__(
        self,
        gateway_id: str,
        clock: IReactorTime,
        clients: Callable[[str], IKVClient],
        replicas: int = 3,
        write_quorum: int = 2,
        read_quorum: int = 2,
        allow_flush_all: bool = False,
        hedge_after: float = 0.05,
        primary_timeout: float = 0.5,
        lease_for: float = LEASE_FOR,
    ) -> None:
        self.name = f"gateway {gateway_id}"
        self.gateway_id = gateway_id
        #: Seconds from the start of a read-modify-write's round to its deadline (``chashd.leases``).
        self.lease_for = lease_for
        self._rmw_seq = 0
        self._clock = clock
        self._hlc = HybridClock(gateway_id)
        self._clients = clients
        self.replicas = replicas
        self.write_quorum = write_quorum
        self.read_quorum = read_quorum
        self._allow_flush_all = allow_flush_all
        #: Seconds a read waits for an asked replica before it also asks the next one (0: never).
        self.hedge_after = hedge_after
        #: Seconds a read-modify-write waits for its primary before the next replica takes over (0: until
        #: the request fails).
        self.primary_timeout = primary_timeout
        # Suspects: node -> until when. Slow nodes are asked last by reads; stalled ones are not primaries
        # either. Both end when the node answers a request sent while it was suspect.
        self._slow: dict[str, float] = {}
        self._stalled: dict[str, float] = {}
        # (due, read, None, 0) or, for a get of one key with R=1, (due, its XGet Deferred, up, index).
        self._hedges: deque[tuple[float, Any, Sequence[str] | None, int]] = deque()
        self._hedge_call: IDelayedCall | None = None
        self.placement = Placement(HashRing({}))
        #: False while the map this router follows may be stale (``Routing.current``: its Raft gateway heard
        #: from no leader within the election timeout): read-modify-writes are refused (``MapNotCurrent``),
        #: since another gateway may route them to another primary; plain reads and sets still run.
        self.map_current = True
        #: Exclusive read-modify-writes of this gateway take turns per key (``_ReadModifyWrite.start``): the
        #: keys one holds the turn of, each with the ones waiting for it. Without it they would refuse each
        #: other's leases at the kvstores and poll; with it the next one starts as the one before ends.
        self._turns: dict[bytes, deque[_ReadModifyWrite]] = {}
        # Read-modify-writes a kvstore refused for a newer map (StaleMap): (epoch, callback, timer), each
        # called with True once the placement reaches the epoch, with False after ``map_wait``.
        self._epoch_waiters: list[tuple[int, Callable[[bool], None], IDelayedCall]] = []
        # Worked out once per placement and N: see replicas_for.
        self._memo_placement: Placement | None = None
        self._memo_replicas = 0
        self._prefs_memo: dict[bytes, tuple[str, ...]] = {}
        self._down: frozenset[str] = frozenset()
        # The nodes down in the placement before the last change of node states (``_prior_primary``).
        self._prior_down: frozenset[str] = frozenset()
        #: Nodes that answered XVer with ERROR (a kvstore of an earlier version): asked with XGet only, until
        #: the placement changes.
        self._no_xver: set[str] = set()
        self._dispatch: dict[type, Callable[[Any], Deferred[Any]]] = {
            Get: self._route_get,
            Store: self._route_store,
            Arith: self._route_rmw,
            Touch: self._route_rmw,
            Delete: self._route_rmw,
            FlushAll: self._flush_all,
        }
        self.counters: dict[str, int] = {
            "cmd_get": 0,
            "cmd_set": 0,
            "cmd_rmw": 0,
            "cmd_delete": 0,
            "get_hits": 0,
            "get_misses": 0,
            "read_repairs": 0,
            "quorum_failures": 0,
            "hedged_reads_total": 0,
            "rmw_catchups_total": 0,
            "rmw_retries_total": 0,
            "rmw_failovers_total": 0,
            "rmw_refused_stale_map_total": 0,
            "rmw_map_waits_total": 0,
            "rmw_copies_refused_stale_map_total": 0,
            "rmw_copies_refenced_total": 0,
            "rmw_exclusive_rounds_total": 0,
            "rmw_lease_waits_total": 0,
            "rmw_copies_refused_deadline_total": 0,
            "rmw_copies_refused_leased_total": 0,
            "rmw_copies_resent_total": 0,
            "rmw_refused_maybe_applied_total": 0,
            "rmw_lease_polls_total": 0,
            "rmw_leases_released_total": 0,
            "rmw_turns_waited_total": 0,
        }

    # -- placement ------------------------------------------------------------------------------

    def update(self, placement: Placement) -> None:
        """Route by ``placement`` from now on (an equal placement changes nothing, so the memo of
        preference lists survives the gateway's periodic refreshes)."""
        if placement != self.placement:
            old = self.placement
            if old.states != placement.states:
                self._prior_down = frozenset(n for n in old.ring.nodes if not old.is_up(n))
            self.placement = placement
            if self._epoch_waiters:
                self._wake_epoch_waiters()

    #: Seconds a read-modify-write refused for a newer map (``StaleMap``) waits for this router's map to
    #: reach that epoch (a Raft heartbeat is 0.1 s), then fails.
    map_wait = 2.0
    #: Seconds a read-modify-write refused for another command's lease first waits before it reads again;
    #: each further wait of the command doubles it, up to the time the kvstore said that lease ends (most
    #: commands end their leases within a few milliseconds, ``_ReadModifyWrite._end_leases``, long before
    #: their deadline).
    lease_poll = 0.005
    #: Waits shorter than the refusal's end (polls) a read-modify-write makes at most, besides its retries.
    max_lease_polls = 12

    def _when_epoch(self, epoch: int, callback: Callable[[bool], None]) -> None:
        """Call ``callback(True)`` once the placement's epoch reaches ``epoch`` (at once if it has), or
        ``callback(False)`` after ``map_wait`` seconds."""
        if self.placement.ring.epoch >= epoch:
            callback(True)
            return
        timer = self._clock.callLater(self.map_wait, self._epoch_wait_over, callback)
        self._epoch_waiters.append((epoch, callback, timer))

    def _epoch_wait_over(self, callback: Callable[[bool], None]) -> None:
        self._epoch_waiters = [w for w in self._epoch_waiters if w[1] is not callback]
        callback(False)

    def _forget_epoch_wait(self, callback: Callable[[bool], None]) -> None:
        """``callback`` is no longer wanted (what waited is over): its timer is cancelled."""
        for waiter in [w for w in self._epoch_waiters if w[1] == callback]:
            self._epoch_waiters.remove(waiter)
            if waiter[2].active():
                waiter[2].cancel()

    def _wake_epoch_waiters(self) -> None:
        epoch = self.placement.ring.epoch
        due = [w for w in self._epoch_waiters if w[0] <= epoch]
        self._epoch_waiters = [w for w in self._epoch_waiters if w[0] > epoch]
        for _, callback, timer in due:
            if timer.active():
                timer.cancel()
            callback(True)

    def _n(self) -> int:
        return max(1, min(self.replicas, len(self.placement.ring)))

    def replicas_for(self, key: bytes) -> tuple[str, ...]:
        """The key's preference list of N nodes (up or not), primary first."""
        placement = self.placement
        if placement is not self._memo_placement or self.replicas != self._memo_replicas:
            self._new_memo(placement)
        prefs = self._prefs_memo.get(key)
        if prefs is None:
            ring = placement.ring
            if not len(ring):
                raise NoNodes()
            prefs = ring.preference_list(key, self._n())
            if len(self._prefs_memo) >= _PREFS_MEMO_SIZE:
                self._prefs_memo = {}
            self._prefs_memo[key] = prefs
        return prefs

    def _new_memo(self, placement: Placement) -> None:
        """Start the memo of preference lists and down nodes over for ``placement``."""
        self._memo_placement = placement
        self._memo_replicas = self.replicas
        self._prefs_memo = {}
        self._down = frozenset(n for n in placement.ring.nodes if not placement.is_up(n))
        self._no_xver.clear()

    def _up(self, replicas: tuple[str, ...]) -> Sequence[str]:
        """The nodes of ``replicas`` that take requests, slow ones last (call after ``replicas_for``)."""
        down = self._down
        up = replicas if not down else [n for n in replicas if n not in down]
        if self._slow:
            return self._suspects_last(up, self._slow)
        return up

    def _primaries(self, replicas: tuple[str, ...]) -> list[str]:
        """The nodes of ``replicas`` that take requests in preference order, stalled ones last: the first
        is the primary of a read-modify-write, the next ones take over if it fails."""
        down = self._down
        up = [n for n in replicas if n not in down]
        if self._stalled:
            return self._suspects_last(up, self._stalled)
        return up

    def _prior_primary(self, replicas: tuple[str, ...]) -> str | None:
        """The primary of ``replicas`` by the node states before the last change, when it differs from the
        primary now (a gateway a map behind sends its read-modify-writes there); else None."""
        prior = self._prior_down
        if prior == self._down:
            return None
        before = next((n for n in replicas if n not in prior), None)
        now = next((n for n in replicas if n not in self._down), None)
        return before if before != now else None

    def _suspects_last(self, nodes: Sequence[str], suspects: dict[str, float]) -> list[str]:
        """``nodes`` with those still suspect moved to the end (suspicions that ran out are forgotten)."""
        now = self._now()
        for node in [n for n, until in suspects.items() if until <= now]:
            del suspects[node]
        return [n for n in nodes if n not in suspects] + [n for n in nodes if n in suspects]

    # -- suspects ---------------------------------------------------------------------------------

    #: Seconds a node that kept a request waiting stays suspect, unless it answers first.
    suspect_for = 5.0

    def _mark_slow(self, node: str) -> None:
        """``node`` kept a read waiting past ``hedge_after``: reads ask it last for a while."""
        self._slow[node] = self._now() + self.suspect_for

    def _mark_stalled(self, node: str) -> None:
        """``node`` did not answer a primary's request within ``primary_timeout``: not a primary for a while."""
        if node not in self._stalled:
            self._log.info(
                "kvstore {node} kept a read-modify-write waiting {seconds}s: the next replica acts as primary",
                node=node,
                seconds=self.primary_timeout,
            )
        until = self._now() + self.suspect_for
        self._stalled[node] = until
        self._slow[node] = until

    def _heard(self, result: Any, node: str) -> Any:
        """``node`` answered: it is no longer suspect."""
        self._slow.pop(node, None)
        self._stalled.pop(node, None)
        return result

    # -- hedging ----------------------------------------------------------------------------------

    def _hedge_later(self, read: Any, up: Sequence[str] | None = None, index: int = 0) -> None:
        """Look at ``read`` again in ``hedge_after`` seconds (one timer for every read pending); ``read`` is
        a ``_Hedged``, or the Deferred of the XGet to ``up[index]`` of a get of one key with R=1."""
        if self.hedge_after <= 0:
            return
        self._hedges.append((self._now() + self.hedge_after, read, up, index))
        if self._hedge_call is None:
            self._hedge_call = self._clock.callLater(self.hedge_after, self._hedge_due)

    def _hedge_due(self, settled: bool = False) -> None:
        """The hedging timer: every read due asks one more replica if it still waits (one XGet per node)."""
        self._hedge_call = None
        if not settled:  # first let in the replies that came while the timer was due
            self._hedge_call = self._clock.callLater(0, self._hedge_due, True)
            return
        now = self._now()
        hedges = self._hedges
        asks: dict[str, list[_Hedged]] = {}
        while hedges and hedges[0][0] <= now:
            _, read, up, index = hedges.popleft()
            if up is not None:  # the XGet of a get with R=1: cancelled, _one_failed asks the next replica
                if not read.called and index + 1 < len(up):
                    self._mark_slow(up[index])
                    self.counters["hedged_reads_total"] += 1
                    read.cancel()
                continue
            node = read.hedge()
            if node is not None:
                asks.setdefault(node, []).append(read)
        for node, reads in asks.items():
            self.counters["hedged_reads_total"] += len(reads)
            self._send(node, XGet(tuple(r.key for r in reads))).addCallbacks(
                _deliver, _deliver_failure, callbackArgs=(node, reads), errbackArgs=(node, reads)
            )
        if hedges:
            self._hedge_call = self._clock.callLater(max(0.0, hedges[0][0] - now), self._hedge_due)

    def stop(self) -> None:
        """Cancel the hedging timer (the gateway stops); reads still pending are not hedged any more, and
        read-modify-writes waiting for a newer map or for their turn fail."""
        if self._hedge_call is not None and self._hedge_call.active():
            self._hedge_call.cancel()
        self._hedge_call = None
        self._hedges.clear()
        waiters, self._epoch_waiters = self._epoch_waiters, []
        for _, callback, timer in waiters:
            if timer.active():
                timer.cancel()
            callback(False)
        for waiting in list(self._turns.values()):
            queued = list(waiting)
            waiting.clear()
            for op in queued:
                op._fail(Failure(ServiceUnavailable("the gateway stopped: the read-modify-write was not applied")))

    def _rmw_quorums(self, n: int) -> tuple[int, int]:
        """A read-modify-write's ``(W, replicas it reads first)`` for a preference list of ``n``: the read,
        ``max(N - W + 1, R)``, meets every write acknowledged by ``W`` of the ``n``."""
        needed_w = min(self.write_quorum, n)
        return needed_w, min(max(n - needed_w + 1, self.read_quorum), n)

    def _previous_owners(self, key: bytes, current: Sequence[str]) -> list[str]:
        previous = self.placement.previous
        if previous is None or not len(previous):
            return []
        return [n for n in previous.preference_list(key, self._n()) if n not in current]

    def _now(self) -> float:
        return self._clock.seconds()

    def _version_now(self) -> Any:
        return self._hlc.tick(int(self._now() * 1000))

    def _send(self, node: str, command: Any) -> Deferred[Any]:
        try:
            d: Deferred[Any] = self._clients(node).send(command)
        except Exception:
            return _fail(ServiceUnavailable(f"no connection to {node}"))
        if self._slow and node in self._slow:
            d.addCallback(self._heard, node)
        return d

    # -- IKeyValue ------------------------------------------------------------------------------

    def execute(self, command: Any) -> Deferred[Any]:
        """Route ``command``; a Deferred of its result."""
        route = self._dispatch.get(type(command))
        if route is None:
            return _fail(RequestError(f"the gateway does not route {type(command).__name__}"))
        try:
            return route(command)
        except Exception:
            return _fail_current()

    def _route_get(self, command: Get) -> Deferred[Any]:
        if command.exptime is not None:
            return self._gat(command)
        if len(command.keys) == 1:
            return self._get_one(command.keys[0], command.cas)
        return self._get(command)

    def _route_store(self, command: Store) -> Deferred[Any]:
        if command.mode == "set":
            return self._set(command)
        return self._rmw(command.key, command)

    def _route_rmw(self, command: Arith | Touch | Delete) -> Deferred[Any]:
        return self._rmw(command.key, command)

    def stats(self) -> dict[str, Any]:
        """The router's counters and what it routes over."""
        placement = self.placement
        return {
            **self.counters,
            "epoch": placement.ring.epoch,
            "nodes": len(placement.ring),
            "nodes_up": sum(1 for n in placement.ring.nodes if placement.is_up(n)),
            "replicas": self.replicas,
            "write_quorum": self.write_quorum,
            "read_quorum": self.read_quorum,
            "rebalancing": placement.previous is not None,
            "nodes_slow": len(self._slow),
            "nodes_stalled": len(self._stalled),
        }

    # -- writes ---------------------------------------------------------------------------------

    def forward_set(self, command: Store, sink: IReplySink) -> bool:
        """``IForwardedSet``: ``_set`` with its result (``STORED``) or error going to ``sink``, the replicas'
        answers counted by a ``_Write`` without a Deferred; declined when there are no nodes (the general
        path words the error)."""
        try:
            replicas = self.replicas_for(command.key)
        except NoNodes:
            return False
        self._write(command, replicas, sink)
        return True

    def _set(self, command: Store) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self._write(command, self.replicas_for(command.key), done)
        return done

    def _write(self, command: Store, replicas: tuple[str, ...], sink: IReplySink | Deferred[Any]) -> None:
        """Send ``command`` as an ``XPut`` with a new version to the up replicas of ``replicas``: ``STORED`` to
        ``sink`` at the W-th acknowledgement, else ``QuorumNotReached`` (counted)."""
        self.counters["cmd_set"] += 1
        up = self._up(replicas)
        needed = min(self.write_quorum, len(replicas))
        now = self._now()
        record = Record(
            command.value,
            command.flags,
            expires_at_from_exptime(command.exptime, now) if command.exptime else 0,
            self._hlc.tick(int(now * 1000)),
        )
        if len(up) < needed:
            self.counters["quorum_failures"] += 1
            failed = QuorumNotReached(needed, len(up), "write")
            sink.errback(Failure(failed) if isinstance(sink, Deferred) else failed)
            return
        put = XPut(command.key, record)
        write = _Write(self, needed, len(up), sink)
        slow = self._slow
        for node in up:
            try:
                client: IKVClient | None = self._clients(node)
            except Exception:  # no connection to node: _send fails its XPut saying so
                client = None
            if client is None or (slow and node in slow) or not client.send_to(put, write):
                self._send(node, put).addCallbacks(write.callback, write.errback)

    def _count_quorum_failure(self, failure: Failure) -> Failure:
        if failure.check(QuorumNotReached):
            self.counters["quorum_failures"] += 1
        return failure

    def _rmw(self, key: bytes, command: Any, with_record: bool = False) -> Deferred[Any]:
        """Apply ``command`` at the key's primary on top of the newest record, then copy the record it left
        to the other replicas (``_ReadModifyWrite``).

        Fires with memcached's result, or ``(result, record)`` when ``with_record`` is set. Refused
        (``MapNotCurrent``) while the map may be stale (``map_current``).
        """
        if not self.map_current:
            self.counters["rmw_refused_stale_map_total"] += 1
            return _fail(MapNotCurrent())
        if isinstance(command, Delete):
            self.counters["cmd_delete"] += 1
        else:
            self.counters["cmd_rmw"] += 1
        operation = _ReadModifyWrite(self, key, command, with_record)
        operation.start()
        return operation.done

    def _flush_all(self, command: FlushAll) -> Deferred[Any]:
        if not self._allow_flush_all:
            raise RequestError("flush_all is disabled on this gateway (start it with --allow-flush-all)")
        nodes = [n for n in self.placement.ring.nodes if self.placement.is_up(n)]
        if not nodes:
            raise NoNodes()
        d = _quorum([self._send(n, FlushAll(command.delay)) for n in nodes], len(nodes), "flush_all")
        d.addCallback(lambda _: Status.OK)
        return d

    # -- reads ----------------------------------------------------------------------------------

    def _get_one(self, key: bytes, cas: bool = False) -> Deferred[Any]:
        """A get of one key: with R=1 and no move under way, one XGet (and the next replica on a failure or
        after ``hedge_after``); otherwise one ``_KeyRead`` that answers with the final ``Values``. With N=1 a
        ``get`` is a ``SplicedGet``: the one replica's reply goes to the client as it came (``bytes``)."""
        self.counters["cmd_get"] += 1
        replicas = self.replicas_for(key)
        if (self.read_quorum == 1 or len(replicas) == 1) and (
            self.placement.previous is None or not self._previous_owners(key, replicas)
        ):
            up = self._up(replicas)
            if not up:
                self.counters["quorum_failures"] += 1
                return _fail(QuorumNotReached(1, 0, "read"))
            if len(replicas) == 1 and not cas:
                d = self._send(up[0], SplicedGet(key))
                return d.addCallbacks(self._spliced, self._one_failed, errbackArgs=(key, up, 0))
            return self._ask_one(key, up, 0)
        read = _KeyRead(self, key, replicas, single=True)
        read.start()
        return read.done

    @property
    def forwarding(self) -> bool:
        """``IForwardedGet``: False when R is 1 and N is not (the hedged one-replica read of ``_get_one``
        keeps its Deferred: ``forward_get`` declines every get then)."""
        return self.read_quorum != 1 or self.replicas == 1 or len(self.placement.ring) == 1

    def forward_get(self, key: bytes, sink: IReplySink) -> bool:
        """``IForwardedGet``: with N=1, a get of one key goes to its kvstore as ``get <key>`` and the reply's
        bytes to ``sink`` (as ``SplicedGet``'s Deferred would give them, without the Deferred); declined
        while a move is under way for the key, its node is down or suspect, or no connection to it is up."""
        try:
            replicas = self.replicas_for(key)
        except NoNodes:
            return False
        moving = self.placement.previous is not None and self._previous_owners(key, replicas)
        if len(replicas) == 1 and not moving:
            node = replicas[0]
            if self._slow or node in self._down or not self._clients(node).forward_get(key, _Spliced(self, sink)):
                return False
        elif self.read_quorum == 1 and not moving:
            return False  # _get_one's hedged read of one replica
        elif not moving and self.read_quorum == 2 and not self._slow and self._pair_read(key, replicas, sink):
            return True
        else:  # a quorum read (or a read during a move) whose answer goes to sink as bytes
            self.counters["cmd_get"] += 1
            _KeyRead(self, key, replicas, single=True, sink=sink).start()
            return True
        self.counters["cmd_get"] += 1
        return True

    def _pair_read(self, key: bytes, replicas: tuple[str, ...], sink: IReplySink) -> bool:
        """``forward_get``'s quorum read with R=2 and no node suspect or moving: a ``_PairRead`` of the first two
        up replicas (counted); False, and nothing sent, when it does not apply (fewer than two up replicas, the
        second not speaking ``XVer``, no connection up to the first): the general ``_KeyRead`` then."""
        up = self._up(replicas)
        if len(up) < 2 or len(replicas) < 2 or up[1] in self._no_xver:
            return False
        try:
            client = self._clients(up[0])
        except Exception:  # no connection to it: the general read words the failure
            return False
        read = _PairRead(self, key, up, sink)
        if not client.send_to(XGet((key,)), read):
            return False
        self.counters["cmd_get"] += 1
        read.ask_version()
        if not read.answered_client:  # (handed over meanwhile: its hedge() passes the call on)
            self._hedge_later(read)
        return True

    def _ask_one(self, key: bytes, up: Sequence[str], index: int) -> Deferred[Any]:
        d = self._send(up[index], XGet((key,)))
        d.addCallbacks(self._one_answered, self._one_failed, callbackArgs=(key,), errbackArgs=(key, up, index))
        if not d.called and index + 1 < len(up):
            self._hedge_later(d, up, index)
        return d

    def _spliced(self, reply: bytes) -> bytes:
        self.counters["get_hits" if reply[0] == 86 else "get_misses"] += 1  # V(ALUE) or E(ND)
        return reply

    def _one_answered(self, answer: Values, key: bytes) -> Values:
        items = answer.items
        if len(items) == 1 and items[0][0] == key:
            record = items[0][1]
            if record.live(self._now()):  # the kvstore's answer is the client's
                self.counters["get_hits"] += 1
                return answer
            self.counters["get_misses"] += 1
            return _NO_VALUES
        for item_key, record in items:
            if item_key == key:
                return self._client_values(key, record)
        self.counters["get_misses"] += 1
        return _NO_VALUES

    def _client_reply(self, key: bytes, record: Record | None) -> bytes:
        """``_client_values`` as the bytes of the reply to ``get <key>``."""
        if record is not None and record.live(self._now()):
            self.counters["get_hits"] += 1
            return plain_get_reply(key, (record.flags, record.value))
        self.counters["get_misses"] += 1
        return plain_get_reply(key, None)

    def _ask(self, node: str, key: bytes, read: _KeyRead) -> None:
        """Send ``XGet((key,))`` to ``node`` for ``read``: its answer to ``read._answer_from``, a failure to
        ``read.failed_on``, through an ``_Answer`` sink (no Deferred) when a connection is up and the node
        is not suspect; else through ``_send``'s Deferred."""
        try:
            client: IKVClient | None = self._clients(node)
        except Exception:  # no connection to node: _send fails the request saying so
            client = None
        if client is not None and node not in self._slow and client.send_to(XGet((key,)), _Answer(read, node)):
            return
        self._send(node, XGet((key,))).addCallbacks(
            read._answer_from, read.failed_on_with, callbackArgs=(node,), errbackArgs=(node,)
        )

    def _ask_version(self, node: str, key: bytes, read: _KeyRead) -> None:
        """Send ``XVer(key)`` to ``node`` for ``read`` (its version to ``read._version_from``) through a
        ``_VersionAnswer`` sink; ``_ask`` instead (the whole record) when ``node`` does not speak ``XVer``, is
        suspect, or no connection to it is up now."""
        if node not in self._no_xver and node not in self._slow:
            try:
                client: IKVClient | None = self._clients(node)
            except Exception:  # no connection to node: _ask's _send fails the request saying so
                client = None
            if client is not None and client.send_to(XVer(key), _VersionAnswer(read, node)):
                return
        self._ask(node, key, read)

    def _client_values(self, key: bytes, record: Record | None) -> Values:
        """What a client reading ``key`` gets when ``record`` is the newest answer."""
        if record is not None and record.live(self._now()):
            self.counters["get_hits"] += 1
            return Values(((key, record),))
        self.counters["get_misses"] += 1
        return _NO_VALUES

    def _one_failed(self, failure: Failure, key: bytes, up: Sequence[str], index: int) -> Deferred[Any]:
        """The XGet of a get with R=1 failed, or was cancelled by the hedging timer: the next up replica."""
        if index + 1 < len(up):
            return self._ask_one(key, up, index + 1)
        self.counters["quorum_failures"] += 1
        return _fail(QuorumNotReached(1, 0, "read"))

    def _get(self, command: Get) -> Deferred[Any]:
        self.counters["cmd_get"] += 1
        keys = list(dict.fromkeys(command.keys))
        reads = [_KeyRead(self, key, self.replicas_for(key)) for key in keys]
        # One XGet per node for all the keys it is asked about.
        by_node: dict[str, list[_KeyRead]] = {}
        for read in reads:
            for node in read.first_round():
                by_node.setdefault(node, []).append(read)
        for node, node_reads in by_node.items():
            self._send(node, XGet(tuple(r.key for r in node_reads))).addCallbacks(
                _deliver, _deliver_failure, callbackArgs=(node, node_reads), errbackArgs=(node, node_reads)
            )
        for read in reads:
            if not read.done.called:
                self._hedge_later(read)
        results = [read.done for read in reads]
        done: Deferred[Any] = Deferred()
        remaining = [len(results)]
        values: dict[bytes, Record | None] = {}
        failure: list[Failure] = []

        def one(result: tuple[bytes, Record | None] | Failure) -> None:
            if isinstance(result, Failure):
                failure.append(result)
            else:
                values[result[0]] = result[1]
            remaining[0] -= 1
            if remaining[0] == 0:
                if failure:
                    done.errback(failure[0])
                    return
                now = self._now()
                items = []
                for key in command.keys:
                    record = values.get(key)
                    if record is not None and record.live(now):
                        items.append((key, record))
                        self.counters["get_hits"] += 1
                    else:
                        self.counters["get_misses"] += 1
                done.callback(Values(tuple(items)))

        for result in results:
            result.addBoth(one)
        if not results:
            done.callback(Values(()))
        return done

    def _gat(self, command: Get) -> Deferred[Any]:
        """``gat``/``gats``: touch each key at its primary (a write), answer with the records it left."""
        assert command.exptime is not None
        self.counters["cmd_get"] += 1
        keys = list(dict.fromkeys(command.keys))
        touches = [self._rmw(key, Touch(key, command.exptime), with_record=True) for key in keys]
        done: Deferred[Any] = Deferred()
        gathered: dict[bytes, Any] = {}

        def collect(result: Any, key: bytes) -> None:
            gathered[key] = result
            if len(gathered) < len(keys):
                return
            failures = [g for g in gathered.values() if isinstance(g, Failure)]
            if failures:
                done.errback(failures[0])
                return
            items = []
            for k in command.keys:
                status, record = gathered[k]
                # A touched record answers as it was read, also when the new exptime is past (memcached's gat
                # answers the item, and the next read misses).
                if status is Status.TOUCHED and record is not None:
                    items.append((k, record))
            done.callback(Values(tuple(items)))

        for key, touch in zip(keys, touches):
            touch.addBoth(collect, key)
        if not keys:
            done.callback(Values(()))
        return done


@implementer(IReplySink)
class _Write:
    """The ``XPut`` of one ``set`` to the key's up replicas, the sink of their answers (``IKVClient.send_to``,
    in place of a Deferred each and a quorum of them): ``STORED`` goes to ``done`` (the line protocol's sink,
    or a Deferred) at the ``needed``-th acknowledgement, or ``QuorumNotReached`` (counted) once so many cannot
    come any more; the answers after that change nothing."""

    __slots__ = ("done", "failures", "needed", "oks", "router", "total")

    called = False  # takes every answer

    def __init__(self, router: Router, needed: int, total: int, done: IReplySink | Deferred[Any]) -> None:
        self.router = router
        self.needed = needed
        self.total = total
        self.oks = self.failures = 0
        self.done = done

    def callback(self, result: Any) -> None:
        self.oks += 1
        if self.oks == self.needed and not self.done.called:
            self.done.callback(Status.STORED)

    def errback(self, error: Any) -> None:
        self.failures += 1
        left = self.total - self.failures
        if left < self.needed and not self.done.called:
            self.router.counters["quorum_failures"] += 1
            failed = QuorumNotReached(self.needed, left, "write")
            failed.__cause__ = error.value if isinstance(error, Failure) else error
            self.done.errback(Failure(failed) if isinstance(self.done, Deferred) else failed)


@implementer(IReplySink)
class _Answer:
    """The sink of one ``XGet`` of a ``_KeyRead`` (``Router._ask``): the answer of ``node``, in place of a
    Deferred and its callbacks."""

    __slots__ = ("node", "read")

    called = False  # never cancelled: the read takes every answer, late ones included (read repair)

    def __init__(self, read: _KeyRead, node: str) -> None:
        self.read = read
        self.node = node

    def callback(self, result: Values) -> None:
        self.read._answer_from(result, self.node)

    def errback(self, error: Any) -> None:
        self.read.failed_on(self.node)


class _VersionAnswer(_Answer):
    """The sink of one ``XVer`` of a ``_KeyRead`` (``Router._ask_version``): the version ``node`` holds; an
    ``ERROR`` (a kvstore of an earlier version) asks it again with ``XGet``."""

    __slots__ = ()

    def callback(self, result: VersionOf) -> None:  # type: ignore[override]  # an XVer's answer
        self.read._version_from(result, self.node)

    def errback(self, error: Any) -> None:
        if isinstance(error, Failure):
            error = error.value
        read, node = self.read, self.node
        if isinstance(error, UnknownCommand):
            read.router._no_xver.add(node)
            read.router._ask(node, read.key, read)
        else:
            read.failed_on(node)


@implementer(IReplySink)
class _Spliced:
    """The sink of a ``Router.forward_get``: counts the hit or miss, and words a failure as the unspliced read
    would (``QuorumNotReached``, counted), before the reply goes on to the client's ``sink``."""

    __slots__ = ("router", "sink")

    def __init__(self, router: Router, sink: IReplySink) -> None:
        self.router = router
        self.sink = sink

    @property
    def called(self) -> bool:
        """The client's sink took its reply or no longer wants it."""
        return bool(self.sink.called)

    def callback(self, reply: bytes) -> None:
        self.sink.callback(self.router._spliced(reply))

    def errback(self, error: Any) -> None:
        self.router.counters["quorum_failures"] += 1
        failed = QuorumNotReached(1, 0, "read")
        failed.__cause__ = error.value if isinstance(error, Failure) else error
        self.sink.errback(failed)


_UNSET: Any = object()


@implementer(IReplySink)
class _PairRead:
    """The common quorum read (``forward_get`` with R=2, no node suspect, no move under way): the record of the
    first up replica (this object is the sink of its ``XGet``) and the version of the second (``_PairVersion``,
    the sink of its ``XVer``); with both in, the client gets the record (``_client_reply``), and a second
    replica that answered an older version or none gets the record written back. Exactly ``_KeyRead``'s rules
    for these two answers, with two slots in place of its lists and dicts.

    Anything else hands the read over to a ``_KeyRead`` (``general``), given what came so far, which goes on by
    its rules: a version newer than the record (its record is asked for), a failure, an ``XVer`` the second
    replica does not know, the hedging timer finding the read waiting. Every later call is passed on to it.
    """

    __slots__ = ("answered_client", "general", "key", "record", "router", "sink", "up", "version")

    called = False  # takes every answer

    def __init__(self, router: Router, key: bytes, up: Sequence[str], sink: IReplySink) -> None:
        self.router = router
        self.key = key
        self.up = up
        self.sink = sink
        self.record: Record | None = _UNSET
        self.version: Version | None = _UNSET
        self.general: _KeyRead | None = None
        self.answered_client = False

    def ask_version(self) -> None:
        """Send the second replica its ``XVer`` (after the first one's ``XGet`` went)."""
        router = self.router
        node = self.up[1]
        try:
            client: IKVClient | None = router._clients(node)
        except Exception:  # no connection to node: the general read's _send fails the request saying so
            client = None
        if client is None or not client.send_to(XVer(self.key), _PairVersion(self)):
            router._ask(node, self.key, self._hand_over())

    def _hand_over(self) -> _KeyRead:
        """The read from now on: a ``_KeyRead`` of the same replicas, the two asked, holding what they answered."""
        general = self.general
        if general is None:
            router = self.router
            up = self.up
            general = _KeyRead(router, self.key, tuple(up), single=True, sink=self.sink, candidates=up)
            general.asked.extend(up[:2])
            if self.record is not _UNSET:
                general.answers[up[0]] = self.record
            if self.version is not _UNSET:
                general.versions[up[1]] = self.version
            self.general = general
        return general

    # -- the first replica's XGet ------------------------------------------------------------------------

    def callback(self, result: Values) -> None:
        if self.general is not None:
            self.general._answer_from(result, self.up[0])
            return
        key = self.key
        record = None
        for item_key, item in result.items:
            if item_key == key:
                record = item
                break
        if self.version is _UNSET:
            self.record = record
        else:
            self._both(record, self.version)

    def errback(self, error: Any) -> None:
        self._hand_over().failed_on(self.up[0])

    # -- the second replica's XVer (_PairVersion) --------------------------------------------------------

    def version_from(self, result: VersionOf) -> None:
        if self.general is not None:
            self.general._version_from(result, self.up[1])
            return
        if self.record is _UNSET:
            self.version = result.version
        else:
            self._both(self.record, result.version)

    def version_failed(self, error: Any) -> None:
        if isinstance(error, Failure):
            error = error.value
        general = self._hand_over()
        node = self.up[1]
        if isinstance(error, UnknownCommand):  # a kvstore of an earlier version: its record, by XGet
            self.router._no_xver.add(node)
            self.router._ask(node, self.key, general)
        else:
            general.failed_on(node)

    def _both(self, record: Record | None, version: Version | None) -> None:
        """Both answered: the client gets the newest, and the second replica the record if it is behind; a
        version newer than the record goes to the general read, which asks for its record."""
        if version is not None and (record is None or version > record.version):
            self.record, self.version = record, version
            self._hand_over()._progress()
            return
        router = self.router
        self.answered_client = True
        self.sink.callback(router._client_reply(self.key, record))
        if record is not None and (version is None or record.version > version):
            node = self.up[1]
            router.counters["read_repairs"] += 1
            router._send(node, XPut(self.key, record)).addErrback(self._repair_failed, node)

    def _repair_failed(self, failure: Failure, node: str) -> None:
        self.router._log.info(
            "read repair of {key!r} on {node} failed: {error}", key=self.key, node=node, error=failure.getErrorMessage()
        )

    # -- hedging (_Hedged) -------------------------------------------------------------------------------

    def hedge(self) -> str | None:
        """Still waiting after ``hedge_after``: the general read takes over and asks the next replica."""
        if self.answered_client:
            return None
        return self._hand_over().hedge()

    def answered(self, node: str, record: Record | None) -> None:
        self._hand_over().answered(node, record)

    def failed_on(self, node: str) -> None:
        self._hand_over().failed_on(node)


@implementer(IReplySink)
class _PairVersion:
    """The sink of a ``_PairRead``'s ``XVer``."""

    __slots__ = ("read",)

    called = False  # never cancelled

    def __init__(self, read: _PairRead) -> None:
        self.read = read

    def callback(self, result: VersionOf) -> None:
        self.read.version_from(result)

    def errback(self, error: Any) -> None:
        self.read.version_failed(error)


class _KeyRead:
    """One key's read: which replicas to ask, their answers, the newest record, the read repair.

    ``done`` fires with ``(key, newest record or None)``, or, for a ``single`` read (a get of this key
    alone), with the ``Values`` the client gets; with a ``sink`` the reply's bytes go there instead (and
    there is no ``done``). A read of this key alone (``start``) asks the first replica for its record and
    the other replicas of its first round for their version only (``versions``); before it answers, a
    replica whose version is newer than every record read is asked for its record. An answer of either kind
    counts toward R, and a version older than the newest record gets that record written back, as a record
    does.
    """

    __slots__ = (
        "_answered_client",
        "answers",
        "asked",
        "candidates",
        "done",
        "extra",
        "failed",
        "key",
        "needed",
        "router",
        "single",
        "sink",
        "versions",
    )

    def __init__(
        self,
        router: Router,
        key: bytes,
        replicas: tuple[str, ...],
        single: bool = False,
        sink: IReplySink | None = None,
        candidates: Sequence[str] | None = None,
    ) -> None:
        self.router = router
        self.key = key
        self.single = single
        self.sink = sink
        # A _PairRead handing its read over gives the up replicas it chose (no move was under way then).
        up = router._up(replicas) if candidates is None else candidates
        self.needed = min(router.read_quorum, len(replicas))
        self.candidates = up
        self.extra = router._previous_owners(key, replicas) if candidates is None else []
        self.asked: list[str] = []
        self.answers: dict[str, Record | None] = {}
        self.versions: dict[str, Version | None] = {}  # answers to XVer
        self.failed: list[str] = []
        # A read answering a sink never fires (nor builds) a Deferred.
        self.done: Deferred[Any] = Deferred() if sink is None else cast("Deferred[Any]", None)
        self._answered_client = False
        if len(up) < self.needed:
            self._fail(QuorumNotReached(self.needed, len(up), "read"))

    def first_round(self) -> list[str]:
        """The nodes to ask first: R up replicas, plus the previous owners during a move."""
        if self._answered_client:
            return []
        first = [*self.candidates[: self.needed], *self.extra]
        self.asked.extend(first)
        return first

    def start(self) -> None:
        """Send the first round of a read of this key alone: the first replica asked for its record, the other
        replicas for their version, the previous owners (during a move) for their records."""
        router = self.router
        key = self.key
        first = True
        extra = self.extra
        for node in self.first_round():
            if first or node in extra:
                router._ask(node, key, self)
                first = False
            else:
                router._ask_version(node, key, self)
        if not self._answered_client:
            router._hedge_later(self)

    def hedge(self) -> str | None:
        """Still short of R answers after ``hedge_after``: ask the next replica not asked yet (the ones
        that keep the read waiting are slow), and look again after another ``hedge_after``."""
        if self._answered_client:
            return None
        answers = self.answers
        versions = self.versions
        candidates = self.candidates
        if sum(1 for n in candidates if n in answers or n in versions) >= self.needed:
            return None  # only previous owners are awaited: no replica to ask in their place
        router = self.router
        for node in self.asked:
            if node in candidates and node not in answers and node not in versions and node not in self.failed:
                router._mark_slow(node)
        untried = [n for n in candidates if n not in self.asked]
        if not untried:
            return None
        self.asked.append(untried[0])
        router._hedge_later(self)
        return untried[0]

    def _answer_from(self, result: Values, node: str) -> None:
        key = self.key
        for item_key, record in result.items:
            if item_key == key:
                self.answers[node] = record
                break
        else:
            self.answers[node] = None
        self._progress()

    def failed_on_with(self, failure: Failure, node: str) -> None:
        """``failed_on`` as an errback."""
        self.failed_on(node)

    def answered(self, node: str, record: Record | None) -> None:
        self.answers[node] = record
        self._progress()

    def _version_from(self, result: VersionOf, node: str) -> None:
        """``node`` answered the ``XVer`` of this key."""
        self.versions[node] = result.version
        self._progress()

    def failed_on(self, node: str) -> None:
        self.failed.append(node)
        if node in self.candidates:
            untried = [n for n in self.candidates if n not in self.asked]
            if untried:
                nxt = untried[0]
                self.asked.append(nxt)
                self.router._send(nxt, XGet((self.key,))).addCallbacks(
                    _deliver, _deliver_failure, callbackArgs=(nxt, [self]), errbackArgs=(nxt, [self])
                )
        self._progress()

    def _progress(self) -> None:
        answers = self.answers
        versions = self.versions
        extra = self.extra
        # Every asked node ends in one of answers (a record), versions or failed (one asked for its record after
        # its version, _newer_version, leaves versions until then); the asked replicas and the previous owners
        # are distinct, and previous owners are asked for records only.
        got = len(answers) + len(versions)
        pending = len(self.asked) - got - len(self.failed)
        if self._answered_client:  # a late answer: the repair waits for the last
            if not pending:
                self._repair(self._newest())
            return
        if extra:
            from_replicas = sum(1 for n in answers if n not in extra) + len(versions)
            extra_pending = any(n in extra and n not in answers and n not in self.failed for n in self.asked)
        else:
            from_replicas = got
            extra_pending = False
        if from_replicas >= self.needed and not extra_pending:
            newest = self._newest()
            if versions and self._newer_version(newest):
                return  # its record is asked for: answered then
            self._answer(newest)
            if not pending:
                self._repair(newest)
        elif not pending and from_replicas < self.needed:
            self._fail(QuorumNotReached(self.needed, from_replicas, "read"))

    def _fail(self, error: QuorumNotReached) -> None:
        """Not enough replicas answered (or are up): the read fails with ``error``, counted."""
        self._answered_client = True
        self.router.counters["quorum_failures"] += 1
        if self.sink is not None:
            self.sink.errback(error)
        else:
            self.done.errback(Failure(error))

    def _answer(self, newest: Record | None) -> None:
        self._answered_client = True
        if self.sink is not None:
            self.sink.callback(self.router._client_reply(self.key, newest))
        elif self.single:
            self.done.callback(self.router._client_values(self.key, newest))
        else:
            self.done.callback((self.key, newest))

    def _newest(self) -> Record | None:
        newest: Record | None = None
        for record in self.answers.values():
            if record is not None and (newest is None or record.version > newest.version):
                newest = record
        return newest

    def _newer_version(self, newest: Record | None) -> bool:
        """When a replica answered a version newer than ``newest`` (the newest record read), ask it for its
        record (its version answer is dropped until then) and return True."""
        best: tuple[Version, str] | None = None
        for node, version in self.versions.items():
            newer = version is not None and (newest is None or version > newest.version)
            if newer and (best is None or version > best[0]):  # type: ignore[operator]  # not None when newer
                best = (version, node)  # type: ignore[assignment]  # not None when newer
        if best is None:
            return False
        node = best[1]
        del self.versions[node]  # pending again until its record (or its failure) comes
        self.router._ask(node, self.key, self)
        return True

    def _repair(self, newest: Record | None) -> None:
        """Every asked node answered or failed: the replicas that answered an older record or version than
        ``newest`` (or none) get it."""
        if newest is None:
            return
        router = self.router
        candidates = self.candidates
        version = newest.version
        for node, record in self.answers.items():
            if (record is None or version > record.version) and node in candidates:
                router.counters["read_repairs"] += 1
                router._send(node, XPut(self.key, newest)).addErrback(self._repair_failed, node)
        for node, held in self.versions.items():
            if (held is None or version > held) and node in candidates and node not in self.answers:
                router.counters["read_repairs"] += 1
                router._send(node, XPut(self.key, newest)).addErrback(self._repair_failed, node)

    def _repair_failed(self, failure: Failure, node: str) -> None:
        self.router._log.info(
            "read repair of {key!r} on {node} failed: {error}", key=self.key, node=node, error=failure.getErrorMessage()
        )


# _REFENCE_WAIT: the copies were refused by replicas that know a newer map; waiting for this router's map to
# reach it. _REFENCING: the copies go again, fenced by that map (``_ReadModifyWrite._refence``).
_READING, _APPLYING, _REPLICATING, _WAITING, _REFENCE_WAIT, _REFENCING, _OVER, _LEASE_WAIT, _QUEUED = range(9)


class _MapMoved(Exception):
    """The placement's epoch changed between a read-modify-write's choice of primary and its command."""


class _ReadModifyWrite:
    """One read-modify-write command: read the key from enough replicas, bring the primary up to date,
    apply the command there, copy the record it left to the other replicas (see the module docstring).

    - Read: ``XLease`` to the first ``reads_needed`` = ``max(N - W + 1, R, W)`` candidates (the up replicas
      in preference order, stalled ones last; the first is the primary: ``needed_r`` meets every
      acknowledged write, ``W`` lets every replica the result must reach grant the lease before anything is
      applied, or the round waits) and to the previous owners during a move; a failure asks the next
      candidate, so does ``hedge_after`` without enough answers. The read is over with ``reads_needed``
      answers from replicas, the primary's among them, and every previous owner's answer (or failure).
    - Apply: the newest record read goes first to a primary that answered an older one (or nothing), then
      ``XApply`` with a version newer than every version read. ``StaleVersion`` (another write got there
      first) sends it again with a version past the stored one, up to ``max_retries`` times.
    - Failover: a primary that fails, or does not answer its read or its command within
      ``primary_timeout``, is replaced by the next candidate, with a new version (the late answers of
      the one replaced are ignored; a ``round`` tells them apart). A primary that fails with no candidate
      after it left is replaced by one before it that was only late (its read may have come meanwhile).
    - Replicate: the record the command left goes to every other candidate, fenced by the command's epoch
      (``XPut.epoch``: a replica that knows a newer map refuses it, ``StaleMap``); ``W - 1``
      acknowledgements complete the command. A command that changed nothing repairs the replicas that
      answered an older record than the newest.
    - Re-fence: when too few copies were taken because replicas know the next map (epoch + 1), the
      command waits for this router's map to reach it and, when every gateway on that map reads the
      primary before its own commands (``_refence_unsound``: the primary is among the first replicas of
      the key's preference list by that map, a ring change or not), sends the copies again fenced by the
      new epoch to the new map's candidates; ``W`` of that map's preference list holding the result (the
      primary, the replicas of both maps that took the first copies, and these) complete it.
    - The map: the command runs by the placement's epoch at ``start``. A placement that changes before the
      command is sent, or a primary that knows a newer map (``StaleMap``: nothing applied; the command waits
      for this router's map to reach it, ``_WAITING``), starts it over from the read (``_restart``). While
      the node states just changed, the read also asks the primary by the states before (``extra``), where a
      gateway a map behind applies.
    - Leases (``chashd.leases``, where the argument is): each round (a read, then the command and its copies)
      has a deadline, ``lease_for`` after it starts; its reads are ``XLease`` (shared while the primary is
      the map's, ``map_primary``; the kvstores keep shared leases of two map epochs apart; exclusive on
      ``max(W, N - W + 1)`` candidates otherwise), its command
      and copies carry the round's ``Lease``. A primary that is not the map's (a failover, or a stalled map
      primary) applies only after an exclusive round (``_go_exclusive``: one more read). A read refused
      for another command's lease (``KeyLeased``) gives up the leases its round got and reads again after
      ``lease_poll`` seconds, doubled each time, or when that lease ends if sooner (``_LEASE_WAIT``).
      Exclusive commands of this router take turns per key (``Router._turns``, ``_QUEUED``). A command
      whose primary may have applied it (its command unanswered: the timeout, a lost connection) remembers
      that version (``sent_version``), reads again exclusively, and fails if that read finds a record as
      new (``_maybe_applied``). Over, it ends its leases where no store of it did (``_end_leases``:
      ``XRelease``, with the newest version it may have left unacknowledged as floor).
    """

    __slots__ = (
        "acknowledged",
        "answer",
        "answers",
        "applied_at",
        "asked",
        "awaited",
        "candidates",
        "command",
        "copies_out",
        "copying",
        "copy_error",
        "copy_ok",
        "done",
        "epoch",
        "extra",
        "exclusive",
        "failed",
        "has_turn",
        "holder",
        "in_flight",
        "key",
        "lease",
        "lease_polls",
        "map_primary",
        "needed_r",
        "needed_w",
        "newest",
        "phase",
        "primary",
        "record",
        "reads_needed",
        "refused_by",
        "replicas",
        "reread",
        "resend",
        "retries",
        "round",
        "router",
        "sent_version",
        "timer",
        "unacknowledged",
        "unreleased",
        "with_record",
    )

    #: ``StaleVersion`` refusals (each a round trip to the primary) before the command fails
    #: (``ServiceUnavailable``): only a key written without a pause by several gateways gets there.
    max_retries = 8

    def __init__(self, router: Router, key: bytes, command: Any, with_record: bool) -> None:
        self.router = router
        self.key = key
        self.command = command
        self.with_record = with_record
        self.done: Deferred[Any] = Deferred()
        self.phase = _READING
        self.round = 0
        self.retries = 0
        self.timer: IDelayedCall | None = None
        self.answers: dict[str, Record | None] = {}
        self.asked: list[str] = []
        self.failed: set[str] = set()
        self.primary = 0
        self.newest: Record | None = None
        self.candidates: list[str] = []
        self.extra: list[str] = []
        self.needed_r = self.needed_w = 0
        self.epoch = self.awaited = 0
        #: The newest map epoch known by a replica that refused a copy of the result (``_copy_not_taken``).
        self.refused_by = 0
        # The replication of the result: the node that applied it, the answer and record it gave, the other
        # replicas that took a copy (STORED, or EXISTS: they hold a newer record), copies still unanswered,
        # and the last refusal or failure (for the error).
        self.applied_at = ""
        self.answer: Any = None
        self.record: Record | None = None
        self.copy_ok: set[str] = set()
        self.copies_out = 0
        #: The nodes a copy of the result is on its way to (a copy taken ends the command's lease there).
        self.copying: set[str] = set()
        self.copy_error: Failure | None = None
        #: Replicas that refused the copy for its deadline or a lease (it came late; a kvstore that started
        #: 3.5 s ago or less leases nothing), sent it again once the result is acknowledged (``_resend``).
        self.resend: list[str] = []
        self.acknowledged = False
        #: After a re-fence: the new map's preference list of the key, the only replicas whose copies count.
        self.replicas: tuple[str, ...] = ()
        # Leases: this command's holder id, its round's lease, whether the round is exclusive, the map's
        # primary of the key (the first up replica), the candidates a round reads, the version of a command
        # sent to a primary that did not answer (it may have applied it), the one in flight, and whether an
        # exclusive round must read again before another node runs the command.
        router._rmw_seq += 1
        self.holder = f"{router.gateway_id}:{router._rmw_seq}"
        self.lease = Lease(self.holder, 0)
        self.exclusive = False
        self.map_primary: str | None = None
        self.reads_needed = 0
        self.sent_version: Version | None = None
        self.in_flight: Version | None = None
        self.reread = False
        #: The nodes that may hold a lease of this command (asked by ``XLease``, no store of it taken since),
        #: with the last deadline sent there: told when the command is over (``_end_leases``).
        self.unreleased: dict[str, int] = {}
        #: The newest version this command may have stored without being acknowledged (a command sent and not
        #: answered, or a result whose copies were refused): the floor of its releases.
        self.unacknowledged: Version | None = None
        self.lease_polls = 0
        #: Holds its key's turn among this gateway's exclusive commands (``Router._turns``).
        self.has_turn = False

    def start(self) -> None:
        router = self.router
        self.epoch = router.placement.ring.epoch
        replicas = router.replicas_for(self.key)
        self.needed_w, self.needed_r = router._rmw_quorums(len(replicas))
        self.reads_needed = max(self.needed_r, self.needed_w)
        self.candidates = router._primaries(replicas)
        down = router._down
        self.map_primary = next((n for n in replicas if n not in down), None)
        # A primary that is not the map's (a stalled one moved last) applies only after exclusive leases. (A
        # gateway on another map may name another primary: the kvstores keep shared leases of two maps apart,
        # by the epoch of the connection, chashd.leases.)
        self.exclusive = bool(self.candidates) and self.candidates[0] != self.map_primary
        if self.exclusive and not self.has_turn:
            waiting = router._turns.get(self.key)
            if waiting is not None:  # another exclusive command of this gateway on the key: after it
                router.counters["rmw_turns_waited_total"] += 1
                self.phase = _QUEUED
                waiting.append(self)
                return
            router._turns[self.key] = deque()
            self.has_turn = True
        self.reread = self.sent_version is not None
        self.extra = router._previous_owners(self.key, replicas)
        prior = router._prior_primary(replicas)
        if prior is not None and prior in self.candidates[self.reads_needed :]:
            # The primary by the map before: a gateway a map behind applies there. Reading it (after this
            # gateway's xmap on the same connection) orders it: what it applied before is read, what comes
            # after is refused. Only a node up now (a down one would hold the command up).
            self.extra = [*self.extra, prior]
        up = len(self.candidates)
        if up < self.needed_w or up < self.needed_r or not up:
            router.counters["quorum_failures"] += 1
            if up < self.needed_w or not up:
                self._fail(Failure(QuorumNotReached(self.needed_w, up, "write")))
            else:
                self._fail(Failure(QuorumNotReached(self.needed_r, up, "read")))
            return
        self._read()

    # -- the read ---------------------------------------------------------------------------------

    def _read(self) -> None:
        router = self.router
        self.phase = _READING
        self.round += 1
        self.answers = {}
        self.asked = []
        self.failed = set()
        self.primary = 0
        self.in_flight = None
        deadline = int((router._now() + router.lease_for) * 1000)
        self.lease = Lease(self.holder, deadline, self.exclusive)
        if self.exclusive:
            self.reread = False
        round = self.round
        for node in [*self.candidates[: self.reads_needed], *self.extra]:
            if self.round != round or self.phase is not _READING:
                break  # answers that came at once moved the command on (an in-memory kvstore)
            if node not in self.asked:
                self._ask(node)
        if self.phase is _READING and self.round == round:
            router._hedge_later(self)
            self._arm()

    def _ask(self, node: str) -> None:
        self.asked.append(node)
        lease = self.lease
        self.unreleased[node] = lease.deadline
        if lease.exclusive and node not in self.candidates:  # a previous owner or prior primary: read only
            lease = Lease(lease.holder, lease.deadline)
        self.router._send(node, XLease(self.key, lease)).addCallbacks(
            self._read_answer, self._read_failed, callbackArgs=(node, self.round), errbackArgs=(node, self.round)
        )

    def _read_answer(self, answer: Values, node: str, round: int) -> None:
        if round != self.round or self.phase is not _READING:
            return
        record = None
        for item_key, item in answer.items:
            if item_key == self.key:
                record = item
        self.answers[node] = record
        self._read_progress()

    def _read_failed(self, failure: Failure, node: str, round: int) -> None:
        if round != self.round or self.phase is not _READING:
            return
        if failure.check(KeyLeased):  # another command's lease: read again once it ends
            self._lease_wait(cast(KeyLeased, failure.value).until)
            return
        self.failed.add(node)
        if node in self.candidates:
            if node == self.candidates[self.primary]:
                nxt = self._next_primary(back=True)
                if nxt is not None:
                    self._switch_primary(nxt)
            untried = [n for n in self.candidates if n not in self.asked]
            if untried and self._replica_answers() + self._replicas_pending() < self.reads_needed:
                self._ask(untried[0])
        self._read_progress()

    def _replica_answers(self) -> int:
        candidates = self.candidates
        return sum(1 for n in self.answers if n in candidates)

    def _replicas_pending(self) -> int:
        return sum(1 for n in self.asked if n in self.candidates and n not in self.answers and n not in self.failed)

    def _read_progress(self) -> None:
        if self.phase is not _READING:
            return
        answers = self.answers
        got = self._replica_answers()
        extra_pending = any(n not in answers and n not in self.failed for n in self.extra)
        if got >= self.reads_needed and self.candidates[self.primary] in answers and not extra_pending:
            self._apply()
            return
        if self._replicas_pending():
            return
        untried = [n for n in self.candidates if n not in self.asked]
        if untried:
            self._ask(untried[0])
            return
        if got < self.reads_needed or self.candidates[self.primary] in self.failed:
            self.router.counters["quorum_failures"] += 1
            self._fail(Failure(QuorumNotReached(self.reads_needed, got, "read")))

    def hedge(self) -> str | None:
        """Short of ``needed_r`` answers after ``hedge_after``: ask the next candidate (sent here, so that
        its answer counts for this round only)."""
        if self.phase is not _READING or self._replica_answers() >= self.reads_needed:
            return None
        router = self.router
        for node in self.asked:
            if node in self.candidates and node not in self.answers and node not in self.failed:
                router._mark_slow(node)
        untried = [n for n in self.candidates if n not in self.asked]
        if untried:
            router.counters["hedged_reads_total"] += 1
            self._ask(untried[0])
            router._hedge_later(self)
        return None

    def answered(self, node: str, record: Record | None) -> None:  # pragma: no cover - hedge() sends itself
        pass

    def failed_on(self, node: str) -> None:  # pragma: no cover - hedge() sends itself
        pass

    # -- the primary ------------------------------------------------------------------------------

    def _next_primary(self, back: bool = False) -> int | None:
        """The index of the candidate after the primary that has not failed, or None; with ``back``, failing
        that, of the first one before it that has not failed (one only late: the primary that failed had taken
        over from it)."""
        candidates = self.candidates
        order = list(range(self.primary + 1, len(candidates)))
        if back:
            order.extend(range(self.primary))
        for index in order:
            if candidates[index] not in self.failed:
                return index
        return None

    def _switch_primary(self, index: int) -> None:
        self.primary = index
        if self.phase is _READING and self.candidates[index] not in self.asked:
            self._ask(self.candidates[index])

    def _arm(self) -> None:
        self._disarm()
        if self.router.primary_timeout > 0:
            self.timer = self.router._clock.callLater(self.router.primary_timeout, self._primary_late)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _primary_late(self, settled: bool = False) -> None:
        """The primary kept its read or its command waiting ``primary_timeout``: the next candidate takes
        over (after one reactor turn, so that replies that came while the timer was due count first)."""
        self.timer = None
        if self.phase not in (_READING, _APPLYING):
            return
        if not settled:
            self.timer = self.router._clock.callLater(0, self._primary_late, True)
            return
        nxt = self._next_primary()
        if nxt is None:
            return  # nobody to take over: the request timeout decides
        router = self.router
        late = self.candidates[self.primary]
        router._mark_stalled(late)
        router.counters["rmw_failovers_total"] += 1
        if self.phase is _READING:
            self._switch_primary(nxt)
            self._arm()
            self._read_progress()
        else:
            self.failed.add(late)
            self._unanswered()
            self.primary = nxt
            self._apply()

    def _unanswered(self) -> None:
        """The command sent to the primary went unanswered (it may have run there): remember its version, and
        read again, exclusively, before another node runs it (``_apply``)."""
        if self.in_flight is not None:
            if self.sent_version is None or self.in_flight < self.sent_version:
                self.sent_version = self.in_flight
            if self.unacknowledged is None or self.in_flight > self.unacknowledged:
                self.unacknowledged = self.in_flight
            self.in_flight = None
            self.reread = True

    # -- leases -----------------------------------------------------------------------------------

    def _lease_wait(self, until_ms: int) -> None:
        """A kvstore refused a read or the command for another command's lease until ``until_ms`` (its
        clock): nothing of this round was applied; the leases this round took end (``_end_leases``: two
        commands that each got part of their leases do not hold each other up), and the command reads again
        after ``lease_poll`` seconds (doubled at each wait), or once that lease ends if sooner. Waits that
        last until then count toward ``max_retries``, the shorter ones toward ``max_lease_polls``."""
        router = self.router
        self._disarm()
        self.in_flight = None
        self._end_leases(False, self.asked)
        router.counters["rmw_lease_waits_total"] += 1
        until = max(0.0, until_ms / 1000 - router._now()) + 0.001
        delay = router.lease_poll * 2**self.lease_polls
        if delay < until:
            self.lease_polls += 1
            router.counters["rmw_lease_polls_total"] += 1
        else:
            delay = until
            self.retries += 1
        if self.retries > self.max_retries or self.lease_polls > router.max_lease_polls:
            self._fail(
                Failure(
                    ServiceUnavailable(
                        f"the key stayed leased to other read-modify-writes ({self.retries + self.lease_polls} "
                        "waits): the read-modify-write was not applied; retry"
                    )
                )
            )
            return
        self.phase = _LEASE_WAIT
        self.round += 1  # the round's late answers are ignored
        self.timer = router._clock.callLater(delay, self._lease_ended)

    def _lease_ended(self) -> None:
        self.timer = None
        if self.phase is not _LEASE_WAIT:
            return
        if self.router.placement.ring.epoch != self.epoch:
            self._restart()
            return
        self._read()

    def _go_exclusive(self) -> None:
        """The command is to run at a primary that is not the map's, or after one that may have run it: read
        again with exclusive leases, the primary chosen first (the candidates passed over last)."""
        self.router.counters["rmw_exclusive_rounds_total"] += 1
        self.candidates = [*self.candidates[self.primary :], *self.candidates[: self.primary]]
        self.exclusive = True
        self._read()

    def _maybe_applied(self, newest: Record | None) -> bool:
        """Fail the command when this round read a record as new as a command sent earlier whose primary did
        not answer: that one may have been applied, and built upon (True: failed)."""
        sent = self.sent_version
        if sent is None or newest is None or newest.version < sent:
            return False
        self.router.counters["rmw_refused_maybe_applied_total"] += 1
        self._fail(
            Failure(
                ServiceUnavailable(
                    "a primary that did not answer the read-modify-write in time may have applied it, and a "
                    f"record as new ({newest.version}) was read since, so it is not run again elsewhere: not "
                    "acknowledged, the value may or may not have changed; retry"
                )
            )
        )
        return True

    # -- the command ------------------------------------------------------------------------------

    def _apply(self, catch_up: bool = True) -> None:
        """Bring the primary up to date if it needs it (``catch_up``: not after it refused the command for a
        newer record), then run the command there (by the map the primary was chosen by: a new one starts
        the command over)."""
        router = self.router
        if router.placement.ring.epoch != self.epoch:
            self._restart()
            return
        primary = self.candidates[self.primary]
        if self.reread or (not self.exclusive and primary != self.map_primary):
            self._go_exclusive()
            return
        if router._now() * 1000 >= self.lease.deadline:  # the read took the round's whole time: read again
            self._restart()
            return
        newest: Record | None = None
        for record in self.answers.values():
            if record is not None and record.newer_than(newest):
                newest = record
        if self._maybe_applied(newest):
            return
        self.phase = _APPLYING
        self.round += 1
        self.newest = newest
        if newest is not None:
            router._hlc.observe(newest.version, int(router._now() * 1000))
        apply = XApply(router._version_now(), self.command, 0, self.lease)
        if apply.version.millis > self.lease.deadline:  # kvstores refuse it (chashd.leases): say why here
            self._fail(
                Failure(
                    ServiceUnavailable(
                        f"the newest record's version ({newest.version if newest else apply.version}) is ahead "
                        "of this gateway's clock by more than a read-modify-write's deadline allows (are the "
                        "clocks of gateways and kvstores synchronized?): the read-modify-write was not "
                        "applied; retry"
                    )
                )
            )
            return
        if (
            catch_up
            and newest is not None
            and (primary not in self.answers or newest.newer_than(self.answers[primary]))
        ):
            router.counters["rmw_catchups_total"] += 1
            d = router._send(primary, XPut(self.key, newest))
            d.addCallback(self._caught_up, primary, apply)
        else:
            self.in_flight = apply.version
            d = router._send(primary, apply)
        d.addCallbacks(
            self._applied, self._apply_failed, callbackArgs=(primary, self.round), errbackArgs=(primary, self.round)
        )
        if self.phase is _APPLYING and not d.called:
            self._arm()

    def _caught_up(self, _: object, primary: str, apply: XApply) -> Deferred[Any]:
        if self.router.placement.ring.epoch != self.epoch:
            raise _MapMoved()
        self.in_flight = apply.version
        return self.router._send(primary, apply)

    def _applied(self, applied: XApplied, primary: str, round: int) -> None:
        if round != self.round or self.phase is not _APPLYING:
            return
        self._disarm()
        self.in_flight = None
        self.unreleased.pop(primary, None)  # its command ran there: its lease there ended
        self.phase = _REPLICATING
        answer = (applied.result, applied.record) if self.with_record else applied.result
        record = applied.record
        if record is None:
            self._repair(primary)
            self._succeed(answer)
            return
        self.applied_at = primary
        self.answer = answer
        self.record = record
        # Fenced by the command's map (the connections may name a newer one by now): a replica that knows a
        # newer map refuses the copy, so a primary that map no longer names gets no result acknowledged.
        others = [n for n in self.candidates if n != primary]
        if self.needed_w <= 1:
            put = XPut(self.key, record, epoch=self.epoch, lease=self.lease)
            for node in others:
                self.router._send(node, put).addErrback(self._copy_refused, node).addErrback(self._copy_failed)
            self._succeed(answer)
            return
        self._copy_to(others, self.epoch)
        # The next command of this gateway on the key may read now: its reads follow this one's command and
        # copies (a read that overtakes a copy on another connection is refused, and polls).
        self._pass_turn()
        self._copies_progress()

    def _copy_to(self, nodes: Sequence[str], epoch: int) -> None:
        """Send the result to ``nodes``, fenced by ``epoch``; each answer goes to ``_copies_progress``."""
        router = self.router
        put = XPut(self.key, cast(Record, self.record), epoch=epoch, lease=self.lease)
        self.copies_out += len(nodes)  # before any answer: one that comes at once sees the others pending
        self.copying.update(nodes)
        for node in nodes:
            router._send(node, put).addCallbacks(
                self._copy_taken, self._copy_not_taken, callbackArgs=(node,), errbackArgs=(node,)
            )

    def _copy_taken(self, _: object, node: str) -> None:
        self.copies_out -= 1
        self.copying.discard(node)
        self.unreleased.pop(node, None)  # the copy taken ended its lease there
        if not self.replicas or node in self.replicas:
            self.copy_ok.add(node)
        self._copies_progress()

    def _copy_not_taken(self, failure: Failure, node: str) -> None:
        self.copies_out -= 1
        self.copying.discard(node)
        if self.phase is _OVER and node in self.unreleased:  # acknowledged without it: release it now
            self._end_leases(True, (node,))
        self._copy_refused(failure, node)
        self.copy_error = failure
        self._copies_progress()

    def _copies_progress(self) -> None:
        """Succeed at the ``W``-th acknowledgement (the primary's included); once ``W`` is out of reach, wait
        to send the copies again by the map the refusing replicas know (``_refence``), or fail."""
        phase = self.phase
        if phase is not _REPLICATING and phase is not _REFENCE_WAIT and phase is not _REFENCING:
            return
        taken = 1 + len(self.copy_ok)
        if taken >= self.needed_w:
            self._succeed(self.answer)
            return
        if phase is _REFENCE_WAIT or taken + self.copies_out >= self.needed_w:
            return
        if phase is _REPLICATING and self.refused_by > self.epoch:
            self.phase = _REFENCE_WAIT
            self.router._when_epoch(self.refused_by, self._refence)
            return
        self._replication_failed()

    def _refence(self, caught_up: bool) -> None:
        """This router's map reached the epoch the refusing replicas know (``caught_up``), or ``map_wait``
        passed: send the result's copies again, fenced by the new map, when that is sound; else fail."""
        if self.phase is not _REFENCE_WAIT:
            return
        router = self.router
        why = self._refence_unsound() if caught_up else "this gateway's map did not reach it in time"
        if why is not None:
            router._log.info(
                "copies of {key!r}'s read-modify-write refused for map epoch {known}, not sent again: {why}",
                key=self.key,
                known=self.refused_by,
                why=why,
            )
            self._replication_failed()
            return
        self.phase = _REFENCING
        router.counters["rmw_copies_refenced_total"] += 1
        # W of the new map's preference list (the primary's among them) must hold the result: a copy taken by
        # a node that map no longer names does not count (its handoff gives the record to the nodes the key
        # moved to, which this re-fence counts by their own copies).
        replicas = self.replicas = router.replicas_for(self.key)
        self.needed_w = router._rmw_quorums(len(replicas))[0]
        self.copy_ok = {n for n in self.copy_ok if n in replicas}
        nodes = [n for n in router._primaries(replicas) if n != self.applied_at and n not in self.copy_ok]
        self._copy_to(nodes, router.placement.ring.epoch)
        self._copies_progress()

    def _refence_unsound(self) -> str | None:
        """Why the result's copies may not go again by the router's map now (None: they may).

        The primary B applied the command by map epoch ``e`` (it knew no newer map); replicas that know
        ``e + 1`` refused the copies. Sending them again fenced by ``e + 1`` is sound when every gateway on
        ``e + 1`` reads B before its own command on the key: that read comes after its ``xmap e + 1`` on the
        same connection, so after B applied ours (B refuses an ``xapply`` of an older map once it knows the
        newer one), and such a gateway sees our result and applies on top of it. So: the map is ``e + 1``
        exactly (no map between, whose gateways may have chosen another primary), B is up in it, and B is
        among its first ``needed_r`` up replicas of the key (by that map's preference list, which every
        gateway on it reads, whatever ring the command's map had). The primary by the command's map is when
        only node states changed: the ``d`` replicas before it were down then, the command had ``W`` up
        replicas, so ``d <= N - W < needed_r``; and after a join (the new node inserted in the list moves B
        back by one at most). A primary that took over from a stalled or failed one may not be, nor one that
        a weight change moved back, nor one the new map no longer names (a drain or a removal of B): the new
        map's gateways read such a previous owner only while their own monitor sees the move under way, and
        one that saw it end (B handed the key off to the nodes it moved to, which it may not read first)
        can apply before our copies come. A replica that knows a later map refuses these copies as well."""
        router = self.router
        placement = router.placement
        epoch = placement.ring.epoch
        if self.refused_by != self.epoch + 1 or epoch != self.refused_by:
            return f"the map moved from epoch {self.epoch} to {epoch}, not by one"
        primary = self.applied_at
        replicas = router.replicas_for(self.key)
        if primary not in replicas:
            return f"{primary} is no longer a replica of the key (the ring changed)"
        if not placement.is_up(primary):
            return f"{primary} is not up in the new map"
        needed_r = router._rmw_quorums(len(replicas))[1]
        if primary not in [n for n in replicas if placement.is_up(n)][:needed_r]:
            return f"{primary} is not among the replicas that gateways on the new map read first"
        return None

    def _apply_failed(self, failure: Failure, primary: str, round: int) -> None:
        if round != self.round or self.phase is not _APPLYING:
            return
        self._disarm()
        router = self.router
        if failure.check(_MapMoved):  # the map changed while the primary caught up: nothing applied
            self._restart()
            return
        if failure.check(KeyLeased):  # another command's lease at the primary: nothing applied
            self.in_flight = None
            self._lease_wait(cast(KeyLeased, failure.value).until)
            return
        if failure.check(DeadlinePassed):  # the round's deadline passed: nothing applied; a new round
            self.in_flight = None
            self._restart()
            return
        if failure.check(StaleMap):  # the primary knows a newer map: nothing applied; start over by it
            router.counters["rmw_map_waits_total"] += 1
            self.phase = _WAITING
            self.round += 1
            self.awaited = cast(StaleMap, failure.value).known
            router._when_epoch(self.awaited, self._map_caught_up)
            return
        if failure.check(StaleVersion):  # another write got there first: once more, past its version
            self.in_flight = None
            self.retries += 1
            router.counters["rmw_retries_total"] += 1
            stored = getattr(failure.value, "stored", None)
            if self.retries > self.max_retries:
                self._fail(Failure(ServiceUnavailable(f"{self.retries} concurrent writes overtook the command")))
            elif isinstance(stored, Version):
                router._hlc.observe(stored, int(router._now() * 1000))
                self._apply(catch_up=False)
            else:
                self._read()
            return
        if failure.check(RequestError):  # the client's fault (a value too large, not a number): the answer
            self._fail(failure)
            return
        self._unanswered()  # a lost connection: the command may have run there
        self.failed.add(primary)
        nxt = self._next_primary(back=True)
        if nxt is None:
            router.counters["quorum_failures"] += 1
            error = QuorumNotReached(self.needed_w, 0, "write")
            error.__cause__ = failure.value
            self._fail(Failure(error))
            return
        router.counters["rmw_failovers_total"] += 1
        self.primary = nxt
        self._apply()

    def _map_caught_up(self, caught_up: bool) -> None:
        """The wait for the map a kvstore knows is over: start over by it, or fail (nothing was applied)."""
        if self.phase is not _WAITING:
            return
        if caught_up:
            self._restart()
            return
        self._fail(
            Failure(
                MapNotCurrent(
                    f"a kvstore knows cluster map epoch {self.awaited}, newer than this gateway's "
                    f"{self.router.placement.ring.epoch}: the read-modify-write was not applied; retry"
                )
            )
        )

    def _restart(self) -> None:
        """The map changed under the command before it was applied anywhere, or its round's deadline passed:
        start over by the current map, its read included (up to ``max_retries`` times in all)."""
        self._disarm()
        self.retries += 1
        router = self.router
        router.counters["rmw_retries_total"] += 1
        if self.retries > self.max_retries:
            self._fail(
                Failure(
                    ServiceUnavailable(
                        f"the read-modify-write started over {self.retries} times (the cluster map changed under "
                        "it, or its round's deadline passed): not applied; retry"
                    )
                )
            )
        elif not router.map_current:
            self._fail(Failure(MapNotCurrent()))
        else:
            self.start()

    def _repair(self, primary: str) -> None:
        """The command changed nothing: the replicas that answered an older record than the newest get it."""
        newest = self.newest
        if newest is None:
            return
        router = self.router
        for node, record in self.answers.items():
            if node != primary and node in self.candidates and newest.newer_than(record):
                router.counters["read_repairs"] += 1
                router._send(node, XPut(self.key, newest)).addErrback(self._copy_failed)

    def _copy_refused(self, failure: Failure, node: str) -> Failure:
        """A replica refused the copy for a newer map (``StaleMap``): counted, and the newest map it knows
        kept (for the re-fence and the error, should too few copies be taken); for its deadline or a lease:
        counted, and sent again once the result is acknowledged."""
        if failure.check(StaleMap):
            self.router.counters["rmw_copies_refused_stale_map_total"] += 1
            self.refused_by = max(self.refused_by, cast(StaleMap, failure.value).known)
        elif failure.check(DeadlinePassed, KeyLeased):
            kind = "deadline" if failure.check(DeadlinePassed) else "leased"
            self.router.counters[f"rmw_copies_refused_{kind}_total"] += 1
            if node not in self.resend:
                self.resend.append(node)
            if self.acknowledged:
                self._resend()
        return failure

    def _resend(self) -> None:
        """The result is acknowledged (``W`` replicas hold it): the replicas of the key that refused its copy
        for its deadline or a lease get it as a read repair would, with no lease (their versions decide: a
        newer record stays). Else they would miss it until anti-entropy's next pass."""
        router = self.router
        replicas = self.replicas or self.candidates
        put = XPut(self.key, cast(Record, self.record))
        for node in self.resend:
            if node in replicas:
                router.counters["rmw_copies_resent_total"] += 1
                router._send(node, put).addErrback(self._copy_failed)
        self.resend.clear()

    def _copy_failed(self, failure: Failure) -> None:
        self.router._log.info(
            "copy of {key!r} to a replica failed: {error}", key=self.key, error=failure.getErrorMessage()
        )

    def _replication_failed(self) -> None:
        """Fewer than ``W`` replicas took the result: fail (counted as a quorum failure)."""
        router = self.router
        router.counters["quorum_failures"] += 1
        error: Exception = QuorumNotReached(self.needed_w - 1, len(self.copy_ok), "write")
        if self.copy_error is not None:
            error.__cause__ = self.copy_error.value
        if self.refused_by:  # replicas that know a newer map refused the result
            quorum = error
            error = ServiceUnavailable(
                f"the primary applied the read-modify-write by cluster map epoch {self.epoch}, but replicas "
                f"that know epoch {self.refused_by} refused its result ({quorum}): not "
                "acknowledged, the value may or may not have changed; retry"
            )
            error.__cause__ = quorum
        elif self.copy_error is not None and self.copy_error.check(DeadlinePassed, KeyLeased):
            quorum = error
            error = ServiceUnavailable(
                f"the primary applied the read-modify-write, but replicas refused its result "
                f"({self.copy_error.getErrorMessage()}; {quorum}): not acknowledged, the value may or may not "
                "have changed; retry"
            )
            error.__cause__ = quorum
        self._fail(Failure(error))

    def _succeed(self, answer: Any) -> None:
        if self.phase is _REFENCE_WAIT:  # a first copy taken late made the quorum: no need to wait any more
            self.router._forget_epoch_wait(self._refence)
        self.phase = _OVER
        self._disarm()
        self._end_leases(self.record is not None)
        self._pass_turn()
        if self.record is not None:
            self.acknowledged = True
            self._resend()
        if not self.done.called:
            self.done.callback(answer)

    def _fail(self, failure: Failure) -> None:
        self.phase = _OVER
        self._disarm()
        self._end_leases(False)
        self._pass_turn()
        if not self.done.called:
            self.done.errback(failure)

    def _pass_turn(self) -> None:
        """The command is over: the next exclusive command of this gateway on the key starts, if any."""
        if not self.has_turn:
            return
        self.has_turn = False
        turns = self.router._turns
        waiting = turns.pop(self.key, None)
        while waiting:
            nxt = waiting.popleft()
            if nxt.phase is _QUEUED:
                turns[self.key] = waiting
                nxt.has_turn = True
                nxt.start()
                return

    def _end_leases(self, acknowledged: bool, nodes: Sequence[str] | None = None) -> None:
        """The command is over (or, with ``nodes``, this round's leases there are given up): its leases end
        (``XRelease``) where no store of it took them (``chashd.leases``). Unless its result was
        acknowledged, a release names the newest version it may have stored (``unacknowledged``: a command
        not answered, a result whose copies were refused) as its floor, and the lease lasts until the
        kvstore's clock passes that plus twice the clock bound: what it left is older than what the next
        command picks. Fire and forget: a lease whose release is lost runs out by its deadline."""
        unreleased = self.unreleased
        if not unreleased:
            return
        floor = 0
        if not acknowledged:
            top = self.unacknowledged
            for version in (self.in_flight, self.record.version if self.record is not None else None):
                if version is not None and (top is None or version > top):
                    top = version
            floor = top.millis if top is not None else 0
        router = self.router
        # Acknowledged: a copy still on its way ends the lease where it is taken (else _copy_not_taken).
        skip = self.copying if acknowledged and nodes is None else ()
        for node in list(unreleased) if nodes is None else [n for n in nodes if n in unreleased]:
            if node in skip:
                continue
            deadline = unreleased.pop(node)
            router.counters["rmw_leases_released_total"] += 1
            router._send(node, XRelease(self.key, self.holder, deadline, floor)).addErrback(self._release_failed, node)

    def _release_failed(self, failure: Failure, node: str) -> None:
        """A release not taken (a lost connection, a kvstore of an earlier version): the lease runs out."""
        if not failure.check(UnknownCommand):
            self.router._log.debug(
                "release of {key!r}'s lease on {node} failed: {error}",
                key=self.key,
                node=node,
                error=failure.getErrorMessage(),
            )


def _deliver(result: Values, node: str, reads: Sequence[_Hedged]) -> None:
    found = dict(result.items)
    for read in reads:
        read.answered(node, found.get(read.key))


def _deliver_failure(failure: Failure, node: str, reads: Sequence[_Hedged]) -> None:
    for read in reads:
        read.failed_on(node)


def _fail_current() -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure())
    return d
