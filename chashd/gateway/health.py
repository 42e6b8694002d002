"""Health verdicts on the kvstore nodes, by the Raft leader only, from the node monitor's reports.

The monitor (``chashd.gateway.monitor``) asks every node for its ``/health`` each probe interval. On the
leader, ``HealthChecker`` counts each node's failures in a row: after ``down_after`` of them it marks an
``up`` node ``down`` (still in the ring, skipped by routing); a later answer marks it ``up`` again. A node
that has been ``down`` for ``dead_after`` seconds is removed from the map, which triggers re-replication; so
is a ``leaving`` node that stopped answering for as long (its drain cannot finish).

The counters live on the leader only. A new leader starts counting afresh: a node that was already
``down`` is removed ``dead_after`` seconds after the new leader first saw it down, never earlier, so a
leader change can delay a removal but never hasten one. When this gateway stops leading, it forgets its
counters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chashd.gateway.clustermap import ClusterView, Outcome
from chashd.node import NodeInfo, NodeState

__all__ = ["HealthChecker"]


class _Membership(Protocol):
    """What the checker needs of ``Membership``."""

    view: ClusterView

    @property
    def is_leader(self) -> bool:
        """True while this gateway leads."""

    def mark_down(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node down."""

    def mark_up(self, node_id: str) -> Deferred[Outcome]:
        """Mark a node up."""

    def remove(self, node_id: str) -> Deferred[Outcome]:
        """Remove a node."""


class HealthChecker:
    """Changes the nodes' states in the map from the monitor's rounds while this gateway is the Raft leader
    (a ``NodeObserver`` of ``chashd.gateway.monitor.NodeMonitor``)."""

    _log = Logger()

    def __init__(
        self, membership: _Membership, clock: IReactorTime, down_after: int = 3, dead_after: float = 60.0
    ) -> None:
        self._membership = membership
        self._clock = clock
        self.down_after = down_after
        self.dead_after = dead_after
        self.failures: dict[str, int] = {}
        self.down_since: dict[str, float] = {}
        self._changing: set[str] = set()
        self._leading = False

    # -- the monitor's rounds -----------------------------------------------------------------------

    def round_started(self, view: ClusterView, now: float) -> None:
        """Follow the leadership; forget nodes that left the map; remove the nodes failing for too long."""
        if not self._membership.is_leader:
            if self._leading:
                self._log.info("no longer the Raft leader: health verdicts stop here")
                self._leading = False
                self.failures.clear()
                self.down_since.clear()
            return
        if not self._leading:
            self._log.info("Raft leader: health verdicts on the kvstores start here")
            self._leading = True
        present = {node.id for node in view.nodes}
        for table in (self.failures, self.down_since):
            for node_id in [n for n in table if n not in present]:
                del table[node_id]
        for node in view.nodes:
            self._check_dead(node, now)

    def reported(self, node: NodeInfo, report: Mapping[str, Any]) -> None:
        """The node answers: count it healthy (and mark it up if it was down)."""
        current = self._current(node.id)
        if current is None:
            return
        self.failures.pop(node.id, None)
        self.down_since.pop(node.id, None)
        if current.state == NodeState.DOWN:
            self._change(node.id, "mark_up", "node {node_id} answers again: marking it up")

    def unreachable(self, node: NodeInfo, reason: str) -> None:
        """The node gave no report: one more failure (marked down after ``down_after``)."""
        current = self._current(node.id)
        if current is None:
            return
        count = self.failures.get(node.id, 0) + 1
        self.failures[node.id] = count
        if count in (1, self.down_after):
            self._log.info(
                "health probe {count} of node {node_id} failed: {error}", count=count, node_id=node.id, error=reason
            )
        if count >= self.down_after and current.state == NodeState.UP:
            self._change(
                node.id, "mark_down", "node {node_id} failed {count} health probes: marking it down", count=count
            )
        if count >= self.down_after:
            self.down_since.setdefault(node.id, self._clock.seconds())

    def round_done(self) -> None:
        """Nothing to do at the end of a round."""

    # -- verdicts ----------------------------------------------------------------------------------

    def _current(self, node_id: str) -> NodeInfo | None:
        """The node as the map holds it now, while this gateway leads; else None (and no counters)."""
        node = self._membership.view.node(node_id)
        if node is None or not self._leading:
            self.failures.pop(node_id, None)
            self.down_since.pop(node_id, None)
            return None
        return node

    def _check_dead(self, node: NodeInfo, now: float) -> None:
        failing = node.state == NodeState.DOWN or (
            node.state == NodeState.LEAVING and self.failures.get(node.id, 0) >= self.down_after
        )
        if not failing:
            self.down_since.pop(node.id, None)
            return
        since = self.down_since.setdefault(node.id, now)
        if now - since >= self.dead_after:
            self._change(
                node.id,
                "remove",
                "node {node_id} has been unreachable for {seconds:.0f}s: removing it from the ring",
                seconds=now - since,
            )

    def _change(self, node_id: str, op: str, message: str, **fields: Any) -> None:
        if node_id in self._changing:
            return
        self._changing.add(node_id)
        self._log.info(message, node_id=node_id, **fields)
        d: Deferred[Outcome] = getattr(self._membership, op)(node_id)

        def done(result: Outcome | Failure) -> None:
            self._changing.discard(node_id)
            if op == "remove" and isinstance(result, Outcome):
                self.failures.pop(node_id, None)
                self.down_since.pop(node_id, None)
            if isinstance(result, Failure):
                self._log.warn(
                    "cannot {op} node {node_id} yet: {error}", op=op, node_id=node_id, error=result.getErrorMessage()
                )

        d.addBoth(done)
