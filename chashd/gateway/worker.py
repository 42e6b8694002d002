# -*- test-case-name: tests.unit.test_workers,tests.integration.test_workers -*-
"""A gateway worker process: ``python -m chashd.gateway.worker``, started by ``chashd.gateway.workers``.

It reads its start message on fd 0 (the control protocol is described in ``chashd.gateway.workers``), follows
the routing at the URLs it is given (``RoutingWatch``), and once it has a routing it accepts on the listening
sockets it inherited (fd 4: HTTP, fd 5: line protocol), serving both with a ``DataPlane`` of its own. HTTP
requests outside ``/kv`` go on to the main process's admin port. Every ``report_interval`` it sends its
stats and metrics to the main process, which sends back the other workers' summed stats, so that ``stats``
on its line port covers the whole gateway.

It stops on SIGTERM (its listeners first, then its connections) and when its control pipe closes (the main
process is gone).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from twisted.application.service import MultiService
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, globalLogBeginner, textFileLogObserver
from twisted.web.iweb import IRequest
from twisted.web.proxy import ProxyClient, ProxyClientFactory, ReverseProxyResource
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from chashd.client import AsyncKVStoreClient
from chashd.config import GatewayConfig
from chashd.gateway.connections import kvstore_connections
from chashd.gateway.dataplane import DataPlane, Routing, worker_writer
from chashd.gateway.follow import FOLLOW_TIMEOUT, RoutingWatch
from chashd.gateway.service import GatewayAdmin
from chashd.gateway.workers import (
    CONTROL_IN,
    CONTROL_OUT,
    HANDOFF_FD,
    HTTP,
    LINE,
    Lines,
    SocketReader,
    as_number,
    encode,
    sum_stats,
)
from chashd.logs import JSONLineObserver
from chashd.memcache.server import MemcacheServerFactory
from chashd.metrics import ConnectionsCollector, daemon_registry
from chashd.tls import https_policy, load_ca

__all__ = ["WorkerLineFactory", "WorkerRoot", "main"]


class WorkerLineFactory(MemcacheServerFactory):
    """The line protocol of a worker: ``stats`` adds the other workers' counters (``others``) to its own."""

    others: Mapping[str, Any] = {}
    workers = 1

    def stats_own(self) -> list[tuple[str, str]]:
        """This worker's own ``stats`` lines."""
        return super().stats()

    def stats(self) -> list[tuple[str, str]]:
        own = dict(self.stats_own())
        total = sum_stats([own, self.others]) if self.others else own
        total["workers"] = str(self.workers)
        return [(name, str(value)) for name, value in total.items()]


class _NoReports:
    """A worker reads no kvstore reports: the main process sends the cluster's totals with the others' stats."""

    reports: dict[str, Any] = {}


class _WorkerAdmin(GatewayAdmin):
    """The gateway's admin commands in a worker: its own router's counters and settings; the cluster's totals
    come from the main process."""

    def stats_extra(self) -> dict[str, Any]:
        return {}


class WorkerRoot(Resource):
    """A worker's HTTP root: ``/kv`` here, everything else on to the main process at ``admin`` (host, port)."""

    isLeaf = True

    def __init__(self, kv: IResource, admin: tuple[str, int] | None, reactor: Any) -> None:
        super().__init__()
        self._kv = kv
        self._admin = admin
        self._reactor = reactor

    def render(self, request: IRequest) -> Any:
        postpath = request.postpath
        if self._admin is None or (postpath and postpath[0] == b"kv"):
            return self._kv.render(request)
        host, port = self._admin
        proxy = ReverseProxyResource(host, port, b"/" + b"/".join(postpath), self._reactor)
        proxy.proxyClientFactoryClass = _QuietProxyClientFactory
        return proxy.render(request)


class _ProxyClient(ProxyClient):
    """Twisted's, except that an answer ending after its client went away (a long poll of a kvstore, when the
    gateway stops) is dropped instead of finishing a lost request (a RuntimeError)."""

    def handleResponseEnd(self) -> None:
        if getattr(self.father, "_disconnected", False):
            self._finished = True
            self.transport.loseConnection()  # type: ignore[union-attr]  # connected: it has a transport
            return
        super().handleResponseEnd()


class _QuietProxyClientFactory(ProxyClientFactory):
    """No log line per request passed on."""

    noisy = False
    protocol = _ProxyClient


class _StatsFamilies:
    """A registry's families minus those derived from the stats (the main process sums those)."""

    def __init__(self, registry: Any, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._registry = registry
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        derived = {"chashd_" + name.replace(".", "_").replace("-", "_") for name in self._stats()}
        derived |= {name.removesuffix("_total") for name in derived}  # a counter family's name has no _total
        for family in self._registry.collect():
            if family.name not in derived:
                yield family


class Worker(Protocol):
    """The control channel's end in the worker, and what the worker runs (see the module docstring)."""

    _log = Logger()

    def __init__(self, reactor: Any, report_interval: float = 1.0) -> None:
        self._reactor = reactor
        self._lines = Lines()
        self._root = MultiService()
        self._report_interval = report_interval
        self.index = 0
        self.data: DataPlane | None = None
        self.line: WorkerLineFactory | None = None
        self._site: Any = None
        self._metrics: _StatsFamilies | None = None
        self._receiver: _Receiver | None = None
        self._http: _Counting | None = None
        self._loop: LoopingCall | None = None

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._lines.feed(data)
        except ValueError as e:
            self._log.error("control channel: {error}", error=e)
            self._stop()
            return
        for message in messages:
            self._message(message)

    def connectionLost(self, reason: Any = None) -> None:
        self._log.info("the gateway's main process is gone; stopping")
        self._stop()

    def _stop(self) -> None:
        if self._reactor.running:
            self._reactor.stop()

    def _send(self, message: Mapping[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(encode(message))

    def _message(self, message: Any) -> None:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "start" and self.data is None:
            self._begin(message)
        elif op == "others" and self.line is not None and isinstance(message.get("stats"), dict):
            self.line.others = message["stats"]

    def _begin(self, message: dict[str, Any]) -> None:
        raw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in message["config"].items()}
        config = GatewayConfig(**raw)
        self.index = int(message["index"])
        _begin_logging(config.log_format, self.index)
        kvstores = kvstore_connections(config, self._reactor)
        self.data = DataPlane(config, self._reactor, kvstores, writer=worker_writer(config.gateway_id, self.index))
        self.data.setServiceParent(self._root)
        shutdown = (lambda: self._send({"op": "shutdown"})) if config.enable_shutdown else None
        admin_commands = _WorkerAdmin(self.data.router, _NoReports(), config)
        line = self.line = cast(
            WorkerLineFactory, self.data.line_factory(WorkerLineFactory, admin=admin_commands, shutdown=shutdown)
        )
        line.workers = int(message.get("workers", 1))
        admin = urlsplit(message["admin"]) if message.get("admin") else None
        connections = ConnectionsCollector(line)
        registry = daemon_registry("gateway", config.gateway_id, self.data.requests, connections)
        http = self.data.http(
            health=lambda: {"role": "gateway", "id": config.gateway_id, "worker": self.index}, metrics=registry
        )
        self._metrics = _StatsFamilies(http.metrics, line.backend.stats)
        kv = http.resource()
        self._site = self.data.site(
            http, WorkerRoot(kv, (admin.hostname or "127.0.0.1", admin.port or 80) if admin else None, self._reactor)
        )
        connections.add(self._site, "http")
        tls = https_policy(load_ca(config.tls_ca))
        follow = message["follow"]
        gateways = AsyncKVStoreClient(self._reactor, follow, timeout=FOLLOW_TIMEOUT, token=config.token, tls=tls)
        watch = RoutingWatch(gateways, self._reactor, self._routed)
        watch.setServiceParent(self._root)
        self._root.startService()
        self._reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    def _routed(self, routing: Routing) -> None:
        assert self.data is not None
        self.data.follow(routing)
        if self._receiver is None:
            self._listen()

    def _listen(self) -> None:
        handoff = socket.socket(fileno=HANDOFF_FD)
        handoff.setblocking(False)
        self._http = _Counting(self._site)
        self._receiver = _Receiver(handoff, {HTTP: self._http, LINE: self.line}, self._reactor)
        self._reactor.addReader(self._receiver)
        self._send({"op": "serving"})
        self._log.info("worker {index} serves", index=self.index)
        self._loop = LoopingCall(self._report)
        self._loop.clock = self._reactor
        self._loop.start(self._report_interval, now=True)

    def _report(self) -> None:
        try:
            assert self.line is not None and self._metrics is not None
            stats = {name: _plain(value) for name, value in self.line.stats_own()}
            stats["http_connections"] = self._http.open if self._http is not None else 0
            stats["received_total"] = self._receiver.received if self._receiver is not None else 0
            self._send({"op": "report", "stats": stats, "metrics": generate_latest(self._metrics).decode()})
        except Exception:
            self._log.failure("reporting to the main process failed")

    def _shutdown(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._receiver is not None:
            self._reactor.removeReader(self._receiver)
        return self._root.stopService()


def _plain(value: str) -> Any:
    """A ``stats`` value as JSON has it: a bool, a number, else the text."""
    if value in ("True", "False"):
        return value == "True"
    number = as_number(value)
    return value if number is None else number


class _Counting:
    """A factory over ``factory`` that counts its open connections in ``open`` (the main process hands new
    connections to the worker with the fewest)."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self.open = 0

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._factory.buildProtocol(addr)
        if protocol is not None:
            self.open += 1
            lost = protocol.connectionLost

            def connectionLost(reason: Any = None) -> None:
                self.open -= 1
                lost(reason)

            protocol.connectionLost = connectionLost
        return protocol


class _Receiver(SocketReader):
    """Takes the connections the main process hands over (one byte naming the surface, one descriptor) and
    serves each with that surface's factory. The socket closing means the main process is gone."""

    _log = Logger()

    def __init__(self, handoff: socket.socket, factories: Mapping[bytes, Any], reactor: Any) -> None:
        super().__init__(handoff)
        self._factories = factories
        self._reactor = reactor
        #: Connections received so far.
        self.received = 0

    def doRead(self) -> None:
        for _ in range(64):
            try:
                surface, fds, _, _ = socket.recv_fds(self._socket, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._log.error("the handoff socket failed: {error}", error=e)
                self._reactor.stop()
                return
            if not surface and not fds:
                self._reactor.removeReader(self)
                return  # the main process is gone: its control pipe says so too
            for fd in fds:
                self._adopt(fd, surface)

    def _adopt(self, fd: int, surface: bytes) -> None:
        self.received += 1
        try:
            factory = self._factories.get(surface)
            if factory is not None:
                family = socket.socket(fileno=fd)
                kind = family.family
                family.detach()
                self._reactor.adoptStreamConnection(fd, kind, factory)  # serves a copy of fd
        except Exception:
            self._log.failure("cannot serve a connection handed over")
        finally:
            os.close(fd)


def _begin_logging(log_format: str, index: int) -> None:
    """Log to stdout as the main process does, each event marked with this worker's number."""
    observer: Any = JSONLineObserver(sys.stdout) if log_format == "json" else textFileLogObserver(sys.stdout)
    system = f"worker-{index}"

    @implementer(ILogObserver)
    def marked(event: dict[str, Any]) -> None:
        event.setdefault("log_system", system)
        event.setdefault("worker", index)
        observer(event)

    globalLogBeginner.beginLoggingTo([marked], redirectStandardIO=False)


def main() -> None:
    """Run one worker until SIGTERM or until the main process goes away."""
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    StandardIO(Worker(reactor), stdin=CONTROL_IN, stdout=CONTROL_OUT, reactor=reactor)  # type: ignore[call-arg]  # POSIX StandardIO takes stdin/stdout
    reactor.run()


if __name__ == "__main__":
    main()
