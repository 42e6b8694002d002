"""twistd wiring of the kvstore role: ``twistd -n chash-kvstore --node-id a --port 8080``."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IReactorCore

from chashd.config import ConfigOptions, KVStoreConfig, options_for
from chashd.daemon import ListenService, SystemdNotifier
from chashd.kvstore.service import KVStoreService
from chashd.web import KeyValueHTTP

__all__ = ["Options", "makeService"]

Options = options_for(KVStoreConfig, "chash-kvstore")


def makeService(options: ConfigOptions, reactor: IReactorCore | None = None) -> IService:
    """Build the kvstore: the node service and its HTTP listener."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor  # type: ignore[assignment]
    assert reactor is not None
    config: KVStoreConfig = options.config
    root = MultiService()
    node = KVStoreService(config, reactor)  # type: ignore[arg-type]
    node.setServiceParent(root)
    http = KeyValueHTTP(health=node.health)
    listener = ListenService(reactor, config.port, http.site(), "HTTP")
    listener.setServiceParent(root)
    notifier = SystemdNotifier()
    notifier.wait_for(listener.listening)
    notifier.setServiceParent(root)
    return root
