"""The cluster map, replicated with Raft (pysyncobj): which kvstore nodes exist, their state and weight.

Three layers live in this module, and pysyncobj lives in this module only:

- ``ClusterState``: the pure, deterministic state machine. Every gateway applies the same commands in the
  same order (also while replaying its journal at start), so an operation reads no clock, does no I/O and
  never raises: it returns an ``Outcome`` (a code and the epoch after it) that the HTTP API maps to a status.
  Every real change bumps the epoch; an operation that changes nothing leaves the epoch alone, so every
  command is idempotent (a timeout or a leader change does not say whether a command was applied; the
  caller simply retries).
- ``ClusterRaft``: the ``SyncObj`` subclass. Its ``@replicated`` methods run ``ClusterState`` operations
  on pysyncobj's tick thread. The state lives in a ``SyncObjConsumer`` created before the ``SyncObj``,
  so it exists before the tick thread replays the journal, and it is the only thing snapshotted (the
  ``SyncObj`` itself gets no attribute after ``super().__init__()``: loggers, locks or reactor objects
  there would break every snapshot). A tick callback hands each new state (as an immutable
  ``ClusterSnapshot``) and each change of leader to the reactor through ``reactor.callFromThread``;
  nothing here touches a Twisted object from that thread.
- ``Membership``: the Twisted service. It constructs the ``SyncObj`` in ``startService`` (its tick
  thread stops when the thread that built it dies, and twistd builds services before it runs the
  reactor), turns each operation into a Deferred (pysyncobj's ``callback=``, bridged with
  ``callFromThread``; never ``sync=True``), publishes each new ``ClusterView`` (the nodes, the gateways
  and the ``HashRing`` of the nodes that are up or down) to its observers, and registers this gateway in
  the map once a leader is known.

Adding a replicated method later: give it ``@replicated(ver=N)`` with a higher ``N``. pysyncobj numbers
replicated methods by sorted name, so a new unversioned method would renumber the others and a journal
written by the older code would replay the wrong methods.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.config import GatewayConfig, endpoint_port
from chashd.daemon import exit_with_status
from chashd.errors import ClusterMapUnavailable, ConfigError
from chashd.ring import HashRing

__all__ = [
    "ClusterRaft",
    "ClusterSnapshot",
    "ClusterState",
    "ClusterView",
    "GatewayInfo",
    "LocalRaft",
    "Membership",
    "MembershipReactor",
    "NodeInfo",
    "Outcome",
    "RaftSettings",
    "RaftStatus",
    "raft_settings",
]

UP = "up"
DOWN = "down"
LEAVING = "leaving"
NODE_STATES = (UP, DOWN, LEAVING)

# Outcome codes.
REGISTERED = "registered"
UPDATED = "updated"
REMOVED = "removed"
UNCHANGED = "unchanged"
UNKNOWN = "unknown"
CONFLICT = "conflict"
STALE = "stale"
INVALID = "invalid"
FAILED = "failed"

#: The codes of operations that changed the map (and bumped the epoch).
CHANGED = frozenset({REGISTERED, UPDATED, REMOVED})

MAX_NODES = 4096
MAX_WEIGHT = 1_000_000
MAX_SEQ = 2**63 - 1

# pysyncobj's FAIL_REASON codes (pysyncobj/config.py), kept here so LocalRaft and tests need no pysyncobj.
SUCCESS = 0
_FAIL_REASONS = {
    1: "the command queue is full",
    2: "no Raft leader is known (election in progress or no connection)",
    3: "a new leader discarded the command",
    4: "the leader changed before the command was committed",
    5: "the leader changed before the command was committed",
    6: "the command was denied",
    7: "the outcome is unknown",
}


# -- the pure state machine ------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """A kvstore node as the map knows it: where it listens, its weight, its state, its announcement seq."""

    id: str
    host: str
    port: int
    line_port: int
    weight: int
    state: str = UP
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "id": self.id,
            "host": self.host,
            "port": self.port,
            "line_port": self.line_port,
            "weight": self.weight,
            "state": self.state,
            "seq": self.seq,
        }


@dataclass(frozen=True)
class GatewayInfo:
    """A gateway of the Raft group: its id, its Raft address (as pysyncobj names it) and its HTTP URL."""

    id: str
    raft: str
    url: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"id": self.id, "raft": self.raft, "url": self.url}


@dataclass(frozen=True)
class Outcome:
    """What an operation did: a code (``registered``, ``unchanged``, ``conflict``, ...), the epoch after it,
    and a sentence for the client when the operation was refused."""

    code: str
    epoch: int
    detail: str = ""

    @property
    def changed(self) -> bool:
        """True when the map changed (and the epoch was bumped)."""
        return self.code in CHANGED


@dataclass(frozen=True)
class ClusterSnapshot:
    """An immutable copy of the map at one epoch: what crosses from the Raft thread to the reactor."""

    epoch: int
    nodes: tuple[NodeInfo, ...]
    gateways: tuple[GatewayInfo, ...]


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable() and " " not in value


def _valid_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535


def _valid_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class ClusterState:
    """The cluster map as a deterministic state machine: kvstore nodes, gateways and the epoch.

    Operations never raise and never read a clock; each returns an ``Outcome``. Registration follows
    tahoe's introducer rule: an identical announcement changes nothing, an announcement whose ``seq`` is
    not greater than the last one but whose data differs is stale, and a node id already up at another
    address is a conflict (a node coming back from ``down`` with a higher seq is accepted, and so is a
    restarted node at the same address).
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.nodes: dict[str, NodeInfo] = {}
        self.gateways: dict[str, GatewayInfo] = {}

    def _bump(self, code: str) -> Outcome:
        self.epoch += 1
        return Outcome(code, self.epoch)

    def _refuse(self, code: str, detail: str) -> Outcome:
        return Outcome(code, self.epoch, detail)

    def snapshot(self) -> ClusterSnapshot:
        """An immutable copy of the map."""
        return ClusterSnapshot(
            self.epoch,
            tuple(self.nodes[k] for k in sorted(self.nodes)),
            tuple(self.gateways[k] for k in sorted(self.gateways)),
        )

    # -- kvstore nodes ----------------------------------------------------------------------------

    def register_node(self, node_id: str, host: str, port: int, line_port: int, weight: int, seq: int) -> Outcome:
        """A node announces itself (``POST /ring/nodes``)."""
        if not _valid_id(node_id):
            return self._refuse(INVALID, f"{node_id!r} is not a node id")
        if not (isinstance(host, str) and 0 < len(host) <= 255):
            return self._refuse(INVALID, f"{host!r} is not a host")
        if not (_valid_port(port) and _valid_port(line_port)):
            return self._refuse(INVALID, "port and line_port must be TCP ports (1-65535)")
        if not _valid_int(weight, 1, MAX_WEIGHT):
            return self._refuse(INVALID, f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}")
        if not _valid_int(seq, 0, MAX_SEQ):
            return self._refuse(INVALID, f"seq must be a non-negative integer, not {seq!r}")
        current = self.nodes.get(node_id)
        if current is None:
            if len(self.nodes) >= MAX_NODES:
                return self._refuse(INVALID, f"the map already holds {MAX_NODES} nodes")
            self.nodes[node_id] = NodeInfo(node_id, host, port, line_port, weight, UP, seq)
            return self._bump(REGISTERED)
        same = (current.host, current.port, current.line_port, current.weight) == (host, port, line_port, weight)
        if seq <= current.seq:
            if same:
                return self._refuse(UNCHANGED, "")
            return self._refuse(
                STALE,
                f"node {node_id!r} announced seq {seq}, not newer than its last seq {current.seq}, with other data",
            )
        if (current.host, current.port) != (host, port) and current.state != DOWN:
            return self._refuse(
                CONFLICT,
                f"node id {node_id!r} is taken by a node {current.state} at {current.host}:{current.port}",
            )
        # A newer announcement: a restart (maybe moved, if it was down) or a new weight. A node that
        # announces itself afresh is alive and wants its share of the ring, whatever it was before.
        self.nodes[node_id] = NodeInfo(node_id, host, port, line_port, weight, UP, seq)
        return self._bump(UPDATED)

    def set_weight(self, node_id: str, weight: int) -> Outcome:
        """Change a node's share of the ring."""
        if not _valid_int(weight, 1, MAX_WEIGHT):
            return self._refuse(INVALID, f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}")
        current = self.nodes.get(node_id)
        if current is None:
            return self._refuse(UNKNOWN, f"no node {node_id!r} in the ring")
        if current.weight == weight:
            return self._refuse(UNCHANGED, "")
        self.nodes[node_id] = _replace(current, weight=weight)
        return self._bump(UPDATED)

    def _set_state(self, node_id: str, state: str, allowed_from: Iterable[str]) -> Outcome:
        current = self.nodes.get(node_id)
        if current is None:
            return self._refuse(UNKNOWN, f"no node {node_id!r} in the ring")
        if current.state == state or current.state not in allowed_from:
            return self._refuse(UNCHANGED, "")
        self.nodes[node_id] = _replace(current, state=state)
        return self._bump(UPDATED)

    def mark_down(self, node_id: str) -> Outcome:
        """The node stopped answering: keep it in the ring, skip it for routing."""
        return self._set_state(node_id, DOWN, (UP,))

    def mark_up(self, node_id: str) -> Outcome:
        """The node answers again. A leaving node stays leaving."""
        return self._set_state(node_id, UP, (DOWN,))

    def start_leaving(self, node_id: str) -> Outcome:
        """Start the node's drain: it owns nothing new and hands its data off."""
        return self._set_state(node_id, LEAVING, (UP, DOWN))

    def remove(self, node_id: str) -> Outcome:
        """Forget the node."""
        if node_id not in self.nodes:
            return self._refuse(UNKNOWN, f"no node {node_id!r} in the ring")
        del self.nodes[node_id]
        return self._bump(REMOVED)

    # -- gateways ---------------------------------------------------------------------------------

    def register_gateway(self, gateway_id: str, raft: str, url: str) -> Outcome:
        """A gateway announces its id, Raft address and HTTP URL. One entry per id and per Raft address."""
        if not _valid_id(gateway_id) or not isinstance(raft, str) or not raft or not isinstance(url, str):
            return self._refuse(INVALID, "a gateway needs an id, a Raft address and a URL")
        info = GatewayInfo(gateway_id, raft, url)
        current = self.gateways.get(gateway_id)
        if current == info:
            return self._refuse(UNCHANGED, "")
        for other in [g for g in self.gateways.values() if g.raft == raft and g.id != gateway_id]:
            del self.gateways[other.id]
        self.gateways[gateway_id] = info
        return self._bump(REGISTERED if current is None else UPDATED)


def _replace(node: NodeInfo, **changes: Any) -> NodeInfo:
    return dataclasses.replace(node, **changes)


#: The operations a caller may submit, with their argument count.
OPERATIONS: Mapping[str, int] = MappingProxyType(
    {
        "register_node": 6,
        "set_weight": 2,
        "mark_down": 1,
        "mark_up": 1,
        "start_leaving": 1,
        "remove": 1,
        "register_gateway": 3,
    }
)


def apply_operation(state: ClusterState, op: str, args: tuple[Any, ...]) -> Outcome:
    """Run one operation; an unknown operation or a bug gives a ``failed`` outcome, never an exception
    (an exception on pysyncobj's tick thread would leave the entry unapplied and retried forever)."""
    if OPERATIONS.get(op) != len(args):
        return Outcome(INVALID, state.epoch, f"no operation {op!r} with {len(args)} arguments")
    try:
        result = getattr(state, op)(*args)
    except Exception as e:  # deterministic on every gateway, so the maps stay equal
        return Outcome(FAILED, state.epoch, f"{type(e).__name__}: {e}")
    assert isinstance(result, Outcome)
    return result


# -- the view published to the reactor -------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """The map at one epoch as the reactor thread sees it, with the ring derived from it.

    ``ring`` holds the nodes that are ``up`` or ``down`` (a ``down`` node keeps its arcs and is skipped by
    routing; a ``leaving`` node owns nothing new), built with the configured points per node and carrying
    the epoch. ``previous_ring`` is the ring before the last change of placement (a join, a drain, a
    removal, a new weight), so rebalancing can compare old and new; it is ``None`` until there was one.
    """

    epoch: int
    nodes: tuple[NodeInfo, ...]
    gateways: tuple[GatewayInfo, ...]
    ring: HashRing
    previous_ring: HashRing | None = None
    _by_id: Mapping[str, NodeInfo] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", MappingProxyType({n.id: n for n in self.nodes}))

    @classmethod
    def empty(cls, points_per_node: int) -> ClusterView:
        """The view before anything is known: epoch 0, no node."""
        return cls(0, (), (), HashRing({}, epoch=0, points_per_node=points_per_node))

    @classmethod
    def build(cls, snapshot: ClusterSnapshot, points_per_node: int, previous: ClusterView | None) -> ClusterView:
        """The view of ``snapshot``; ``previous`` (the view it replaces) gives ``previous_ring``."""
        weights = {n.id: n.weight for n in snapshot.nodes if n.state in (UP, DOWN)}
        ring = HashRing(weights, epoch=snapshot.epoch, points_per_node=points_per_node)
        previous_ring = None
        if previous is not None:
            # A change that keeps the placement (a node down or up, a gateway) keeps the previous ring.
            previous_ring = previous.previous_ring if ring.same_placement(previous.ring) else previous.ring
        return cls(snapshot.epoch, snapshot.nodes, snapshot.gateways, ring, previous_ring)

    def node(self, node_id: str) -> NodeInfo | None:
        """The node with this id, or None."""
        return self._by_id.get(node_id)

    @property
    def states(self) -> Mapping[str, str]:
        """Node id to state, for every node of the map."""
        return {n.id: n.state for n in self.nodes}

    def nodes_in(self, *states: str) -> tuple[NodeInfo, ...]:
        """The nodes in one of ``states``."""
        return tuple(n for n in self.nodes if n.state in states)

    def gateway_at(self, raft_address: str | None) -> GatewayInfo | None:
        """The gateway registered with this Raft address, or None."""
        if raft_address is None:
            return None
        for gateway in self.gateways:
            if gateway.raft == raft_address:
                return gateway
        return None


# -- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaftSettings:
    """How this gateway's ``SyncObj`` is built (see DESIGN.md, "pysyncobj, as measured and read")."""

    self_address: str
    peers: tuple[str, ...]
    password: str | None = None
    journal_file: str | None = None
    dump_file: str | None = None
    connection_timeout: float = 10.0
    connection_retry_time: float = 1.0
    dns_cache_time: float = 5.0
    dns_fail_cache_time: float = 1.0
    log_compaction_min_entries: int = 5000
    log_compaction_min_time: float = 300.0
    max_bind_retries: int = 1


def _raft_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def raft_address(host: str, port: int) -> str:
    """The address pysyncobj uses for a gateway: ``host:port`` (an IPv6 address without brackets, since
    pysyncobj splits at the last colon). Every gateway must spell its peers the same way."""
    return f"{_raft_host(host)}:{port}"


def _normalize_peer(peer: str) -> str:
    host, _, port = peer.rpartition(":")
    return raft_address(host, int(port))


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raft_settings(config: GatewayConfig) -> RaftSettings:
    """The Raft settings of a gateway; raises ``ConfigError`` before anything binds.

    ``--peers`` entries equal to this gateway's own Raft address are dropped (listing every gateway on
    each of them is harmless). Without ``--raft-password``, the Raft port unpickles whatever reaches it,
    so a gateway whose Raft addresses (its own and its peers') are not all on loopback refuses to start,
    unless ``--insecure-raft`` says so on purpose.
    """
    self_address = raft_address(config.advertise_host, config.raft_port)
    peers = tuple(dict.fromkeys(p for p in map(_normalize_peer, config.peers) if p != self_address))
    if config.raft_password:
        try:
            import cryptography  # noqa: F401
        except ImportError:  # pragma: no cover - cryptography is a dependency of our dependencies
            raise ConfigError("option --raft-password: the Python package 'cryptography' is not installed") from None
    elif not config.insecure_raft:
        exposed = [a for a in (self_address, *peers) if not _is_loopback(a)]
        if exposed:
            raise ConfigError(
                f"option --raft-password is required: Raft address {exposed[0]} is not on loopback, and without "
                "a password anyone who reaches a Raft port can rewrite the cluster map (--insecure-raft overrides)"
            )
    journal = dump = None
    if config.data_dir:
        journal = os.path.join(config.data_dir, "raft.journal")
        dump = os.path.join(config.data_dir, "raft.dump")
    return RaftSettings(self_address, peers, config.raft_password or None, journal, dump)


# -- the bridge between the Raft thread and the reactor ------------------------------------------------


@dataclass(frozen=True)
class RaftStatus:
    """What this gateway knows of the Raft group: the leader's Raft address, its own role, quorum."""

    leader: str | None = None
    is_leader: bool = False
    has_quorum: bool = False


class RaftListener(Protocol):
    """What a Raft object reports; every method may be called from any thread."""

    def snapshot(self, snapshot: ClusterSnapshot) -> None:
        """A new state of the map."""

    def status(self, status: RaftStatus) -> None:
        """A new leader, role or quorum."""

    def ready(self) -> None:
        """The state is loaded: the journal replayed and caught up with a known leader."""

    def command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        """A submitted command finished: ``error`` is 0 (success) or a pysyncobj FAIL_REASON."""

    def failure(self, failure: Failure, what: str) -> None:
        """Something went wrong on the Raft thread."""


class RaftHandle(Protocol):
    """What ``Membership`` needs of the Raft object (``ClusterRaft``, or ``LocalRaft`` in tests)."""

    def submit(self, op: str, args: tuple[Any, ...], token: int) -> None:
        """Submit a command; ``listener.command_done(token, ...)`` reports its end."""

    def destroy(self) -> None:
        """Stop (asynchronously)."""

    def alive(self) -> bool:
        """True while a thread of its own still runs."""

    def broken(self) -> bool:
        """True when it cannot work (its Raft port could not be bound)."""


RaftFactory = Callable[[RaftSettings, RaftListener], RaftHandle]


#: The reactor Membership needs: ``IReactorTime`` (``seconds``, ``callLater``) and ``IReactorThreads``
#: (``callFromThread``). Typed loosely because test clocks provide these without declaring the interfaces.
MembershipReactor = Any


class _ReactorBridge:
    """A ``RaftListener`` that hands every report to ``Membership`` on the reactor thread."""

    def __init__(self, reactor: MembershipReactor, membership: Membership) -> None:
        self._call = reactor.callFromThread
        self._membership = membership

    def snapshot(self, snapshot: ClusterSnapshot) -> None:
        self._call(self._membership._on_snapshot, snapshot)

    def status(self, status: RaftStatus) -> None:
        self._call(self._membership._on_status, status)

    def ready(self) -> None:
        self._call(self._membership._on_ready)

    def command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        self._call(self._membership._on_command_done, token, outcome, error)

    def failure(self, failure: Failure, what: str) -> None:
        self._call(self._membership._on_failure, failure, what)


# -- pysyncobj ----------------------------------------------------------------------------------------


class _MapHolder(SyncObjConsumer):  # type: ignore[misc]
    """Holds the replicated state. Built before the SyncObj, so the state exists before the tick thread
    replays the journal; ``state`` (set after ``SyncObjConsumer.__init__``) is what snapshots hold."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ClusterState()


class ClusterRaft(SyncObj):  # type: ignore[misc]
    """The cluster map's ``SyncObj``: one ``@replicated`` method per ``ClusterState`` operation.

    Every attribute is set before ``super().__init__()`` so that none is snapshotted; the replicated
    state is ``_MapHolder.state``. ``submit()`` is the only entry point of the reactor thread; what
    happens on the tick thread reaches the reactor through the listener only.
    """

    def __init__(self, settings: RaftSettings, listener: RaftListener) -> None:
        self._holder = _MapHolder()
        self._listener = listener
        self._reported_epoch = -1
        self._reported_status: RaftStatus | None = None
        self._reported_ready = False
        self._destroyed = False
        conf = SyncObjConf(
            password=settings.password,
            journalFile=settings.journal_file,
            fullDumpFile=settings.dump_file,
            bindAddress=settings.self_address,
            connectionTimeout=settings.connection_timeout,
            connectionRetryTime=settings.connection_retry_time,
            dnsCacheTime=settings.dns_cache_time,
            dnsFailCacheTime=settings.dns_fail_cache_time,
            logCompactionMinEntries=settings.log_compaction_min_entries,
            logCompactionMinTime=settings.log_compaction_min_time,
            maxBindRetries=settings.max_bind_retries,
            useFork=False,
            appendEntriesUseBatch=True,
            commandsWaitLeader=True,
        )
        super().__init__(settings.self_address, list(settings.peers), conf, consumers=[self._holder])
        self.addOnTickCallback(self._after_tick)

    @classmethod
    def create(cls, settings: RaftSettings, listener: RaftListener) -> ClusterRaft:
        """The production ``RaftFactory``."""
        return cls(settings, listener)

    # -- reactor thread ---------------------------------------------------------------------------

    def submit(self, op: str, args: tuple[Any, ...], token: int) -> None:
        """Queue a command for the leader (forwarded there by pysyncobj when this gateway follows)."""
        if op not in OPERATIONS:
            raise ValueError(f"no operation {op!r}")
        listener = self._listener

        def done(result: Any, error: int) -> None:
            listener.command_done(token, result if isinstance(result, Outcome) else None, error)

        getattr(self, op)(*args, callback=done)

    def alive(self) -> bool:
        """True while the tick thread runs."""
        return bool(self.tick_thread_alive())

    def broken(self) -> bool:
        """True when the tick thread ended without ``destroy()``: the Raft port could not be bound."""
        return not self._destroyed and not self.tick_thread_alive()

    def destroy(self) -> None:
        """Stop the tick thread (it closes the connections and the journal on its way out)."""
        self._destroyed = True
        super().destroy()

    # -- tick thread --------------------------------------------------------------------------------

    def _after_tick(self) -> None:
        """Report a new epoch, a new status and readiness to the reactor (each only when it changed)."""
        try:
            state = self._holder.state
            if state.epoch != self._reported_epoch:
                self._reported_epoch = state.epoch
                self._listener.snapshot(state.snapshot())
            leader = self._getLeader()
            status = RaftStatus(
                leader=getattr(leader, "address", None) if leader is not None else None,
                is_leader=bool(self._isLeader()),
                has_quorum=bool(self.hasQuorum),
            )
            if status != self._reported_status:
                self._reported_status = status
                self._listener.status(status)
            if not self._reported_ready and self.isReady():
                self._reported_ready = True
                self._listener.ready()
        except Exception:
            self._listener.failure(Failure(), "reporting the Raft state")

    def _apply(self, op: str, *args: Any) -> Outcome:
        return apply_operation(self._holder.state, op, args)

    @replicated
    def register_node(self, node_id: str, host: str, port: int, line_port: int, weight: int, seq: int) -> Outcome:
        """Replicated ``ClusterState.register_node``."""
        return self._apply("register_node", node_id, host, port, line_port, weight, seq)

    @replicated
    def set_weight(self, node_id: str, weight: int) -> Outcome:
        """Replicated ``ClusterState.set_weight``."""
        return self._apply("set_weight", node_id, weight)

    @replicated
    def mark_down(self, node_id: str) -> Outcome:
        """Replicated ``ClusterState.mark_down``."""
        return self._apply("mark_down", node_id)

    @replicated
    def mark_up(self, node_id: str) -> Outcome:
        """Replicated ``ClusterState.mark_up``."""
        return self._apply("mark_up", node_id)

    @replicated
    def start_leaving(self, node_id: str) -> Outcome:
        """Replicated ``ClusterState.start_leaving``."""
        return self._apply("start_leaving", node_id)

    @replicated
    def remove(self, node_id: str) -> Outcome:
        """Replicated ``ClusterState.remove``."""
        return self._apply("remove", node_id)

    @replicated
    def register_gateway(self, gateway_id: str, raft: str, url: str) -> Outcome:
        """Replicated ``ClusterState.register_gateway``."""
        return self._apply("register_gateway", gateway_id, raft, url)


class LocalRaft:
    """An in-memory stand-in for ``ClusterRaft``: the real ``ClusterState``, applied at once on the
    caller's thread, with this gateway as the leader of a group of one. For tests of everything above
    the Raft layer (the API, the health checker, the wiring).

    ``hold()`` keeps submitted commands pending until ``release()`` (or ``fail_held(reason)``), and
    ``elect(address)`` changes the reported leader, so tests can play timeouts and leader changes.
    """

    def __init__(
        self, settings: RaftSettings, listener: RaftListener, state: ClusterState | None = None, leader: bool = True
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.state = state or ClusterState()
        self.submitted: list[tuple[str, tuple[Any, ...]]] = []
        self.held: list[tuple[str, tuple[Any, ...], int]] | None = None
        self.destroyed = False
        self._ready = False
        self.listener.snapshot(self.state.snapshot())
        if leader:
            self.elect(settings.self_address)

    def elect(self, address: str | None) -> None:
        """Report ``address`` as the leader (None: no leader); this gateway leads when it is its own."""
        is_leader = address == self.settings.self_address
        self.listener.status(RaftStatus(address, is_leader, address is not None))
        if address is not None and not self._ready:
            self._ready = True
            self.listener.ready()

    def submit(self, op: str, args: tuple[Any, ...], token: int) -> None:
        """Apply at once (or hold)."""
        self.submitted.append((op, args))
        if self.held is not None:
            self.held.append((op, args, token))
            return
        self._apply(op, args, token)

    def _apply(self, op: str, args: tuple[Any, ...], token: int) -> None:
        before = self.state.epoch
        outcome = apply_operation(self.state, op, args)
        self.listener.command_done(token, outcome, SUCCESS)
        if self.state.epoch != before:
            self.listener.snapshot(self.state.snapshot())

    def hold(self) -> None:
        """Keep commands pending from now on."""
        if self.held is None:
            self.held = []

    def release(self) -> None:
        """Apply the held commands and stop holding."""
        held, self.held = self.held or [], None
        for op, args, token in held:
            self._apply(op, args, token)

    def fail_held(self, reason: int) -> None:
        """Fail the held commands with a pysyncobj FAIL_REASON and stop holding."""
        held, self.held = self.held or [], None
        for _, _, token in held:
            self.listener.command_done(token, None, reason)

    def destroy(self) -> None:
        """Nothing runs; remember it was called."""
        self.destroyed = True

    def alive(self) -> bool:
        """Never a thread."""
        return False

    def broken(self) -> bool:
        """Never broken."""
        return False


# -- the service -----------------------------------------------------------------------------------


@dataclass
class _Pending:
    op: str
    deferred: Deferred[Outcome]
    timer: IDelayedCall | None
    outcome: Outcome | None = None


class Membership(Service):
    """The gateway's view of the cluster map and its way to change it.

    Each operation returns a Deferred that fires with an ``Outcome`` once the change is committed and
    this gateway's view has reached its epoch (read-your-writes on this gateway), or fails with
    ``ClusterMapUnavailable`` on a timeout, a leader change or a missing leader (safe to retry: every
    command is idempotent). ``view`` is the latest ``ClusterView``; observers (``subscribe``) get each
    new one. ``ready`` fires once the Raft state is loaded (journal replayed, leader known).
    """

    _log = Logger()
    #: Longest wait, after a commit, for this gateway's view to reach the committed epoch.
    view_wait = 2.0
    #: Delay between attempts to register this gateway in the map.
    register_retry = 1.0
    #: How many recent views ``history`` keeps.
    history_size = 16

    def __init__(
        self,
        config: GatewayConfig,
        reactor: MembershipReactor,
        raft_factory: RaftFactory | None = None,
        on_view: Callable[[ClusterView], None] | None = None,
        command_timeout: float = 4.0,
        settings: RaftSettings | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or raft_settings(config)
        self._reactor = reactor
        self._factory: RaftFactory = raft_factory or ClusterRaft.create
        self._observers: list[Callable[[ClusterView], None]] = [on_view] if on_view else []
        self.command_timeout = command_timeout
        self.view = ClusterView.empty(config.points_per_node)
        self._history: collections.deque[ClusterView] = collections.deque([self.view], maxlen=self.history_size)
        self.status = RaftStatus()
        self.ready: Deferred[None] = Deferred()
        self._raft: RaftHandle | None = None
        self._tokens = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._registering = False
        self._register_call: IDelayedCall | None = None
        self._stop_poll: IDelayedCall | None = None
        self._bind_check: IDelayedCall | None = None
        self._on_fatal = on_fatal or self._exit
        port = endpoint_port(config.port)
        host = config.advertise_host
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        url = f"http://{shown}:{port}" if port is not None else ""
        self.self_info = GatewayInfo(config.gateway_id, self.settings.self_address, url)

    # -- lifecycle --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.config.data_dir:
            os.makedirs(self.config.data_dir, exist_ok=True)
        else:
            self._log.warn("no --data-dir: the Raft journal is kept in memory only and lost on restart")
        self._log.info(
            "Raft: {address}, peers {peers}{secure}",
            address=self.settings.self_address,
            peers=", ".join(self.settings.peers) or "none",
            secure=" (encrypted)" if self.settings.password else "",
        )
        self._raft = self._factory(self.settings, _ReactorBridge(self._reactor, self))
        self._bind_check = self._reactor.callLater(0.5, self._check_bound)
        self._maybe_register_self()  # in case a leader was reported while the factory ran

    def _check_bound(self) -> None:
        self._bind_check = None
        if self._raft is not None and self._raft.broken():
            message = f"cannot listen on the Raft address {self.settings.self_address} (in use?)"
            self._log.critical("{message}", message=message)
            self._on_fatal(message)

    def _exit(self, message: str) -> None:
        exit_with_status(self._reactor, 1)  # type: ignore[arg-type]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for call in (self._register_call, self._bind_check):
            if call is not None and call.active():
                call.cancel()
        self._register_call = self._bind_check = None
        for token in list(self._pending):
            self._fail(token, "the gateway is stopping")
        raft, self._raft = self._raft, None
        if raft is None:
            return None
        raft.destroy()
        if not raft.alive():
            return None
        done: Deferred[None] = Deferred()
        deadline = self._reactor.seconds() + 3.0

        def poll() -> None:
            self._stop_poll = None
            if not raft.alive() or self._reactor.seconds() >= deadline:
                done.callback(None)
            else:
                self._stop_poll = self._reactor.callLater(0.05, poll)

        poll()
        return done

    # -- state ------------------------------------------------------------------------------------

    def subscribe(self, observer: Callable[[ClusterView], None]) -> None:
        """Call ``observer(view)`` with every new view (on the reactor thread)."""
        self._observers.append(observer)

    def unsubscribe(self, observer: Callable[[ClusterView], None]) -> None:
        """Stop calling ``observer``."""
        if observer in self._observers:
            self._observers.remove(observer)

    @property
    def is_leader(self) -> bool:
        """True while this gateway is the Raft leader (as far as it knows)."""
        return self.status.is_leader

    @property
    def has_quorum(self) -> bool:
        """True while this gateway reaches a majority of the group."""
        return self.status.has_quorum

    @property
    def leader_known(self) -> bool:
        """True when a Raft leader is known."""
        return self.status.leader is not None

    @property
    def history(self) -> tuple[ClusterView, ...]:
        """The last ``history_size`` views this gateway published, oldest first (the current one last)."""
        return tuple(self._history)

    def leader_id(self) -> str | None:
        """The leader gateway's id, or None (no leader, or one not registered in the map yet)."""
        gateway = self.view.gateway_at(self.status.leader)
        return gateway.id if gateway is not None else None

    # -- operations -------------------------------------------------------------------------------

    def register_node(
        self, node_id: str, host: str, port: int, line_port: int, weight: int, seq: int
    ) -> Deferred[Outcome]:
        """Register or refresh a kvstore node."""
        return self._submit("register_node", node_id, host, port, line_port, weight, seq)

    def set_weight(self, node_id: str, weight: int) -> Deferred[Outcome]:
        """Change a node's weight."""
        return self._submit("set_weight", node_id, weight)

    def mark_down(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node down."""
        return self._submit("mark_down", node_id)

    def mark_up(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node up."""
        return self._submit("mark_up", node_id)

    def start_leaving(self, node_id: str) -> Deferred[Outcome]:
        """Start a node's drain."""
        return self._submit("start_leaving", node_id)

    def remove(self, node_id: str) -> Deferred[Outcome]:
        """Remove a node."""
        return self._submit("remove", node_id)

    def register_gateway(self, gateway_id: str, raft: str, url: str) -> Deferred[Outcome]:
        """Register a gateway."""
        return self._submit("register_gateway", gateway_id, raft, url)

    def _submit(self, op: str, *args: Any) -> Deferred[Outcome]:
        raft = self._raft
        if raft is None:
            return fail(ClusterMapUnavailable("the Raft cluster map is not running"))
        token = next(self._tokens)
        deferred: Deferred[Outcome] = Deferred(lambda _: self._cancel(token))
        timer = self._reactor.callLater(self.command_timeout, self._fail, token, "no answer in time")
        self._pending[token] = _Pending(op, deferred, timer)
        try:
            raft.submit(op, args, token)
        except Exception:
            self._forget(token)
            return fail()
        return deferred

    def _cancel(self, token: int) -> None:
        self._forget(token)

    def _forget(self, token: int) -> _Pending | None:
        pending = self._pending.pop(token, None)
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        return pending

    def _fail(self, token: int, reason: str) -> None:
        pending = self._forget(token)
        if pending is None:
            return
        if pending.outcome is not None:
            # Committed, but this gateway's view lags: answer with what is known.
            pending.deferred.callback(pending.outcome)
            return
        pending.deferred.errback(ClusterMapUnavailable(f"{pending.op}: {reason}"))

    # -- reports from the Raft thread (on the reactor thread) -------------------------------------

    def _on_command_done(self, token: int, outcome: Outcome | None, error: int) -> None:
        pending = self._pending.get(token)
        if pending is None:
            return  # timed out or cancelled
        if error != SUCCESS or outcome is None:
            self._fail(token, _FAIL_REASONS.get(error, f"pysyncobj error {error}"))
            return
        if outcome.epoch <= self.view.epoch:
            self._forget(token)
            pending.deferred.callback(outcome)
            return
        # Wait (briefly) for the view of this epoch, so the caller reads its own write here.
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.outcome = outcome
        pending.timer = self._reactor.callLater(self.view_wait, self._fail, token, "view lag")

    def _on_snapshot(self, snapshot: ClusterSnapshot) -> None:
        if snapshot.epoch < self.view.epoch or (snapshot.epoch == self.view.epoch and self.view.epoch != 0):
            return
        self.view = ClusterView.build(snapshot, self.config.points_per_node, self.view)
        self._history.append(self.view)
        self._log.info(
            "cluster map epoch {epoch}: {nodes} node(s) in the ring, {gateways} gateway(s)",
            epoch=snapshot.epoch,
            nodes=len(self.view.ring),
            gateways=len(snapshot.gateways),
        )
        for observer in list(self._observers):
            try:
                observer(self.view)
            except Exception:
                self._log.failure("observer of the cluster map failed on epoch {epoch}", epoch=snapshot.epoch)
        for token, pending in list(self._pending.items()):
            if pending.outcome is not None and pending.outcome.epoch <= self.view.epoch:
                self._forget(token)
                pending.deferred.callback(pending.outcome)
        self._maybe_register_self()

    def _on_status(self, status: RaftStatus) -> None:
        previous, self.status = self.status, status
        if status.leader != previous.leader:
            self._log.info(
                "Raft leader: {leader}{me}",
                leader=status.leader or "none",
                me=" (this gateway)" if status.is_leader else "",
            )
        self._maybe_register_self()

    def _on_ready(self) -> None:
        if not self.ready.called:
            self._log.info("Raft state loaded at epoch {epoch}", epoch=self.view.epoch)
            self.ready.callback(None)

    def _on_failure(self, failure: Failure, what: str) -> None:
        self._log.failure("Raft thread failed {what}", failure, what=what)

    # -- this gateway in the map ------------------------------------------------------------------

    def _maybe_register_self(self) -> None:
        if not self.running or self._registering or self._raft is None or not self.leader_known:
            return
        if self._register_call is not None and self._register_call.active():
            return
        if self.self_info in self.view.gateways:
            return
        self._registering = True
        info = self.self_info
        d = self.register_gateway(info.id, info.raft, info.url)
        d.addCallbacks(self._registered, self._register_failed)

    def _registered(self, outcome: Outcome) -> None:
        self._registering = False
        if outcome.changed:
            self._log.info("gateway {id} registered in the cluster map", id=self.self_info.id)
        self._maybe_register_self()

    def _register_failed(self, failure: Failure) -> None:
        self._registering = False
        if not self.running:
            return
        self._log.warn("cannot register this gateway yet: {error}", error=failure.getErrorMessage())
        self._register_call = self._reactor.callLater(self.register_retry, self._retry_register)

    def _retry_register(self) -> None:
        self._register_call = None
        self._maybe_register_self()
