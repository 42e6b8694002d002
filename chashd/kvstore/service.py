"""The kvstore node: its backend, its registration with the gateways."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from chashd.config import KVStoreConfig, endpoint_port
from chashd.kvstore.registration import Registrar

__all__ = ["KVStoreService"]


class KVStoreService(MultiService):
    """Owns what a kvstore node is: its identity, its registration."""

    _log = Logger()

    def __init__(self, config: KVStoreConfig, reactor: IReactorTime, http_client: Any = None) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._started = reactor.seconds()
        self.registrar: Registrar | None = None
        if config.gateway:
            from chashd.kvstore.registration import treq_post

            if http_client is None:
                from chashd.web import http_client as make_client

                http_client = make_client(reactor)
            self.registrar = Registrar(
                config.gateway,
                self.announcement,
                treq_post(http_client),
                reactor,
                interval=config.register_interval,
                token=config.token,
            )
            self.registrar.setServiceParent(self)

    def announcement(self) -> dict[str, Any]:
        """What this node tells the gateways about itself."""
        return {
            "id": self.config.node_id,
            "host": self.config.advertise_host,
            "port": endpoint_port(self.config.port),
            "line_port": endpoint_port(self.config.line_port),
            "weight": self.config.weight,
            "seq": int(self._started * 1000),
        }

    def health(self) -> dict[str, Any]:
        """The body of ``GET /health``."""
        return {
            "role": "kvstore",
            "id": self.config.node_id,
            "registered": self.registrar.registered_with is not None if self.registrar else None,
        }
