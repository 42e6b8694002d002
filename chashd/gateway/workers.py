"""The gateway's worker processes (``--workers N``), as the main process runs them.

The main process opens the listening sockets (line protocol and HTTP), accepts each connection and hands it
over at once to one of N worker processes (``python -m chashd.gateway.worker``): the one with the fewest
connections, over a Unix socket with ``SCM_RIGHTS``. The worker serves it to its end with a data plane of its
own (``chashd.gateway.dataplane``); the main process never reads a byte of it. (Workers accepting on the
shared socket themselves spread badly: the worker that is awake takes a burst of connections, 4/46 and
42/8 of 50 were measured; the kernel's SO_REUSEPORT hash spreads them at random. Handing them over costs
the main process an accept and a sendmsg per connection, not per request.) The main process keeps Raft, the
health checks and the admin API, on a private HTTP port on loopback; a worker follows the main process's
routing there (``GET /ring/placement``, a long poll answered at each change: ``chashd.gateway.follow``) and
passes every HTTP request that is not ``/kv`` on to it, so ``/ring``, ``/health``, ``/ready``, ``/stats`` and
``/metrics`` answer as one gateway.

Control channel, one JSON object a line, over two pipes (the worker's fd 0 and fd 3)::

    main -> worker   {"op": "start", "index": i, "workers": N, "config": {...}, "follow": [url], "admin": url}
                     {"op": "others", "stats": {...}}     the other workers' summed stats, every report interval
    worker -> main   {"op": "serving"}                    once it routes: connections may come
                     {"op": "report", "stats": {...}, "metrics": "<Prometheus text>"}   every report interval

The secrets travel in ``config`` on the pipe, never on a command line. ``stats`` on any worker's line port
and ``GET /stats`` sum the counters over the workers (``sum_stats``; figures of the whole gateway, such as
the epoch, are not summed); ``GET /metrics`` has the summed stats and each worker's other metrics with a
``worker`` label. The figures of the other workers are at most one report interval old.

A worker that dies is started again (after ``restart_delay``, doubling while it keeps dying young): its
clients see their connections closed, and the other workers go on serving. A worker whose main process is
gone (its control pipe closes) stops. ``stopService`` (SIGTERM) sends SIGTERM to every worker and waits up
to ``stop_timeout`` seconds for them, then kills what is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import chashd
from chashd.errors import ServiceUnavailable
from chashd.interfaces import IKeyValue

__all__ = ["MAX_MESSAGE", "Lines", "SocketReader", "WorkerSupervisor", "WorkersMetrics", "as_number", "sum_stats"]

#: Longest control message (a worker's metrics text is the largest).
MAX_MESSAGE = 16 * 1024 * 1024
#: Stats that describe the whole gateway or one process, not work done: never summed over workers (nor
#: ``cluster_*``, the kvstores' totals).
NOT_SUMMED = frozenset(
    {
        "pid",
        "uptime",
        "time",
        "version",
        "max_connections",
        "epoch",
        "nodes",
        "nodes_up",
        "replicas",
        "write_quorum",
        "read_quorum",
        "rebalancing",
        "nodes_slow",
        "nodes_stalled",
    }
)
#: A worker's child file descriptors: control in, control out, and the Unix socket connections come over.
CONTROL_IN, CONTROL_OUT, HANDOFF_FD = 0, 3, 4
#: The byte sent with a connection: which surface it is for.
HTTP, LINE = b"h", b"l"


def as_number(value: Any) -> int | float | None:
    """``value`` as a number (an int or float, or a string of one), else None; a bool is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def sum_stats(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One set of stats from several processes': numbers added up, except ``NOT_SUMMED`` names and what is
    not a number, which keep the first report's value. The order of names is the first report's."""
    total: dict[str, Any] = {}
    for report in reports:
        for name, value in report.items():
            if name not in total:
                total[name] = value
                continue
            if name in NOT_SUMMED or name.startswith("cluster_"):  # cluster_*: the kvstores' totals, not ours
                continue
            mine, theirs = as_number(total[name]), as_number(value)
            if mine is not None and theirs is not None:
                total[name] = mine + theirs
    return total


class Lines:
    """Splits a byte stream into JSON messages, one a line; ``ValueError`` past ``MAX_MESSAGE`` bytes."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        """The messages completed by ``data``."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_MESSAGE:
            raise ValueError(f"a control message is longer than {MAX_MESSAGE} bytes")
        return [json.loads(line) for line in lines if line.strip()]


def encode(message: Mapping[str, Any]) -> bytes:
    """One control message as a line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class _Worker(ProcessProtocol):
    """One worker process as the supervisor sees it."""

    def __init__(self, supervisor: WorkerSupervisor, index: int, handoff: socket.socket) -> None:
        self.supervisor = supervisor
        self.index = index
        #: The main process's end of the Unix socket connections are handed over on.
        self.handoff = handoff
        #: Every connection handed over (ties of ``load()`` go to the worker that got fewer).
        self.handed_total = 0
        self.lines = Lines()
        self.serving = False
        self.ended: Deferred[None] = Deferred()
        self.report: dict[str, Any] = {}
        self.metrics = ""
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]  # connected: it has a transport
        self.send(self.supervisor.start_message(self.index))

    def send(self, message: Mapping[str, Any]) -> None:
        """Write one control message to the worker."""
        if self.transport is not None and self.transport.pid is not None:
            self.transport.writeToChild(CONTROL_IN, encode(message))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CONTROL_OUT:
            return
        try:
            messages = self.lines.feed(data)
        except ValueError as e:
            self.supervisor._log.error("worker {index}: {error}; killing it", index=self.index, error=e)
            self.signal("KILL")
            return
        for message in messages:
            self.supervisor._message(self, message)

    def signal(self, name: str) -> None:
        """Send the worker signal ``name`` (nothing if it is gone)."""
        with contextlib.suppress(ProcessExitedAlready, OSError, AttributeError):
            self.transport.signalProcess(name)  # type: ignore[union-attr]  # tested above

    def processEnded(self, reason: Failure) -> None:
        self.handoff.close()
        self.supervisor._ended(self, reason)
        self.ended.callback(None)

    def load(self) -> int:
        """How many connections the worker is believed to have."""
        report = self.report
        in_flight = self.handed_total - int(report.get("received_total", 0))  # handed over since the report
        return int(report.get("curr_connections", 0)) + int(report.get("http_connections", 0)) + in_flight


@implementer(IReadDescriptor)
class SocketReader:
    """A socket the reactor watches for reading (``addReader``), read by ``doRead`` in a subclass."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return type(self).__name__

    def connectionLost(self, reason: Failure) -> None:
        pass

    def doRead(self) -> None:
        raise NotImplementedError


class _Acceptor(SocketReader):
    """Accepts on one listening socket and hands each connection to the least loaded serving worker."""

    _log = Logger()
    #: Most connections accepted in one reactor turn.
    burst = 32

    def __init__(self, listening: socket.socket, surface: bytes, supervisor: WorkerSupervisor) -> None:
        super().__init__(listening)
        self._surface = surface
        self._supervisor = supervisor

    def doRead(self) -> None:
        for _ in range(self.burst):
            try:
                connection, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the connection waits in the backlog
                self._log.warn("cannot accept a connection: {error}", error=e)
                return
            with connection:
                self._supervisor.hand_over(connection, self._surface)


@implementer(IKeyValue)
class _WorkersBackend:
    """The main process's backend for its own ``/stats`` and ``/metrics``: the workers' summed stats. Keys are
    served by the workers, so a key command reaching the main process is refused."""

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self._supervisor = supervisor
        self.name = "gateway workers"

    def execute(self, command: Any) -> Any:
        raise ServiceUnavailable("the gateway's workers serve keys, not its main process")

    def stats(self) -> dict[str, Any]:
        return self._supervisor.stats()


class WorkersMetrics:
    """The main process's metrics (``registry``) and each worker's (those not derived from its stats, which the
    main process sums) with a ``worker`` label, merged by family: a registry for ``KeyValueHTTP``."""

    def __init__(self, supervisor: WorkerSupervisor, registry: Any) -> None:
        self._supervisor = supervisor
        self._registry = registry

    def register(self, collector: Collector) -> None:
        """Add a collector of the main process."""
        self._registry.register(collector)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {family.name: family for family in self._registry.collect()}
        for worker in self._supervisor.workers():
            if not worker.metrics:
                continue
            try:
                parsed = list(text_string_to_metric_families(worker.metrics))
            except ValueError:
                continue
            label = str(worker.index)
            for family in parsed:
                samples = [s._replace(labels={**s.labels, "worker": label}) for s in family.samples]
                if family.name in families:
                    families[family.name].samples.extend(samples)
                else:
                    family.samples = samples
                    families[family.name] = family
        yield from families.values()


class WorkerSupervisor(Service):
    """Starts ``count`` workers once the sockets are open, starts them again when they die, stops them.

    ``sockets`` fires with the listening sockets, ``{HTTP: socket, LINE: socket}`` (the main process's
    listeners, which it must not read: ``stopReading()``);
    ``start`` is the rest of each worker's start message (``config``, ``follow``, ``admin``). ``ready`` fires
    once every worker has served (sent ``serving``) once.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        sockets: Deferred[dict[bytes, socket.socket]],
        start: Mapping[str, Any],
        executable: str = sys.executable,
        restart_delay: float = 0.25,
        max_restart_delay: float = 10.0,
        stop_timeout: float = 10.0,
        report_interval: float = 1.0,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self._sockets = sockets
        self._acceptors: list[_Acceptor] = []
        self._accepting = False
        #: The rest of each worker's start message (the admin URL is added once its port listens).
        self.start = dict(start)
        self._waits: list[Deferred[Any]] = []
        self._executable = executable
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stop_timeout = stop_timeout
        self.report_interval = report_interval
        self._workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._started_at: dict[int, float] = {}
        self._respawns: dict[int, IDelayedCall] = {}
        self._loop: LoopingCall | None = None
        self.restarts = 0
        #: Stats of the main process itself, sent with the others' (the cluster's totals).
        self.extra_stats: Callable[[], Mapping[str, Any]] = dict
        #: Called when a worker is asked ``shutdown`` on its line port (None: the workers refuse it).
        self.on_shutdown: Callable[[], object] | None = None
        self.ready: Deferred[None] = Deferred()
        self.backend = _WorkersBackend(self)

    def workers(self) -> list[_Worker]:
        """The running workers, by index."""
        return [self._workers[i] for i in sorted(self._workers)]

    def start_message(self, index: int) -> dict[str, Any]:
        """What worker ``index`` is told first."""
        return {"op": "start", "index": index, "workers": self.count, **self.start}

    def wait_for(self, condition: Deferred[Any]) -> None:
        """Start no worker before ``condition`` fires (call before ``startService``)."""
        self._waits.append(condition)

    def startService(self) -> None:
        super().startService()
        waits = gatherResults([self._sockets, *self._waits], consumeErrors=True)
        waits.addCallback(lambda results: self._spawn_all(results[0])).addErrback(
            lambda f: self._log.failure("cannot start the workers", f)
        )
        self._loop = LoopingCall(self._share_stats)
        self._loop.clock = self._reactor
        self._loop.start(self.report_interval, now=False).addErrback(
            lambda f: self._log.failure("sharing the workers' stats stopped", f)
        )

    def _spawn_all(self, sockets: dict[bytes, socket.socket]) -> None:
        self._acceptors = [_Acceptor(listening, surface, self) for surface, listening in sockets.items()]
        if self.running:
            for index in range(1, self.count + 1):
                self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._respawns.pop(index, None)
        if not self.running or not self._acceptors:
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        worker = _Worker(self, index, mine)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(chashd.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        child_fds: dict[int, Any] = {CONTROL_IN: "w", 1: 1, 2: 2, CONTROL_OUT: "r", HANDOFF_FD: theirs.fileno()}
        try:
            self._reactor.spawnProcess(
                worker,
                self._executable,
                [self._executable, "-m", "chashd.gateway.worker"],
                env=env,
                childFDs=child_fds,
            )
        finally:
            theirs.close()
        self._workers[index] = worker
        self._started_at[index] = self._reactor.seconds()
        self._log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _message(self, worker: _Worker, message: Any) -> None:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "report":
            stats = message.get("stats")
            worker.report = stats if isinstance(stats, dict) else {}
            metrics = message.get("metrics")
            worker.metrics = metrics if isinstance(metrics, str) else ""
        elif op == "shutdown" and self.on_shutdown is not None:
            self._log.info("worker {index} was asked to shut the gateway down", index=worker.index)
            self.on_shutdown()
        elif op == "serving":
            worker.serving = True
            self._accept(True)
            self._log.info("worker {index} serves", index=worker.index)
            if not self.ready.called and len(self._workers) == self.count and all(w.serving for w in self.workers()):
                self.ready.callback(None)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        index = worker.index
        if self._workers.get(index) is worker:
            del self._workers[index]
        if not any(w.serving for w in self._workers.values()):
            self._accept(False)  # until one serves again, connections wait in the backlog
        if not self.running:
            return
        self.restarts += 1
        lived = self._reactor.seconds() - self._started_at.get(index, 0.0)
        delay = self.restart_delay if lived > 10.0 else min(self.max_restart_delay, self._delays.get(index, 0.0) * 2)
        delay = max(delay, self.restart_delay)
        self._delays[index] = delay
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        self._log.warn(
            "worker {index} (pid {pid}) {how}; starting it again in {delay:.2f}s",
            index=index,
            pid=worker.pid,
            how=how,
            delay=delay,
        )
        self._respawns[index] = self._reactor.callLater(delay, self._spawn, index)

    def _accept(self, on: bool) -> None:
        """Accept connections (while some worker serves) or leave them in the listening sockets' backlog."""
        if on == self._accepting:
            return
        self._accepting = on
        for acceptor in self._acceptors:
            if on:
                self._reactor.addReader(acceptor)
            else:
                self._reactor.removeReader(acceptor)

    def hand_over(self, connection: socket.socket, surface: bytes) -> None:
        """Send ``connection`` to the serving worker with the fewest connections (the caller closes its copy);
        with no worker able to take it, it is closed."""
        candidates = sorted((w for w in self._workers.values() if w.serving), key=lambda w: (w.load(), w.handed_total))
        for worker in candidates:
            try:
                socket.send_fds(worker.handoff, [surface], [connection.fileno()])
            except OSError:  # its buffer is full (a stuck worker) or it is gone: the next one
                continue
            worker.handed_total += 1
            return
        self._log.warn("no worker could take a connection; closed it")

    def _share_stats(self) -> None:
        """Tell each worker what the others counted, so that ``stats`` on any of them covers all."""
        try:
            workers = self.workers()
            extra = self.extra_stats()
            for worker in workers:
                others = sum_stats(w.report for w in workers if w is not worker)
                worker.send({"op": "others", "stats": {**others, **extra}})
        except Exception:
            self._log.failure("sharing the workers' stats failed")

    def stats(self) -> dict[str, Any]:
        """The workers' summed stats, how many there are and serve, and each one's connections."""
        workers = self.workers()
        total = sum_stats(w.report for w in workers)
        total.pop("pid", None)
        total.update(self.extra_stats())
        total["workers"] = self.count
        total["workers_serving"] = sum(1 for w in workers if w.serving)
        total["worker_restarts_total"] = self.restarts
        total["worker_connections"] = ",".join(str(w.load()) for w in workers)
        total["worker_total_connections"] = ",".join(str(w.report.get("total_connections", 0)) for w in workers)
        return total

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._accept(False)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        workers = self.workers()
        if not workers:
            return succeed(None)
        for worker in workers:
            worker.signal("TERM")
        kill = self._reactor.callLater(self.stop_timeout, self._kill, workers)
        done = DeferredList([w.ended for w in workers])

        def stopped(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(stopped)

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                self._log.warn("worker {index} did not stop in time; killing it", index=worker.index)
                worker.signal("KILL")
