"""The gateway's data plane: every key command routed to the kvstores that own the key, with replication.

- Plain writes (``set``) get a version here and go to every up replica of the key's preference list as a
  versioned ``XPut``; the client hears ``STORED`` once ``W`` replicas stored it, else a
  ``QuorumNotReached`` error. Nothing is written to nodes outside the preference list (no sloppy quorum).
- Reads ask ``R`` up replicas (the first ones of the preference list, then the next on a failure) with
  ``XGet``, answer with the newest record, and write it back to the asked replicas that answered an older
  version or nothing (read repair).
- Read-modify-write commands (``add``, ``replace``, ``append``, ``prepend``, ``cas``, ``incr``, ``decr``,
  ``touch``, ``gat``, ``delete``) are applied by the key's primary (its first up replica) with ``XApply``,
  which returns the record it left; that record then goes to the other replicas, and ``W`` acknowledgements
  in all (the primary's included) make the command succeed.
- While a ring change is handed off (``Placement.previous`` set), reads of keys whose preference list
  changed also ask the previous owners, and a read-modify-write first copies the newest record from them
  to the new primary, so no acknowledged write is missed during a move.

N, W and R are capped at the number of nodes in the ring, so a one-node ring works.

The common cases take short paths that do the same thing with fewer objects per request: a single-key
``get`` with R=1 is one ``XGet`` whose Deferred the client protocol gets back (a failure moves on to the
next up replica); any other single-key ``get`` is one ``_KeyRead`` whose Deferred is the answer; a ``set``
to a single replica needs no quorum object. Preference lists are memoized per placement (the ring is
immutable, so a key's list only changes with a new placement), and which nodes are down is worked out
once per placement rather than per request. Callbacks are bound methods with arguments, not closures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chashd.commands import (
    Arith,
    Delete,
    FlushAll,
    Get,
    Status,
    Store,
    Touch,
    Values,
    XApplied,
    XApply,
    XGet,
    XPut,
)
from chashd.errors import NoNodes, QuorumNotReached, RequestError, ServiceUnavailable
from chashd.gateway.clustermap import NodeState
from chashd.interfaces import IKeyValue, IKVClient
from chashd.record import Record, expires_at_from_exptime
from chashd.ring import HashRing
from chashd.versions import HybridClock

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


@implementer(IKeyValue)
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
    ) -> None:
        self.name = f"gateway {gateway_id}"
        self._clock = clock
        self._hlc = HybridClock(gateway_id)
        self._clients = clients
        self.replicas = replicas
        self.write_quorum = write_quorum
        self.read_quorum = read_quorum
        self._allow_flush_all = allow_flush_all
        self.placement = Placement(HashRing({}))
        # Worked out once per placement and N: see replicas_for.
        self._memo_placement: Placement | None = None
        self._memo_replicas = 0
        self._prefs_memo: dict[bytes, tuple[str, ...]] = {}
        self._down: frozenset[str] = frozenset()
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
        }

    # -- placement ------------------------------------------------------------------------------

    def update(self, placement: Placement) -> None:
        """Route by ``placement`` from now on (an equal placement changes nothing, so the memo of
        preference lists survives the gateway's periodic refreshes)."""
        if placement != self.placement:
            self.placement = placement

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

    def _up(self, replicas: tuple[str, ...]) -> Sequence[str]:
        """The nodes of ``replicas`` that take requests (call after ``replicas_for``)."""
        down = self._down
        if not down:
            return replicas
        return [n for n in replicas if n not in down]

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
            return self._clients(node).send(command)  # type: ignore[no-any-return]
        except Exception:
            return _fail(ServiceUnavailable(f"no connection to {node}"))

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
            return self._get_one(command.keys[0])
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
        }

    # -- writes ---------------------------------------------------------------------------------

    def _set(self, command: Store) -> Deferred[Any]:
        self.counters["cmd_set"] += 1
        replicas = self.replicas_for(command.key)
        up = self._up(replicas)
        needed = min(self.write_quorum, len(replicas))
        now = self._now()
        record = Record(
            command.value,
            command.flags,
            expires_at_from_exptime(command.exptime, now) if command.exptime else 0,
            self._hlc.tick(int(now * 1000)),
        )
        put = XPut(command.key, record)
        if needed == 1 and len(up) == 1:  # one replica to write: its answer is the answer
            return self._send(up[0], put).addCallbacks(_stored, self._single_write_failed)
        d = _quorum([self._send(n, put) for n in up], needed, "write")
        d.addCallbacks(_stored, self._count_quorum_failure)
        return d

    def _single_write_failed(self, failure: Failure) -> Failure:
        """The only replica written to failed: the write quorum of 1 is not reached."""
        self.counters["quorum_failures"] += 1
        error = QuorumNotReached(1, 0, "write")
        error.__cause__ = failure.value
        return Failure(error)

    def _count_quorum_failure(self, failure: Failure) -> Failure:
        if failure.check(QuorumNotReached):
            self.counters["quorum_failures"] += 1
        return failure

    def _rmw(self, key: bytes, command: Any, with_record: bool = False) -> Deferred[Any]:
        """Apply ``command`` at the key's primary, then copy the record it left to the other replicas.

        Fires with memcached's result, or ``(result, record)`` when ``with_record`` is set.
        """
        if isinstance(command, Delete):
            self.counters["cmd_delete"] += 1
        else:
            self.counters["cmd_rmw"] += 1
        replicas = self.replicas_for(key)
        up = self._up(replicas)
        needed = min(self.write_quorum, len(replicas))
        if len(up) < needed or not up:
            self.counters["quorum_failures"] += 1
            return _fail(QuorumNotReached(needed, len(up), "write"))
        primary, others = up[0], up[1:]
        previous = self._previous_owners(key, replicas)
        ready: Deferred[Any] = self._pull_from_previous(key, primary, previous) if previous else succeed(None)
        version = self._version_now()

        def apply(_: Any) -> Deferred[Any]:
            return self._send(primary, XApply(version, command))

        def replicate(applied: XApplied) -> Any:
            answer = (applied.result, applied.record) if with_record else applied.result
            if applied.record is None or needed <= 1:
                return answer
            put = XPut(key, applied.record)
            d = _quorum([self._send(n, put) for n in others], needed - 1, "write")
            d.addCallbacks(lambda _: answer, self._count_quorum_failure)
            return d

        ready.addCallback(apply)
        ready.addCallback(replicate)
        return ready

    def _pull_from_previous(self, key: bytes, primary: str, previous: Sequence[str]) -> Deferred[None]:
        """Copy the newest record the previous owners hold to the new primary (a move is under way)."""
        asks = [self._send(n, XGet((key,))).addErrback(lambda _: None) for n in previous]
        asks.append(self._send(primary, XGet((key,))).addErrback(lambda _: None))
        done: Deferred[None] = Deferred()
        answers: list[Any] = []

        def collect(result: Any) -> None:
            answers.append(result)
            if len(answers) < len(asks):
                return
            newest = _newest([a for a in answers[:-1] if a is not None], key)
            mine = _newest([answers[-1]] if answers[-1] is not None else [], key)
            if newest is not None and newest.newer_than(mine):
                self._send(primary, XPut(key, newest)).addBoth(lambda _: done.callback(None))
            else:
                done.callback(None)

        for ask in asks:
            ask.addCallback(collect)
        return done

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

    def _get_one(self, key: bytes) -> Deferred[Any]:
        """A get of one key: with R=1 and no move under way, one XGet (and the next replica on a failure);
        otherwise one ``_KeyRead`` that answers with the final ``Values``."""
        self.counters["cmd_get"] += 1
        replicas = self.replicas_for(key)
        if (self.read_quorum == 1 or len(replicas) == 1) and (
            self.placement.previous is None or not self._previous_owners(key, replicas)
        ):
            up = self._up(replicas)
            if not up:
                self.counters["quorum_failures"] += 1
                return _fail(QuorumNotReached(1, 0, "read"))
            return self._ask_one(key, up, 0)
        read = _KeyRead(self, key, replicas, single=True)
        read.start()
        return read.done

    def _ask_one(self, key: bytes, up: Sequence[str], index: int) -> Deferred[Any]:
        d = self._send(up[index], XGet((key,)))
        d.addCallbacks(self._one_answered, self._one_failed, callbackArgs=(key,), errbackArgs=(key, up, index))
        return d

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

    def _client_values(self, key: bytes, record: Record | None) -> Values:
        """What a client reading ``key`` gets when ``record`` is the newest answer."""
        if record is not None and record.live(self._now()):
            self.counters["get_hits"] += 1
            return Values(((key, record),))
        self.counters["get_misses"] += 1
        return _NO_VALUES

    def _one_failed(self, failure: Failure, key: bytes, up: Sequence[str], index: int) -> Deferred[Any]:
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
            now = self._now()
            items = []
            for k in command.keys:
                status, record = gathered[k]
                if status is Status.TOUCHED and record is not None and record.live(now):
                    items.append((k, record))
            done.callback(Values(tuple(items)))

        for key, touch in zip(keys, touches):
            touch.addBoth(collect, key)
        if not keys:
            done.callback(Values(()))
        return done


class _KeyRead:
    """One key's read: which replicas to ask, their answers, the newest record, the read repair.

    ``done`` fires with ``(key, newest record or None)``, or, for a ``single`` read (a get of this key
    alone), with the ``Values`` the client gets.
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
    )

    def __init__(self, router: Router, key: bytes, replicas: tuple[str, ...], single: bool = False) -> None:
        self.router = router
        self.key = key
        self.single = single
        up = router._up(replicas)
        self.needed = min(router.read_quorum, len(replicas))
        self.candidates = up
        self.extra = router._previous_owners(key, replicas)
        self.asked: list[str] = []
        self.answers: dict[str, Record | None] = {}
        self.failed: list[str] = []
        self.done: Deferred[Any] = Deferred()
        self._answered_client = False
        if len(up) < self.needed:
            router.counters["quorum_failures"] += 1
            self.done.errback(Failure(QuorumNotReached(self.needed, len(up), "read")))

    def first_round(self) -> list[str]:
        """The nodes to ask first: R up replicas, plus the previous owners during a move."""
        if self.done.called:
            return []
        first = [*self.candidates[: self.needed], *self.extra]
        self.asked.extend(first)
        return first

    def start(self) -> None:
        """Send the first round of a read of this key alone."""
        send = self.router._send
        for node in self.first_round():
            send(node, XGet((self.key,))).addCallbacks(
                self._answer_from, self.failed_on_with, callbackArgs=(node,), errbackArgs=(node,)
            )

    def _answer_from(self, result: Values, node: str) -> None:
        key = self.key
        for item_key, record in result.items:
            if item_key == key:
                self.answered(node, record)
                return
        self.answered(node, None)

    def failed_on_with(self, failure: Failure, node: str) -> None:
        """``failed_on`` as an errback."""
        self.failed_on(node)

    def answered(self, node: str, record: Record | None) -> None:
        self.answers[node] = record
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
        extra = self.extra
        # Every asked node answers or fails once; the asked replicas and the previous owners are distinct.
        pending = len(self.asked) - len(answers) - len(self.failed)
        if extra:
            from_replicas = sum(1 for n in answers if n not in extra)
            extra_pending = any(n in extra and n not in answers and n not in self.failed for n in self.asked)
        else:
            from_replicas = len(answers)
            extra_pending = False
        if not self._answered_client:
            if from_replicas >= self.needed and not extra_pending:
                self._answer()
            elif not pending and from_replicas < self.needed:
                self._answered_client = True
                self.router.counters["quorum_failures"] += 1
                self.done.errback(Failure(QuorumNotReached(self.needed, from_replicas, "read")))
                return
        if self._answered_client and not pending:
            self._repair()

    def _answer(self) -> None:
        self._answered_client = True
        if self.single:
            self.done.callback(self.router._client_values(self.key, self._newest()))
        else:
            self.done.callback((self.key, self._newest()))

    def _newest(self) -> Record | None:
        newest: Record | None = None
        for record in self.answers.values():
            if record is not None and record.newer_than(newest):
                newest = record
        return newest

    def _repair(self) -> None:
        newest = self._newest()
        if newest is None:
            return
        for node, record in self.answers.items():
            if node in self.candidates and newest.newer_than(record):
                self.router.counters["read_repairs"] += 1
                self.router._send(node, XPut(self.key, newest)).addErrback(self._repair_failed, node)

    def _repair_failed(self, failure: Failure, node: str) -> None:
        self.router._log.info(
            "read repair of {key!r} on {node} failed: {error}", key=self.key, node=node, error=failure.getErrorMessage()
        )


def _deliver(result: Values, node: str, reads: Sequence[_KeyRead]) -> None:
    found = dict(result.items)
    for read in reads:
        read.answered(node, found.get(read.key))


def _deliver_failure(failure: Failure, node: str, reads: Sequence[_KeyRead]) -> None:
    for read in reads:
        read.failed_on(node)


def _stored(_: Any) -> Status:
    return Status.STORED


def _newest(answers: Sequence[Values], key: bytes) -> Record | None:
    newest: Record | None = None
    for answer in answers:
        for item_key, record in answer.items:
            if item_key == key and record.newer_than(newest):
                newest = record
    return newest


def _fail_current() -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure())
    return d
