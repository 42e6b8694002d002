"""The gateway follows the kvstores' handoff progress (chashd.gateway.rebalance, fed by the node monitor) and keeps
the previous ring while a move is under way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import GatewayConfig, load_config
from chashd.gateway.membership import Membership
from chashd.gateway.monitor import NodeMonitor
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.rebalance import Rebalance
from chashd.gateway.router import Router
from chashd.gateway.service import GatewayAdmin
from chashd.gateway.testing import LocalRaft
from chashd.node import NodeInfo
from tests.unit.test_health import ClockWithThreads


class Reports:
    """What each kvstore answers on /health: its synced epoch, or a refusal."""

    def __init__(self) -> None:
        self.synced: dict[str, int | None] = {}
        self.down: set[str] = set()
        self.asked: list[str] = []

    def probe(self, node: NodeInfo) -> Deferred[Mapping[str, Any]]:
        self.asked.append(node.id)
        if node.id in self.down:
            return fail(ConnectionRefusedError())
        epoch = self.synced.get(node.id)
        figures = {"curr_items": 3, "bytes": 300, "limit_maxbytes": 1000, "evictions": ord(node.id) - ord("a")}
        return succeed({"keys": 7, "handoff": {"synced_epoch": epoch, "records_sent": 1}, "stats": figures})


class RebalanceTests(SynchronousTestCase):
    """Rebalance over a real Membership (LocalRaft) and a Clock."""

    def setUp(self) -> None:
        self.clock = ClockWithThreads()
        config = load_config(GatewayConfig, {"gateway_id": "g1"}, environ={})
        self.membership = Membership(config, self.clock, self._factory, command_timeout=5)
        self.membership.startService()
        self.clock.advance(0.5)
        self.reports = Reports()
        self.changes = 0
        self.monitor = NodeMonitor(self.membership, self.reports.probe, self.clock, interval=1.0)
        self.rebalance = Rebalance(self.membership, self.monitor.reports, self._changed)
        self.monitor.subscribe(self.rebalance)

    def _factory(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        return LocalRaft(settings, listener)

    def _changed(self) -> None:
        self.changes += 1

    def tearDown(self) -> None:
        self.monitor.stopService()
        self.membership.stopService()
        assert self.clock.getDelayedCalls() == []

    def register(self, name: str) -> int:
        self.successResultOf(self.membership.register_node(name, "h", 1000 + ord(name), 2, 100, 1))
        return self.membership.view.epoch

    def poll(self) -> None:
        self.clock.advance(1.0)

    def test_join_then_caught_up(self) -> None:
        """A node joins: until the old owners report the new epoch, the old ring stays as previous."""
        self.register("a")
        two = self.register("b")
        self.reports.synced.update(a=two, b=two)
        self.monitor.startService()
        assert not self.rebalance.rebalancing()
        assert self.rebalance.placement().previous is None
        three = self.register("c")
        self.reports.synced["c"] = three
        self.poll()
        assert self.rebalance.rebalancing()
        previous = self.rebalance.placement().previous
        assert previous is not None and previous.nodes == ("a", "b")
        self.reports.synced.update(a=three, b=three)
        self.poll()
        assert not self.rebalance.rebalancing()
        assert self.rebalance.placement().previous is None
        assert self.changes >= 3

    def test_epoch_without_placement_change(self) -> None:
        """A node synced to an older epoch with the same placement is caught up."""
        self.register("a")
        epoch = self.register("b")
        self.reports.synced.update(a=epoch, b=epoch)
        self.successResultOf(self.membership.mark_down("b"))
        self.successResultOf(self.membership.mark_up("b"))
        assert self.membership.view.epoch > epoch
        self.monitor.startService()
        assert not self.rebalance.rebalancing()

    def test_down_nodes_do_not_hold_it_up(self) -> None:
        """A down node cannot report; it does not keep the cluster rebalancing."""
        self.register("a")
        epoch = self.register("b")
        self.reports.synced.update(a=epoch, b=None)
        self.monitor.startService()
        assert self.rebalance.rebalancing()
        self.successResultOf(self.membership.mark_down("b"))
        self.reports.synced["a"] = self.membership.view.epoch
        self.poll()
        assert not self.rebalance.rebalancing()

    def test_leaving_node_counts(self) -> None:
        """A leaving node that has not handed off keeps the ring with it as previous."""
        self.register("a")
        epoch = self.register("b")
        self.reports.synced.update(a=epoch, b=epoch)
        self.successResultOf(self.membership.start_leaving("b"))
        self.reports.synced["a"] = self.membership.view.epoch
        self.monitor.startService()
        previous = self.rebalance.placement().previous
        assert previous is not None and "b" in previous.nodes
        assert self.membership.view.ring.nodes == ("a",)

    def test_status_and_polling(self) -> None:
        """Every node is asked every interval; a failure keeps the last report."""
        self.register("a")
        self.register("b")
        self.monitor.startService()
        assert sorted(self.reports.asked) == ["a", "b"]
        self.reports.down.add("b")
        self.poll()
        status = self.rebalance.status()
        assert {n["id"]: n["keys"] for n in status["nodes"]} == {"a": 7, "b": 7}
        assert status["nodes"][0]["handoff"]["records_sent"] == 1
        assert "rebalancing" in status

    def test_a_move_is_followed_after_each_round(self) -> None:
        """The router's placement is worked out again once every node of a round answered (a slow node
        holds up its own round, and is not asked again while its request is under way)."""
        self.register("a")
        held: list[Deferred[Mapping[str, Any]]] = []

        def slow(node: NodeInfo) -> Deferred[Mapping[str, Any]]:
            d: Deferred[Mapping[str, Any]] = Deferred()
            held.append(d)
            return d

        monitor = NodeMonitor(self.membership, slow, self.clock, interval=1.0, timeout=5.0)
        rebalance = Rebalance(self.membership, monitor.reports, self._changed)
        monitor.subscribe(rebalance)
        monitor.startService()
        self.clock.advance(3.0)
        assert len(held) == 1 and rebalance.synced_epoch("a") is None  # one request in flight per node
        changes = self.changes
        held[0].callback({"handoff": {"synced_epoch": 1}})
        assert self.changes == changes + 1 and rebalance.synced_epoch("a") == 1
        self.clock.advance(1.0)
        assert len(held) == 2
        monitor.stopService()
        assert held[1].called

    def test_cluster_totals_and_admin(self) -> None:
        """GatewayAdmin sums the figures the kvstores reported into the gateway's stats (cluster_*), says the
        gateway's N/W/R in stats settings, zeroes the router's counters on stats reset, and refuses
        cache_memlimit with the reason."""
        config = load_config(GatewayConfig, {"gateway_id": "g1", "replicas": "2", "write_quorum": "1"}, environ={})
        router = Router("g1", self.clock, lambda node: None)  # type: ignore[arg-type,return-value]
        admin = GatewayAdmin(router, self.monitor, config)
        assert admin.stats_extra()["cluster_nodes_reporting"] == 0
        self.register("a")
        self.register("b")
        self.monitor.startService()
        totals = admin.stats_extra()
        assert totals["cluster_nodes_reporting"] == 2
        assert (totals["cluster_curr_items"], totals["cluster_bytes"], totals["cluster_limit_maxbytes"]) == (
            6,
            600,
            2000,
        )
        assert (totals["cluster_evictions"], totals["cluster_total_items"]) == (1, 0)
        settings = admin.settings()
        assert (settings["replicas"], settings["write_quorum"], settings["read_quorum"]) == (2, 1, 2)
        router.counters["cmd_get"] = 5
        admin.reset_stats()
        assert set(router.counters.values()) == {0}
        with pytest.raises(ValueError, match="send cache_memlimit to each kvstore"):
            admin.set_memory_limit(64 << 20)
        assert admin.dump_items(10) == []
