"""Rebalancing as a gateway sees it: which kvstores have handed off their data for the current ring.

Every gateway (not only the leader) reads each kvstore's ``GET /health`` every probe interval (the node
monitor, ``chashd.gateway.monitor``, does the asking). A kvstore reports there the epoch of the ring its data
conforms to (``handoff.synced_epoch``), its key count and its handoff progress. While some node's synced
ring places keys differently from the current ring, a move is under way: ``Rebalance.placement()`` then
gives the router the oldest such ring as ``previous``, so reads (and read-modify-writes) also ask the nodes
that owned a key before the move, and no acknowledged write is missed. When every node has caught up,
``previous`` is None again and reads cost what they cost before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger

from chashd.gateway.clustermap import ClusterView
from chashd.gateway.membership import Membership
from chashd.gateway.router import Placement
from chashd.node import NodeInfo, NodeState
from chashd.ring import HashRing

__all__ = ["Rebalance"]


class Rebalance:
    """Follows the kvstores' handoff progress in the node monitor's reports (``reports``: node id to the last
    ``/health`` report) and derives the router's ``Placement`` from it (a ``NodeObserver`` of
    ``chashd.gateway.monitor.NodeMonitor``).

    ``on_change()`` is called after each round of the monitor, when the placement may have changed.
    """

    _log = Logger()

    def __init__(
        self, membership: Membership, reports: Mapping[str, Mapping[str, Any]], on_change: Callable[[], None]
    ) -> None:
        self._membership = membership
        self.reports = reports
        self._on_change = on_change
        self._was_rebalancing = False

    # -- the monitor's rounds -----------------------------------------------------------------------

    def round_started(self, view: ClusterView, now: float) -> None:
        """Nothing to do before a round."""

    def reported(self, node: NodeInfo, report: Mapping[str, Any]) -> None:
        """Nothing to do per report: the monitor keeps the reports, and the round's end reads them."""

    def unreachable(self, node: NodeInfo, reason: str) -> None:
        """Health verdicts are ``HealthChecker``'s: here a miss only leaves the node's last report."""

    def round_done(self) -> None:
        """Log when a move starts or ends, and let the router follow."""
        rebalancing = self.rebalancing()
        if rebalancing != self._was_rebalancing:
            self._was_rebalancing = rebalancing
            self._log.info(
                "rebalancing {state} at epoch {epoch}",
                state="started" if rebalancing else "finished",
                epoch=self._membership.view.epoch,
            )
        self._on_change()

    # -- derived state --------------------------------------------------------------------------

    def synced_epoch(self, node_id: str) -> int | None:
        """The epoch of the ring ``node_id`` last reported its data conforms to, or None."""
        handoff = self.reports.get(node_id, {}).get("handoff")
        epoch = handoff.get("synced_epoch") if isinstance(handoff, dict) else None
        return epoch if isinstance(epoch, int) else None

    def _ring_at(self, epoch: int, view: ClusterView) -> HashRing | None:
        """The ring in force at ``epoch`` (the newest remembered view at or before it)."""
        found = None
        for old in self._membership.history:
            if old.epoch <= epoch:
                found = old.ring
        return found

    def _lagging(self, view: ClusterView) -> list[HashRing | None]:
        """For every up or leaving node not caught up with the current placement: the ring its data follows
        (None when that ring is not remembered)."""
        lagging: list[HashRing | None] = []
        for node in view.nodes:
            if node.state == NodeState.DOWN:
                continue
            epoch = self.synced_epoch(node.id)
            if epoch is not None and epoch >= view.epoch:
                continue
            ring = self._ring_at(epoch, view) if epoch is not None else None
            if ring is not None and ring.same_placement(view.ring):
                continue
            lagging.append(ring)
        return lagging

    def rebalancing(self) -> bool:
        """True while some up or leaving node has not handed off for the current placement."""
        return bool(self._lagging(self._membership.view))

    def previous_ring(self) -> HashRing | None:
        """The oldest ring some node's data still follows, while a move is under way."""
        view = self._membership.view
        lagging = self._lagging(view)
        if not lagging:
            return None
        known = [ring for ring in lagging if ring is not None]
        if len(known) < len(lagging) and view.previous_ring is not None:
            known.append(view.previous_ring)
        if not known:
            return None
        return min(known, key=lambda ring: ring.epoch)

    def placement(self) -> Placement:
        """What the router routes by now."""
        view = self._membership.view
        previous = self.previous_ring()
        if previous is not None and previous.same_placement(view.ring):
            previous = None
        return Placement(view.ring, view.states, previous)

    def status(self) -> dict[str, Any]:
        """``rebalancing`` and the nodes with their keys and handoff progress, for ``GET /ring/status``."""
        view = self._membership.view
        nodes = []
        for node in view.nodes:
            report = self.reports.get(node.id, {})
            entry = node.to_dict()
            entry["keys"] = report.get("keys")
            entry["handoff"] = report.get("handoff")
            nodes.append(entry)
        return {"rebalancing": self.rebalancing(), "nodes": nodes}
