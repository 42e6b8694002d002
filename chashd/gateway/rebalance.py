"""Rebalancing as a gateway sees it: which kvstores have handed off their data for the current ring.

Every gateway (not only the leader) reads each up or leaving kvstore's ``GET /health`` every probe interval.
A kvstore reports there the epoch of the ring its data conforms to (``handoff.synced_epoch``), its key
count and its handoff progress. While some node's synced ring places keys differently from the current
ring, a move is under way: ``Rebalance.placement()`` then gives the router the oldest such ring as
``previous``, so reads (and read-modify-writes) also ask the nodes that owned a key before the move, and no
acknowledged write is missed. When every node has caught up, ``previous`` is None again and reads cost
what they cost before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from chashd.gateway.clustermap import ClusterView
from chashd.gateway.membership import Membership
from chashd.gateway.router import Placement
from chashd.node import NodeInfo, NodeState
from chashd.ring import HashRing

__all__ = ["Rebalance", "http_report"]

Fetch = Callable[[NodeInfo], Deferred[dict[str, Any]]]


def http_report(client: Any, timeout: float = 1.0) -> Fetch:
    """A ``fetch`` over a ``treq.client.HTTPClient``: the JSON body of ``GET http://host:port/health``."""

    def fetch(node: NodeInfo) -> Deferred[dict[str, Any]]:
        host = f"[{node.host}]" if ":" in node.host else node.host
        d: Deferred[Any] = client.get(f"http://{host}:{node.port}/health", timeout=timeout)
        return d.addCallback(lambda response: response.json())  # type: ignore[no-any-return]

    return fetch


class Rebalance(Service):
    """Follows the kvstores' handoff progress and derives the router's ``Placement`` from it.

    ``on_change()`` is called whenever the placement may have changed (a new view, a node caught up).
    """

    _log = Logger()

    def __init__(
        self,
        membership: Membership,
        fetch: Fetch,
        clock: IReactorTime,
        interval: float,
        on_change: Callable[[], None],
    ) -> None:
        self._membership = membership
        self._fetch = fetch
        self._clock = clock
        self._interval = interval
        self._on_change = on_change
        self.reports: dict[str, dict[str, Any]] = {}
        self._loop: LoopingCall | None = None
        self._polling: Deferred[Any] | None = None
        self._was_rebalancing = False

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self._log.failure("the progress poll stopped", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._polling is not None:
            self._polling.cancel()

    def _poll(self) -> Deferred[Any] | None:
        """Ask every up or leaving node for its report (one round at a time; errors only logged)."""
        if self._polling is not None:
            return None
        view = self._membership.view
        nodes = view.nodes_in(NodeState.UP, NodeState.LEAVING)
        for gone in set(self.reports) - {n.id for n in view.nodes}:
            del self.reports[gone]
        asks = [
            self._fetch(node).addCallbacks(self._got, self._missed, callbackArgs=(node,), errbackArgs=(node,))
            for node in nodes
        ]
        self._polling = DeferredList(asks, consumeErrors=True)
        self._polling.addBoth(self._round_done)
        return None

    def _got(self, body: Any, node: NodeInfo) -> None:
        if isinstance(body, dict):
            self.reports[node.id] = body

    def _missed(self, failure: Any, node: NodeInfo) -> None:
        # Health verdicts are the leader's HealthChecker's job; here a miss only leaves the last report.
        pass

    def _round_done(self, _: Any) -> None:
        self._polling = None
        try:
            rebalancing = self.rebalancing()
            if rebalancing != self._was_rebalancing:
                self._was_rebalancing = rebalancing
                self._log.info(
                    "rebalancing {state} at epoch {epoch}",
                    state="started" if rebalancing else "finished",
                    epoch=self._membership.view.epoch,
                )
            self._on_change()
        except Exception:
            self._log.failure("applying the kvstores' progress failed")

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
