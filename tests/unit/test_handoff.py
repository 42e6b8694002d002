"""Rebalancing between real in-process kvstores: each node is a LocalBackend over an engine behind the real
line-protocol server; the handoff pushes over real KVClientPools, and twisted.test.iosim carries the bytes
in memory on a MemoryReactorClock (no socket, no real time, no thread: the thread pool runs inline)."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from chashd.bulk import decode_rows
from chashd.commands import Command, Get, Status, Store, Values, XBulk, XEpoch, XPut
from chashd.interfaces import IStorageEngine
from chashd.kvstore.backend import LocalBackend
from chashd.kvstore.handoff import Handoff
from chashd.kvstore.pacing import Sizer
from chashd.kvstore.placement import RingUpdate, load_synced
from chashd.memcache.client import KVClientPool, KVConnectionLost
from chashd.memcache.server import MemcacheServerFactory
from chashd.node import NodeInfo, NodeState
from chashd.record import Record
from chashd.ring import HashRing
from chashd.storage import MemoryEngine, SQLiteEngine
from chashd.versions import HybridClock
from tests.unit.memory_network import MemoryNetwork
from tests.unit.test_pacing import iterate

T0 = 1_700_000_000.0
POINTS = 16


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """The node's thread pool, run inline."""
    return maybeDeferred(f, *args)


def all_records(engine: IStorageEngine) -> dict[bytes, Record]:
    """Every record an engine holds."""
    found: dict[bytes, Record] = {}
    after = None
    while True:
        page = engine.scan(0, 2**32 - 1, after, 1000)
        found.update(page)
        if len(page) < 1000:
            return found
        from chashd.ring import key_hash

        after = (key_hash(page[-1][0]), page[-1][0])


class Node:
    """One kvstore: engine, backend, line-protocol server on a memory port, handoff."""

    def __init__(self, cluster: Cluster, node_id: str, port: int, engine: IStorageEngine, state_path: str | None):
        self.id = node_id
        self.port = port
        self.engine = engine
        self.backend = LocalBackend(engine, node_id, cluster.reactor, 1 << 20)
        cluster.reactor.listenTCP(port, MemcacheServerFactory(self.backend, cluster.reactor))
        self.handoff = Handoff(
            node_id, engine, run_now, cluster.reactor, cluster.connect, state_path, rng=random.Random(0)
        )
        self.handoff.page_size = cluster.page_size
        self.handoff.drop_chunk = 2
        self.backend.on_epoch = self.handoff.newer_ring_seen  # as the kvstore service wires them
        self.handoff.startService()

    def records(self) -> dict[bytes, Record]:
        """What this node holds."""
        return all_records(self.engine)


class Cluster:
    """Nodes on one MemoryReactorClock; ``settle()`` moves bytes and time until every handoff is over."""

    def __init__(self, page_size: int = 4) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0)
        self.network = MemoryNetwork(self.reactor)
        self.connect = self.network.connect
        self.pump = self.network.pump
        self.nodes: dict[str, Node] = {}
        self.page_size = page_size
        self.hlc = HybridClock("writer")

    def add(self, node_id: str, engine: IStorageEngine | None = None, state_path: str | None = None) -> Node:
        node = Node(self, node_id, 20000 + len(self.nodes), engine or MemoryEngine(), state_path)
        self.nodes[node_id] = node
        return node

    def ring(self, epoch: int, *node_ids: str, replicas: int = 1) -> RingUpdate:
        """The ring the gateways would publish (every node up, at its memory port)."""
        ring = HashRing(dict.fromkeys(node_ids, 1), epoch=epoch, points_per_node=POINTS)
        nodes = {n: NodeInfo(n, "127.0.0.1", 0, self.nodes[n].port, 1) for n in node_ids}
        return RingUpdate(ring, max(1, min(replicas, len(node_ids))), nodes)

    def announce(self, update: RingUpdate, node_ids: Iterable[str] | None = None) -> None:
        """The ring watch of each node (default: all) brings ``update``."""
        for node_id in node_ids if node_ids is not None else list(self.nodes):
            self.nodes[node_id].handoff.ring_changed(update)

    def record(self, value: bytes, tombstone: bool = False) -> Record:
        """A record with a fresh version."""
        version = self.hlc.tick(int(self.reactor.seconds() * 1000))
        return Record.deleted(version) if tombstone else Record(value, 0, 0, version)

    def populate(self, update: RingUpdate, count: int, prefix: str = "key") -> dict[bytes, Record]:
        """``count`` keys written on every replica of ``update``'s placement."""
        written = {}
        for i in range(count):
            key = f"{prefix}-{i}".encode()
            record = self.record(b"value-%d" % i)
            for node_id in update.ring.preference_list(key, update.replicas):
                self.nodes[node_id].engine.put(key, record)
            written[key] = record
        return written

    def settle(self, limit: int = 2000, only: Iterable[str] | None = None) -> None:
        """Run until no handoff (of the nodes ``only``, default all) is under way, advancing the clock to the
        next timer when nothing moves."""
        watched = [self.nodes[n] for n in only] if only is not None else list(self.nodes.values())
        for _ in range(limit):
            if self.pump():
                continue
            if not any(n.handoff.running_handoff for n in watched):
                return
            calls = self.reactor.getDelayedCalls()
            assert calls, (
                f"a handoff is stuck with nothing to wait for: {[n.handoff.status() for n in self.nodes.values()]}"
            )
            self.reactor.advance(max(0.0, min(c.getTime() for c in calls) - self.reactor.seconds()))
        raise AssertionError("the handoffs did not finish")

    def run_for(self, seconds: float) -> None:
        """Move bytes and time (to each next timer) for ``seconds`` of the clock."""
        end = self.reactor.seconds() + seconds
        while True:
            while self.pump():
                pass
            calls = [c.getTime() for c in self.reactor.getDelayedCalls()]
            if not calls or min(calls) > end:
                self.reactor.advance(max(0.0, end - self.reactor.seconds()))
                self.pump()
                return
            self.reactor.advance(max(0.0, min(calls) - self.reactor.seconds()))

    def stop(self) -> None:
        """Stop every handoff; nothing may be left scheduled."""
        for node in self.nodes.values():
            node.handoff.stopService()
        self.pump()
        assert self.reactor.getDelayedCalls() == []

    def assert_placed(self, update: RingUpdate, written: dict[bytes, Record]) -> None:
        """Every key is on exactly its replicas under ``update``, with the version written."""
        holders: dict[bytes, set[str]] = {}
        for node_id in update.ring.nodes:
            for key, record in self.nodes[node_id].records().items():
                holders.setdefault(key, set()).add(node_id)
                assert record == written[key], (node_id, key)
        for key in written:
            assert holders.get(key, set()) == set(update.ring.preference_list(key, update.replicas)), key


@pytest.fixture
def cluster() -> Any:
    c = Cluster()
    yield c
    c.stop()


class JoinTests:
    """A node joins: the old owners push it its share and drop what they no longer own."""

    def test_records_move_to_the_new_node(self, cluster: Cluster) -> None:
        """With N=1 the keys whose owner is now B move to B, and A keeps exactly the others, unchanged."""
        a = cluster.add("A")
        cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 200)
        two = cluster.ring(2, "A", "B")
        with capturedLogs() as events:
            cluster.announce(two)
            cluster.settle()
        cluster.assert_placed(two, written)
        moved = [k for k in written if two.ring.node_for(k) == "B"]
        assert 0 < len(moved) < 200
        assert a.handoff.synced == two and cluster.nodes["B"].handoff.synced == two
        assert a.handoff.records_sent == len(moved) == a.handoff.records_dropped
        assert cluster.nodes["B"].backend.stats()["handoff_records_received_total"] == len(moved)
        arc_lines = [e for e in events if "arc" in e.get("log_format", "") and e.get("found")]
        assert sum(e["found"] for e in arc_lines) == len(moved)  # one line per arc, not per key
        assert len(arc_lines) < len(moved)

    def test_replicas_gain_a_copy(self, cluster: Cluster) -> None:
        """With N=2 a join gives the new node a copy of every key it now replicates; the node it displaced
        drops it, the one that stays keeps it."""
        for node_id in "ABC":
            cluster.add(node_id)
        one = cluster.ring(1, "A", "B", replicas=2)
        cluster.announce(one)
        written = cluster.populate(one, 150)
        two = cluster.ring(2, "A", "B", "C", replicas=2)
        cluster.announce(two)
        cluster.settle()
        cluster.assert_placed(two, written)
        assert cluster.nodes["C"].records()
        assert all(n.handoff.synced == two for n in cluster.nodes.values())

    def test_first_ring_of_an_empty_node_is_synced(self, cluster: Cluster) -> None:
        """A node that starts empty takes the first ring it learns as synced, and pushes nothing."""
        a = cluster.add("A")
        cluster.announce(cluster.ring(3, "A"))
        assert a.handoff.synced is not None and a.handoff.synced.epoch == 3
        assert not a.handoff.running_handoff and a.handoff.records_sent == 0

    def test_data_without_a_saved_ring_goes_to_every_replica(self, cluster: Cluster) -> None:
        """A node holding data but no saved ring treats the old ring as empty: every record goes to each
        of its replicas under the new ring, and the node keeps only what it owns."""
        a = cluster.add("A")
        for node_id in "BC":
            cluster.add(node_id)
        written = {b"k-%d" % i: cluster.record(b"v") for i in range(60)}
        for key, record in written.items():
            a.engine.put(key, record)
        a.handoff.stopService()
        a.handoff.startService()  # a restart with data and no saved ring (a memory node has none)
        ring = cluster.ring(5, "A", "B", "C", replicas=2)
        cluster.announce(ring)
        cluster.settle()
        cluster.assert_placed(ring, written)
        assert a.handoff.synced == ring


class DrainAndFailureTests:
    """A node leaves (drain), or dies and is removed (failure)."""

    def test_a_leaving_node_hands_everything_off(self, cluster: Cluster) -> None:
        """The node that leaves the ring pushes every record to the nodes that take its arcs and keeps nothing."""
        for node_id in "ABC":
            cluster.add(node_id)
        one = cluster.ring(1, "A", "B", "C", replicas=2)
        cluster.announce(one)
        written = cluster.populate(one, 150)
        two = cluster.ring(2, "B", "C", replicas=2)  # A is leaving: not in the ring any more
        cluster.announce(two)
        cluster.settle()
        assert cluster.nodes["A"].records() == {}
        cluster.assert_placed(two, written)
        assert cluster.nodes["A"].handoff.synced == two

    def test_survivors_copy_to_the_node_that_enters_the_list(self, cluster: Cluster) -> None:
        """When a dead node is removed, the surviving replicas push each affected record to the node that
        enters its preference list, so every key is on N nodes again."""
        for node_id in "ABCD":
            cluster.add(node_id)
        one = cluster.ring(1, "A", "B", "C", "D", replicas=2)
        cluster.announce(one)
        written = cluster.populate(one, 200)
        dead = cluster.nodes.pop("D")  # killed: no handoff of its own
        dead.handoff.stopService()
        two = cluster.ring(2, "A", "B", "C", replicas=2)
        cluster.announce(two)
        cluster.settle()
        cluster.assert_placed(two, written)

    def test_the_last_node_keeps_its_data(self, cluster: Cluster) -> None:
        """A node whose arcs go to nobody (the last node leaves) drops nothing: there is nowhere to push."""
        a = cluster.add("A")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 20)
        empty = RingUpdate(HashRing({}, epoch=2, points_per_node=POINTS), 1)
        cluster.announce(empty)
        cluster.settle()
        assert a.records() == written and a.handoff.synced == empty


class ConcurrencyTests:
    """Writes that race a handoff, tombstones, a new ring mid-handoff."""

    def test_a_write_on_the_old_owner_during_the_push_is_kept_then_swept(self, cluster: Cluster) -> None:
        """A record rewritten on the old owner after it was pushed is not dropped (compare-and-remove);
        the final sweep pushes the new version and drops it; the new owner ends with the newer version."""
        a = cluster.add("A")
        b = cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 40)
        two = cluster.ring(2, "A", "B")
        key = next(k for k in written if two.ring.node_for(k) == "B")
        real_connect = cluster.connect
        raced: list[Any] = []

        def carries(command: Any) -> bool:
            if isinstance(command, XBulk):
                return any(row[0] == key for row in decode_rows(command.block, command.count, 1 << 20))
            return isinstance(command, XPut) and command.key == key

        def racing_connect(host: str, port: int) -> KVClientPool:
            pool = real_connect(host, port)
            send_many, send_bulk = pool.send_many, pool.send_bulk

            def send_and_race(send: Callable[[list[Any]], Deferred[Any]], commands: list[Any]) -> Deferred[Any]:
                d = send(commands)
                if any(carries(c) for c in commands) and not raced:
                    raced.append(a.backend.execute(Store("set", key, 0, 0, b"newer")))
                return d

            pool.send_many = partial(send_and_race, send_many)  # type: ignore[method-assign]  # the test wraps them
            pool.send_bulk = partial(send_and_race, send_bulk)  # type: ignore[method-assign]
            return pool

        a.handoff.connect = racing_connect
        cluster.announce(two)
        cluster.settle()
        assert raced == [Status.STORED]
        newer = b.engine.get(key)
        assert newer is not None and newer.value == b"newer" and newer.version > written[key].version
        assert key not in a.records()
        assert a.handoff.records_dropped == len([k for k in written if two.ring.node_for(k) == "B"])

    def test_a_newer_write_on_the_new_owner_wins(self, cluster: Cluster) -> None:
        """The old owner streams version 1 while a client wrote version 2 to the new owner: version 2 stays,
        and the old owner still drops its copy (EXISTS is an acknowledgement)."""
        a = cluster.add("A")
        b = cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 40)
        two = cluster.ring(2, "A", "B")
        key = next(k for k in written if two.ring.node_for(k) == "B")
        cluster.reactor.advance(1)  # the client's write comes after the one A holds
        b.backend.execute(Store("set", key, 0, 0, b"version 2"))
        cluster.announce(two)
        cluster.settle()
        stored = b.engine.get(key)
        assert stored is not None and stored.value == b"version 2"
        assert key not in a.records()

    def test_a_tombstone_keeps_a_key_deleted(self, cluster: Cluster) -> None:
        """A deleted key's tombstone is pushed like a record: a stale live copy on the new owner is
        replaced and reads miss."""
        a = cluster.add("A")
        b = cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        two = cluster.ring(2, "A", "B")
        key = next(k for k in (b"gone-%d" % i for i in range(100)) if two.ring.node_for(k) == "B")
        b.engine.put(key, cluster.record(b"stale"))
        a.engine.put(key, cluster.record(b"", tombstone=True))
        cluster.announce(two)
        cluster.settle()
        stored = b.engine.get(key)
        assert stored is not None and stored.tombstone
        assert b.backend.execute(Get((key,))) == Values(())
        assert a.engine.get(key) is None

    def test_a_new_ring_mid_handoff_restarts_the_plan(self, cluster: Cluster) -> None:
        """B joins, and before the push to B is answered C replaces B: the node plans again from its synced
        ring to the newest one, and the keys end up placed by the newest ring."""
        a = cluster.add("A")
        for node_id in "BC":
            cluster.add(node_id)
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 120)
        two = cluster.ring(2, "A", "B")
        cluster.announce(two)
        assert a.handoff.running_handoff  # its first page is on its way to B, not answered yet
        three = cluster.ring(3, "A", "C")
        with capturedLogs() as events:
            cluster.announce(three)
            cluster.settle()
        assert any("planning anew" in e.get("log_format", "") for e in events)
        for key, record in written.items():
            owner = three.ring.node_for(key)
            assert cluster.nodes[owner].engine.get(key) == record
            if owner != "A":
                assert a.engine.get(key) is None
        assert a.handoff.synced == three


class CutTarget(MultiService):
    """A connection to a target whose answers fail (``KVConnectionLost`` after ``delay`` seconds, as a
    connection cut off times out) while ``cut`` is set, and go through the real connection once it is not."""

    def __init__(self, reactor: MemoryReactorClock, real: KVClientPool, delay: float = 1.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.real = real
        self.delay = delay
        self.cut = True
        self.failed = 0
        self._calls: list[Any] = []
        real.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        """Closed: the answers still due never come."""
        for call in self._calls:
            if call.active():
                call.cancel()
        stopped: Deferred[None] = super().stopService()
        return stopped

    def send_many(self, commands: Sequence[Command]) -> Deferred[list[Any]]:
        """The real answers, or a failure for each command after ``delay`` while cut."""
        if not self.cut:
            return self.real.send_many(commands)
        return self._fail(commands)

    def send_bulk(self, commands: Sequence[XBulk | XEpoch]) -> Deferred[list[Any]]:
        """Bulk pages: the real answers, or a failure for each command after ``delay`` while cut."""
        if not self.cut:
            return self.real.send_bulk(commands)
        return self._fail(commands)

    def _fail(self, commands: Sequence[Command]) -> Deferred[list[Any]]:
        self.failed += 1
        d: Deferred[list[Any]] = Deferred()
        self._calls.append(
            self.reactor.callLater(self.delay, d.callback, [Failure(KVConnectionLost("cut off")) for _ in commands])
        )
        return d


def cut_to(cluster: Cluster, node: Node, target: str) -> list[CutTarget]:
    """Make ``node``'s connections to ``target`` cut off (``CutTarget``); the list gets each one made."""
    made: list[CutTarget] = []
    port = cluster.nodes[target].port

    def connect(host: str, line_port: int) -> Any:
        real = cluster.connect(host, line_port)
        if line_port != port:
            return real
        made.append(CutTarget(cluster.reactor, real))
        return made[-1]

    node.handoff.connect = connect
    return made


class NewerRingTests:
    """A node whose ring watch lags (it knows a ring its peers have left behind) never drops what they push
    for the newer ring, and is not synced until it knows that ring."""

    def test_a_removed_node_that_returns_keeps_what_its_peers_push_back(self, tmp_path: Path) -> None:
        """Scenario of the fault suite's removed-restart, in memory: D is removed (ring 2) and its peers hand
        its arcs off; D restarts with its data and its saved ring 1 while its ring watch brings ring 2 only,
        so it hands everything off for ring 2 (its pushes to A cut off, so that handoff is under way), and
        the peers, on ring 3 where D is back, push D's arcs to it. D stops its plan at the peers' epoch:
        nothing is dropped, synced stays at ring 1, until ring 3 comes; then every key is on its 3
        replicas of ring 3, D's included."""
        cluster = Cluster()
        state = str(tmp_path / "d-ring.json")
        for node_id in "ABC":
            cluster.add(node_id)
        cluster.add("D", state_path=state)
        one = cluster.ring(1, "A", "B", "C", "D", replicas=3)
        cluster.announce(one)
        written = cluster.populate(one, 240)
        d = cluster.nodes["D"]
        d.handoff.stopService()  # killed
        two = cluster.ring(2, "A", "B", "C", replicas=3)
        cluster.announce(two, "ABC")
        cluster.settle()
        cluster.assert_placed(two, written)

        cluster.nodes["D"] = d = Node(cluster, "D", 20100, d.engine, state)  # restarted: its data, ring 1
        assert d.handoff.synced is not None and d.handoff.synced.epoch == 1
        held = set(d.records())
        cuts = cut_to(cluster, d, "A")
        two = RingUpdate(two.ring, 3, two.nodes)
        cluster.announce(two, "D")  # its ring watch polls a gateway that knows only ring 2
        assert d.handoff.running_handoff
        three = cluster.ring(3, "A", "B", "C", "D", replicas=3)  # its registration put it back
        with capturedLogs() as events:
            cluster.announce(three, "ABC")
            cluster.settle(only="ABC")
            cluster.run_for(60.0)
        assert cuts and cuts[0].failed > 0  # D's own handoff was under way, held up by A
        assert d.handoff.awaited_epoch == 3 and d.handoff.synced.epoch == 1 and d.handoff.running_handoff
        assert any("newer than this node's" in e.get("log_format", "") for e in events)
        mine = {k for k in written if "D" in three.ring.preference_list(k, 3)}
        assert mine <= set(d.records())  # the peers delivered D's arcs, and D dropped none of them
        assert held - set(d.records()) <= set(written) - mine  # what D dropped, ring 3 does not give it
        cuts[0].cut = False
        cluster.announce(three, "D")
        cluster.settle()
        cluster.assert_placed(three, written)
        assert d.handoff.synced == three and d.handoff.awaited_epoch == 3
        saved = load_synced(state)
        assert saved is not None and saved.epoch == 3

    def test_an_older_epoch_changes_nothing(self, cluster: Cluster) -> None:
        """A peer that pushes for a ring this node already knows (or an older one) does not stop its plan."""
        a = cluster.add("A")
        cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 40)
        two = cluster.ring(2, "A", "B")
        cluster.announce(two)
        a.handoff.newer_ring_seen(2)
        a.handoff.newer_ring_seen(1)
        cluster.settle()
        assert a.handoff.awaited_epoch == 0 and a.handoff.synced == two
        cluster.assert_placed(two, written)


class UnreachableTargetTests:
    """A target that is down, or does not answer, does not stall the other arcs; what it is owed is never
    dropped before it got it, and the node is not synced before."""

    def setup_three(self, cluster: Cluster, b_state: NodeState) -> tuple[Node, dict[bytes, Record], RingUpdate]:
        a = cluster.add("A")
        for node_id in "BC":
            cluster.add(node_id)
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 120)
        two = cluster.ring(2, "A", "B", "C")
        b = two.nodes["B"]
        two = RingUpdate(two.ring, 1, {**two.nodes, "B": NodeInfo(b.id, b.host, b.port, b.line_port, 1, b_state)})
        return a, written, two

    def test_a_target_marked_down_is_owed_its_arcs(self, cluster: Cluster) -> None:
        """B joins and is marked down at once: A hands C its arcs (and drops them) without waiting for B,
        keeps B's arcs, and stays unsynced; once the ring shows B up, A pushes B its arcs and is synced."""
        a, written, two = self.setup_three(cluster, NodeState.DOWN)
        cluster.announce(two, "A")
        cluster.run_for(120.0)
        to_c = {k for k in written if two.ring.node_for(k) == "C"}
        to_b = {k for k in written if two.ring.node_for(k) == "B"}
        assert to_b and to_c
        assert set(cluster.nodes["C"].records()) == to_c and cluster.nodes["B"].records() == {}
        assert set(a.records()) == set(written) - to_c  # B's arcs kept
        assert a.handoff.running_handoff and a.handoff.synced is not None and a.handoff.synced.epoch == 1
        up = cluster.ring(3, "A", "B", "C")
        cluster.announce(up, "A")
        cluster.settle()
        cluster.assert_placed(up, written)
        assert a.handoff.synced == up

    def test_a_target_that_does_not_answer_is_owed_its_arcs(self, cluster: Cluster) -> None:
        """B is in the ring and up but cut off: after ``attempts`` failed pushes A goes on with C's arcs,
        never asks B again in that pass, and keeps B's arcs; once B answers, the owed arcs reach it."""
        a, written, two = self.setup_three(cluster, NodeState.UP)
        cuts = cut_to(cluster, a, "B")
        with capturedLogs() as events:
            cluster.announce(two, "A")
            cluster.run_for(5.0)
        to_c = {k for k in written if two.ring.node_for(k) == "C"}
        assert set(cluster.nodes["C"].records()) == to_c
        assert set(a.records()) == set(written) - to_c and a.handoff.running_handoff
        gave_up = [e for e in events if "owed them after the other arcs" in e.get("log_format", "")]
        assert len(cuts) == 1 and 0 < len(gave_up) <= a.handoff.window  # not one wait per page of B's arcs
        cluster.run_for(30.0)  # the owed arcs are tried again, with backoff, and kept
        assert set(a.records()) == set(written) - to_c and a.handoff.running_handoff
        cuts[0].cut = False
        cluster.settle()
        cluster.assert_placed(two, written)
        assert a.handoff.synced == two


class DeliveryTests:
    """A page counts as delivered only once the receiver has it durably."""

    def test_a_record_is_committed_on_the_receiver_before_the_sender_drops_it(self, tmp_path: Path) -> None:
        """With a SQLite receiver, every time the sender gets the answers to bulk pages (or a slice of xmoves),
        each answered record is already in the receiver's database file (read through a connection of its
        own): the sender never drops what a kill -9 of the receiver could lose. Every page follows the
        XEpoch of the ring it is pushed for."""
        cluster = Cluster()
        a = cluster.add("A")
        b = cluster.add("B", SQLiteEngine(tmp_path / "b.db"))
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 60)
        checked: list[int] = []

        def on_disk(keys: list[bytes]) -> set[bytes]:
            db = sqlite3.connect(tmp_path / "b.db")
            try:
                rows = db.execute("SELECT key FROM records").fetchall()
            finally:
                db.close()
            return {bytes(r[0]) for r in rows} & set(keys)

        def connect(host: str, port: int) -> Any:
            pool = cluster.connect(host, port)
            send_many, send_bulk = pool.send_many, pool.send_bulk

            def checking(send: Callable[[list[Any]], Deferred[Any]], commands: list[Any]) -> Deferred[Any]:
                keys = [c.key for c in commands if isinstance(c, XPut)]
                for before, command in zip([None, *commands], commands):
                    if isinstance(command, XBulk):
                        assert before == XEpoch(2)
                        keys.extend(row[0] for row in decode_rows(command.block, command.count, 1 << 20))
                assert isinstance(commands[0], XEpoch) and commands[0].epoch == 2

                def answered(results: list[Any]) -> list[Any]:
                    assert on_disk(keys) == set(keys)
                    checked.append(len(keys))
                    return results

                return send(commands).addCallback(answered)

            pool.send_many = partial(checking, send_many)  # type: ignore[method-assign]  # the test wraps them
            pool.send_bulk = partial(checking, send_bulk)  # type: ignore[method-assign]
            return pool

        a.handoff.connect = connect
        two = cluster.ring(2, "B")
        cluster.announce(two)
        cluster.settle()
        assert sum(checked) >= len(written) and a.records() == {}
        cluster.assert_placed(two, written)
        cluster.stop()
        b.engine.close()


class BackPressureTests:
    """The handoff never has more than ``window`` pages in flight per target."""

    class ManualTarget(Service):
        """A target whose answers the test gives."""

        def __init__(self) -> None:
            self.sent: list[tuple[XPut, Deferred[Any]]] = []
            self.groups: list[list[XPut]] = []
            self.epochs: list[int] = []

        def send_many(self, commands: Sequence[Command]) -> Deferred[list[Any]]:
            """One Deferred per record for the test to fire (the slice's XEpoch is answered at once); the
            group's answers once all have fired."""
            answers: list[Deferred[Any]] = []
            self.groups.append([c for c in commands if isinstance(c, XPut)])
            self.epochs.extend(c.epoch for c in commands if isinstance(c, XEpoch))
            for command in commands:
                if isinstance(command, XEpoch):
                    answers.append(succeed(Status.OK))
                    continue
                assert isinstance(command, XPut)
                d: Deferred[Any] = Deferred()
                self.sent.append((command, d))
                answers.append(d)
            group = DeferredList(answers, consumeErrors=True)  # a failure is an answer too
            return group.addCallback(lambda results: [value for _, value in results])

    def setup_handoff(
        self,
        page_size: int,
        count: int,
        prepare: Callable[[Handoff], None] | None = None,
        engine: IStorageEngine | None = None,
    ) -> tuple[Cluster, Node, ManualTarget, RingUpdate]:
        cluster = Cluster(page_size=page_size)
        a = cluster.add("A", engine)
        if prepare is not None:
            prepare(a.handoff)
        cluster.add("B")
        cluster.announce(cluster.ring(1, "A"), ["A"])
        for i in range(count):
            a.engine.put(b"k-%d" % i, cluster.record(b"v"))
        target = self.ManualTarget()
        a.handoff.connect = lambda host, port: target
        two = cluster.ring(2, "B")  # everything moves from A to B
        a.handoff.ring_changed(two)
        return cluster, a, target, two

    def test_a_window_of_pages(self) -> None:
        """At most ``window`` pages are pushed and not wholly acknowledged (no new page while the oldest one
        waits for an acknowledgement); a record is dropped on the sender only after its acknowledgement."""
        cluster, a, target, two = self.setup_handoff(page_size=3, count=10)
        window = a.handoff.window
        assert window == 3
        for _ in range(5):
            cluster.reactor.advance(0)
        assert len(target.sent) == window * 3  # the first pages leave at once, up to the window
        pages = 0
        while a.handoff.running_handoff:
            unanswered = [(c, d) for c, d in target.sent if not d.called]
            assert 0 < len(unanswered) <= window * 3
            assert set(a.records()) >= {c.key for c, _ in unanswered}  # nothing dropped before its acknowledgement
            oldest, rest = unanswered[:3], unanswered[3:]
            for _, d in oldest[:-1]:
                d.callback(Status.STORED)
            for _ in range(5):
                cluster.reactor.advance(0)
            assert [(c, d) for c, d in target.sent if not d.called] == oldest[-1:] + rest  # no new page yet
            oldest[-1][1].callback(Status.STORED)
            pages += 1
            for _ in range(10):  # the drops run a chunk per turn
                cluster.reactor.advance(0)
        assert pages == 4 and len(target.sent) == 10 and a.records() == {}
        assert a.handoff.synced == two

    def test_failed_pushes_are_retried_with_backoff(self) -> None:
        """A page the target did not acknowledge is sent again after a backoff, and only then dropped."""
        cluster, a, target, _ = self.setup_handoff(page_size=4, count=2)
        cluster.reactor.advance(0)  # the push's first unit
        first = list(target.sent)
        assert len(first) == 2
        for _, d in first:
            d.errback(KVConnectionLost("gone"))
        assert len(target.sent) == 2 and len(a.records()) == 2
        (retry,) = cluster.reactor.getDelayedCalls()
        assert 0.3 <= retry.getTime() - cluster.reactor.seconds() <= 0.7
        cluster.reactor.advance(1.0)
        assert [c.key for c, _ in target.sent[2:]] == [c.key for c, _ in first]
        for _, d in target.sent[2:]:
            d.callback(Status.STORED)
        cluster.reactor.advance(0)
        assert a.records() == {}

    def test_a_target_that_left_the_map_is_skipped(self) -> None:
        """While retrying, a newer ring without the target stops the pushes to it and plans anew."""
        cluster, a, target, _ = self.setup_handoff(page_size=4, count=2)
        cluster.reactor.advance(0)  # the push's first unit
        assert len(target.sent) == 2
        for _, d in target.sent:
            d.errback(KVConnectionLost("gone"))
        three = cluster.ring(3, "A")  # B is gone again: A owns everything
        a.handoff.ring_changed(three)
        assert not a.handoff.running_handoff and a.handoff.synced == three
        assert len(a.records()) == 2 and cluster.reactor.getDelayedCalls() == []


class PacingTests:
    """The handoff's work on the reactor thread comes in small units, one per reactor iteration; its SQLite
    work (scans, drops) runs in the thread pool."""

    def test_a_page_is_pushed_in_slices_and_dropped_in_chunks_in_the_pool(self) -> None:
        """A page leaves in slices of ``push_slice`` records (one send_many each) and is dropped in the thread
        pool, once every arc is pushed, in one job of transactions of ``drop_chunk`` records (one engine call
        each, for a run of the page kept as its digest)."""
        chunks: list[int] = []
        in_pool: list[bool] = [False]

        class Recording(MemoryEngine):
            def remove_run_if(self, first: bytes, last: bytes, digest: bytes) -> int:
                assert in_pool[0], "a drop outside the thread pool"
                removed = super().remove_run_if(first, last, digest)
                chunks.append(removed)
                return removed

        jobs: list[str] = []

        def pool(f: Any, *args: Any) -> Deferred[Any]:
            jobs.append(f.__name__)
            in_pool[0] = True
            try:
                return maybeDeferred(f, *args)
            finally:
                in_pool[0] = False

        def prepare(handoff: Handoff) -> None:
            self.small_units(handoff)
            handoff._run_in_pool = pool

        cluster, a, target, _ = BackPressureTests().setup_handoff(10, 10, prepare, Recording())
        cluster.reactor.advance(0)
        assert [len(group) for group in target.groups] == [3, 3, 3, 1]
        for _, d in target.sent:
            d.callback(Status.STORED)
        cluster.reactor.advance(0)
        assert chunks == [2] * 5 and a.records() == {} and a.handoff.records_dropped == 10
        assert jobs.count("_drop_runs") == 1 and jobs.count("_drop_rows") == 0

    def test_one_unit_per_reactor_iteration_whatever_the_targets(self) -> None:
        """A node hands every page to two targets and drops it: each iteration of the reactor runs one unit
        of the pushes at most (a slice sent), with the units of several pages and both targets under way, and
        none runs in the callbacks of the acknowledgements."""
        units: list[str] = []

        class Target(BackPressureTests.ManualTarget):
            def send_many(self, commands: Sequence[Command]) -> Deferred[list[Any]]:
                units.append("push")
                return super().send_many(commands)

        cluster = Cluster(page_size=6)
        a = cluster.add("A")
        self.small_units(a.handoff)
        for node_id in "BC":
            cluster.add(node_id)
        cluster.announce(cluster.ring(1, "A"), ["A"])
        for i in range(24):
            a.engine.put(b"k-%d" % i, cluster.record(b"v"))
        targets: list[Target] = []

        def connect(host: str, port: int) -> Target:
            targets.append(Target())
            return targets[-1]

        a.handoff.connect = connect
        a.handoff.ring_changed(cluster.ring(2, "B", "C", replicas=2))  # A leaves: every page goes to B and C
        most = 0
        for _ in range(500):
            if not a.handoff.running_handoff:
                break
            before = len(units)
            iterate(cluster.reactor)
            most = max(most, len(units) - before)
            before = len(units)
            for target in targets:
                for _, d in target.sent:
                    if not d.called:
                        d.callback(Status.STORED)
            assert len(units) == before
        assert not a.handoff.running_handoff and a.records() == {} and len(targets) == 2
        assert most == 1 and [len(t.sent) for t in targets] == [24, 24] and a.handoff.records_dropped == 24
        assert units.count("push") >= 2 * 24 // 3  # slices of 3

    def test_a_drop_under_way_stops_at_a_newer_epoch(self) -> None:
        """A peer's ``XEpoch`` for a newer ring stops the plan: the transactions of a drop job not begun yet
        drop nothing (each checks the plan under the engine's write lock), so what the peer pushes after it is
        never removed."""
        cluster, a, target, _ = BackPressureTests().setup_handoff(10, 10, self.small_units)
        cluster.reactor.advance(0)
        rows = a.engine.scan_rows(0, 2**32 - 1, None, 100)
        assert len(rows) == 10
        a.handoff.newer_ring_seen(99)  # the plan under way is for an older ring than a peer pushes for
        assert a.handoff._drop_rows(rows) == 0
        assert len(a.records()) == 10

    def test_drops_wait_until_every_arc_is_pushed(self) -> None:
        """The main pass drops nothing while pages are still to push: the records every target acknowledged
        stay, counted in ``dropping``, until the last page is acknowledged; then they go, in the pool."""
        cluster, a, target, two = BackPressureTests().setup_handoff(4, 10, self.small_units)
        cluster.reactor.advance(0)
        assert len(target.sent) == 10
        for _, d in target.sent[:-1]:
            d.callback(Status.STORED)
        cluster.reactor.advance(0)
        assert len(a.records()) == 10 and a.handoff.records_dropped == 0
        dropping = a.handoff.status()["dropping"]  # the records of the pages wholly acknowledged
        assert 0 < dropping < 10 and a.handoff.stats()["handoff_records_dropping"] == dropping
        assert a.handoff.running_handoff and a.handoff.synced is not None and a.handoff.synced.epoch == 1
        target.sent[-1][1].callback(Status.STORED)
        cluster.reactor.advance(0)
        assert a.records() == {} and a.handoff.records_dropped == 10 and a.handoff.status()["dropping"] == 0
        assert not a.handoff.running_handoff and a.handoff.synced == two

    def test_deferred_drops_go_in_jobs_of_drop_job_records(self) -> None:
        """The deferred drops run in jobs of whole pages, a new job once one holds ``drop_job`` records."""
        jobs: list[int] = []

        def prepare(handoff: Handoff) -> None:
            self.small_units(handoff)
            handoff.drop_job = 5

            def pool(f: Any, *args: Any) -> Deferred[Any]:
                if f.__name__ == "_drop_runs":
                    jobs.append(sum(run.count for run in args[0]))
                return maybeDeferred(f, *args)

            handoff._run_in_pool = pool

        cluster, a, target, two = BackPressureTests().setup_handoff(3, 20, prepare)
        for _ in range(20):
            cluster.reactor.advance(0)
            for _, d in target.sent:
                if not d.called:
                    d.callback(Status.STORED)
        assert a.records() == {} and sum(jobs) == 20 and len(jobs) >= 2
        assert all(5 <= count <= 7 for count in jobs[:-1])  # whole pages of 3 or fewer, up to 5 and past it

    def test_a_record_rewritten_before_the_deferred_drop_goes_to_the_target(self) -> None:
        """A record rewritten on the sender after its push keeps its whole run from the deferred drop; the sweep
        pushes the run again (the rewritten version) and drops it record by record."""
        cluster = Cluster(page_size=4)
        a = cluster.add("A")
        b = cluster.add("B")
        cluster.announce(cluster.ring(1, "A"))
        written = cluster.populate(cluster.ring(1, "A"), 12)
        a.handoff.drop_chunk = 2
        rewritten: dict[bytes, Record] = {}
        drop_deferred = a.handoff._drop_deferred

        async def rewrite_first(new: RingUpdate) -> None:
            key = next(iter(written))
            rewritten[key] = cluster.record(b"rewritten")
            a.engine.put(key, rewritten[key])
            await drop_deferred(new)

        a.handoff._drop_deferred = rewrite_first  # type: ignore[method-assign]
        with capturedLogs() as logs:
            cluster.announce(cluster.ring(2, "B"))
            cluster.settle()
        assert a.records() == {} and b.records() == {**written, **rewritten}
        assert a.handoff.records_dropped == 12 and a.handoff.records_sent == 14  # the run of two again
        assert any("10 records pushed dropped, 2 kept" in str(e.get("log_format", "")).format(**e) for e in logs)

    def test_a_newer_ring_during_the_deferred_drops_drops_nothing_more(self) -> None:
        """A peer's ``XEpoch`` for a newer ring while the deferred drops run: the runs not dropped yet stay (the
        plan stops; ``synced`` does not move), as a restart with drops pending keeps them for the next plan."""
        cluster, a, target, two = BackPressureTests().setup_handoff(4, 10, self.small_units)
        jobs: list[Deferred[Any]] = []

        def pool(f: Any, *args: Any) -> Deferred[Any]:
            if f.__name__ != "_drop_runs":
                return maybeDeferred(f, *args)
            d: Deferred[Any] = Deferred()
            jobs.append(d)
            d.addCallback(lambda _: f(*args))
            return d

        a.handoff._run_in_pool = pool
        a.handoff.drop_job = 1  # a job per page
        cluster.reactor.advance(0)
        for _, d in target.sent:
            d.callback(Status.STORED)
        cluster.reactor.advance(0)
        assert len(jobs) == 1 and a.handoff.status()["dropping"] == 10
        jobs[0].callback(None)  # the first page's runs
        assert len(a.records()) == 6 and len(jobs) == 2
        a.handoff.newer_ring_seen(99)
        jobs[1].callback(None)
        cluster.reactor.advance(0)
        assert len(a.records()) == 6 and a.handoff.records_dropped == 4
        assert a.handoff.synced is not None and a.handoff.synced.epoch == 1
        assert a.handoff.status()["dropping"] == 0

    @staticmethod
    def small_units(handoff: Handoff) -> None:
        """Slices of 3 records, drop transactions of 2, whatever the time they take."""
        handoff.push_slice = handoff.push_slice_max = 3
        handoff.drop_chunk = 2
        handoff._push_size = Sizer(3, 3, 1.0)


class PersistenceTests:
    """``synced`` of a SQLite node survives a restart."""

    def test_synced_survives_a_restart(self, tmp_path: Path) -> None:
        """The ring is saved once the handoff is done; a restarted node knows it, so a ring with the same
        placement moves nothing, and a different one hands off from the saved ring."""
        state = str(tmp_path / "handoff-ring.json")
        cluster = Cluster()
        a = cluster.add("A", SQLiteEngine(tmp_path / "a.db"), state)
        cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 50)
        saved = load_synced(state)
        assert saved is not None and saved.epoch == 1 and saved.same_placement(one)
        a.handoff.stopService()
        a.engine.close()

        cluster.nodes["A"] = a = Node(cluster, "A", 20100, SQLiteEngine(tmp_path / "a.db"), state)
        assert a.handoff.synced is not None and a.handoff.synced.epoch == 1
        cluster.announce(cluster.ring(4, "A"), ["A"])  # same placement, newer epoch
        assert not a.handoff.running_handoff and a.handoff.records_sent == 0
        two = cluster.ring(5, "A", "B")
        two = RingUpdate(two.ring, 1, {"A": NodeInfo("A", "127.0.0.1", 0, 20100, 1), **dict(two.nodes)})
        cluster.announce(two)
        cluster.settle()
        assert a.handoff.records_sent == len([k for k in written if two.ring.node_for(k) == "B"]) > 0
        saved = load_synced(state)
        assert saved is not None and saved.epoch == 5
        assert json.loads(Path(state).read_text())["replicas"] == 1
        cluster.stop()
        a.engine.close()

    def test_a_restart_with_drops_pending(self, tmp_path: Path) -> None:
        """A node stopped while the drops of its main pass wait (every page acknowledged) has saved no newer ring
        and still holds every record; restarted, it hands off again from the saved ring: it pushes again what
        it holds (the target keeps each record once) and drops it, and nothing is lost or left behind."""
        state = str(tmp_path / "handoff-ring.json")
        cluster = Cluster()
        a = cluster.add("A", SQLiteEngine(tmp_path / "a.db"), state)
        b = cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        written = cluster.populate(one, 40)
        held: list[Deferred[Any]] = []

        def pool(f: Any, *args: Any) -> Deferred[Any]:
            if f.__name__ == "_drop_runs":  # the drops wait, as a slow pool would make them
                held.append(Deferred())
                return held[-1]
            return maybeDeferred(f, *args)

        a.handoff._run_in_pool = pool
        two = cluster.ring(2, "B")
        cluster.announce(two)
        for _ in range(100):
            cluster.pump()
        assert held and a.handoff.phase == "drop" and a.handoff.status()["dropping"] == 40
        assert b.records() == written and a.records() == written
        a.handoff.stopService()
        a.engine.close()
        saved = load_synced(state)
        assert saved is not None and saved.epoch == 1

        cluster.nodes["A"] = a = Node(cluster, "A", 20100, SQLiteEngine(tmp_path / "a.db"), state)
        assert a.handoff.synced is not None and a.handoff.synced.epoch == 1 and len(a.records()) == 40
        cluster.announce(two, ["A"])
        cluster.settle()
        assert a.records() == {} and b.records() == written and a.handoff.records_dropped == 40
        saved = load_synced(state)
        assert saved is not None and saved.epoch == 2
        cluster.stop()
        a.engine.close()

    def test_an_unreadable_saved_ring_means_no_saved_ring(self, tmp_path: Path) -> None:
        """A saved ring that does not parse is logged and ignored: the node hands off as if it had none."""
        state = tmp_path / "handoff-ring.json"
        state.write_text("{not json")
        cluster = Cluster()
        with capturedLogs() as events:
            a = cluster.add("A", state_path=str(state))
        assert a.handoff.synced is None
        assert any("cannot read the saved ring" in e.get("log_format", "") for e in events)
        cluster.stop()


class ProgressTests:
    """What ``GET /health`` and ``/stats`` show of a handoff."""

    def test_status_and_stats(self, cluster: Cluster) -> None:
        """While a handoff runs, the status names both epochs, the arcs and an estimate of what is left;
        when it is over, pending is 0 and synced is the target."""
        a = cluster.add("A")
        cluster.add("B")
        one = cluster.ring(1, "A")
        cluster.announce(one)
        cluster.populate(one, 100)
        two = cluster.ring(2, "A", "B")
        cluster.announce(two)
        during = a.handoff.status()
        assert during["synced_epoch"] == 1 and during["target_epoch"] == 2 and during["running"]
        assert during["arcs_total"] > 0 and during["pending"] > 0
        cluster.settle()
        after = a.handoff.status()
        assert after["synced_epoch"] == 2 and not after["running"] and after["pending"] == 0
        stats = a.handoff.stats()
        assert stats["handoff_records_sent_total"] == after["records_sent"] > 0
        assert stats["handoff_records_pending"] == 0
