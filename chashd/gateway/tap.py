"""twistd wiring of the gateway role: ``twistd -n chash-gateway --gateway-id g1 --port 8000``."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory

from chashd.client import AsyncKVStoreClient, http_client
from chashd.config import ConfigOptions, GatewayConfig, check_secrets, connection_limits, options_for
from chashd.daemon import ListenService, SystemdNotifier, lock_data_dir, shutdown_command
from chashd.errors import ConfigError
from chashd.gateway.api import RingAPI, RingRoot
from chashd.gateway.connections import kvstore_connections
from chashd.gateway.dataplane import DataPlane, Routing
from chashd.gateway.follow import FOLLOW_TIMEOUT, RoutingFeed, RoutingWatch
from chashd.gateway.health import HealthChecker
from chashd.gateway.membership import Membership
from chashd.gateway.metrics import GatewayCollector
from chashd.gateway.monitor import NodeMonitor, Probe, health_probe
from chashd.gateway.raft import RaftFactory, raft_settings
from chashd.gateway.service import GatewayService
from chashd.gateway.statuspage import StatusPage
from chashd.gateway.workers import HTTP, LINE, WorkersMetrics, WorkerSupervisor
from chashd.logs import with_log_format
from chashd.metrics import ConnectionsCollector, daemon_registry
from chashd.tls import https_policy, load_ca
from chashd.web import KeyValueHTTP

__all__ = ["Options", "makeService"]


class Options(options_for(GatewayConfig, "chash-gateway")):  # type: ignore[misc]  # a class made at run time
    """``twistd chash-gateway`` options; the secrets and the Raft settings are checked here too, so a gateway
    without its Raft password (or exposing its admin routes without a token) stops with one line before it
    binds anything."""

    def postOptions(self) -> None:
        super().postOptions()
        try:
            check_secrets(self.config)
            raft_settings(self.config)
            load_ca(self.config.tls_ca)
        except ConfigError as e:
            raise SystemExit(f"chash-gateway: error: {e}") from None


class _CloseOnStop(Service):
    """Answers the ring API's and the routing feed's waiting long polls when the gateway stops."""

    def __init__(self, api: RingAPI, feed: RoutingFeed) -> None:
        self._api = api
        self._feed = feed

    def stopService(self) -> None:
        super().stopService()
        self._api.close()
        self._feed.wake()


def makeService(
    options: ConfigOptions,
    reactor: Any = None,
    raft_factory: RaftFactory | None = None,
    probe: Probe | None = None,
) -> IService:
    """Build the gateway: with Raft (the gateway service: membership, health checks, router) or following
    other gateways' routing (``--follow``), serving keys in this process or in ``--workers`` processes.

    Raises ``ConfigError`` for a missing secret (``check_secrets``) or Raft settings that must not run
    (``raft_settings``). Tests pass a memory reactor, a ``LocalRaft`` factory and a probe of their own.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    config: GatewayConfig = options.config
    check_secrets(config)
    root = MultiService()
    notifier = SystemdNotifier()
    if config.follow:
        _follower(config, reactor, root, notifier)
    else:
        raft_settings(config)
        if config.data_dir:
            try:
                lock_data_dir(config.data_dir)
            except ConfigError as e:
                raise SystemExit(f"chash-gateway: error: {e}") from None
        _raft_gateway(config, reactor, raft_factory, probe, root, notifier)
    notifier.setServiceParent(root)
    return with_log_format(root, config.log_format)


def _raft_gateway(
    config: GatewayConfig,
    reactor: Any,
    raft_factory: RaftFactory | None,
    probe: Probe | None,
    root: MultiService,
    notifier: SystemdNotifier,
) -> None:
    """A gateway of the Raft group: membership, health checks, the ring API, and the data plane."""
    if probe is None:
        # With a CA, the kvstores' HTTP ports are TLS too: probe them with https, verified against it.
        kvstores = http_client(reactor, connect_timeout=1.0, tls=https_policy(load_ca(config.tls_ca)))
        scheme = "https" if config.tls_ca else "http"
        probe = health_probe(kvstores, reactor, max(0.5, min(2.0, config.probe_interval)), scheme)
    membership = Membership(config, reactor, raft_factory)
    gateway = GatewayService(
        config,
        membership,
        NodeMonitor(membership, probe, reactor, config.probe_interval),
        HealthChecker(membership, reactor, down_after=config.down_after, dead_after=config.dead_after),
        DataPlane(config, reactor, kvstore_connections(config, reactor)),
        serves_keys=config.workers == 1,
    )
    gateway.setServiceParent(root)
    feed = RoutingFeed(reactor, config.token)
    gateway.on_routing = feed.publish
    ring_api = RingAPI(gateway.membership, config, reactor, status_extra=gateway.status_extra, routing=feed)
    _CloseOnStop(ring_api, feed).setServiceParent(root)
    notifier.wait_for(gateway.membership.ready)
    notifier.wait_for(gateway.membership.joined)  # READY=1 when /health turns 200
    if config.workers == 1:
        data = gateway.data_plane
        line = data.line_factory(admin=gateway.admin, shutdown=shutdown_command(reactor, config.enable_shutdown))
        connections = ConnectionsCollector(line)
        registry = daemon_registry(
            "gateway", config.gateway_id, data.requests, GatewayCollector(gateway.membership), connections
        )
        http = data.http(health=gateway.health, ready=gateway.ready, metrics=registry)
        figures = data.figures
    else:
        supervisor = _workers(config, reactor, root, notifier, follow=None)
        supervisor.extra_stats = gateway.admin.stats_extra
        supervisor.on_shutdown = shutdown_command(reactor, config.enable_shutdown)
        registry = daemon_registry("gateway", config.gateway_id, GatewayCollector(gateway.membership))
        http = _admin_http(supervisor, gateway.health, gateway.ready, registry)
        figures = supervisor.stats
    limits = connection_limits(config)
    page = StatusPage(ring_api.status_body, lambda: gateway.membership.view.ring, figures, reactor)
    site = http.site(RingRoot(ring_api.resource(), http.resource(), page.resource()), reactor=reactor, **limits)
    if config.workers == 1:
        connections.add(site, "http")
        _listen(reactor, config, root, notifier, site, line)
    else:
        _listen_admin(reactor, root, supervisor, site)


def _follower(config: GatewayConfig, reactor: Any, root: MultiService, notifier: SystemdNotifier) -> None:
    """A gateway without Raft: its data plane follows the routing of the gateways of ``--follow``."""
    if config.workers > 1:
        supervisor = _workers(config, reactor, root, notifier, follow=list(config.follow))

        def ready() -> tuple[bool, str]:
            serving = supervisor.stats()["workers_serving"]
            return bool(serving), f"{serving} of {config.workers} workers serve"

        registry = daemon_registry("gateway", config.gateway_id)
        health = lambda: _follower_health(config, supervisor.stats().get("epoch"))  # noqa: E731
        site = _admin_http(supervisor, health, ready, registry).site(reactor=reactor, **connection_limits(config))
        _listen_admin(reactor, root, supervisor, site)
        return
    data = DataPlane(config, reactor, kvstore_connections(config, reactor))
    data.setServiceParent(root)
    routed: Deferred[None] = Deferred()

    def follow(routing: Routing) -> None:
        data.follow(routing)
        if not routed.called:
            routed.callback(None)

    tls = https_policy(load_ca(config.tls_ca))
    gateways = AsyncKVStoreClient(reactor, config.follow, timeout=FOLLOW_TIMEOUT, token=config.token, tls=tls)
    watch = RoutingWatch(gateways, reactor, follow)
    watch.setServiceParent(root)
    notifier.wait_for(routed)
    line = data.line_factory(shutdown=shutdown_command(reactor, config.enable_shutdown))
    connections = ConnectionsCollector(line)
    http = data.http(
        health=lambda: _follower_health(config, data.routing.epoch if data.routing else None),
        ready=lambda: _follower_ready(data.routing),
        metrics=daemon_registry("gateway", config.gateway_id, data.requests, connections),
    )
    site = data.site(http)
    connections.add(site, "http")
    _listen(reactor, config, root, notifier, site, line)


def _follower_health(config: GatewayConfig, epoch: Any) -> dict[str, Any]:
    return {"role": "gateway", "id": config.gateway_id, "follows": list(config.follow), "epoch": epoch}


def _follower_ready(routing: Routing | None) -> tuple[bool, str]:
    if routing is None:
        return False, "no routing from the followed gateways yet"
    up = sum(1 for node in routing.placement.ring.nodes if routing.placement.is_up(node))
    if not up:
        return False, "no kvstore node is up"
    return True, f"following epoch {routing.epoch}, {up} kvstore node(s) up"


def _listen(
    reactor: Any,
    config: GatewayConfig,
    root: MultiService,
    notifier: SystemdNotifier | None,
    site: IProtocolFactory,
    line: IProtocolFactory,
) -> list[ListenService]:
    listeners = []
    for description, factory, what in ((config.port, site, "HTTP"), (config.line_port, line, "line protocol")):
        listener = ListenService(reactor, description, factory, what)
        listener.setServiceParent(root)
        if notifier is not None:
            notifier.wait_for(listener.listening)
        listeners.append(listener)
    return listeners


class _NoAccept(Factory):
    """The factory of the sockets the workers accept on: the main process never accepts there."""

    def buildProtocol(self, addr: Any) -> None:
        return None


def _workers(
    config: GatewayConfig, reactor: Any, root: MultiService, notifier: SystemdNotifier, follow: list[str] | None
) -> WorkerSupervisor:
    """The worker processes behind the public ports, which this process opens and accepts on."""
    shared = _listen(reactor, config, root, None, _NoAccept(), _NoAccept())

    def listening_socket(port: Any) -> socket.socket:
        port.stopReading()  # in the reactor turn that listened: nothing was accepted yet
        sock: socket.socket = port.socket
        return sock

    sockets = gatherResults([s.listening.addCallback(listening_socket) for s in shared], consumeErrors=True)
    start = {"config": dataclasses.asdict(config), "follow": follow}
    by_surface = sockets.addCallback(lambda found: dict(zip((HTTP, LINE), found)))
    supervisor = WorkerSupervisor(reactor, config.workers, by_surface, start)
    supervisor.setServiceParent(root)
    notifier.wait_for(supervisor.ready)
    return supervisor


def _admin_http(
    supervisor: WorkerSupervisor,
    health: Callable[[], dict[str, Any]],
    ready: Callable[[], tuple[bool, str]],
    registry: Any,
) -> KeyValueHTTP:
    """The main process's HTTP surface when workers serve: health, readiness, and its own metrics with the
    workers' summed stats and each worker's other metrics (labelled) merged in."""
    return KeyValueHTTP(
        supervisor.backend,
        health=health,
        ready=ready,
        metrics=WorkersMetrics(supervisor, registry),  # type: ignore[arg-type]  # a registry by its methods
        role="gateway",
    )


def _listen_admin(reactor: Any, root: MultiService, supervisor: WorkerSupervisor, site: IProtocolFactory) -> None:
    """The main process's private HTTP port on loopback, which the workers follow and pass requests on to."""
    listener = ListenService(reactor, "tcp:0:interface=127.0.0.1", site, "HTTP for the workers")
    listener.setServiceParent(root)

    def known(port: Any) -> None:
        url = f"http://127.0.0.1:{port.getHost().port}"
        supervisor.start["admin"] = url
        if supervisor.start.get("follow") is None:
            supervisor.start["follow"] = [url]

    listener.listening.addCallback(known)
    supervisor.wait_for(listener.listening)
