"""Networks in memory for the unit tests, no socket.

``MemoryNetwork``: line-protocol connections between in-process kvstores on one MemoryReactorClock, carried
by twisted.test.iosim (the handoff's connections in the handoff and drain tests). ``HTTPNetwork``: treq
requests routed by host to ``StubTreq`` over real resources (the cluster client's requests to gateways and
kvstores)."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
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
        return KVClientPool(self.reactor, host, port, size=1, timeout=30.0, endpoint=endpoint, probe_bulk=True)

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


class HTTPNetwork:
    """A treq client for ``AsyncKVStoreClient``: routes each request by its URL's ``host:port`` to the
    ``StubTreq`` over a real resource in ``hosts``; any other host refuses the connection. ``asked`` lists
    the hosts asked, in order, and ``urls`` the whole URLs."""

    def __init__(self, hosts: dict[str, StubTreq]) -> None:
        self.hosts = hosts
        self.asked: list[str] = []
        self.urls: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        host = url.split("/")[2]
        self.asked.append(host)
        self.urls.append(url)
        stub = self.hosts.get(host)
        if stub is None:
            return fail(ConnectionRefusedError(f"{host} refuses"))
        # StubTreq makes its request methods at run time, out of a type checker's sight.
        return stub.request(method, url, **kwargs)  # type: ignore[attr-defined,no-any-return]

    def flush(self) -> None:
        """Run every request the servers can answer now."""
        for stub in self.hosts.values():
            stub.flush()
