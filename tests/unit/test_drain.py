"""The drain (chashd.kvstore.drain), through the real kvstore service (made by the tap's make_node) under its
KVStoreRoot: the registrar, ring watch, handoff and drain talk to a real gateway RingAPI (real Membership over the
in-memory Raft) through StubTreq, and the kvstores push to each other over KVClientPools carried in memory by
twisted.test.iosim. One MemoryReactorClock, no socket."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest
from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from chashd.client import AsyncKVStoreClient
from chashd.commands import Store
from chashd.config import GatewayConfig, KVStoreConfig, load_config
from chashd.gateway.api import RingAPI
from chashd.gateway.membership import Membership
from chashd.gateway.raft import RaftListener, RaftSettings
from chashd.gateway.testing import LocalRaft
from chashd.kvstore.drain import KVStoreRoot
from chashd.kvstore.service import KVStoreService
from chashd.kvstore.tap import make_node
from chashd.memcache.server import MemcacheServerFactory
from chashd.storage import MemoryEngine
from chashd.web import KeyValueHTTP
from tests.unit.memory_network import MemoryNetwork

BASE = "http://gateway:8000"
T0 = 1_700_000_000.0


class Reactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` runs at once (LocalRaft reports on the caller's thread)."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """The kvstore's thread pool, run inline."""
    return maybeDeferred(f, *args)


class DrainTests(SynchronousTestCase):
    """A kvstore registered with a gateway drains before it stops."""

    def setUp(self) -> None:
        self.reactor = Reactor()
        self.reactor.advance(T0)
        config = load_config(
            GatewayConfig, {"gateway_id": "g1", "replicas": "1", "write_quorum": "1", "read_quorum": "1"}, environ={}
        )
        self.membership = Membership(config, self.reactor, self._raft)
        self.membership.startService()
        self.reactor.advance(0.5)
        self.api = RingAPI(self.membership, config, self.reactor)
        self.stub: Any = StubTreq(self.api.resource())
        self.network = MemoryNetwork(self.reactor)
        self.nodes: dict[str, KVStoreService] = {}
        self.roots: dict[str, KVStoreRoot] = {}
        self.exits: dict[str, list[int]] = {}
        self.stopping: list[str] = []

    def _raft(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        return LocalRaft(settings, listener)

    def tearDown(self) -> None:
        for node in self.nodes.values():
            if node.running:
                node.stopService()
        self.api.close()
        self.membership.stopService()
        self.settle(lambda: True)

    def kvstore(self, node_id: str, listen: bool = True, start: bool = True, **options: str) -> KVStoreService:
        """A kvstore service under its root (``self.roots``), registered with the gateway, its line port
        listening on the memory reactor."""
        line_port = 21000 + len(self.nodes)
        config = load_config(
            KVStoreConfig,
            {"node_id": node_id, "gateway": BASE, "line_port": str(line_port), "port": str(line_port + 100), **options},
            environ={},
        )
        cluster = AsyncKVStoreClient(self.stub, config.gateway, reactor=self.reactor)
        node = make_node(config, self.reactor, MemoryEngine(), cluster, self.network.connect, run_in_thread=run_now)
        self.roots[node_id] = KVStoreRoot(
            node,
            self.reactor,
            notify_stopping=lambda: self.stopping.append(node_id),
            exit_status=self.exits.setdefault(node_id, []).append,
        )
        if listen:
            self.reactor.listenTCP(line_port, MemcacheServerFactory(node.backend, self.reactor))
        if start:
            node.startService()
        self.nodes[node_id] = node
        return node

    def settle(self, done: Callable[[], bool], seconds: float = 60.0) -> None:
        """Move bytes and time (at most ``seconds``) until ``done()``."""
        deadline = self.reactor.seconds() + seconds
        while self.reactor.seconds() <= deadline:
            self.reactor.advance(0)
            self.stub.flush()
            if self.network.pump():
                continue
            if done():
                return
            self.reactor.advance(0.1)
        raise AssertionError("not done in time")

    def in_ring(self, *node_ids: str) -> bool:
        """Every node is in the ring and every kvstore's data conforms to the current epoch."""
        view = self.membership.view
        synced = [node.handoff.synced for node in self.nodes.values()]
        return all(n in view.ring for n in node_ids) and all(s is not None and s.epoch == view.epoch for s in synced)

    def test_drain_hands_off_and_deregisters(self) -> None:
        """The drain marks the node leaving, refuses writes, hands every record to the node that takes its
        arcs, deregisters, and ends without touching the exit status."""
        a = self.kvstore("kv-a")
        b = self.kvstore("kv-b")
        self.settle(lambda: self.in_ring("kv-a", "kv-b"))
        for i in range(100):
            key = b"key-%d" % i
            owner = self.nodes[self.membership.view.ring.node_for(key)]
            owner.backend.execute(Store("set", key, 0, 0, b"v%d" % i))
        held_by_a = a.engine.stats()["keys"]
        assert 0 < held_by_a < 100
        drained = self.roots["kv-a"].drain()
        self.settle(lambda: drained.called)
        assert a.backend.leaving and self.stopping == ["kv-a"]
        assert a.engine.stats()["keys"] == 0 and b.engine.stats()["keys"] == 100
        assert self.membership.view.node("kv-a") is None
        assert self.exits["kv-a"] == []
        assert self.roots["kv-a"].drain().called  # idempotent: every caller waits for the same drain
        assert b.health()["handoff"]["records_received"] == held_by_a
        assert a.health()["handoff"]["records_sent"] == held_by_a

    def test_timeout_exits_with_status_1(self) -> None:
        """A drain that cannot push (its target never answers) gives up at --drain-timeout, logs what was
        left and sets the exit status 1; the shutdown then goes on."""
        a = self.kvstore("kv-a", drain_timeout="5")
        self.kvstore("kv-b", listen=False)
        self.settle(lambda: self.in_ring("kv-a", "kv-b"))
        for i in range(50):
            a.backend.execute(Store("set", b"key-%d" % i, 0, 0, b"v"))
        with capturedLogs() as events:
            drained = self.roots["kv-a"].drain()
            self.settle(lambda: drained.called, seconds=10)
        assert self.exits["kv-a"] == [1]
        (gave_up,) = [e for e in events if "gave up" in e.get("log_format", "")]
        assert "5s" in gave_up["reason"] and gave_up["arcs_left"] > 0 and gave_up["held"] > 0

    def test_a_second_sigterm_exits_with_status_1(self) -> None:
        """A second SIGTERM during the drain gives up at once with exit status 1."""
        a = self.kvstore("kv-a")
        self.kvstore("kv-b", listen=False)
        self.settle(lambda: self.in_ring("kv-a", "kv-b"))
        for i in range(50):
            a.backend.execute(Store("set", b"key-%d" % i, 0, 0, b"v"))
        drained = self.roots["kv-a"].drain()
        self.settle(lambda: a.backend.leaving)
        assert not drained.called
        with capturedLogs() as events:
            self.roots["kv-a"]._second_signal(signal.SIGTERM, None)
        assert drained.called and self.exits["kv-a"] == [1]
        assert any(e.get("reason") == "a second SIGTERM" for e in events)

    def test_not_registered_just_stops(self) -> None:
        """A node that never got into the map (no gateway answered) stops without a drain."""
        node = self.kvstore("kv-a")
        assert node.registrar is not None
        node.registrar.registered_with = None
        assert node.ring_watch is not None
        node.ring_watch.latest = None
        assert self.roots["kv-a"].drain().called and not node.backend.leaving and self.exits["kv-a"] == []

    def test_the_root_stops_its_children_after_the_drain(self) -> None:
        """KVStoreRoot keeps every child (the listeners too) running until the drain is over."""
        a = self.kvstore("kv-a", start=False)
        self.kvstore("kv-b")
        listener = Service()
        root = self.roots["kv-a"]
        listener.setServiceParent(root)
        root.startService()
        self.settle(lambda: self.in_ring("kv-a", "kv-b"))
        for i in range(20):
            a.backend.execute(Store("set", b"k%d" % i, 0, 0, b"v"))
        stopped = root.stopService()
        assert listener.running and not stopped.called
        self.settle(lambda: stopped.called)
        assert not listener.running and not a.running
        assert self.membership.view.node("kv-a") is None


class NoGatewayTests(SynchronousTestCase):
    """A kvstore without --gateway."""

    def test_just_stops(self) -> None:
        """No gateway: no drain, and health still reports the handoff state."""
        reactor = Reactor()
        config = load_config(KVStoreConfig, {"node_id": "solo"}, environ={})
        node = make_node(config, reactor, MemoryEngine(), None, MemoryNetwork(reactor).connect, run_in_thread=run_now)
        root = KVStoreRoot(node, reactor)
        node.startService()
        assert root.drain().called and not node.backend.leaving
        health = node.health()["handoff"]
        assert health["synced_epoch"] is None and health["running"] is False and health["records_received"] == 0
        node.stopService()
        assert reactor.getDelayedCalls() == []

    def test_counters_reach_stats_and_metrics(self) -> None:
        """GET /stats and /metrics carry the handoff's counters."""
        reactor = Reactor()
        config = load_config(KVStoreConfig, {"node_id": "solo"}, environ={})
        node = make_node(config, reactor, MemoryEngine(), None, MemoryNetwork(reactor).connect, run_in_thread=run_now)
        stats = node.backend.stats()
        assert stats["handoff_records_sent_total"] == 0 and stats["handoff_records_pending"] == 0
        assert "handoff_records_received_total" in stats
        text = generate_latest(KeyValueHTTP(node.backend, role="kvstore").metrics)
        for name in (b"handoff_records_sent_total", b"handoff_records_received_total", b"handoff_records_pending"):
            assert b"chashd_" + name in text
