# -*- test-case-name: tests.unit.test_gateway_tap,tests.unit.test_rebalance -*-
"""The gateway: the Raft-replicated cluster map, the node monitor with the health verdicts and the handoff
progress it feeds, the router over them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.logger import Logger
from zope.interface import implementer

from chashd.config import GatewayConfig
from chashd.errors import NotServing
from chashd.gateway.clustermap import ClusterView
from chashd.gateway.dataplane import DataPlane, Routing
from chashd.gateway.health import HealthChecker
from chashd.gateway.membership import NOT_CURRENT, Membership
from chashd.gateway.monitor import NodeMonitor
from chashd.gateway.rebalance import Rebalance
from chashd.gateway.router import Router
from chashd.interfaces import IServerAdmin
from chashd.node import NodeState
from chashd.record import Record

__all__ = ["CLUSTER_TOTALS", "GatewayAdmin", "GatewayService"]

#: The cluster totals a gateway's ``stats`` adds: ``cluster_<name>``, summed over the kvstores' last reports.
CLUSTER_TOTALS = ("curr_items", "bytes", "limit_maxbytes", "evictions", "total_items", "get_hits", "get_misses")


class _Reports(Protocol):
    """Where the kvstores' last ``/health`` reports are (``NodeMonitor``)."""

    @property
    def reports(self) -> Mapping[str, Mapping[str, Any]]:
        """Node id to its last report."""


@implementer(IServerAdmin)
class GatewayAdmin:
    """The gateway's side of memcached's admin commands (``IServerAdmin``): its routing settings, its
    router's counters (``stats reset``), and the cluster's totals, summed from the reports every kvstore
    gives in ``GET /health`` (read each probe interval by the node monitor, ``monitor``):
    ``cluster_nodes_reporting`` and ``cluster_<name>`` for each name of ``CLUSTER_TOTALS``. A gateway holds
    no items: ``cache_memlimit`` is refused (send it to each kvstore) and ``stats cachedump`` is empty."""

    def __init__(self, router: Router, monitor: _Reports, config: GatewayConfig) -> None:
        self._router = router
        self._monitor = monitor
        self._config = config

    def stats_extra(self) -> dict[str, Any]:
        """The cluster totals."""
        totals = dict.fromkeys(CLUSTER_TOTALS, 0)
        reporting = 0
        for report in self._monitor.reports.values():
            figures = report.get("stats")
            if not isinstance(figures, dict):
                continue
            reporting += 1
            for name in CLUSTER_TOTALS:
                value = figures.get(name)
                if isinstance(value, int):
                    totals[name] += value
        return {"cluster_nodes_reporting": reporting, **{f"cluster_{name}": v for name, v in totals.items()}}

    def settings(self) -> dict[str, Any]:
        """N, W, R and whether flush_all may reach the kvstores."""
        config = self._config
        return {
            "maxbytes": 0,
            "evictions": "on",
            "flush_enabled": "yes" if config.allow_flush_all else "no",
            "replicas": config.replicas,
            "write_quorum": config.write_quorum,
            "read_quorum": config.read_quorum,
            "gateway_id": config.gateway_id,
        }

    def reset_stats(self) -> None:
        """Zero the router's counters."""
        counters = self._router.counters
        for name in counters:
            counters[name] = 0

    def set_memory_limit(self, limit_bytes: int) -> None:
        """Refused: the kvstores hold the items."""
        raise ValueError("a gateway holds no items: send cache_memlimit to each kvstore")

    def dump_items(self, limit: int) -> list[tuple[bytes, int, int]]:
        """None: the kvstores hold the items."""
        return []

    def dump_page(self, after: tuple[int, bytes] | None, limit: int) -> tuple[list[tuple[bytes, Record]], None]:
        """None: the kvstores hold the items."""
        return [], None


class GatewayService(MultiService):
    """Owns what a gateway is: its identity, its membership in the Raft group (``membership``), the node
    monitor (``monitor``: every kvstore's ``/health`` each probe interval) and the two things it feeds, the
    health verdicts the gateway gives while it leads (``health_checker``) and the handoff progress
    (``rebalance``), and the data plane: the ``router`` over the ``connections`` to every kvstore, both
    following each new view of the cluster map and each round of the monitor.

    Its parts come made, with their timers and clients, from ``chashd.gateway.tap``, the role's one wiring
    module; the gateway ties them together (the monitor's rounds to the verdicts and the handoff progress,
    each new view and each round to the routing). ``serves_keys`` False leaves the data plane unconnected: the
    gateway's workers serve keys (``--workers``), fed through ``on_routing``.
    """

    _log = Logger()

    def __init__(
        self,
        config: GatewayConfig,
        membership: Membership,
        monitor: NodeMonitor,
        health_checker: HealthChecker,
        data_plane: DataPlane,
        serves_keys: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.membership = membership
        self.membership.setServiceParent(self)
        self.monitor = monitor
        self.monitor.setServiceParent(self)
        self.health_checker = health_checker
        self.monitor.subscribe(self.health_checker)
        self.data_plane = data_plane
        self.data_plane.setServiceParent(self)
        self.connections = self.data_plane.connections
        self.router = self.data_plane.router
        self._serves_keys = serves_keys
        #: Called with each new ``Routing`` (the workers' and followers' feed).
        self.on_routing: Callable[[Routing], None] | None = None
        self.rebalance = Rebalance(self.membership, self.monitor.reports, self._route)
        self.monitor.subscribe(self.rebalance)
        self.admin = GatewayAdmin(self.router, self.monitor, config)
        self.membership.subscribe(self._new_view)
        self.membership.subscribe_contact(self._contact)

    def _new_view(self, view: ClusterView) -> None:
        """Route by the new view: connect to its nodes, place keys on its ring."""
        self._route()

    def _contact(self, current: bool) -> None:
        """The map became current or may be stale (``Membership.map_current``): read-modify-writes follow."""
        self._route()

    def _route(self) -> None:
        routing = Routing.of(self.rebalance.placement(), self.membership.view.nodes, self.membership.map_current)
        if self._serves_keys:
            self.data_plane.follow(routing)
        if self.on_routing is not None:
            self.on_routing(routing)

    def health(self) -> dict[str, Any]:
        """The body of ``GET /health``; raises ``NotServing`` (a 503 naming why) until this gateway is in the
        cluster map it serves: before, the map a client or a kvstore reads here does not name it, its
        registration may still fail (no quorum), and whatever waits on ``/health`` (``chash cluster up``,
        Compose's healthcheck, Kubernetes' startup probe, the demo) would go on with a gateway that has not
        joined. Once in the map it stays healthy: a gateway cut off from the others says so on ``/ready``."""
        body = {
            "role": "gateway",
            "id": self.config.gateway_id,
            "epoch": self.membership.view.epoch,
            "leader": self.membership.leader_id(),
        }
        absence = self.membership.absence()
        if absence is not None:
            raise NotServing(absence, body)
        return body

    def ready(self) -> tuple[bool, str]:
        """``GET /ready``: this gateway is in the cluster map, leads or heard from the Raft leader within its
        election timeout (its map is current: a follower cut off from the other gateways still names its
        last leader), and at least one kvstore is up."""
        absence = self.membership.absence()
        if absence is not None:
            return False, absence
        if not self.membership.leader_known:
            return False, "no Raft leader is known"
        if not self.membership.map_current:
            return False, NOT_CURRENT
        up = len(self.membership.view.nodes_in(NodeState.UP))
        if not up:
            return False, "no kvstore node is up"
        return True, f"leader known, {up} kvstore node(s) up"

    def status_extra(self) -> dict[str, Any]:
        """More fields for ``GET /ring/status``: ``rebalancing`` and each node's keys and handoff progress."""
        return self.rebalance.status()
