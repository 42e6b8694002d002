"""Anti-entropy between real in-process kvstores: each node is a LocalBackend over a MemoryEngine behind the
real line-protocol server, with its real handoff (which gives the ring the data conforms to); the
comparisons travel over real KVClientPools, carried in memory by twisted.test.iosim on a MemoryReactorClock
(no socket, no real time; the thread pool runs inline)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from chashd.commands import Digests, KeyVersions, XDigest, XList
from chashd.errors import ServiceUnavailable
from chashd.kvstore.antientropy import AntiEntropy, NotSynced, placement_id, shared_ranges
from chashd.kvstore.backend import LocalBackend
from chashd.kvstore.handoff import Handoff
from chashd.kvstore.placement import RingUpdate
from chashd.memcache.client import KVClientPool
from chashd.memcache.server import MemcacheServerFactory
from chashd.metrics import RequestMetrics
from chashd.node import NodeInfo, NodeState
from chashd.record import Record
from chashd.ring import HashRing, key_hash
from chashd.storage import MemoryEngine
from chashd.versions import HybridClock
from tests.unit.memory_network import MemoryNetwork
from tests.unit.test_handoff import all_records, run_now

T0 = 1_700_000_000.0
POINTS = 16


class Node:
    """One kvstore: engine, backend, line-protocol server on a memory port, handoff, anti-entropy."""

    def __init__(self, cluster: Cluster, node_id: str, port: int, rate: float) -> None:
        self.id = node_id
        self.port = port
        self.engine = MemoryEngine()
        self.backend = LocalBackend(self.engine, node_id, cluster.reactor, 1 << 20)
        server = MemcacheServerFactory(self.backend, cluster.reactor, requests=RequestMetrics())  # as the daemon's
        cluster.reactor.listenTCP(port, server)
        self.handoff = Handoff(node_id, self.engine, run_now, cluster.reactor, cluster.connect)
        self.handoff.startService()
        self.ae = AntiEntropy(
            node_id,
            self.engine,
            self.handoff,
            self.backend.execute_puts,
            run_now,
            cluster.reactor,
            cluster.connect,
            interval=60.0,
            rate=rate,
            rng=random.Random(node_id),
        )
        self.ae.page_size = 50
        self.backend.ranges = self.ae

    def records(self) -> dict[bytes, Record]:
        return all_records(self.engine)


class Cluster:
    """Nodes a, b, c (N=3 by default) on one MemoryReactorClock."""

    def __init__(self, names: str = "abc", replicas: int = 3, rate: float = 1e9) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        self.network = MemoryNetwork(self.reactor)
        self.nodes = {name: Node(self, name, 21000 + i, rate) for i, name in enumerate(names)}
        self.hlc = HybridClock("writer")
        self.update = self.ring(1, replicas)
        for node in self.nodes.values():
            node.handoff.ring_changed(self.update)  # empty at start: synced at once
            node.ae.ring_changed(self.update)

    def connect(self, host: str, port: int) -> KVClientPool:
        """The connection the handoff or anti-entropy of a node makes to another."""
        return self.network.connect(host, port)

    def ring(self, epoch: int, replicas: int, down: str = "") -> RingUpdate:
        ring = HashRing(dict.fromkeys(self.nodes, 1), epoch=epoch, points_per_node=POINTS)
        nodes = {
            n: NodeInfo(n, "127.0.0.1", 0, node.port, 1, NodeState.DOWN if n in down else NodeState.UP)
            for n, node in self.nodes.items()
        }
        return RingUpdate(ring, replicas, nodes)

    def record(self, value: bytes = b"v", tombstone: bool = False) -> Record:
        version = self.hlc.tick(int(self.reactor.seconds() * 1000))
        return Record.deleted(version) if tombstone else Record(value, 0, 0, version)

    def write(self, key: bytes, record: Record, *on: str) -> None:
        """Store ``record`` on the nodes named (default: every replica of the key)."""
        for name in on or self.update.ring.preference_list(key, self.update.replicas):
            self.nodes[name].engine.put(key, record)

    def start(self) -> None:
        for node in self.nodes.values():
            node.ae.startService()

    def run_for(self, seconds: float) -> None:
        """Move bytes and time for ``seconds`` of the reactor's clock."""
        until = self.reactor.seconds() + seconds
        for _ in range(100_000):
            if self.network.pump():
                continue
            calls = [c.getTime() for c in self.reactor.getDelayedCalls()]
            due = min(calls, default=until)
            if due > until:
                self.reactor.advance(until - self.reactor.seconds())
                self.network.pump()
                return
            self.reactor.advance(max(0.0, due - self.reactor.seconds()))
        raise AssertionError("the reactor never got there")

    def stop(self) -> None:
        for node in self.nodes.values():
            node.ae.stopService()
            node.handoff.stopService()
        self.network.pump()
        assert self.reactor.getDelayedCalls() == []

    def assert_converged(self) -> None:
        """Every node holds, for each key whose preference list includes it, the newest record written."""
        newest: dict[bytes, Record] = {}
        for node in self.nodes.values():
            for key, record in node.records().items():
                if record.newer_than(newest.get(key)):
                    newest[key] = record
        for key, record in newest.items():
            for name in self.update.ring.preference_list(key, self.update.replicas):
                assert self.nodes[name].engine.get(key) == record, (name, key)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.stop()


def keys_of(node: str, cluster: Cluster, count: int, prefix: bytes = b"k") -> list[bytes]:
    """``count`` keys whose preference list holds ``node``."""
    found: list[bytes] = []
    i = 0
    while len(found) < count:
        key = b"%s%d" % (prefix, i)
        if node in cluster.update.ring.preference_list(key, cluster.update.replicas):
            found.append(key)
        i += 1
    return found


class SharedRangesTests:
    """Which hash ranges two nodes both hold, and the name of a placement."""

    def test_every_range_once_per_peer(self) -> None:
        """With N=2 of three nodes, each pair shares some ranges; together a node's shared ranges cover
        exactly the hashes whose preference list holds it, each range naming a peer in that list."""
        c = Cluster(replicas=2)
        c.stop()
        ring = c.update.ring
        shared = shared_ranges(c.update, "a")
        assert set(shared) == {"b", "c"}
        for peer, ranges in shared.items():
            for first, last in ranges:
                for probe in (first, last, (first + last) // 2):
                    assert set(ring.preference_list_for_hash(probe, 2)) == {"a", peer}
            assert all(x[1] + 1 < y[0] for x, y in zip(ranges, ranges[1:]))  # merged, in order

    def test_placement_id_ignores_the_epoch(self) -> None:
        """Every epoch of one placement has the same id; another weight or N gives another."""
        ring = HashRing({"a": 1, "b": 1}, epoch=3)
        same = HashRing({"b": 1, "a": 1}, epoch=9)
        assert placement_id(RingUpdate(ring, 2)) == placement_id(RingUpdate(same, 2))
        assert placement_id(RingUpdate(ring, 2)) != placement_id(RingUpdate(ring, 1))
        assert placement_id(RingUpdate(ring, 2)) != placement_id(RingUpdate(HashRing({"a": 2, "b": 1}), 2))


class PassTests:
    """A pass makes every replica hold the newest record of every key it shares, without any read."""

    def test_missing_older_and_deleted_records_are_repaired(self, cluster: Cluster) -> None:
        """Keys missing on a replica, an older version on one, a delete one replica missed: after the first
        passes every replica holds the newest record, tombstones included; the counters say so."""
        for i in range(300):
            cluster.write(b"same-%d" % i, cluster.record(b"x"))
        only_a = keys_of("a", cluster, 20, b"only-a-")
        for key in only_a:
            cluster.write(key, cluster.record(b"a"), "a")
        stale = keys_of("c", cluster, 10, b"stale-")
        for key in stale:
            cluster.write(key, cluster.record(b"old"))
            cluster.write(key, cluster.record(b"new"), "c")
        deleted = keys_of("b", cluster, 10, b"deleted-")
        for key in deleted:
            cluster.write(key, cluster.record(b"alive"))
            cluster.write(key, cluster.record(tombstone=True), "b")
        cluster.start()
        cluster.run_for(20)
        cluster.assert_converged()
        for key in stale:
            assert all(cluster.nodes[n].engine.get(key).value == b"new" for n in "abc")  # type: ignore[union-attr]
        for key in deleted:
            assert all(cluster.nodes[n].engine.get(key).tombstone for n in "abc")  # type: ignore[union-attr]
        repaired = sum(n.ae.stats()["antientropy_keys_repaired_total"] for n in cluster.nodes.values())
        assert repaired == 2 * 20 + 2 * 10 + 2 * 10
        for node in cluster.nodes.values():
            stats = node.ae.stats()
            assert stats["antientropy_last_full_pass"] > T0
            assert stats["antientropy_passes_total"] >= 1
            assert stats["antientropy_cpu_seconds_total"] > 0  # its scans and comparisons, timed
        assert cluster.nodes["a"].ae.stats()["antientropy_arcs_compared_total"] == 2  # with b and with c
        assert cluster.nodes["b"].ae.stats()["antientropy_arcs_compared_total"] == 1  # with c
        assert cluster.nodes["c"].ae.stats()["antientropy_arcs_compared_total"] == 0  # the larger id answers

    def test_equal_replicas_exchange_nothing(self, cluster: Cluster) -> None:
        """Replicas that agree compare one digest per shared range and list nothing."""
        for i in range(500):
            cluster.write(b"k%d" % i, cluster.record())
        cluster.start()
        cluster.run_for(20)
        for node in cluster.nodes.values():
            stats = node.ae.stats()
            assert stats["antientropy_keys_repaired_total"] == 0
            assert stats["antientropy_ranges_compared_total"] == stats["antientropy_arcs_compared_total"]
            assert node.backend.stats()["cmd_xlist"] == 0

    def test_one_difference_among_many_is_found_by_recursion(self) -> None:
        """One key missing among 5,000: the digests lead down to it; only a few sub-ranges are listed."""
        c = Cluster("ab", replicas=2)
        try:
            for i in range(5000):
                c.write(b"k%d" % i, c.record())
            c.write(b"lost", c.record(b"!"), "a")
            c.start()
            c.run_for(20)
            c.assert_converged()
            assert c.nodes["b"].engine.get(b"lost") is not None
            stats = c.nodes["a"].ae.stats()
            assert stats["antientropy_keys_repaired_total"] == 1
            assert c.nodes["b"].backend.stats()["cmd_xlist"] == 1
            assert stats["antientropy_ranges_compared_total"] <= 4
        finally:
            c.stop()

    def test_a_node_out_of_the_placement_refuses(self) -> None:
        """A peer whose data conforms to another placement refuses the comparison (NotSynced): the pass is
        incomplete, nothing is exchanged, and the next pass comes sooner than the interval."""
        c = Cluster("ab", replicas=2)
        try:
            c.write(b"lost", c.record(b"!"), "a")
            other = RingUpdate(HashRing({"a": 1, "b": 2}, epoch=2, points_per_node=POINTS), 2, c.update.nodes)
            c.nodes["b"].handoff.synced = other
            c.start()
            c.run_for(8)
            stats = c.nodes["a"].ae.stats()
            assert stats["antientropy_passes_total"] == 1
            assert stats["antientropy_last_full_pass"] == 0
            assert c.nodes["b"].engine.get(b"lost") is None
            c.nodes["b"].handoff.synced = c.update
            c.run_for(10)  # the next pass within first_delay, not interval
            assert c.nodes["b"].engine.get(b"lost") is not None
        finally:
            c.stop()

    def test_answers_refused_while_a_handoff_runs_or_for_another_placement(self, cluster: Cluster) -> None:
        """The answering side checks the placement and the handoff itself."""
        ae = cluster.nodes["a"].ae
        placement = placement_id(cluster.update)
        failure = ae.digest(XDigest("0123456789abcdef", 0, 10, 2))
        assert isinstance(failure.result.value, NotSynced)  # type: ignore[attr-defined]
        failure.addErrback(lambda _: None)
        answer = ae.digest(XDigest(placement, 0, 10, 2))
        assert isinstance(answer.result, Digests)
        cluster.nodes["a"].handoff._busy = True
        refused = ae.list_keys(XList(placement, 0, 10, 5))
        assert isinstance(refused.result.value, ServiceUnavailable)  # type: ignore[attr-defined]
        refused.addErrback(lambda _: None)
        cluster.nodes["a"].handoff._busy = False

    def test_rate_limit_spreads_the_scans(self) -> None:
        """At 1,000 records a second, comparing 6,000 records on each side takes more than 5 s of the clock
        (a second's worth saved in the bucket, then 1,000 a second), during which the reactor is free between
        pages; nothing is lost to the pacing."""
        c = Cluster("ab", replicas=2, rate=1000)
        try:
            for i in range(6000):
                c.write(b"k%d" % i, c.record())
            c.write(b"lost", c.record(b"!"), "a")
            c.start()
            for _ in range(100):
                c.run_for(0.1)
                if c.nodes["a"].ae.running_pass:
                    break
            c.run_for(3)
            assert c.nodes["a"].ae.running_pass
            assert c.nodes["b"].engine.get(b"lost") is None
            assert 2500 <= c.nodes["a"].ae.stats()["antientropy_keys_scanned_total"] <= 4500
            c.run_for(30)
            assert c.nodes["b"].engine.get(b"lost") is not None
            assert c.nodes["a"].ae.stats()["antientropy_last_pass_seconds"] >= 5.0
        finally:
            c.stop()


class SchedulingTests:
    """When passes run, and who starts them."""

    def test_the_larger_id_takes_over_from_a_silent_peer(self) -> None:
        """b does not start comparisons with a while a does; once a has been silent for two intervals,
        b starts them itself."""
        c = Cluster("ab", replicas=2)
        try:
            c.write(b"lost", c.record(b"!"), "b")
            c.nodes["b"].ae.startService()  # a never starts a pass
            c.run_for(60)
            assert c.nodes["a"].engine.get(b"lost") is None
            c.run_for(150)
            assert c.nodes["a"].engine.get(b"lost") is not None
            c.nodes["a"].ae.startService()
        finally:
            c.stop()

    def test_a_node_back_up_brings_a_pass_soon(self, cluster: Cluster) -> None:
        """A ring in which a node is up again (it was down) starts a pass within kick_delay seconds, well
        before the interval."""
        cluster.start()
        cluster.run_for(20)
        passes = cluster.nodes["a"].ae.stats()["antientropy_passes_total"]
        for node in cluster.nodes.values():
            node.ae.ring_changed(cluster.ring(2, 3, down="c"))
        cluster.run_for(5)
        assert cluster.nodes["a"].ae.stats()["antientropy_passes_total"] == passes
        for node in cluster.nodes.values():
            node.ae.ring_changed(cluster.ring(3, 3))
        cluster.run_for(3)
        assert cluster.nodes["a"].ae.stats()["antientropy_passes_total"] == passes + 1

    def test_interval_zero_runs_no_pass_but_answers(self) -> None:
        """--anti-entropy-interval 0: no pass of its own, no timer, but it answers its peers."""
        c = Cluster("ab", replicas=2)
        try:
            c.nodes["a"].ae.interval = 0
            c.write(b"lost", c.record(b"!"), "b")
            c.nodes["a"].ae.startService()
            assert c.reactor.getDelayedCalls() == []
            c.nodes["b"].ae.startService()
            c.run_for(200)
            assert c.nodes["a"].engine.get(b"lost") is not None
        finally:
            c.stop()


def listing(node: Node, command: XList) -> KeyVersions:
    """The backend's answer to an XList (a fired Deferred)."""
    d: Any = node.backend.execute(command)
    assert isinstance(d.result, KeyVersions)
    return d.result


def test_listing_pages_in_hash_order(cluster: Cluster) -> None:
    """XList pages through a range in (hash, key) order, after the position given."""
    for i in range(30):
        cluster.write(b"k%d" % i, cluster.record(), "a")
    placement = placement_id(cluster.update)
    node = cluster.nodes["a"]
    first = listing(node, XList(placement, 0, 2**32 - 1, 10))
    rest = listing(node, XList(placement, 0, 2**32 - 1, 100, (first.items[-1][0], first.items[-1][1])))
    listed = [entry[1] for entry in first.items + rest.items]
    assert listed == sorted((b"k%d" % i for i in range(30)), key=lambda k: (key_hash(k), k))
