"""The gateway's connection pools follow the cluster map."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from chashd.errors import ServiceUnavailable
from chashd.gateway.connections import Connections
from chashd.node import NodeInfo


def node(node_id: str, host: str, line_port: int) -> NodeInfo:
    """A node of the map at ``host:line_port`` (its HTTP port and weight do not matter here)."""
    return NodeInfo(node_id, host, 8080, line_port, 1)


def _targets(reactor: MemoryReactorClock) -> list[tuple[str, int]]:
    return [(host, port) for host, port, *_ in reactor.tcpClients]


class ConnectionsTests:
    """Connections.update(nodes)."""

    def test_pool_per_node(self) -> None:
        """Each node gets pool_size connection attempts to its line port."""
        reactor = MemoryReactorClock()
        connections = Connections(reactor, pool_size=2)
        connections.startService()
        connections.update([node("a", "127.0.0.1", 7001), node("b", "127.0.0.1", 7002)])
        reactor.advance(0)
        assert connections.nodes() == ["a", "b"]
        assert sorted(_targets(reactor)) == [("127.0.0.1", 7001)] * 2 + [("127.0.0.1", 7002)] * 2
        connections.stopService()

    def test_address_change_and_removal(self) -> None:
        """A new address replaces the pool; a node gone from the map loses its pool."""
        reactor = MemoryReactorClock()
        connections = Connections(reactor, pool_size=1)
        connections.startService()
        connections.update([node("a", "127.0.0.1", 7001), node("b", "127.0.0.1", 7002)])
        first = connections.client("a")
        connections.update([node("a", "127.0.0.2", 7001)])
        assert connections.nodes() == ["a"]
        assert connections.client("a") is not first
        with pytest.raises(ServiceUnavailable):
            connections.client("b")
        connections.stopService()

    def test_same_address_keeps_pool(self) -> None:
        """An unchanged node keeps its connections across map updates."""
        reactor = MemoryReactorClock()
        connections = Connections(reactor)
        connections.startService()
        connections.update([node("a", "h", 1)])
        pool = connections.client("a")
        connections.update([node("a", "h", 1), node("c", "h", 2)])
        assert connections.client("a") is pool
        connections.stopService()

    def test_announce(self) -> None:
        """The map epoch goes to every pool, and to the pools of nodes that join later."""
        reactor = MemoryReactorClock()
        connections = Connections(reactor)
        connections.startService()
        connections.update([node("a", "h", 1)])
        connections.announce(5)
        connections.update([node("a", "h", 1), node("b", "h", 2)])
        assert [connections.client(n).map_epoch for n in ("a", "b")] == [5, 5]  # type: ignore[attr-defined]
        connections.stopService()
