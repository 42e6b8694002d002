"""The gateway's node monitor (chashd.gateway.monitor): one GET /health per node per interval for all its
observers, over a real Membership (LocalRaft) and a Clock; health_probe through the cluster client to a real
kvstore /health over StubTreq."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import GatewayConfig, load_config
from chashd.gateway.clustermap import ClusterView
from chashd.gateway.membership import Membership
from chashd.gateway.monitor import NodeMonitor, health_probe
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.testing import LocalRaft
from chashd.kvstore.backend import LocalBackend
from chashd.node import NodeInfo
from chashd.storage import MemoryEngine
from chashd.web import KeyValueHTTP
from tests.unit.memory_network import HTTPNetwork
from tests.unit.test_health import ClockWithThreads, Nodes


class Recorder:
    """An observer that writes down what it hears."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, ...]] = []

    def round_started(self, view: ClusterView, now: float) -> None:
        self.heard.append(("started", str(view.epoch)))

    def reported(self, node: NodeInfo, report: Mapping[str, Any]) -> None:
        self.heard.append(("reported", node.id))

    def unreachable(self, node: NodeInfo, reason: str) -> None:
        self.heard.append(("unreachable", node.id, reason))

    def round_done(self) -> None:
        self.heard.append(("done",))


class NodeMonitorTests(SynchronousTestCase):
    """NodeMonitor over a scripted probe."""

    def setUp(self) -> None:
        self.clock = ClockWithThreads()
        config = load_config(GatewayConfig, {"gateway_id": "g1"}, environ={})
        self.membership = Membership(config, self.clock, self._factory, command_timeout=5)
        self.membership.startService()
        self.clock.advance(0.5)
        for name in ("a", "b"):
            self.successResultOf(self.membership.register_node(name, "h", ord(name), 2, 100, 1))
        self.nodes = Nodes()
        self.monitor = NodeMonitor(self.membership, self.nodes.probe, self.clock, interval=1.0, timeout=2.0)
        self.recorder = Recorder()
        self.monitor.subscribe(self.recorder)

    def _factory(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        return LocalRaft(settings, listener)

    def tearDown(self) -> None:
        self.monitor.stopService()
        self.membership.stopService()
        assert self.clock.getDelayedCalls() == []

    def test_one_request_per_node_per_interval_for_every_observer(self) -> None:
        """Each node is asked once a round, however many observers listen, and each observer hears the
        round begin, every answer, and the round end, in that order."""
        second = Recorder()
        self.monitor.subscribe(second)
        self.monitor.startService()
        self.clock.advance(1.0)
        assert sorted(self.nodes.probes) == ["a", "a", "b", "b"]
        epoch = str(self.membership.view.epoch)
        one_round = [("started", epoch), ("reported", "a"), ("reported", "b"), ("done",)]
        assert self.recorder.heard == second.heard == one_round * 2
        assert set(self.monitor.reports) == {"a", "b"}

    def test_a_failure_keeps_the_last_report(self) -> None:
        """A node that stops answering is unreachable with the reason; its last report stays until it leaves
        the map."""
        self.monitor.startService()
        self.nodes.healthy["b"] = False
        self.clock.advance(1.0)
        what, node, reason = self.recorder.heard[-2]
        assert (what, node) == ("unreachable", "b") and "refused" in reason
        assert self.monitor.reports["b"]["id"] == "b"
        self.successResultOf(self.membership.remove("b"))
        self.clock.advance(1.0)
        assert set(self.monitor.reports) == {"a"}

    def test_a_slow_node_holds_its_round_until_the_timeout(self) -> None:
        """One request in flight per node; the round ends when the slow one times out."""
        self.nodes.hold = {"a"}
        self.monitor.startService()
        assert self.recorder.heard[-1] == ("reported", "b")
        self.clock.advance(1.0)
        assert self.nodes.probes.count("a") == 1 and self.nodes.probes.count("b") == 2
        self.clock.advance(1.0)
        assert ("unreachable", "a", "timed out") in self.recorder.heard
        assert self.recorder.heard.count(("done",)) == 2  # the second round, without it, then its own

    def test_observer_errors_are_logged_and_the_rounds_go_on(self) -> None:
        """An observer that raises is logged; the others still hear, and the next round comes."""

        class Broken(Recorder):
            def reported(self, node: NodeInfo, report: Mapping[str, Any]) -> None:
                raise RuntimeError("bug")

        self.monitor._observers.insert(0, Broken())
        with capturedLogs() as events:
            self.monitor.startService()
        assert [e["log_failure"].value.args for e in events if "log_failure" in e] == [("bug",), ("bug",)]
        self.flushLoggedErrors(RuntimeError)
        assert ("reported", "a") in self.recorder.heard
        self.clock.advance(1.0)
        assert self.nodes.probes.count("a") == 2
        self.flushLoggedErrors(RuntimeError)

    def test_stop_cancels_the_loop_and_the_requests(self) -> None:
        """Stopping cancels the loop and the requests in flight: no timer is left."""
        self.nodes.hold = {"a", "b"}
        self.monitor.startService()
        pending: list[Deferred[Any]] = list(self.nodes.pending.values())
        self.monitor.stopService()
        assert self.clock.getDelayedCalls() == []
        assert len(pending) == 2 and all(d.called for d in pending)
        self.flushLoggedErrors()


class HealthProbeTests(SynchronousTestCase):
    """health_probe: GET /health of the node's HTTP address through the cluster client."""

    def test_probe_over_a_real_kvstore_surface(self) -> None:
        """A kvstore's /health report comes back as it is; a node that refuses, or answers an error, fails."""
        clock = ClockWithThreads()
        backend = LocalBackend(MemoryEngine(), "a", clock, 1024)
        surface = KeyValueHTTP(backend, health=lambda: {"role": "kvstore", "id": "a", "keys": 0}, role="kvstore")
        broken = KeyValueHTTP(backend, health=lambda: 1 // 0, role="kvstore")  # type: ignore[arg-type, return-value]
        network = HTTPNetwork(
            {"127.0.0.1:8080": StubTreq(surface.resource()), "127.0.0.3:8081": StubTreq(broken.resource())}
        )
        probe = health_probe(network, clock, timeout=1.0)
        report = self.successResultOf(probe(NodeInfo("a", "127.0.0.1", 8080, 11212, 1)))
        assert {"role": "kvstore", "id": "a", "keys": 0}.items() <= report.items()
        self.failureResultOf(probe(NodeInfo("b", "127.0.0.2", 8080, 11212, 1)))
        d = probe(NodeInfo("c", "127.0.0.3", 8081, 11212, 1))
        network.flush()
        self.failureResultOf(d)
        self.flushLoggedErrors(ZeroDivisionError)
        assert network.asked == ["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.3:8081"]
        backend.stop()
