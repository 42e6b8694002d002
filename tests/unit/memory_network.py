"""Line-protocol connections between in-process kvstores on one MemoryReactorClock, carried in memory by
twisted.test.iosim (no socket): the handoff's connections in the handoff and drain tests."""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter, IOPump

from chashd.memcache.client import KVClientPool


class MemoryNetwork:
    """Completes the connections made on ``reactor`` to the servers listening on it, and moves their bytes."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self._completer = ConnectionCompleter(reactor)
        self._pumps: list[IOPump] = []

    def connect(self, host: str, port: int) -> KVClientPool:
        """What the kvstore service gives the handoff: a KVClientPool, here over the memory reactor."""
        endpoint = TCP4ClientEndpoint(self.reactor, host, port)
        return KVClientPool(self.reactor, host, port, size=1, timeout=30.0, endpoint=endpoint)

    def pump(self) -> bool:
        """Complete pending connections and move bytes; True if anything happened."""
        moved = False
        for index in reversed(range(len(self.reactor.connectors))):  # attempts given up (a pool stopped)
            if self.reactor.connectors[index].stoppedConnecting:
                del self.reactor.connectors[index]
                del self.reactor.tcpClients[index]
        while (pump := self._completer.succeedOnce()) is not None:
            self._pumps.append(pump)
            moved = True
        for pump in self._pumps:
            moved = pump.flush() or moved
        return moved
