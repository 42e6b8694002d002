# -*- test-case-name: tests.unit.test_follow,tests.unit.test_gateway_tap -*-
"""The gateway's data plane as one unit, and the routing it follows in a form that crosses processes.

``DataPlane`` is what serves keys: the connections to the kvstores, the router over them, and the two client
surfaces over the router (``line_factory()``: the memcached line protocol; ``http()``: ``/kv`` and the rest of
``KeyValueHTTP``). A gateway that runs Raft builds one in its own process (``--workers 1``); its workers
(``chashd.gateway.worker``) and the gateways that follow another's map (``--follow``) build the same one.

``Routing`` is what a data plane follows: the router's ``Placement`` (ring, node states, the ring being handed
off from) and where each kvstore of it listens. Its JSON form is the body of ``GET /ring/placement``
(``chashd.gateway.follow``)::

    {"version": 1, "tag": "<epoch>.<epoch of the previous ring, 0 for none>[.stale]",
     "ring": HashRing.to_dict(), "previous": HashRing.to_dict() or null,
     "nodes": [NodeInfo.to_dict(), ...], "current": true}

The tag changes whenever the placement does: a new epoch, or a move that ends (``previous`` gone) or moves on;
and when ``current`` does. ``current`` is false while the Raft gateway that serves the routing has heard from
no Raft leader within the election timeout (``Membership.map_current``): its map may be stale, and every data
plane that follows it refuses read-modify-writes (``Router.map_current``). A body without it (a gateway of an
earlier version) counts as current.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.web.resource import IResource

from chashd.config import GatewayConfig, connection_limits
from chashd.gateway.connections import Connections
from chashd.gateway.router import Placement, Router
from chashd.interfaces import IServerAdmin
from chashd.memcache.server import MemcacheServerFactory
from chashd.metrics import RequestMetrics
from chashd.node import NodeInfo
from chashd.ring import HashRing
from chashd.web import KeyValueHTTP, LimitedSite

__all__ = ["DataPlane", "Routing", "worker_writer"]

#: The version of ``Routing``'s JSON form; another is refused.
ROUTING_VERSION = 1


@dataclass(frozen=True)
class Routing:
    """A ``Placement`` and the addresses of its nodes (see the module docstring)."""

    placement: Placement
    nodes: tuple[NodeInfo, ...] = ()
    current: bool = True

    @classmethod
    def of(cls, placement: Placement, nodes: Iterable[NodeInfo], current: bool = True) -> Routing:
        """The routing of ``placement`` over ``nodes`` (a cluster view's); ``current``: see the module docstring."""
        return cls(placement, tuple(nodes), current)

    @property
    def epoch(self) -> int:
        """The epoch of the cluster map."""
        return self.placement.ring.epoch

    @property
    def tag(self) -> str:
        """Changes whenever the placement does (see the module docstring)."""
        previous = self.placement.previous
        tag = f"{self.epoch}.{previous.epoch if previous is not None else 0}"
        return tag if self.current else tag + ".stale"

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        previous = self.placement.previous
        return {
            "version": ROUTING_VERSION,
            "tag": self.tag,
            "ring": self.placement.ring.to_dict(),
            "previous": previous.to_dict() if previous is not None else None,
            "nodes": [node.to_dict() for node in self.nodes],
            "current": self.current,
        }

    @classmethod
    def from_json(cls, body: object) -> Routing:
        """Read the JSON form; ``ValueError`` for a body that is not one."""
        if not isinstance(body, Mapping) or body.get("version") != ROUTING_VERSION:
            raise ValueError(f"not a routing of version {ROUTING_VERSION}")
        ring = HashRing.from_dict(body.get("ring") or {})
        previous = HashRing.from_dict(body["previous"]) if body.get("previous") is not None else None
        items = body.get("nodes")
        if not isinstance(items, list):
            raise ValueError("malformed routing: nodes is not a list")
        nodes = []
        for item in items:
            if not isinstance(item, Mapping):
                raise ValueError(f"malformed routing: node {item!r}")
            nodes.append(NodeInfo.from_dict(item))
        current = body.get("current", True)
        if not isinstance(current, bool):
            raise ValueError("malformed routing: current is not a boolean")
        states = MappingProxyType({n.id: n.state for n in nodes})
        return cls(Placement(ring, states, previous), tuple(nodes), current)


def worker_writer(gateway_id: str, index: int) -> str:
    """The writer id of worker ``index`` of gateway ``gateway_id`` in the versions it assigns: each process
    that accepts writes needs an id of its own, or two of them could give two writes the same version."""
    suffix = f"-w{index}"
    return gateway_id[: 64 - len(suffix)] + suffix


class DataPlane(MultiService):
    """The connections, the router and the client surfaces of one process (see the module docstring).

    ``connections`` come made by whoever wires the process (``chashd.gateway.connections.kvstore_connections``);
    the data plane owns them from then on (starts and stops them). ``writer`` is the id in the versions the
    router assigns (default: the gateway's id).
    """

    def __init__(
        self, config: GatewayConfig, reactor: Any, connections: Connections, writer: str | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.connections = connections
        self.connections.setServiceParent(self)
        self.router = Router(
            writer or config.gateway_id,
            reactor,
            self.connections.client,
            replicas=config.replicas,
            write_quorum=config.write_quorum,
            read_quorum=config.read_quorum,
            allow_flush_all=config.allow_flush_all,
            hedge_after=config.hedge_after,
            primary_timeout=config.primary_timeout,
        )
        #: The latency histograms and error counts of both surfaces (None with --no-latency-histograms).
        self.requests = RequestMetrics() if config.latency_histograms else None
        #: The routing followed, None before the first.
        self.routing: Routing | None = None

    def follow(self, routing: Routing) -> None:
        """Route by ``routing`` from now on: connect to its nodes, place keys by its placement."""
        self.routing = routing
        self.connections.update(routing.nodes)
        # The connections name the new epoch before anything is routed by it (the read-modify-writes waiting
        # for it start over as soon as the router has it).
        self.connections.announce(routing.epoch)
        self.router.map_current = routing.current
        self.router.update(routing.placement)

    def stopService(self) -> Any:
        self.router.stop()
        return super().stopService()

    def line_factory(
        self,
        factory: type[MemcacheServerFactory] = MemcacheServerFactory,
        admin: IServerAdmin | None = None,
        shutdown: Callable[[], object] | None = None,
    ) -> MemcacheServerFactory:
        """The line protocol's factory over the router, with the configured limits."""
        config = self.config
        return factory(
            self.router,
            self._reactor,
            max_value_size=config.max_value_size,
            max_keys=config.max_keys,
            max_pending_bytes=config.max_pending_bytes,
            admin=admin,
            shutdown=shutdown,
            requests=self.requests,
            **connection_limits(config),
        )

    def http(
        self,
        health: Callable[[], dict[str, Any]],
        ready: Callable[[], tuple[bool, str]] | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> KeyValueHTTP:
        """The HTTP surface over the router."""
        return KeyValueHTTP(
            self.router,
            health=health,
            ready=ready,
            max_value_size=self.config.max_value_size,
            metrics=metrics,
            role="gateway",
            requests=self.requests,
        )

    def site(self, http: KeyValueHTTP, resource: IResource | None = None) -> LimitedSite:
        """The HTTP listener's site for ``resource`` (default: ``http``'s), with the configured connection
        limits."""
        return http.site(resource, reactor=self._reactor, **connection_limits(self.config))

    def figures(self) -> dict[str, Any]:
        """The router's stats and each surface's error counts (the status page's figures)."""
        figures = self.router.stats()
        if self.requests is not None:
            for surface, kind in (("line", "client"), ("line", "server"), ("http", "client"), ("http", "server")):
                figures[f"{surface}_{kind}_errors"] = self.requests.errors(surface, kind)
        return figures
