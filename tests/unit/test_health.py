"""Health verdicts (chashd.gateway.health) from the node monitor's rounds: only the leader judges; down after N
failures, up after a success, removed when dead."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import GatewayConfig, load_config
from chashd.gateway.health import HealthChecker
from chashd.gateway.membership import Membership
from chashd.gateway.monitor import NodeMonitor
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.testing import LocalRaft
from chashd.node import NodeInfo, NodeState


class ClockWithThreads(Clock):
    """A Clock whose ``callFromThread`` runs at once (LocalRaft reports on the caller's thread)."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class Nodes:
    """A scripted probe: each node answers healthy unless told otherwise; or holds its answer."""

    def __init__(self) -> None:
        self.healthy: dict[str, bool] = {}
        self.hold: set[str] = set()
        self.probes: list[str] = []
        self.pending: dict[str, Deferred[Mapping[str, Any]]] = {}

    def probe(self, node: NodeInfo) -> Deferred[Mapping[str, Any]]:
        self.probes.append(node.id)
        if node.id in self.hold:
            d: Deferred[Mapping[str, Any]] = Deferred()
            self.pending[node.id] = d
            return d
        if self.healthy.get(node.id, True):
            return succeed({"role": "kvstore", "id": node.id})
        return fail(ConnectionRefusedError("refused"))


class HealthCheckerTests(SynchronousTestCase):
    """The checker over a real Membership (LocalRaft) and a Clock."""

    def setUp(self) -> None:
        self.clock = ClockWithThreads()
        self.rafts: list[LocalRaft] = []
        config = load_config(GatewayConfig, {"gateway_id": "g1"}, environ={})
        self.membership = Membership(config, self.clock, self._factory, command_timeout=5)
        self.membership.startService()
        self.clock.advance(0.5)  # past the Raft bind check
        self.raft = self.rafts[0]
        for name in ("a", "b"):
            self.successResultOf(self.membership.register_node(name, "h", ord(name), 2, 100, 1))
        self.nodes = Nodes()
        self.monitor = NodeMonitor(self.membership, self.nodes.probe, self.clock, interval=1.0, timeout=2.0)
        self.checker = HealthChecker(self.membership, self.clock, down_after=3, dead_after=10.0)
        self.monitor.subscribe(self.checker)

    def _factory(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        raft = LocalRaft(settings, listener)
        self.rafts.append(raft)
        return raft

    def tearDown(self) -> None:
        self.monitor.stopService()
        self.membership.stopService()
        assert self.clock.getDelayedCalls() == []

    def state(self, node_id: str) -> NodeState | None:
        """The node's state in the view (None once removed)."""
        node = self.membership.view.node(node_id)
        return node.state if node else None

    def test_probes_every_interval(self) -> None:
        """Each node is probed at start and then every interval."""
        self.monitor.startService()
        assert sorted(self.nodes.probes) == ["a", "b"]
        self.clock.advance(1.0)
        assert sorted(self.nodes.probes) == ["a", "a", "b", "b"]

    def test_down_after_consecutive_failures(self) -> None:
        """After down_after failed probes the node is marked down, not before; the other stays up."""
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.advance(1.0)
        assert self.state("a") == NodeState.UP and self.checker.failures["a"] == 2
        with capturedLogs() as events:
            self.clock.advance(1.0)
        assert self.state("a") == NodeState.DOWN and self.state("b") == NodeState.UP
        assert any(e.get("node_id") == "a" and e.get("count") == 3 for e in events)

    def test_success_resets_the_count(self) -> None:
        """Failures must be consecutive."""
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.advance(1.0)
        self.nodes.healthy["a"] = True
        self.clock.advance(1.0)
        self.nodes.healthy["a"] = False
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        assert self.state("a") == NodeState.UP

    def test_up_again_after_success(self) -> None:
        """A down node that answers is marked up."""
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.pump([1.0, 1.0])
        assert self.state("a") == NodeState.DOWN
        self.nodes.healthy["a"] = True
        self.clock.advance(1.0)
        assert self.state("a") == NodeState.UP

    def test_removed_after_dead_after(self) -> None:
        """A node down for dead_after seconds is removed from the map, not earlier."""
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.pump([1.0, 1.0])
        assert self.state("a") == NodeState.DOWN
        self.clock.pump([1.0] * 9)
        assert self.state("a") == NodeState.DOWN
        self.clock.advance(1.0)
        assert self.state("a") is None
        assert "a" not in self.checker.failures and "a" not in self.checker.down_since
        assert self.membership.view.ring.nodes == ("b",)

    def test_leaving_node_that_stopped_answering_is_removed(self) -> None:
        """A draining node that stopped answering cannot finish: it is removed after dead_after too."""
        self.successResultOf(self.membership.start_leaving("a"))
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.pump([1.0] * 2)
        assert self.state("a") == NodeState.LEAVING  # not marked down: it already owns nothing new
        self.clock.pump([1.0] * 10)
        assert self.state("a") is None

    def test_only_the_leader_judges(self) -> None:
        """A follower's monitor asks the nodes too (for the handoff progress), but only the leader counts
        failures and changes states; losing the leadership forgets the counters."""
        self.raft.elect("127.0.0.1:9999")
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.pump([1.0] * 5)
        assert self.nodes.probes.count("a") == 6 and self.checker.failures == {}
        assert self.state("a") == NodeState.UP
        self.raft.elect(self.raft.settings.self_address)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        assert self.checker.failures["a"] == 2
        self.raft.elect("127.0.0.1:9999")
        self.clock.advance(1.0)
        assert self.checker.failures == {}
        self.raft.elect(self.raft.settings.self_address)
        self.clock.pump([1.0, 1.0])
        assert self.state("a") == NodeState.UP  # the new count starts from zero: 2 failures so far
        self.clock.advance(1.0)
        assert self.state("a") == NodeState.DOWN

    def test_new_leader_removes_nodes_already_down(self) -> None:
        """A node down before this gateway led is removed dead_after seconds after it first saw it."""
        self.successResultOf(self.membership.mark_down("a"))
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.clock.pump([1.0] * 9)
        assert self.state("a") == NodeState.DOWN
        self.clock.advance(1.0)
        assert self.state("a") is None

    def test_slow_probe_times_out(self) -> None:
        """A probe that never answers counts as a failure after the monitor's timeout; one probe in flight per
        node."""
        self.nodes.hold = {"a"}
        self.monitor.startService()
        self.clock.advance(1.0)
        assert self.nodes.probes.count("a") == 1  # still in flight: not probed again
        self.clock.advance(self.monitor.timeout)
        assert self.checker.failures.get("a") == 1

    def test_failed_change_is_logged_and_retried(self) -> None:
        """A change that cannot be confirmed is logged, and tried again on a later round."""
        self.nodes.healthy["a"] = False
        self.monitor.startService()
        self.raft.hold()
        self.clock.pump([1.0, 1.0])
        assert self.raft.held and self.raft.held[-1][0] == "mark_down"
        with capturedLogs() as events:
            self.raft.fail_held(5)
        assert any("cannot" in e.get("log_format", "") for e in events)
        self.clock.advance(1.0)
        assert self.state("a") == NodeState.DOWN
