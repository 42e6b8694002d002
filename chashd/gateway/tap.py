"""twistd wiring of the gateway role: ``twistd -n chash-gateway --gateway-id g1 --port 8000``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service

from chashd.config import ConfigOptions, GatewayConfig, check_secrets, options_for
from chashd.daemon import ListenService, SystemdNotifier, lock_data_dir, shutdown_command
from chashd.errors import ConfigError
from chashd.gateway.api import RingAPI, RingRoot
from chashd.gateway.health import Probe
from chashd.gateway.metrics import GatewayCollector
from chashd.gateway.raft import RaftFactory, raft_settings
from chashd.gateway.service import GatewayService
from chashd.gateway.statuspage import StatusPage
from chashd.logs import with_log_format
from chashd.memcache.server import MemcacheServerFactory
from chashd.metrics import ConnectionsCollector, RequestMetrics, daemon_registry
from chashd.web import KeyValueHTTP

__all__ = ["Options", "makeService"]


class Options(options_for(GatewayConfig, "chash-gateway")):  # type: ignore[misc]
    """``twistd chash-gateway`` options; the secrets and the Raft settings are checked here too, so a gateway
    without its Raft password (or exposing its admin routes without a token) stops with one line before it
    binds anything."""

    def postOptions(self) -> None:
        super().postOptions()
        try:
            check_secrets(self.config)
            raft_settings(self.config)
        except ConfigError as e:
            raise SystemExit(f"chash-gateway: error: {e}") from None


class _CloseOnStop(Service):
    """Answers the ring API's waiting long polls when the gateway stops."""

    def __init__(self, api: RingAPI) -> None:
        self._api = api

    def stopService(self) -> None:
        super().stopService()
        self._api.close()


def makeService(
    options: ConfigOptions,
    reactor: Any = None,
    raft_factory: RaftFactory | None = None,
    probe: Probe | None = None,
) -> IService:
    """Build the gateway: the gateway service (Raft membership, health checks, router) and its HTTP and
    line-protocol listeners.

    Raises ``ConfigError`` for a missing secret (``check_secrets``) or Raft settings that must not run
    (``raft_settings``). Tests pass a memory reactor, a ``LocalRaft`` factory and a probe of their own.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    config: GatewayConfig = options.config
    check_secrets(config)
    raft_settings(config)
    if config.data_dir:
        try:
            lock_data_dir(config.data_dir)
        except ConfigError as e:
            raise SystemExit(f"chash-gateway: error: {e}") from None
    root = MultiService()
    gateway = GatewayService(config, reactor, raft_factory=raft_factory, probe=probe)
    gateway.setServiceParent(root)
    ring_api = RingAPI(gateway.membership, config, reactor, status_extra=gateway.status_extra)
    _CloseOnStop(ring_api).setServiceParent(root)
    requests = RequestMetrics() if config.latency_histograms else None
    line = MemcacheServerFactory(
        gateway.router,
        reactor,
        max_value_size=config.max_value_size,
        max_connections=config.max_connections,
        max_keys=config.max_keys,
        idle_timeout=config.idle_timeout,
        admin=gateway.admin,
        shutdown=shutdown_command(reactor, config.enable_shutdown),
        requests=requests,
    )
    collectors = (requests, GatewayCollector(gateway.membership), ConnectionsCollector(line))
    http = KeyValueHTTP(
        gateway.router,
        health=gateway.health,
        ready=gateway.ready,
        max_value_size=config.max_value_size,
        metrics=daemon_registry("gateway", config.gateway_id, *collectors),
        role="gateway",
        requests=requests,
    )

    def page_figures() -> dict[str, Any]:
        figures = gateway.router.stats()
        if requests is not None:
            for surface, kind in (("line", "client"), ("line", "server"), ("http", "client"), ("http", "server")):
                figures[f"{surface}_{kind}_errors"] = requests.errors(surface, kind)
        return figures

    page = StatusPage(ring_api.status_body, lambda: gateway.membership.view.ring, page_figures, reactor)
    site = http.site(RingRoot(ring_api.resource(), http.resource(), page.resource()))
    notifier = SystemdNotifier()
    for description, factory, what in ((config.port, site, "HTTP"), (config.line_port, line, "line protocol")):
        listener = ListenService(reactor, description, factory, what)
        listener.setServiceParent(root)
        notifier.wait_for(listener.listening)
    notifier.wait_for(gateway.membership.ready)
    notifier.setServiceParent(root)
    return with_log_format(root, config.log_format)
