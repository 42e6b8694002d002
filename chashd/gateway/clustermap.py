"""The cluster map: which kvstore nodes exist (address, weight, state, announcement seq), which gateways
form the Raft group, and the epoch; the state machine that changes it, and the view the reactor reads.

This module is pure: it imports nothing of Twisted or pysyncobj and reads no clock. Its contracts:

- ``ClusterState`` is a deterministic state machine. Every gateway applies the same operations in the same
  order (also while replaying its Raft journal at start), so an operation reads no clock, does no I/O and
  never raises: it returns an ``Outcome``, an ``OutcomeCode`` and the epoch after it, which the HTTP API
  maps to a status.
- Every real change bumps the epoch by one; an operation that changes nothing leaves it alone. Applying an
  operation twice in a row changes nothing the second time, so every operation may be retried (a timeout or
  a leader change does not say whether it was applied).
- The operations are the ``ClusterState`` methods marked ``@operation``; ``OPERATIONS`` lists them and
  ``apply_operation`` runs one by name. Their arguments are plain ``str`` and ``int`` values (they are
  pickled into the Raft journal). Adding an operation takes that one method: the Raft adapter
  (``chashd.gateway.raft``) replicates every entry of ``OPERATIONS`` under the method's name, and
  ``chashd.gateway.testing.LocalRaft`` applies it. The name, the argument list and ``ver`` of an operation
  are what the journal records, so they never change; a new operation takes a ``ver`` higher than every
  existing one (see ``chashd.gateway.raft``).
- ``ClusterState.to_plain()`` is the map as plain tuples of ``str`` and ``int``: what a Raft snapshot
  stores, so that a snapshot does not depend on the names of the classes here.
- ``ClusterView`` is an immutable value: the map at one epoch with the ``HashRing`` derived from it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeVar

from chashd.node import NodeInfo, NodeState
from chashd.ring import HashRing

__all__ = [
    "MAX_NODES",
    "MAX_SEQ",
    "MAX_WEIGHT",
    "OPERATIONS",
    "ClusterSnapshot",
    "ClusterState",
    "ClusterView",
    "GatewayInfo",
    "Operation",
    "Outcome",
    "OutcomeCode",
    "PlainMap",
    "apply_operation",
    "operation",
]

MAX_NODES = 4096
MAX_WEIGHT = 1_000_000
MAX_SEQ = 2**63 - 1


class OutcomeCode(StrEnum):
    """What an operation did (its JSON form, the ``result`` of the admin routes, is the value)."""

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
_CHANGED = frozenset({OutcomeCode.REGISTERED, OutcomeCode.UPDATED, OutcomeCode.REMOVED})


@dataclass(frozen=True)
class GatewayInfo:
    """A gateway of the Raft group: its id, its Raft address (``host:port``, as pysyncobj names it) and its
    HTTP URL."""

    id: str
    raft: str
    url: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"id": self.id, "raft": self.raft, "url": self.url}


@dataclass(frozen=True)
class Outcome:
    """What an operation did: a code, the epoch after it, and a sentence for the client when the operation
    was refused."""

    code: OutcomeCode
    epoch: int
    detail: str = ""

    @property
    def changed(self) -> bool:
        """True when the map changed (and the epoch was bumped)."""
        return self.code in _CHANGED


@dataclass(frozen=True)
class ClusterSnapshot:
    """An immutable copy of the map at one epoch, nodes and gateways sorted by id."""

    epoch: int
    nodes: tuple[NodeInfo, ...]
    gateways: tuple[GatewayInfo, ...]


#: A node as plain data: (id, host, port, line_port, weight, state, seq).
PlainNode = tuple[str, str, int, int, int, str, int]
#: A gateway as plain data: (id, raft, url).
PlainGateway = tuple[str, str, str]
#: The map as plain data: (epoch, nodes, gateways), as ``ClusterState.to_plain()`` gives it.
PlainMap = tuple[int, tuple[PlainNode, ...], tuple[PlainGateway, ...]]


# -- the operations ------------------------------------------------------------------------------------

_Method = TypeVar("_Method", bound=Callable[..., "Outcome"])

#: Method name to ver, filled by ``@operation`` while ``ClusterState`` is defined.
_MARKED: dict[str, int] = {}


def operation(*, ver: int) -> Callable[[_Method], _Method]:
    """Mark a ``ClusterState`` method as an operation of the map, introduced with command set ``ver``."""

    def mark(method: _Method) -> _Method:
        _MARKED[method.__name__] = ver
        return method

    return mark


@dataclass(frozen=True)
class Operation:
    """An operation of the map: the ``ClusterState`` method's name and parameters, and its ``ver``."""

    name: str
    params: tuple[str, ...]
    ver: int

    @property
    def arity(self) -> int:
        """How many arguments it takes."""
        return len(self.params)


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable() and " " not in value


def _valid_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535


def _valid_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class ClusterState:
    """The cluster map as a deterministic state machine: kvstore nodes, gateways and the epoch.

    Operations never raise and never read a clock; each returns an ``Outcome``. Registration is idempotent
    and ordered: an identical announcement changes nothing, an announcement whose ``seq`` is not greater
    than the last one but whose data differs is stale, and a node id already up (or leaving) at another
    address is a conflict. A node coming back from ``down`` with a higher seq is accepted, and so is a
    restarted node at the same address.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.nodes: dict[str, NodeInfo] = {}
        self.gateways: dict[str, GatewayInfo] = {}

    def _bump(self, code: OutcomeCode) -> Outcome:
        self.epoch += 1
        return Outcome(code, self.epoch)

    def _refuse(self, code: OutcomeCode, detail: str) -> Outcome:
        return Outcome(code, self.epoch, detail)

    def snapshot(self) -> ClusterSnapshot:
        """An immutable copy of the map."""
        return ClusterSnapshot(
            self.epoch,
            tuple(self.nodes[k] for k in sorted(self.nodes)),
            tuple(self.gateways[k] for k in sorted(self.gateways)),
        )

    def to_plain(self) -> PlainMap:
        """The map as plain tuples of ``str`` and ``int`` (what a Raft snapshot stores)."""
        snapshot = self.snapshot()
        return (
            snapshot.epoch,
            tuple((n.id, n.host, n.port, n.line_port, n.weight, str(n.state), n.seq) for n in snapshot.nodes),
            tuple((g.id, g.raft, g.url) for g in snapshot.gateways),
        )

    @classmethod
    def from_plain(cls, plain: PlainMap) -> ClusterState:
        """The state ``to_plain()`` gave; raises ``ValueError`` or ``TypeError`` on anything else."""
        epoch, nodes, gateways = plain
        state = cls()
        state.epoch = int(epoch)
        for node_id, host, port, line_port, weight, node_state, seq in nodes:
            state.nodes[node_id] = NodeInfo(node_id, host, port, line_port, weight, NodeState(node_state), seq)
        for gateway_id, raft, url in gateways:
            state.gateways[gateway_id] = GatewayInfo(gateway_id, raft, url)
        return state

    # -- kvstore nodes ----------------------------------------------------------------------------

    @operation(ver=0)
    def register_node(self, node_id: str, host: str, port: int, line_port: int, weight: int, seq: int) -> Outcome:
        """A node announces itself (``POST /ring/nodes``)."""
        if not _valid_id(node_id):
            return self._refuse(OutcomeCode.INVALID, f"{node_id!r} is not a node id")
        if not (isinstance(host, str) and 0 < len(host) <= 255):
            return self._refuse(OutcomeCode.INVALID, f"{host!r} is not a host")
        if not (_valid_port(port) and _valid_port(line_port)):
            return self._refuse(OutcomeCode.INVALID, "port and line_port must be TCP ports (1-65535)")
        if not _valid_int(weight, 1, MAX_WEIGHT):
            return self._refuse(
                OutcomeCode.INVALID, f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}"
            )
        if not _valid_int(seq, 0, MAX_SEQ):
            return self._refuse(OutcomeCode.INVALID, f"seq must be a non-negative integer, not {seq!r}")
        current = self.nodes.get(node_id)
        if current is None:
            if len(self.nodes) >= MAX_NODES:
                return self._refuse(OutcomeCode.INVALID, f"the map already holds {MAX_NODES} nodes")
            self.nodes[node_id] = NodeInfo(node_id, host, port, line_port, weight, NodeState.UP, seq)
            return self._bump(OutcomeCode.REGISTERED)
        same = (current.host, current.port, current.line_port, current.weight) == (host, port, line_port, weight)
        if seq <= current.seq:
            if same:
                return self._refuse(OutcomeCode.UNCHANGED, "")
            return self._refuse(
                OutcomeCode.STALE,
                f"node {node_id!r} announced seq {seq}, not newer than its last seq {current.seq}, with other data",
            )
        if (current.host, current.port) != (host, port) and current.state != NodeState.DOWN:
            return self._refuse(
                OutcomeCode.CONFLICT,
                f"node id {node_id!r} is taken by a node {current.state} at {current.host}:{current.port}",
            )
        # A newer announcement: a restart (maybe moved, if it was down) or a new weight. A node that
        # announces itself afresh is alive and wants its share of the ring, whatever it was before.
        self.nodes[node_id] = NodeInfo(node_id, host, port, line_port, weight, NodeState.UP, seq)
        return self._bump(OutcomeCode.UPDATED)

    @operation(ver=0)
    def set_weight(self, node_id: str, weight: int) -> Outcome:
        """Change a node's share of the ring."""
        if not _valid_int(weight, 1, MAX_WEIGHT):
            return self._refuse(
                OutcomeCode.INVALID, f"weight must be an integer from 1 to {MAX_WEIGHT}, not {weight!r}"
            )
        current = self.nodes.get(node_id)
        if current is None:
            return self._refuse(OutcomeCode.UNKNOWN, f"no node {node_id!r} in the ring")
        if current.weight == weight:
            return self._refuse(OutcomeCode.UNCHANGED, "")
        self.nodes[node_id] = dataclasses.replace(current, weight=weight)
        return self._bump(OutcomeCode.UPDATED)

    def _set_state(self, node_id: str, state: NodeState, allowed_from: Iterable[NodeState]) -> Outcome:
        current = self.nodes.get(node_id)
        if current is None:
            return self._refuse(OutcomeCode.UNKNOWN, f"no node {node_id!r} in the ring")
        if current.state == state or current.state not in allowed_from:
            return self._refuse(OutcomeCode.UNCHANGED, "")
        self.nodes[node_id] = dataclasses.replace(current, state=state)
        return self._bump(OutcomeCode.UPDATED)

    @operation(ver=0)
    def mark_down(self, node_id: str) -> Outcome:
        """The node stopped answering: keep it in the ring, skip it for routing."""
        return self._set_state(node_id, NodeState.DOWN, (NodeState.UP,))

    @operation(ver=0)
    def mark_up(self, node_id: str) -> Outcome:
        """The node answers again. A leaving node stays leaving."""
        return self._set_state(node_id, NodeState.UP, (NodeState.DOWN,))

    @operation(ver=0)
    def start_leaving(self, node_id: str) -> Outcome:
        """Start the node's drain: it owns nothing new and hands its data off."""
        return self._set_state(node_id, NodeState.LEAVING, (NodeState.UP, NodeState.DOWN))

    @operation(ver=0)
    def remove(self, node_id: str) -> Outcome:
        """Forget the node."""
        if node_id not in self.nodes:
            return self._refuse(OutcomeCode.UNKNOWN, f"no node {node_id!r} in the ring")
        del self.nodes[node_id]
        return self._bump(OutcomeCode.REMOVED)

    # -- gateways ---------------------------------------------------------------------------------

    @operation(ver=0)
    def register_gateway(self, gateway_id: str, raft: str, url: str) -> Outcome:
        """A gateway announces its id, Raft address and HTTP URL. One entry per id and per Raft address."""
        if not _valid_id(gateway_id) or not isinstance(raft, str) or not raft or not isinstance(url, str):
            return self._refuse(OutcomeCode.INVALID, "a gateway needs an id, a Raft address and a URL")
        info = GatewayInfo(gateway_id, raft, url)
        current = self.gateways.get(gateway_id)
        if current == info:
            return self._refuse(OutcomeCode.UNCHANGED, "")
        for other in [g for g in self.gateways.values() if g.raft == raft and g.id != gateway_id]:
            del self.gateways[other.id]
        self.gateways[gateway_id] = info
        return self._bump(OutcomeCode.REGISTERED if current is None else OutcomeCode.UPDATED)


def _operations() -> Mapping[str, Operation]:
    table = {}
    for name, ver in sorted(_MARKED.items()):
        params = tuple(inspect.signature(getattr(ClusterState, name)).parameters)[1:]  # without self
        table[name] = Operation(name, params, ver)
    return MappingProxyType(table)


#: The operations of the map by name, sorted by name.
OPERATIONS: Mapping[str, Operation] = _operations()


def apply_operation(state: ClusterState, name: str, args: tuple[Any, ...]) -> Outcome:
    """Run one operation by name. An unknown operation, a wrong argument count or a bug gives an ``invalid``
    or ``failed`` outcome, never an exception: the same on every gateway, so the maps stay equal."""
    op = OPERATIONS.get(name)
    if op is None or op.arity != len(args):
        return Outcome(OutcomeCode.INVALID, state.epoch, f"no operation {name!r} with {len(args)} arguments")
    try:
        result: Outcome = getattr(state, name)(*args)
    except Exception as e:
        return Outcome(OutcomeCode.FAILED, state.epoch, f"{type(e).__name__}: {e}")
    return result


# -- the view published to the reactor -------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """The map at one epoch as the reactor thread sees it, with the ring derived from it.

    ``ring`` holds the nodes that are up or down (a down node keeps its arcs and is skipped by routing; a
    leaving node owns nothing new), built with the configured points per node and carrying the epoch.
    ``previous_ring`` is the ring before the last change of placement (a join, a drain, a removal, a new
    weight), so rebalancing can compare old and new; it is ``None`` until there was one.
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
        weights = {n.id: n.weight for n in snapshot.nodes if n.state in (NodeState.UP, NodeState.DOWN)}
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
    def states(self) -> Mapping[str, NodeState]:
        """Node id to state, for every node of the map."""
        return {n.id: n.state for n in self.nodes}

    def nodes_in(self, *states: NodeState) -> tuple[NodeInfo, ...]:
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
