"""twistd wiring of the gateway role: ``twistd -n chash-gateway --gateway-id g1 --port 8000``."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorCore

from chashd.config import ConfigOptions, GatewayConfig, options_for
from chashd.daemon import ListenService, SystemdNotifier
from chashd.gateway.service import GatewayService
from chashd.web import KeyValueHTTP

__all__ = ["Options", "makeService"]

Options = options_for(GatewayConfig, "chash-gateway")


def makeService(options: ConfigOptions, reactor: IReactorCore | None = None) -> IService:
    """Build the gateway: the gateway service and its HTTP listener."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor  # type: ignore[assignment]
    assert reactor is not None
    config: GatewayConfig = options.config
    root = MultiService()
    gateway = GatewayService(config, reactor)  # type: ignore[arg-type]
    gateway.setServiceParent(root)
    http = KeyValueHTTP(health=gateway.health)
    listener = ListenService(reactor, config.port, http.site(), "HTTP")
    listener.setServiceParent(root)
    notifier = SystemdNotifier()
    notifier.wait_for(listener.listening)
    notifier.setServiceParent(root)
    return root
