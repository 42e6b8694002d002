"""The gateway's connections to kvstores: a few persistent, pipelined line-protocol connections per node.

``Connections.update(nodes)`` follows the cluster map: a pool per node at its advertised host and line
port, replaced when the address changes and stopped when the node leaves the map. The router sends every
client request of every client connection over these pools (multiplexing), never a connection per client.
``kvstore_connections(config, reactor)`` makes them as a gateway's options ask (``chashd.gateway.tap`` and a
worker, ``chashd.gateway.worker``, give them to their data plane).
``announce(epoch)`` names the map epoch the router routes by on every connection (``xmap``), before any
command routed by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger

from chashd.config import GatewayConfig
from chashd.errors import ServiceUnavailable
from chashd.interfaces import IKVClient
from chashd.memcache.client import KVClientPool
from chashd.node import NodeInfo
from chashd.tls import TrustRoot, client_endpoint, load_ca

__all__ = ["Connections", "kvstore_connections"]


class Connections(MultiService):
    """One ``KVClientPool`` per kvstore node; every connection proves ``token`` (the cluster token) first."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        pool_size: int = 2,
        timeout: float = 5.0,
        max_value_size: int = 1024 * 1024,
        token: str | None = None,
        tls_ca: TrustRoot | None = None,
    ) -> None:
        super().__init__()
        self._tls_ca = tls_ca
        self._token = token
        self._reactor = reactor
        self._pool_size = pool_size
        self._timeout = timeout
        # Replies carry a value plus its command line; leave room above the largest value.
        self._max_value_size = max_value_size + 4096
        self._pools: dict[str, KVClientPool] = {}
        self._epoch = 0

    def update(self, nodes: Iterable[NodeInfo]) -> None:
        """Keep a pool for exactly these nodes, at their current addresses."""
        wanted = {node.id: (node.host, node.line_port) for node in nodes}
        for node_id in list(self._pools):
            pool = self._pools[node_id]
            if wanted.get(node_id) != (pool.host, pool.port):
                del self._pools[node_id]
                pool.disownServiceParent()
                self._log.info("closed connections to {node_id}", node_id=node_id)
        for node_id, (host, port) in wanted.items():
            if node_id not in self._pools:
                pool = KVClientPool(
                    self._reactor,
                    host,
                    port,
                    size=self._pool_size,
                    timeout=self._timeout,
                    max_value_size=self._max_value_size,
                    token=self._token,
                    endpoint=client_endpoint(self._reactor, host, port, 5.0, self._tls_ca),
                )
                self._pools[node_id] = pool
                pool.announce(self._epoch)
                pool.setServiceParent(self)
                self._log.info("connecting to {node_id} at {host}:{port}", node_id=node_id, host=host, port=port)

    def announce(self, epoch: int) -> None:
        """The router routes by the map of ``epoch`` from now on: every connection names it to its kvstore
        (once; again when it changes), before the commands routed by it."""
        if epoch == self._epoch:
            return
        self._epoch = epoch
        for pool in self._pools.values():
            pool.announce(epoch)

    def client(self, node_id: str) -> IKVClient:
        """The client for ``node_id``; ``ServiceUnavailable`` for a node the map does not hold."""
        try:
            return self._pools[node_id]  # type: ignore[return-value]  # @implementer(IKVClient), mypy-zope misses it
        except KeyError:
            raise ServiceUnavailable(f"no connection to kvstore {node_id}") from None

    def nodes(self) -> list[str]:
        """The nodes with a pool."""
        return sorted(self._pools)


def kvstore_connections(config: GatewayConfig, reactor: Any) -> Connections:
    """The connections of a gateway with ``config``: its request timeout and value limit, proving the cluster
    token, TLS verified against ``--tls-ca`` when given."""
    return Connections(
        reactor,
        timeout=config.request_timeout,
        max_value_size=config.max_value_size,
        token=config.token,
        tls_ca=load_ca(config.tls_ca),
    )
