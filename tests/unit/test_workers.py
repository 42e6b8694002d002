"""The worker supervisor of a gateway's main process (fake process spawning, a Clock, real Unix socket pairs
for the connections handed over), the summed stats, and the worker's line factory and HTTP root."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.proxy import ProxyClientFactory

from chashd.gateway.worker import WorkerLineFactory, WorkerRoot
from chashd.gateway.workers import CONTROL_IN, CONTROL_OUT, HANDOFF_FD, HTTP, LINE, Lines, WorkerSupervisor, sum_stats
from chashd.web import KeyValueHTTP


class FakeProcess:
    """The transport spawnProcess gives: what was written to the child, the signals sent."""

    def __init__(self, pid: int) -> None:
        self.pid: int | None = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []
        self.handoff: socket.socket | None = None

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == CONTROL_IN
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessReactor(Clock):
    """A Clock that records spawned processes and readers."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any], FakeProcess]] = []
        self.readers: set[Any] = set()

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: dict[int, Any]) -> Any:
        process = FakeProcess(1000 + len(self.spawned))
        process.handoff = socket.socket(fileno=os.dup(childFDs[HANDOFF_FD]))  # the child's copy
        self.spawned.append((protocol, args, childFDs, process))
        protocol.makeConnection(process)
        return process

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)


def message(process: FakeProcess, index: int = 0) -> dict[str, Any]:
    """The ``index``-th control message written to a worker."""
    return json.loads(process.written[index])  # type: ignore[no-any-return]


def say(protocol: Any, body: dict[str, Any]) -> None:
    """A worker sends ``body`` on its control pipe."""
    protocol.childDataReceived(CONTROL_OUT, json.dumps(body).encode() + b"\n")


class SupervisorTests(SynchronousTestCase):
    """WorkerSupervisor over a fake reactor."""

    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.listening = {HTTP: socket.socket(), LINE: socket.socket()}
        for s in self.listening.values():
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            s.setblocking(False)
            self.addCleanup(s.close)
        self.supervisor = WorkerSupervisor(
            self.reactor, 2, succeed(self.listening), {"config": {"gateway_id": "g"}, "follow": ["http://x"]}
        )
        self.supervisor.startService()

    def tearDown(self) -> None:
        for _, _, _, process in self.reactor.spawned:
            if process.handoff is not None:
                process.handoff.close()
        if self.supervisor.running:
            d = self.supervisor.stopService()
            for protocol, _, _, _ in self.reactor.spawned:
                if not protocol.ended.called:
                    protocol.processEnded(Failure(ProcessDone(0)))
            self.successResultOf(d)
        assert self.reactor.getDelayedCalls() == []

    def workers(self) -> list[Any]:
        return [protocol for protocol, _, _, _ in self.reactor.spawned]

    def serve_all(self) -> None:
        for worker in self.supervisor.workers():
            say(worker, {"op": "serving"})

    def test_spawns_and_tells_each_worker_its_start(self) -> None:
        """Each worker runs ``-m chashd.gateway.worker`` with the control pipes and its own handoff socket, and
        is told its index, the count and the rest of the start message first."""
        assert len(self.reactor.spawned) == 2
        for index, (_, args, fds, process) in enumerate(self.reactor.spawned, start=1):
            assert args[1:] == ["-m", "chashd.gateway.worker"]
            assert fds[CONTROL_IN] == "w" and fds[CONTROL_OUT] == "r" and isinstance(fds[HANDOFF_FD], int)
            assert message(process) == {
                "op": "start", "index": index, "workers": 2, "config": {"gateway_id": "g"}, "follow": ["http://x"]
            }  # fmt: skip

    def test_ready_and_accepting_once_workers_serve(self) -> None:
        """Connections are accepted once a worker serves; ``ready`` fires once every worker has."""
        assert self.reactor.readers == set()
        say(self.workers()[0], {"op": "serving"})
        assert len(self.reactor.readers) == 2 and not self.supervisor.ready.called
        say(self.workers()[1], {"op": "serving"})
        self.successResultOf(self.supervisor.ready)

    def test_hands_connections_to_the_least_loaded(self) -> None:
        """Each accepted connection goes to the worker with the fewest, with the byte naming its surface."""
        self.serve_all()
        first, second = self.supervisor.workers()
        say(first, {"op": "report", "stats": {"curr_connections": 3, "received_total": 0}})
        for _ in range(4):
            client = socket.create_connection(self.listening[LINE].getsockname())
            self.addCleanup(client.close)
            connection, _ = self.listening[LINE].accept()
            with connection:
                self.supervisor.hand_over(connection, LINE)
        received = []
        for _, _, _, process in self.reactor.spawned:
            assert process.handoff is not None
            process.handoff.setblocking(False)
            count = 0
            while True:
                try:
                    surface, fds, _, _ = socket.recv_fds(process.handoff, 16, 4)
                except BlockingIOError:
                    break
                assert surface == LINE and len(fds) == 1
                os.close(fds[0])
                count += 1
            received.append(count)
        assert received == [1, 3]
        assert first.load() == 4 and second.load() == 3

    def test_a_dead_worker_is_started_again(self) -> None:
        """A worker that dies is spawned again after ``restart_delay``; the restart is counted."""
        self.serve_all()
        dead = self.workers()[0]
        dead.processEnded(Failure(ProcessTerminated(signal=9)))
        assert len(self.supervisor.workers()) == 1
        self.reactor.advance(self.supervisor.restart_delay)
        assert len(self.reactor.spawned) == 3 and self.supervisor.restarts == 1
        assert message(self.reactor.spawned[2][3])["index"] == 1

    def test_no_worker_serving_stops_accepting(self) -> None:
        """With no worker serving, connections wait in the backlog instead of being accepted."""
        self.serve_all()
        for worker in self.workers():
            worker.processEnded(Failure(ProcessTerminated(signal=9)))
        assert self.reactor.readers == set()

    def test_stop_terms_then_kills(self) -> None:
        """stopService sends SIGTERM, and SIGKILL to a worker still running after ``stop_timeout``."""
        self.serve_all()
        d = self.supervisor.stopService()
        first, second = self.workers()
        assert first.transport.signals == ["TERM"] and second.transport.signals == ["TERM"]
        first.processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.reactor.advance(self.supervisor.stop_timeout)
        assert second.transport.signals == ["TERM", "KILL"]
        second.processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(d)
        assert len(self.reactor.spawned) == 2, "no worker is started again while stopping"

    def test_stats_sum_and_are_shared(self) -> None:
        """The main process's stats sum the workers' reports; each worker is sent the others' sum."""
        self.serve_all()
        first, second = self.workers()
        say(first, {"op": "report", "stats": {"cmd_get": 5, "epoch": 7, "pid": 1}, "metrics": ""})
        say(second, {"op": "report", "stats": {"cmd_get": 2, "epoch": 7, "pid": 2}, "metrics": ""})
        stats = self.supervisor.stats()
        assert stats["cmd_get"] == 7 and stats["epoch"] == 7 and "pid" not in stats
        assert stats["workers"] == 2 and stats["workers_serving"] == 2
        self.reactor.advance(self.supervisor.report_interval)
        assert json.loads(first.transport.written[-1])["stats"]["cmd_get"] == 2
        assert json.loads(second.transport.written[-1])["stats"]["cmd_get"] == 5

    def test_oversized_message_kills_the_worker(self) -> None:
        """A control line past the limit is not buffered on: the worker is killed."""
        worker = self.workers()[0]
        worker.lines._buffer = b"x" * (16 * 1024 * 1024)
        worker.childDataReceived(CONTROL_OUT, b"more")
        assert worker.transport.signals == ["KILL"]


class HandoffSocketTests(SynchronousTestCase):
    """The descriptor really crosses the Unix socket."""

    def test_connection_arrives_with_its_surface(self) -> None:
        """What ``hand_over`` sends is one byte and a working descriptor of the same connection."""
        reactor = ProcessReactor()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        self.addCleanup(listening.close)
        supervisor = WorkerSupervisor(reactor, 1, Deferred(), {})
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(theirs.close)
        from chashd.gateway.workers import _Worker

        worker = _Worker(supervisor, 1, mine)
        worker.serving = True
        supervisor._workers[1] = worker
        client = socket.create_connection(listening.getsockname())
        self.addCleanup(client.close)
        connection, _ = listening.accept()
        with connection:
            supervisor.hand_over(connection, HTTP)
        surface, fds, _, _ = socket.recv_fds(theirs, 16, 4)
        assert surface == HTTP and len(fds) == 1
        with socket.socket(fileno=fds[0]) as received:
            received.sendall(b"hello")
            assert client.recv(5) == b"hello"
        mine.close()


class SumStatsTests(SynchronousTestCase):
    """sum_stats."""

    def test_sums_counters_keeps_the_rest(self) -> None:
        """Numbers add up (numeric strings too); gateway-wide figures and text keep the first value."""
        total = sum_stats(
            [
                {"cmd_get": 1, "curr_connections": "2", "epoch": 5, "version": "0.1", "rebalancing": False},
                {"cmd_get": 4, "curr_connections": "3", "epoch": 5, "version": "0.1", "rebalancing": True},
            ]
        )
        assert total == {"cmd_get": 5, "curr_connections": 5, "epoch": 5, "version": "0.1", "rebalancing": False}

    def test_lines(self) -> None:
        """Messages are split on newlines, a partial one kept for the next chunk."""
        lines = Lines()
        assert lines.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
        assert lines.feed(b": 2}\n") == [{"b": 2}]


class _Backend:
    """A backend with stats, for the line factory."""

    name = "test"

    def execute(self, command: Any) -> Any:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {"cmd_get": 3, "epoch": 4}


class WorkerSurfaceTests(SynchronousTestCase):
    """What a worker serves."""

    def test_line_stats_add_the_other_workers(self) -> None:
        """``stats`` on a worker adds the other workers' counters to its own and names the worker count."""
        factory = WorkerLineFactory(_Backend(), Clock())  # type: ignore[arg-type]
        factory.workers = 3
        factory.others = {"cmd_get": 10, "curr_connections": 4, "epoch": 4}
        stats = dict(factory.stats())
        assert stats["cmd_get"] == "13" and stats["curr_connections"] == "4" and stats["epoch"] == "4"
        assert stats["workers"] == "3"
        assert dict(factory.stats_own())["cmd_get"] == "3"

    def test_root_passes_all_but_kv_to_the_main_process(self) -> None:
        """``/kv`` is answered by the worker's own surface; any other path goes to the admin port."""
        reactor = MemoryReactor()
        http = KeyValueHTTP(None, health=lambda: {"here": True})
        stub: Any = StubTreq(WorkerRoot(http.resource(), ("127.0.0.1", 4321), reactor))
        d = stub.get("http://worker/kv/some-key")
        stub.flush()
        assert self.successResultOf(d).code == 503  # no backend here: answered locally
        assert reactor.tcpClients == []
        stub.get("http://worker/ring/status?x=1")
        stub.flush()
        host, port, factory, _, _ = reactor.tcpClients[0]
        assert isinstance(factory, ProxyClientFactory)
        assert (host, port) == ("127.0.0.1", 4321) and factory.rest == b"/ring/status?x=1"
