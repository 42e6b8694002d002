"""The gateway's router over real kvstore backends (LocalBackend + MemoryEngine), connected in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from chashd.commands import (
    Arith,
    Delete,
    FlushAll,
    Get,
    Number,
    SplicedGet,
    Status,
    Store,
    Touch,
    Values,
    XApply,
    XGet,
    XLease,
    XPut,
    XRelease,
    XVer,
)
from chashd.errors import MapNotCurrent, QuorumNotReached, RequestError, ServiceUnavailable, UnknownCommand
from chashd.gateway.router import Placement, Router
from chashd.interfaces import IKVClient
from chashd.kvstore.backend import LocalBackend
from chashd.memcache.text import serialize_result
from chashd.node import NodeState
from chashd.record import Record
from chashd.ring import HashRing
from chashd.storage import MemoryEngine
from chashd.versions import Version
from tests.unit.test_memcache_client import Sink

NOW = 1_700_000_000.0


@implementer(IKVClient)
class Link:
    """An in-memory connection to a real kvstore backend: up, down (fails at once) or hanging."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self.mode = "up"
        self.sent: list[Any] = []
        self.held: list[Deferred[Any]] = []
        self.held_commands: list[Any] = []
        #: The map epoch this connection named (``xmap``): its xapply and xlease commands carry it, as on the
        #: wire.
        self.epoch = 0

    def send(self, command: Any) -> Deferred[Any]:
        if (type(command) is XApply or type(command) is XLease) and self.epoch:
            command = replace(command, epoch=self.epoch)
        self.sent.append(command)
        if self.mode == "down":
            return fail(ConnectionLost("kvstore unreachable"))
        if self.mode == "hang":
            d: Deferred[Any] = Deferred()
            self.held.append(d)
            self.held_commands.append(command)
            return d
        return self._run(command)

    def send_to(self, command: Any, sink: Any) -> bool:
        """A connection that is up sends the command (its result or failure to ``sink``); a down one declines."""
        if self.mode == "down":
            return False
        self.send(command).addCallbacks(sink.callback, sink.errback)
        return True

    def forward_get(self, key: bytes, sink: Any) -> bool:
        """A connection that is up forwards the get (its reply or failure to ``sink``); a down one declines."""
        if self.mode == "down":
            return False
        self.send(SplicedGet(key)).addCallbacks(sink.callback, sink.errback)
        return True

    def _run(self, command: Any) -> Deferred[Any]:
        try:
            if type(command) is SplicedGet:  # on the wire a plain get, whose reply comes back as it is
                get = Get((command.key,))
                return succeed(serialize_result(get, self.backend.execute(get)))
            return succeed(self.backend.execute(command))
        except Exception as e:
            return fail(e)

    def resume(self, reverse: bool = False) -> None:
        """A paused kvstore runs on: the commands it held run now, in order (or the last first: two
        connections), and their answers come."""
        self.mode = "up"
        held = list(zip(self.held, self.held_commands))
        self.held, self.held_commands = [], []
        for d, command in reversed(held) if reverse else held:
            answer = self._run(command)
            if not d.called:  # else cancelled by the router: the connection drops the late answer
                answer.addBoth(d.callback)


class Cluster:
    """kvstores a..e (MemoryEngine + LocalBackend) and a router over the first ``count`` of them."""

    def __init__(
        self,
        count: int = 3,
        replicas: int = 3,
        w: int = 2,
        r: int = 2,
        flush: bool = False,
        hedge_after: float = 0.05,
        primary_timeout: float = 0.5,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.links = {
            name: Link(LocalBackend(MemoryEngine(), name, self.clock, 1024 * 1024)) for name in "abcde"[:count]
        }
        clients: dict[str, IKVClient] = dict(self.links)
        self.router = Router(
            "gw1",
            self.clock,
            clients.__getitem__,
            replicas,
            w,
            r,
            allow_flush_all=flush,
            hedge_after=hedge_after,
            primary_timeout=primary_timeout,
        )
        self.router.update(Placement(HashRing(dict.fromkeys(self.links, 1), epoch=1)))

    def mark(self, **states: str) -> None:
        """Route with these node states (the others up)."""
        self.router.update(Placement(self.router.placement.ring, {n: NodeState(s) for n, s in states.items()}))

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass (``Clock.advance`` also runs the calls made for the turn after)."""
        self.clock.advance(seconds)

    def record(self, node: str, key: bytes) -> Record | None:
        record: Record | None = self.links[node].backend.engine.get(key)
        return record

    def holders(self, key: bytes) -> set[str]:
        """The kvstores holding a live record for ``key``."""
        return {
            name
            for name, link in self.links.items()
            if (r := link.backend.engine.get(key)) is not None and r.live(self.clock.seconds())
        }

    def replicas(self, key: bytes) -> tuple[str, ...]:
        return self.router.replicas_for(key)

    def sends(self) -> int:
        return sum(len(link.sent) for link in self.links.values())


def cluster_gaining_d() -> tuple[Cluster, HashRing, HashRing, bytes]:
    """An N=1 cluster of a, b, c, d routing with the ring of a, b, c; that ring, the ring with d, and a key
    d owns in the latter."""
    c = Cluster(count=4, replicas=1, w=1, r=1)
    old = HashRing({"a": 1, "b": 1, "c": 1}, epoch=1)
    new = HashRing({"a": 1, "b": 1, "c": 1, "d": 1}, epoch=2)
    c.router.update(Placement(old))
    key = next(k for k in (b"m%d" % i for i in range(200)) if new.node_for(k) == "d")
    return c, old, new, key


class RouterTests(SynchronousTestCase):
    """Writes reach W replicas of the preference list, reads take the newest of R."""

    def test_set_then_get(self) -> None:
        """A value written through the router is on every up replica and reads back."""
        c = Cluster()
        assert self.successResultOf(c.router.execute(Store("set", b"k", 5, 0, b"v"))) is Status.STORED
        assert c.holders(b"k") == set(c.replicas(b"k"))
        result = self.successResultOf(c.router.execute(Get((b"k", b"missing"))))
        assert [(k, r.value, r.flags) for k, r in result.items] == [(b"k", b"v", 5)]

    def test_writes_only_to_preference_list(self) -> None:
        """With N=2 of 4 nodes, nothing reaches the other nodes (no sloppy quorum), even with one down."""
        c = Cluster(count=4, replicas=2, w=1, r=1)
        key = b"user:1"
        pref = c.replicas(key)
        c.links[pref[0]].mode = "down"
        assert self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v"))) is Status.STORED
        others = set(c.links) - set(pref)
        assert all(not c.links[n].sent for n in others)
        assert c.holders(key) == {pref[1]}

    def test_write_quorum_not_reached(self) -> None:
        """With two of three replicas down and W=2, the write fails and is not reported as done."""
        c = Cluster()
        key = b"k2"
        for name in c.replicas(key)[1:]:
            c.links[name].mode = "down"
        failure = self.failureResultOf(c.router.execute(Store("set", key, 0, 0, b"v")), QuorumNotReached)
        assert "1 of 2" in str(failure.value)
        assert c.router.stats()["quorum_failures"] == 1

    def test_down_node_skipped(self) -> None:
        """A node marked down is not asked at all."""
        c = Cluster()
        key = b"k3"
        down = c.replicas(key)[0]
        c.router.update(Placement(c.router.placement.ring, {down: NodeState.DOWN}))
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v")))
        assert c.links[down].sent == []
        assert self.successResultOf(c.router.execute(Get((key,)))).items[0][1].value == b"v"

    def test_read_takes_newest_and_repairs(self) -> None:
        """A stale replica is outvoted by the newest version and then repaired."""
        c = Cluster(r=3)
        key = b"k4"
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"new")))
        stale = c.replicas(key)[1]
        engine = c.links[stale].backend.engine
        engine.put(key, Record(b"old", version=Version(1, "x")))
        result = self.successResultOf(c.router.execute(Get((key,))))
        assert result.items[0][1].value == b"new"
        assert engine.get(key).value == b"new"
        assert c.router.stats()["read_repairs"] == 1

    def test_read_fails_over(self) -> None:
        """When an asked replica fails, the next one is asked; R answers are still required."""
        c = Cluster()
        key = b"k5"
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v")))
        c.links[c.replicas(key)[0]].mode = "down"
        assert self.successResultOf(c.router.execute(Get((key,)))).items[0][1].value == b"v"
        c.links[c.replicas(key)[1]].mode = "down"
        self.failureResultOf(c.router.execute(Get((key,))), QuorumNotReached)

    def test_read_waits_for_quorum(self) -> None:
        """A read answers only once R replicas answered."""
        c = Cluster()
        key = b"k6"
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v")))
        second = c.replicas(key)[1]
        c.links[second].mode = "hang"
        d = c.router.execute(Get((key,)))
        self.assertNoResult(d)
        link = c.links[second]
        assert link.held_commands == [XVer(key)]  # the second replica is asked for its version only
        link.held.pop().callback(link.backend.execute(link.held_commands.pop()))
        assert self.successResultOf(d).items[0][1].value == b"v"

    def test_multi_get_one_request_per_node(self) -> None:
        """A get of many keys sends at most one XGet to each node."""
        c = Cluster()
        keys = [b"m%d" % i for i in range(30)]
        for key in keys:
            self.successResultOf(c.router.execute(Store("set", key, 0, 0, key)))
        before = {n: len(link.sent) for n, link in c.links.items()}
        result = self.successResultOf(c.router.execute(Get(tuple(keys))))
        assert [k for k, _ in result.items] == keys
        assert all(len(link.sent) - before[n] <= 1 for n, link in c.links.items())

    def test_expired_and_deleted_are_misses(self) -> None:
        """A tombstone or an expired record reads as absent."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"t", 0, 10, b"v")))
        self.successResultOf(c.router.execute(Store("set", b"d", 0, 0, b"v")))
        assert self.successResultOf(c.router.execute(Delete(b"d"))) is Status.DELETED
        assert self.successResultOf(c.router.execute(Delete(b"d"))) is Status.NOT_FOUND
        c.clock.advance(11)
        assert self.successResultOf(c.router.execute(Get((b"t", b"d")))).items == ()

    def test_tombstone_replicated(self) -> None:
        """A delete leaves a tombstone on W replicas, so a stale replica cannot resurrect the key."""
        c = Cluster(r=3)
        self.successResultOf(c.router.execute(Store("set", b"z", 0, 0, b"v")))
        self.successResultOf(c.router.execute(Delete(b"z")))
        stones = [link.backend.engine.get(b"z") for link in c.links.values()]
        assert sum(1 for s in stones if s is not None and s.tombstone) >= 2
        assert self.successResultOf(c.router.execute(Get((b"z",)))).items == ()


class ReadModifyWriteTests(SynchronousTestCase):
    """cas, incr/decr, append/prepend, add/replace and touch run at the primary, then replicate."""

    def test_incr_at_primary_then_replicated(self) -> None:
        """incr returns the new number and every replica holds it."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"10")))
        assert self.successResultOf(c.router.execute(Arith(b"n", 5))) == Number(15)
        assert self.successResultOf(c.router.execute(Arith(b"n", 20, incr=False))) == Number(0)
        values = {c.links[n].backend.engine.get(b"n").value for n in c.replicas(b"n")}
        assert values == {b"0 "}  # memcached keeps the length of a decremented value, padding with spaces
        assert self.successResultOf(c.router.execute(Arith(b"absent", 1))) is Status.NOT_FOUND

    def test_cas(self) -> None:
        """gets gives the cas unique; cas with it stores, with a stale one answers EXISTS."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"c", 0, 0, b"1")))
        ((_, record),) = self.successResultOf(c.router.execute(Get((b"c",), cas=True))).items
        unique = record.version.cas
        assert self.successResultOf(c.router.execute(Store("cas", b"c", 0, 0, b"2", unique))) is Status.STORED
        assert self.successResultOf(c.router.execute(Store("cas", b"c", 0, 0, b"3", unique))) is Status.EXISTS
        assert self.successResultOf(c.router.execute(Store("cas", b"nope", 0, 0, b"3", 1))) is Status.NOT_FOUND

    def test_conditions(self) -> None:
        """add, replace, append and prepend answer as memcached does."""
        c = Cluster()
        run = lambda cmd: self.successResultOf(c.router.execute(cmd))  # noqa: E731
        assert run(Store("replace", b"a", 0, 0, b"x")) is Status.NOT_STORED
        assert run(Store("add", b"a", 0, 0, b"x")) is Status.STORED
        assert run(Store("add", b"a", 0, 0, b"y")) is Status.NOT_STORED
        assert run(Store("append", b"a", 0, 0, b">")) is Status.STORED
        assert run(Store("prepend", b"a", 0, 0, b"<")) is Status.STORED
        assert run(Get((b"a",))).items[0][1].value == b"<x>"

    def test_a_copy_refused_late_is_sent_again_once_acknowledged(self) -> None:
        """The third replica's copy of an incr comes after the command's deadline and is refused; the result
        was acknowledged by the primary and Q (W=2), so the third gets it again without a lease, as a read
        repair: every replica holds it, not only after anti-entropy's next pass. When Q's copy is late too,
        the result is not acknowledged, and neither gets it again."""
        for acknowledged in (True, False):
            c = Cluster()
            self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
            p, q, third = c.replicas(b"n")
            late = (third,) if acknowledged else (q, third)
            for node in late:
                hold(c.links[node], XPut)
            incr = c.router.execute(Arith(b"n", 1))
            if acknowledged:
                assert self.successResultOf(incr) == Number(2)
            c.advance(2.1)  # past the command's deadline
            for node in late:
                c.links[node].resume()  # the copy, refused (and held again if sent again)
            stats = c.router.stats()
            assert stats["rmw_copies_refused_deadline_total"] == len(late)
            assert stats["rmw_copies_resent_total"] == (1 if acknowledged else 0)
            for node in late:
                c.links[node].resume()
            if acknowledged:
                assert [c.record(n, b"n").value for n in (p, q, third)] == [b"2", b"2", b"2"]  # type: ignore[union-attr]
            else:
                self.failureResultOf(incr, ServiceUnavailable)
                assert [c.record(n, b"n").value for n in (p, q, third)] == [b"2", b"1", b"1"]  # type: ignore[union-attr]

    def test_a_kvstore_that_just_started_gets_the_copies_of_results(self) -> None:
        """A kvstore that started 3.5 s ago or less grants no lease and refuses the copies of results (it
        may have forgotten a lease that conflicts). Once a result is acknowledged by the other two, it gets
        a copy without a lease: the first increments after a cluster starts reach every replica."""
        c = Cluster()
        third = c.replicas(b"n")[2]
        c.links[third].backend = LocalBackend(MemoryEngine(), third, c.clock, 1024 * 1024, restarted=True)
        assert self.successResultOf(c.router.execute(Arith(b"n", 1, vivify=0, initial=5))) == Number(5)
        assert self.successResultOf(c.router.execute(Arith(b"n", 10))) == Number(15)
        stats = c.router.stats()
        assert (stats["rmw_copies_refused_leased_total"], stats["rmw_copies_resent_total"]) == (2, 2)
        assert [c.record(n, b"n").value for n in c.replicas(b"n")] == [b"15", b"15", b"15"]  # type: ignore[union-attr]

    def test_rmw_primary_down_uses_next(self) -> None:
        """With the first replica down, the next up one acts as primary."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"p", 0, 0, b"1")))
        first = c.replicas(b"p")[0]
        c.links[first].mode = "down"
        c.router.update(Placement(c.router.placement.ring, {first: NodeState.DOWN}))
        assert self.successResultOf(c.router.execute(Arith(b"p", 1))) == Number(2)

    def test_gat_touches_and_returns(self) -> None:
        """gat returns the value and moves the expiry on the replicas."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"g", 0, 10, b"v")))
        result = self.successResultOf(c.router.execute(Get((b"g", b"none"), exptime=100)))
        assert [(k, r.value) for k, r in result.items] == [(b"g", b"v")]
        c.clock.advance(50)
        assert self.successResultOf(c.router.execute(Get((b"g",)))).items[0][1].value == b"v"
        assert self.successResultOf(c.router.execute(Touch(b"none", 5))) is Status.NOT_FOUND

    def test_stale_map_refuses_read_modify_writes(self) -> None:
        """While the map may be stale (no Raft leader heard from), every read-modify-write, gat included, is
        refused with MapNotCurrent before anything is sent, and counted; get and set still run; once the map
        is current again, they run."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        c.router.map_current = False
        sent = c.sends()
        refused = [
            Arith(b"n", 1),
            Arith(b"n", 1, incr=False),
            Delete(b"n"),
            Touch(b"n", 10),
            Get((b"n",), exptime=10),
            *(Store(mode, b"n", 0, 0, b"x", 1) for mode in ("add", "replace", "append", "prepend", "cas")),
        ]
        for command in refused:
            failure = self.failureResultOf(c.router.execute(command), MapNotCurrent)
            assert "Raft leader" in str(failure.value)
        assert c.sends() == sent
        assert c.router.stats()["rmw_refused_stale_map_total"] == len(refused)
        assert self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"5"))) is Status.STORED
        assert self.successResultOf(c.router.execute(Get((b"n",)))).items[0][1].value == b"5"
        c.router.map_current = True
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(6)

    def test_flush_all_off_by_default(self) -> None:
        """flush_all is refused unless enabled, then reaches every node."""
        c = Cluster()
        self.failureResultOf(c.router.execute(FlushAll()), RequestError)
        c = Cluster(flush=True)
        self.successResultOf(c.router.execute(Store("set", b"f", 0, 0, b"v")))
        assert self.successResultOf(c.router.execute(FlushAll())) is Status.OK
        assert c.holders(b"f") == set()


class MapFenceTests(SynchronousTestCase):
    """A read-modify-write runs by one map: a primary that knows a newer map refuses it (nothing applied) and
    it starts over once the router's map reaches that epoch; a map that changes under it starts it over."""

    def announce(self, c: Cluster, epoch: int, **states: str) -> None:
        """The router routes by the map of ``epoch`` (node states as given), its connections name it."""
        for link in c.links.values():  # first, as DataPlane.follow does: commands routed by it carry it
            link.epoch = epoch
        ring = HashRing(dict.fromkeys(c.links, 1), epoch=epoch)
        c.router.update(Placement(ring, {n: NodeState(s) for n, s in states.items()}))

    def test_waits_for_the_map_the_primary_knows(self) -> None:
        """The primary knows epoch 2 while the router routes by 1: its xapply is refused; once the router's
        map reaches 2 the command starts over (read included) and applies once."""
        c = Cluster()
        self.announce(c, 1)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        primary = c.replicas(b"n")[0]
        c.links[primary].backend.know_epoch(2)
        d = c.router.execute(Arith(b"n", 1))
        self.assertNoResult(d)
        assert c.links[primary].backend.stats()["xapply_stale_map"] == 1
        self.announce(c, 2)
        assert self.successResultOf(d) == Number(2)
        assert {c.record(n, b"n").value for n in c.replicas(b"n")} == {b"2"}  # type: ignore[union-attr]
        assert c.router.stats()["rmw_map_waits_total"] == 1
        assert c.clock.getDelayedCalls() == []

    def test_fails_when_the_map_does_not_catch_up(self) -> None:
        """A map that does not reach the primary's epoch within ``map_wait``: MapNotCurrent, nothing applied."""
        c = Cluster()
        self.announce(c, 1)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        for link in c.links.values():
            link.backend.know_epoch(3)
        d = c.router.execute(Arith(b"n", 1))
        c.advance(c.router.map_wait)
        failure = self.failureResultOf(d, MapNotCurrent)
        assert "epoch 3" in str(failure.value)
        assert {c.record(n, b"n").value for n in c.replicas(b"n")} == {b"1"}  # type: ignore[union-attr]

    def test_a_map_that_changes_under_the_command(self) -> None:
        """The map changes while the command reads (its primary marked down): it starts over by the new map
        and applies at the new primary; the old one runs nothing."""
        c = Cluster()
        self.announce(c, 1)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        old, new = c.replicas(b"n")[:2]
        c.links[old].mode = "hang"
        d = c.router.execute(Arith(b"n", 1))
        self.announce(c, 2, **{old: "down"})
        c.links[old].resume()
        assert self.successResultOf(d) == Number(2)
        assert not any(type(cmd) is XApply for cmd in c.links[old].sent)
        assert [type(cmd) for cmd in c.links[new].sent].count(XApply) == 1

    def test_reads_every_replica_its_result_must_reach(self) -> None:
        """With W=N (max(N - W + 1, R) is one replica), the read before a read-modify-write still asks W
        replicas: each one its result must reach grants the command's lease before anything is applied (a
        kvstore in its start-up pause refuses the read, and the round waits, instead of refusing the copy of
        a result already applied). After a node is up again, the prior primary is among them."""
        c = Cluster(w=3, r=1)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        sent_gets = lambda: {n for n, link in c.links.items() for cmd in link.sent if type(cmd) is XLease}  # noqa: E731
        for link in c.links.values():
            link.sent.clear()
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)
        assert sent_gets() == set(c.replicas(b"n"))
        first = c.replicas(b"n")[0]
        self.announce(c, 2, **{first: "down"})
        self.announce(c, 3)
        for link in c.links.values():
            link.sent.clear()
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(3)
        assert sent_gets() == set(c.replicas(b"n"))


class TwoGatewayFenceTests(SynchronousTestCase):
    """Two gateways a map change apart, over the same kvstores: the new map marks the key's primary down, the
    gateway still on the old map reaches it, no gateway on the new map does. The primary applies the late
    gateway's command (it knows no newer map), but its result is copied to the other replicas fenced by the
    command's epoch (``XPut.epoch``), which replicas that know the newer map refuse: two primaries never both
    answer the same read-modify-write."""

    def late_and_new(self, epoch: int = 2) -> tuple[Cluster, Router, dict[str, Link], str]:
        """Routers ``gw1`` (the cluster's, epoch 1, every node up: one heartbeat behind) and ``gw2`` (``epoch``,
        2 by default, the key's primary down and unreachable: the leader's side); ``n`` = 1 on every replica.
        The second router, its links, and the primary."""
        c = Cluster()
        for link in c.links.values():
            link.epoch = 1
        c.router.update(Placement(HashRing(dict.fromkeys(c.links, 1), epoch=1)))
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        primary = c.replicas(b"n")[0]
        links = {name: Link(link.backend) for name, link in c.links.items()}
        newer = Router("gw2", c.clock, links.__getitem__)
        links[primary].mode = "down"
        for name, link in links.items():  # as DataPlane.follow does: its connections name the epoch (xmap)
            link.epoch = epoch
            if name != primary:
                link.backend.know_epoch(epoch)
        newer.update(Placement(HashRing(dict.fromkeys(c.links, 1), epoch=epoch), {primary: NodeState.DOWN}))
        return c, newer, links, primary

    def test_late_primary_result_is_not_acknowledged(self) -> None:
        """The late gateway reads the key (1) at the primary (held) and the next replica, shared; the new map's
        gateway's shared lease there is refused while the late command's lease, of another map epoch, lasts.
        The old primary then applies the late increment on its own 1 (2): the replicas that know epoch 2
        refuse its copies, so the late gateway fails the command (not acknowledged) and releases its lease
        with the version it left as floor; the new map's command increments once that floor is half a second
        behind, so its result (2, acknowledged) is newer than the one the old primary kept, and the next
        command builds on it (3)."""
        c, newer, _, primary = self.late_and_new()
        c.links[primary].mode = "hang"
        late = c.router.execute(Arith(b"n", 1))  # reads the primary (held) and the next replica (1)
        self.assertNoResult(late)
        acknowledged = newer.execute(Arith(b"n", 1))
        self.assertNoResult(acknowledged)  # the next replica is leased to the late command
        c.links[primary].resume()
        self.assertNoResult(late)  # waits for its map to reach epoch 2, which the refusing replicas know
        c.router.update(newer.placement)  # its primary down there: the copies do not go again
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 2" in str(failure.value) and "not acknowledged" in str(failure.value)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0
        fork = c.record(primary, b"n")
        assert fork is not None and fork.value == b"2"  # applied there, unacknowledged
        c.advance(1)
        assert self.successResultOf(acknowledged) == Number(2)
        others = [n for n in c.replicas(b"n") if n != primary]
        assert [c.record(n, b"n").value for n in others] == [b"2", b"2"]  # type: ignore[union-attr]
        assert all(fork.version < c.record(n, b"n").version for n in others)  # type: ignore[union-attr]
        assert sum(c.links[n].backend.stats()["xput_stale_map"] for n in others) == 2
        assert c.router.stats()["rmw_copies_refused_stale_map_total"] == 2
        assert self.successResultOf(newer.execute(Arith(b"n", 1))) == Number(3)
        assert c.clock.getDelayedCalls() == []

    def test_the_late_failure_releases_with_its_version_as_floor(self) -> None:
        """The same race with the new map's gateway's clock 200 ms behind (within the 250 ms bound): the late
        command fails at once and releases its lease at Y naming the version it left at X as floor, so Y
        grants the new map's command only once its clock is half a second past that version, and the version
        the lagging gateway then picks is still newer than the one X kept."""
        c, _, _, x = self.late_and_new()
        lag = Clock()
        lag.advance(c.clock.seconds() - 0.2)
        links = {name: Link(link.backend) for name, link in c.links.items()}
        for link in links.values():
            link.epoch = 2
        newer = Router("gw2", lag, links.__getitem__)
        newer.update(Placement(HashRing(dict.fromkeys(c.links, 1), epoch=2), {x: NodeState.DOWN}))
        links[x].mode = "down"
        c.links[x].mode = "hang"
        late = c.router.execute(Arith(b"n", 1))
        acknowledged = newer.execute(Arith(b"n", 1))
        c.links[x].resume()
        c.router.update(newer.placement)
        self.failureResultOf(late, ServiceUnavailable)
        fork = c.record(x, b"n")
        assert fork is not None and fork.value == b"2"
        releases = [cmd for link in c.links.values() for cmd in link.sent if type(cmd) is XRelease]
        assert [r.floor for r in releases] == [fork.version.millis]
        for _ in range(100):
            c.clock.advance(0.01)
            lag.advance(0.01)
        assert self.successResultOf(acknowledged) == Number(2)
        y = c.replicas(b"n")[1]
        kept = c.record(y, b"n")
        assert kept is not None and kept.version > fork.version
        assert c.links[y].backend.execute(XPut(b"n", fork)) is Status.EXISTS

    def test_a_copy_taken_before_the_newer_map_is_read_by_it(self) -> None:
        """The late gateway's copies reach the replicas before they learn epoch 2: its command is
        acknowledged (2), and the new map's gateway, whose read comes after its xmap on the same connection,
        reads that result and increments on top of it (3)."""
        c, newer, links, primary = self.late_and_new()
        for link in c.links.values():
            link.backend.map_epoch = 1  # epoch 2 not known yet anywhere
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)
        for name in links:
            if name != primary:
                links[name].backend.know_epoch(2)
        assert self.successResultOf(newer.execute(Arith(b"n", 1))) == Number(3)

    def test_a_late_result_left_on_the_old_primary_never_wins(self) -> None:
        """W2. The late gateway (epoch 1) reads the old primary X (held: its answer comes late) and Y, shared; the
        new map's gateway (epoch 2: X down) appends at Y, the primary now, and its result is acknowledged.
        Then X answers, and the late gateway appends at X on X's own record, with a version picked later: its
        copies are refused (Y and the third know epoch 2) and it fails, but X keeps that result. It must never
        win a comparison over the acknowledged one (read repair, anti-entropy, the handoff would spread it and
        lose the acknowledged append): the new map's command is ordered with the late one at the replica both
        read, and ends up newer than whatever the late one left, or built on it. The same with the new gateway
        two maps ahead (epoch 3)."""
        for epoch in (2, 3):
            self.w2(epoch)

    def w2(self, epoch: int) -> None:
        c, newer, _, x = self.late_and_new(epoch)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"x")))  # every node on epoch 1 knows it
        y, third = [n for n in c.replicas(b"n") if n != x]
        c.links[x].mode = "hang"
        late = c.router.execute(Store("append", b"n", 0, 0, b"a"))  # reads X (held) and Y ("x")
        self.assertNoResult(late)
        acknowledged = newer.execute(Store("append", b"n", 0, 0, b"b"))
        c.advance(0.01)
        c.links[x].resume()  # X answers "x": the late append runs there ("xa"), its copies are refused
        for _ in range(60):
            c.advance(0.1)
        assert self.successResultOf(acknowledged) is Status.STORED
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "not acknowledged" in str(failure.value)
        kept = c.record(y, b"n")
        assert kept is not None and b"b" in kept.value
        assert c.record(third, b"n") == kept
        fork = c.record(x, b"n")
        assert fork is not None
        if b"b" not in fork.value:  # a result computed without the acknowledged append: older, it loses
            assert fork.version < kept.version
            assert c.links[y].backend.execute(XPut(b"n", fork)) is Status.EXISTS
        assert c.clock.getDelayedCalls() == []

    def test_copies_carry_the_command_epoch(self) -> None:
        """The copies of a result name the epoch of the map the command ran by; a router with no map epoch (0)
        sends plain copies."""
        c = Cluster()

        def copies(value: bytes) -> set[int]:
            sent = [cmd for link in c.links.values() for cmd in link.sent if type(cmd) is XPut]
            found = [cmd.epoch for cmd in sent if cmd.record.value == value]
            assert len(found) == 2
            return set(found)

        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)
        assert copies(b"2") == {1}
        c.router.update(Placement(HashRing(dict.fromkeys(c.links, 1), epoch=0)))
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(3)
        assert copies(b"3") == {0}


class RefenceTests(SynchronousTestCase):
    """A kvstore V comes back (map epoch 3: V up again, the key's primary) while a gateway is still on epoch 2
    (V down, the primary B, the next replica). B knows only epoch 2 and applies that gateway's command; the
    other replicas know epoch 3 and refuse its copies (fenced by 2). The command waits for its gateway's map
    to reach 3 and, as every gateway on 3 reads B before its own commands, sends the copies again fenced by 3
    to the new map's replicas: acknowledged, not a failure. So after a ring change (a join, a drain or a
    weight change) that keeps B among the replicas the new map reads first. Not when that is unsound: B down
    in the new map, a map between (the epoch jumped by 2), B no longer a replica or moved back in the list,
    or a replica that knows a later map still."""

    def route(
        self,
        c: Cluster,
        epoch: int,
        down: str | None = None,
        ring: HashRing | None = None,
        previous: HashRing | None = None,
        leaving: str | None = None,
    ) -> None:
        """The cluster's router routes by the map of ``epoch`` (``down`` marked down, ``leaving`` leaving, the
        others up; ``previous`` the ring of a move under way), its connections name it."""
        for link in c.links.values():
            link.epoch = epoch
        ring = ring or HashRing(dict.fromkeys(c.links, 1), epoch=epoch)
        states = {down: NodeState.DOWN} if down else {}
        if leaving:
            states[leaving] = NodeState.LEAVING
        c.router.update(Placement(ring, states, previous))

    def returning(self, known: int = 3) -> tuple[Cluster, str, str, str]:
        """``n`` = 1 everywhere (epoch 1), then 41 while its primary V is down (epoch 2); V runs again and V and
        the third replica know epoch ``known``, B only 2; the cluster's router is still on epoch 2. The
        cluster, V, B and the third replica."""
        c = Cluster()
        v, b, third = c.replicas(b"n")
        self.route(c, 1)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        c.links[v].mode = "down"
        self.route(c, 2, down=v)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"41")))
        c.links[v].mode = "up"
        for node in (v, third):
            c.links[node].backend.know_epoch(known)
        return c, v, b, third

    def newer(self, c: Cluster, epoch: int = 3, previous: HashRing | None = None) -> Router:
        """A second gateway over the same kvstores, on the map of ``epoch`` with every node up (``previous``:
        the ring of a move under way)."""
        links = {name: Link(link.backend) for name, link in c.links.items()}
        for link in links.values():
            link.epoch = epoch
        router = Router("gw2", c.clock, links.__getitem__)
        router.update(Placement(HashRing(dict.fromkeys(c.links, 1), epoch=epoch), {}, previous))
        return router

    def changing(
        self,
        old: HashRing,
        new: HashRing,
        pick: Callable[[tuple[str, ...], tuple[str, ...]], bool],
        w: int = 2,
        unaware: tuple[str, ...] = (),
    ) -> tuple[Cluster, bytes, Deferred[Any]]:
        """kvstores a..d (N=3, W=``w``, R=2) routing by ``old`` (epoch 1); a key whose preference lists by
        ``old`` and ``new`` ``pick`` accepts = 41 on its replicas; the ring changes to ``new``, which every
        kvstore but the key's primary (and ``unaware``) knows; the cluster's router, still on epoch 1,
        increments the key: applied at the primary, waiting. The cluster, the key and the increment."""
        key = next(
            k for k in (b"n%d" % i for i in range(400)) if pick(old.preference_list(k, 3), new.preference_list(k, 3))
        )
        c = Cluster(count=4, w=w)
        self.route(c, 1, ring=old)
        assert self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"41"))) is Status.STORED
        primary = c.replicas(key)[0]
        for node, link in c.links.items():
            if node != primary and node not in unaware:
                link.backend.know_epoch(new.epoch)
        late = c.router.execute(Arith(key, 1))
        self.assertNoResult(late)
        return c, key, late

    def value(self, c: Cluster, node: str, key: bytes) -> bytes | None:
        record = c.record(node, key)
        return record.value if record is not None and not record.tombstone else None

    def values(self, c: Cluster) -> list[bytes | None]:
        return [r.value if (r := c.record(n, b"n")) is not None and not r.tombstone else None for n in c.replicas(b"n")]

    def test_the_copies_go_again_fenced_by_the_next_map(self) -> None:
        """The CI case: a delete at B by epoch 2, its copy refused by a replica on epoch 3; once the gateway's
        map reaches 3 the copies go to V and the third replica fenced by 3: DELETED, the key gone everywhere."""
        c, v, b, third = self.returning()
        late = c.router.execute(Delete(b"n"))
        self.assertNoResult(late)
        assert c.record(b, b"n").tombstone and not c.record(third, b"n").tombstone  # type: ignore[union-attr]
        assert c.router.stats()["rmw_copies_refused_stale_map_total"] == 1
        for link in c.links.values():
            link.sent.clear()
        self.route(c, 3)
        assert self.successResultOf(late) is Status.DELETED
        assert c.holders(b"n") == set()
        fenced = {n: [cmd.epoch for cmd in link.sent if type(cmd) is XPut] for n, link in c.links.items()}
        assert fenced == {v: [3], b: [], third: [3]}
        assert c.router.stats()["rmw_copies_refenced_total"] == 1
        assert c.router.stats()["quorum_failures"] == 0
        assert self.successResultOf(self.newer(c).execute(Arith(b"n", 1))) is Status.NOT_FOUND
        assert c.clock.getDelayedCalls() == []

    def test_a_command_of_the_next_map_builds_on_the_late_result(self) -> None:
        """Between B's apply (42) and the re-fence, a gateway on epoch 3 increments at V: it read B (after its
        xmap 3 there), so it applies on top of 42 (43). The late copies then meet 43 at V (EXISTS: a newer
        record built on them) and count: both increments acknowledged, in that order, 43 on V and B."""
        c, v, b, third = self.returning()
        late = c.router.execute(Arith(b"n", 1))
        self.assertNoResult(late)
        assert self.values(c) == [b"1", b"42", b"41"]  # V holds what it had before it went down
        newer = self.newer(c)
        assert self.successResultOf(newer.execute(Arith(b"n", 1))) == Number(43)
        self.route(c, 3)
        assert self.successResultOf(late) == Number(42)
        # The newer command's copy met the late command's exclusive lease at the third replica (its map moved
        # the primary from V to B) and was refused: W = 2 held 43, then the third got it without a lease; the
        # late copy (42) met it there (EXISTS).
        assert self.values(c) == [b"43", b"43", b"43"]
        assert newer.stats()["rmw_copies_resent_total"] == 1

    def test_fails_when_the_map_does_not_catch_up(self) -> None:
        """The gateway's map does not reach epoch 3 within ``map_wait``: the command fails as before the
        re-fence (not acknowledged, the value may or may not have changed), no timer left."""
        c, _, _, _ = self.returning()
        late = c.router.execute(Arith(b"n", 1))
        c.advance(c.router.map_wait)
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 3 refused its result" in str(failure.value) and "not acknowledged" in str(failure.value)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0
        assert c.clock.getDelayedCalls() == []

    def test_fails_when_the_epoch_jumped_by_two(self) -> None:
        """The refusing replicas know epoch 4: a map between the command's and that one may have named another
        primary, whose gateways need not read B. The command fails once the gateway reaches 4."""
        c, _, _, third = self.returning(known=4)
        late = c.router.execute(Arith(b"n", 1))
        self.assertNoResult(late)
        self.route(c, 4)
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 4 refused its result" in str(failure.value)
        assert c.record(third, b"n").value == b"41"  # type: ignore[union-attr]
        assert c.router.stats()["rmw_copies_refenced_total"] == 0

    def test_fails_when_the_map_moved_past_the_next_one(self) -> None:
        """The replicas knew epoch 3 when they refused, but the gateway's map is 4 by the time it wakes: fails."""
        c, _, _, _ = self.returning()
        late = c.router.execute(Arith(b"n", 1))
        self.route(c, 4)
        self.failureResultOf(late, ServiceUnavailable)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0

    def test_a_weight_change_that_keeps_the_primary_read_first(self) -> None:
        """Epoch 3 also changes a node's weight (other preference lists), but B stays among the key's first two
        up replicas, which every gateway on 3 reads: the copies go again, acknowledged."""
        c, v, b, third = self.returning()
        late = c.router.execute(Arith(b"n", 1))
        self.assertNoResult(late)
        ring = HashRing({v: 1, b: 1, third: 2}, epoch=3)
        self.route(c, 3, ring=ring, previous=HashRing(dict.fromkeys(c.links, 1), epoch=2))
        assert b in ring.preference_list(b"n", 3)[:2]
        assert self.successResultOf(late) == Number(42)
        assert c.router.stats()["rmw_copies_refenced_total"] == 1

    def test_the_copies_go_again_after_a_join(self) -> None:
        """d joins (epoch 2) and becomes the key's primary; the old primary b, second now, applied an increment
        by epoch 1 and c and a refused its copies. Once the gateway reaches epoch 2 the copies go to d and c
        (the new map's replicas; not to a, which the key left), fenced by 2: acknowledged, whether or not this
        gateway still sees the move under way (every gateway on 2 reads d and b first either way). A gateway
        on 2 then increments on top of it, and the new replicas end with 43."""
        old = HashRing(dict.fromkeys("abc", 1), epoch=1)
        new = HashRing(dict.fromkeys("abcd", 1), epoch=2)
        for previous in (old, None):
            c, key, late = self.changing(old, new, lambda _, after: after[0] == "d")
            assert (c.replicas(key), new.preference_list(key, 3)) == (("b", "c", "a"), ("d", "b", "c"))
            assert [self.value(c, n, key) for n in "abcd"] == [b"41", b"42", b"41", None]
            for link in c.links.values():
                link.sent.clear()
            self.route(c, 2, ring=new, previous=previous)
            assert self.successResultOf(late) == Number(42)
            fenced = {n: [cmd.epoch for cmd in link.sent if type(cmd) is XPut] for n, link in c.links.items()}
            assert fenced == {"a": [], "b": [], "c": [2], "d": [2]}
            assert c.router.stats()["rmw_copies_refenced_total"] == 1
            assert self.successResultOf(self.newer(c, 2, previous=old).execute(Arith(key, 1))) == Number(43)
            assert [self.value(c, n, key) for n in "bcd"] == [b"43", b"43", b"43"]
            assert c.clock.getDelayedCalls() == []

    def test_a_copy_taken_by_a_node_the_new_map_drops_does_not_count(self) -> None:
        """W = 3: a (the key's last replica, which the join of d pushes out) still knew only epoch 1 and took
        the copy; c refused it. After the re-fence W counts on the new map's list (d, b, c): b's apply and c's
        copy make 2, d is unreachable, and a's copy does not stand in for it: the command fails."""
        old = HashRing(dict.fromkeys("abc", 1), epoch=1)
        new = HashRing(dict.fromkeys("abcd", 1), epoch=2)
        c, key, late = self.changing(old, new, lambda _, after: after[0] == "d", w=3, unaware=("a",))
        assert [self.value(c, n, key) for n in "abc"] == [b"42", b"42", b"41"]
        c.links["d"].mode = "down"
        self.route(c, 2, ring=new, previous=old)
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 2 refused its result" in str(failure.value)
        assert c.router.stats()["rmw_copies_refenced_total"] == 1
        assert self.value(c, "c", key) == b"42"

    def test_fails_when_the_new_map_drains_the_primary(self) -> None:
        """Epoch 2 drains the key's primary b (leaving: out of the ring, a previous owner of its keys). Gateways
        on 2 read b only while their own monitor sees the move under way; one that saw b's handoff end reads
        the new replicas first, which need not hold the result yet: the copies do not go again."""
        old = HashRing(dict.fromkeys("abcd", 1), epoch=1)
        new = HashRing(dict.fromkeys("acd", 1), epoch=2)
        c, key, late = self.changing(old, new, lambda before, _: before[0] == "b")
        self.route(c, 2, ring=new, previous=old, leaving="b")
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 2 refused its result" in str(failure.value)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0
        assert {self.value(c, n, key) for n in old.preference_list(key, 3) if n != "b"} == {b"41"}

    def test_fails_when_a_weight_change_moves_the_primary_back(self) -> None:
        """Epoch 2 raises two nodes' weights: the key's old primary b is its third replica now, which gateways
        on 2 do not read first (R = 2): the copies do not go again."""
        old = HashRing(dict.fromkeys("abcd", 1), epoch=1)
        new = HashRing({"a": 1, "b": 1, "c": 3, "d": 3}, epoch=2)
        c, key, late = self.changing(old, new, lambda before, after: before[0] == after[2] == "b")
        self.route(c, 2, ring=new, previous=old)
        self.failureResultOf(late, ServiceUnavailable)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0

    def test_fails_when_a_join_comes_two_maps_later(self) -> None:
        """The refusing replicas know epoch 3, a join (a map between may have named another primary): fails."""
        old = HashRing(dict.fromkeys("abc", 1), epoch=1)
        new = HashRing(dict.fromkeys("abcd", 1), epoch=3)
        c, _, late = self.changing(old, new, lambda _, after: after[0] == "d")
        self.route(c, 3, ring=new, previous=old)
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 3 refused its result" in str(failure.value)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0

    def test_fails_when_the_next_map_does_not_read_the_primary(self) -> None:
        """B kept a command waiting (stalled): the late gateway's primary is the third replica, which gateways on
        epoch 3 do not read (they read V and B, the prior primary): its copies do not go again."""
        c, v, b, third = self.returning()
        c.links[third].backend.map_epoch = 2
        c.links[b].backend.know_epoch(3)
        c.router._mark_stalled(b)  # as its primary timeout does
        late = c.router.execute(Arith(b"n", 1))
        self.assertNoResult(late)
        assert self.values(c) == [b"1", b"41", b"42"]
        self.route(c, 3)
        self.failureResultOf(late, ServiceUnavailable)
        assert c.router.stats()["rmw_copies_refenced_total"] == 0

    def test_fails_when_a_replica_knows_a_later_map_still(self) -> None:
        """V and the third replica learn epoch 4 before the copies fenced by 3 reach them: refused again, the
        command fails, naming epoch 4."""
        c, v, _, third = self.returning()
        late = c.router.execute(Arith(b"n", 1))
        for node in (v, third):
            c.links[node].backend.know_epoch(4)
        self.route(c, 3)
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "epoch 4 refused its result" in str(failure.value)
        assert c.router.stats()["rmw_copies_refenced_total"] == 1
        assert c.router.stats()["rmw_copies_refused_stale_map_total"] == 3


class MissedWritesTests(SynchronousTestCase):
    """A primary that missed writes (down, paused, cut off) answers read-modify-writes as one memcached would:
    the router reads the newest record from N-W+1 replicas and brings the primary up to date first."""

    def missed(self, c: Cluster, key: bytes, value: bytes = b"5") -> str:
        """Write ``key`` while its primary is down, then mark the primary up again; the primary's id."""
        primary = c.replicas(key)[0]
        c.links[primary].mode = "down"
        c.mark(**{primary: "down"})
        assert self.successResultOf(c.router.execute(Store("set", key, 0, 0, value))) is Status.STORED
        c.links[primary].mode = "up"
        c.mark()
        assert c.record(primary, key) is None
        return primary

    def test_delete_after_the_primary_missed_the_set(self) -> None:
        """delete answers DELETED (not NOT_FOUND) and the key is gone on every replica."""
        c = Cluster()
        self.missed(c, b"k")
        assert self.successResultOf(c.router.execute(Delete(b"k"))) is Status.DELETED
        assert c.holders(b"k") == set()
        assert self.successResultOf(c.router.execute(Get((b"k",)))) == Values(())
        assert c.router.stats()["rmw_catchups_total"] == 1

    def test_add_after_the_primary_missed_the_set(self) -> None:
        """add answers NOT_STORED and the acknowledged value stays, on the primary too."""
        c = Cluster()
        primary = self.missed(c, b"k", b"acked")
        assert self.successResultOf(c.router.execute(Store("add", b"k", 0, 0, b"other"))) is Status.NOT_STORED
        assert self.successResultOf(c.router.execute(Get((b"k",)))).items[0][1].value == b"acked"
        record = c.record(primary, b"k")
        assert record is not None and record.value == b"acked"

    def test_incr_after_the_primary_missed_the_set(self) -> None:
        """incr finds the counter and every replica ends with the new number."""
        c = Cluster()
        self.missed(c, b"n", b"41")
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(42)
        assert {c.record(n, b"n").value for n in c.replicas(b"n")} == {b"42"}  # type: ignore[union-attr]

    def test_primary_missed_a_delete(self) -> None:
        """A primary that missed a delete does not resurrect the key: incr answers NOT_FOUND, add stores."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"d", 0, 0, b"1")))
        primary = c.replicas(b"d")[0]
        c.links[primary].mode = "down"
        c.mark(**{primary: "down"})
        assert self.successResultOf(c.router.execute(Delete(b"d"))) is Status.DELETED
        c.links[primary].mode = "up"
        c.mark()
        assert c.record(primary, b"d").tombstone is False  # type: ignore[union-attr]
        assert self.successResultOf(c.router.execute(Arith(b"d", 1))) is Status.NOT_FOUND
        assert self.successResultOf(c.router.execute(Store("add", b"d", 0, 0, b"new"))) is Status.STORED
        assert self.successResultOf(c.router.execute(Get((b"d",)))).items[0][1].value == b"new"

    def test_reads_before_applying_meet_every_write_quorum(self) -> None:
        """N=3, W=2: two replicas are read (the primary and the next); W=1 needs all three, and with one of
        them down the command fails rather than answering from a replica that may have missed the write."""
        c = Cluster()
        key = b"q"
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"1")))
        before = {n: list(c.links[n].sent) for n in c.links}
        self.successResultOf(c.router.execute(Arith(key, 1)))
        reads = [n for n in c.links if any(type(cmd) is XLease for cmd in c.links[n].sent[len(before[n]) :])]
        assert sorted(reads) == sorted(c.replicas(key)[:2])
        c = Cluster(w=1, r=1)
        c.mark(**{c.replicas(key)[2]: "down"})
        failure = self.failureResultOf(c.router.execute(Arith(key, 1)), QuorumNotReached)
        assert "read quorum not reached: 2 of 3" in str(failure.value)

    def test_a_write_racing_in_is_not_overwritten(self) -> None:
        """A write with a newer version that reaches the primary between the read and the command makes the
        kvstore refuse the command (StaleVersion, with the stored version); the router sends it again with a
        version past that one, and it applies on top of the newer record."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"r", 0, 0, b"1")))
        primary = c.replicas(b"r")[0]
        link = c.links[primary]
        raced = Record(b"100", 0, 0, Version(int(NOW * 1000 + 1_000) << 16, "gw2"))
        original = link.send

        def racing(command: Any) -> Deferred[Any]:
            if type(command).__name__ == "XApply" and link.backend.engine.get(b"r") != raced:
                for node in c.replicas(b"r"):
                    c.links[node].backend.engine.put(b"r", raced)
            return original(command)

        link.send = racing  # type: ignore[method-assign]
        assert self.successResultOf(c.router.execute(Arith(b"r", 1))) == Number(101)
        assert c.router.stats()["rmw_retries_total"] == 1
        assert link.backend.stats()["xapply_stale"] == 1
        assert sum(1 for cmd in link.sent if isinstance(cmd, XLease)) == 1  # no second read

    def test_rmw_asks_the_previous_owners_during_a_move(self) -> None:
        """During a move, the newest record of a previous owner goes to the new primary before the command."""
        c = Cluster(count=4, replicas=1, w=1, r=1)
        old = HashRing({"a": 1, "b": 1, "c": 1}, epoch=1)
        new = HashRing({"a": 1, "b": 1, "c": 1, "d": 1}, epoch=2)
        key = next(k for k in (b"n%d" % i for i in range(200)) if new.node_for(k) == "d")
        c.router.update(Placement(old))
        self.successResultOf(c.router.execute(Store("add", key, 0, 0, b"x")))
        c.router.update(Placement(new, previous=old))
        assert self.successResultOf(c.router.execute(Store("add", key, 0, 0, b"y"))) is Status.NOT_STORED
        assert self.successResultOf(c.router.execute(Store("append", key, 0, 0, b"z"))) is Status.STORED
        assert c.record("d", key).value == b"xz"  # type: ignore[union-attr]


class SlowReplicaTests(SynchronousTestCase):
    """Hedged reads and the failover of a primary that does not answer: a paused kvstore costs a request
    ``hedge_after`` or ``primary_timeout``, not the request timeout."""

    def test_r1_read_asks_the_next_replica_after_hedge_after(self) -> None:
        """With R=1, a replica that has not answered within hedge_after is joined by the next one, whose
        answer is the client's; the slow one is asked last until it answers again."""
        c = Cluster(w=3, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")))
        first, second, _ = c.replicas(b"k")
        c.links[first].mode = "hang"
        d = c.router.execute(Get((b"k",)))
        self.assertNoResult(d)
        c.clock.advance(0.049)
        self.assertNoResult(d)
        c.advance(0.001)
        assert self.successResultOf(d).items[0][1].value == b"v"
        assert c.links[second].sent[-1] == XGet((b"k",))
        assert c.router.stats()["hedged_reads_total"] == 1
        assert c.router.stats()["nodes_slow"] == 1
        sent = len(c.links[first].sent)
        assert self.successResultOf(c.router.execute(Get((b"k",)))).items[0][1].value == b"v"
        assert len(c.links[first].sent) == sent  # asked last: not asked at all
        c.links[first].resume()
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"w")))  # its answer clears it
        assert c.router.stats()["nodes_slow"] == 0

    def test_a_reply_that_came_while_the_timer_was_due_wins(self) -> None:
        """A hedging timer that fires late acts one reactor turn later: a reply that came meanwhile
        answers the read and nobody else is asked."""
        c = Cluster(w=3, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")))
        first, second, _ = c.replicas(b"k")
        c.links[first].mode = "hang"
        d = c.router.execute(Get((b"k",)))
        sent = len(c.links[second].sent)
        # Due with the timer, run after it: a reply read in the same reactor turn as the timer fires.
        c.clock.callLater(0.05, c.links[first].resume)
        c.clock.advance(0.05)
        assert self.successResultOf(d).items[0][1].value == b"v"
        assert len(c.links[second].sent) == sent
        assert c.router.stats()["hedged_reads_total"] == 0

    def test_r2_read_hedges_the_missing_answer(self) -> None:
        """With R=2, one of the two asked replicas hanging makes the read ask the third after hedge_after."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")))
        first, second, third = c.replicas(b"k")
        c.links[second].mode = "hang"
        d = c.router.execute(Get((b"k",)))
        self.assertNoResult(d)
        c.advance(0.05)
        assert self.successResultOf(d).items[0][1].value == b"v"
        assert c.links[third].sent[-1] == XGet((b"k",))

    def test_multi_get_hedges_per_node(self) -> None:
        """A multi-key get whose replica hangs asks the next replicas, one XGet per node for all its keys."""
        c = Cluster(w=3, r=1)
        keys = [b"m%d" % i for i in range(30)]
        for key in keys:
            self.successResultOf(c.router.execute(Store("set", key, 0, 0, key)))
        c.links["a"].mode = "hang"
        before = {n: len(link.sent) for n, link in c.links.items()}
        d = c.router.execute(Get(tuple(keys)))
        self.assertNoResult(d)
        c.advance(0.05)
        assert [k for k, _ in self.successResultOf(d).items] == keys
        assert all(len(c.links[n].sent) - before[n] <= 2 for n in ("b", "c"))

    def test_no_hedging_with_hedge_after_zero(self) -> None:
        """hedge_after=0 turns hedging off: the read waits for the replica it asked."""
        c = Cluster(w=3, r=1, hedge_after=0)
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")))
        c.links[c.replicas(b"k")[0]].mode = "hang"
        d = c.router.execute(Get((b"k",)))
        c.advance(10)
        self.assertNoResult(d)
        assert c.clock.getDelayedCalls() == []

    def test_rmw_fails_over_from_a_primary_that_does_not_answer_its_command(self) -> None:
        """A primary that has not answered XApply within primary_timeout is replaced by the next replica,
        with a newer version; the late primary is stalled (not a primary) for the next commands, and when it
        runs the abandoned command at last (before or after the copies of the newer records), that cannot
        undo the acknowledged ones."""
        for reverse in (False, True):
            self.fail_over_on_apply(reverse)

    def fail_over_on_apply(self, reverse: bool) -> None:
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"10")))
        first, second, _ = c.replicas(b"n")
        link = c.links[first]
        original = link.send

        def pause_on_apply(command: Any) -> Deferred[Any]:
            if type(command).__name__ == "XApply":
                link.mode = "hang"
            return original(command)

        link.send = pause_on_apply  # type: ignore[method-assign]
        d = c.router.execute(Arith(b"n", 1))
        self.assertNoResult(d)
        c.advance(0.5)
        assert self.successResultOf(d) == Number(11)
        assert c.router.stats()["rmw_failovers_total"] == 1
        assert c.router.stats()["nodes_stalled"] == 1
        sent = len(link.sent)
        # The next command does not wait for the stalled node: the second replica is its primary.
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(12)
        assert self.successResultOf(c.router.execute(Delete(b"n"))) is Status.DELETED
        assert not [cmd for cmd in link.sent[sent:] if type(cmd).__name__ == "XApply"]
        link.send = original  # type: ignore[method-assign]
        link.resume(reverse)  # the paused node runs what it held: the abandoned incr, the copies
        assert link.backend.stats()["xapply_stale"] == (1 if reverse else 0)
        deleted = c.record(second, b"n")
        assert deleted is not None and deleted.tombstone
        if reverse:
            # The newer copies came first, while the abandoned command's lease lasted there (it may still
            # store there): refused, then sent again without a lease (both were acknowledged): the first holds
            # the delete's tombstone, and the abandoned incr was refused after it.
            assert link.backend.stats()["xlease_refused_total"] == 2
            assert c.router.stats()["rmw_copies_resent_total"] == 2
        assert all(c.record(n, b"n").tombstone for n in c.replicas(b"n"))  # type: ignore[union-attr]
        assert self.successResultOf(c.router.execute(Get((b"n",)))) == Values(())
        c.advance(5)  # the first is asked again
        assert self.successResultOf(c.router.execute(Get((b"n",)))) == Values(())
        assert all(c.record(n, b"n").tombstone for n in c.replicas(b"n"))  # type: ignore[union-attr]

    def test_no_failover_with_primary_timeout_zero(self) -> None:
        """primary_timeout=0 turns the failover off: the command waits for its primary."""
        c = Cluster(primary_timeout=0)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        first = c.replicas(b"n")[0]
        c.links[first].mode = "hang"
        d = c.router.execute(Arith(b"n", 1))
        c.advance(60)
        self.assertNoResult(d)
        assert c.router.stats()["rmw_failovers_total"] == 0
        c.links[first].resume()
        assert self.successResultOf(d) == Number(2)

    def test_rmw_fails_over_from_a_primary_whose_read_hangs(self) -> None:
        """A primary that does not answer the read before the command is replaced too, and the command
        runs on the newest record the other replicas hold."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"a", 0, 0, b"x")))
        first, second, third = c.replicas(b"a")
        c.links[first].mode = "hang"
        d = c.router.execute(Store("append", b"a", 0, 0, b"y"))
        c.advance(0.05)  # the hedge asks the third replica
        self.assertNoResult(d)
        c.advance(0.45)
        assert self.successResultOf(d) is Status.STORED
        assert c.record(second, b"a").value == b"xy"  # type: ignore[union-attr]
        assert c.record(third, b"a").value == b"xy"  # type: ignore[union-attr]

    def test_rmw_fails_back_to_a_late_primary_when_the_last_one_fails(self) -> None:
        """The first two replicas keep the read waiting past the primary timeout, so the primary role passes to
        the third, whose read then fails (a killed kvstore not yet marked down, as on a loaded machine): the
        command goes back to a replica that was only late, which answered meanwhile, rather than failing with
        two answers in hand."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        first, second, third = c.replicas(b"n")
        for node in (first, second, third):
            c.links[node].mode = "hang"
        d = c.router.execute(Arith(b"n", 1))
        c.advance(0.05)  # the hedge asks the third replica
        c.advance(0.5)  # the first is late: the second is primary
        c.advance(0.5)  # the second is late: the third is primary
        assert c.router.stats()["rmw_failovers_total"] == 2
        c.links[first].resume()
        c.links[second].resume()
        self.assertNoResult(d)
        c.links[third].mode = "down"
        c.links[third].held.pop().errback(ConnectionLost("kvstore killed"))
        assert self.successResultOf(d) == Number(2)
        assert c.record(first, b"n").value == c.record(second, b"n").value == b"2"  # type: ignore[union-attr]

    def test_rmw_fails_back_when_the_last_primary_fails_its_command(self) -> None:
        """The same with the read done: the third replica, primary after the two others were late, answered
        its read but its connection fails with the command; a late one that answered since runs it."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        first, second, third = c.replicas(b"n")
        for node in (first, second):
            c.links[node].mode = "hang"
        d = c.router.execute(Arith(b"n", 1))
        c.advance(0.05)  # the hedge asks the third replica, which answers
        c.advance(0.5)
        c.advance(0.5)  # the third is primary
        link = c.links[third]
        original = link.send

        def fails_the_command(command: Any) -> Deferred[Any]:
            if type(command) is XApply:
                link.sent.append(command)
                return fail(ConnectionLost("kvstore killed"))
            return original(command)

        link.send = fails_the_command  # type: ignore[method-assign]
        c.links[first].resume()
        c.links[second].resume()  # its read, then the copy of the result
        assert self.successResultOf(d) == Number(2)
        assert [type(cmd) for cmd in c.links[third].sent].count(XApply) == 1
        assert c.record(first, b"n").value == b"2"  # type: ignore[union-attr]

    def test_rmw_fails_over_at_once_from_a_primary_that_refuses_connections(self) -> None:
        """A primary whose connection fails (not marked down yet) is replaced without waiting."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        c.links[c.replicas(b"n")[0]].mode = "down"
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)

    def test_no_timer_left_behind(self) -> None:
        """Once the commands are answered and hedge_after has passed, no timer is left; stop() cancels the
        hedging timer of reads still pending."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"1")))
        self.successResultOf(c.router.execute(Arith(b"k", 1)))
        self.successResultOf(c.router.execute(Get((b"k",))))
        c.advance(0.05)
        assert c.clock.getDelayedCalls() == []
        c.links[c.replicas(b"k")[0]].mode = "hang"
        c.links[c.replicas(b"k")[1]].mode = "hang"
        c.router.execute(Get((b"k",)))
        assert c.clock.getDelayedCalls() != []
        c.router.stop()
        assert c.clock.getDelayedCalls() == []


def hold(link: Link, *kinds: type) -> None:
    """Hold the commands of ``kinds`` sent over ``link`` (as a kvstore whose answers to them are late: the
    others pass); ``link.resume()`` runs them."""
    original = link.send

    def held(command: Any) -> Deferred[Any]:
        if type(command) in kinds:
            link.mode = "hang"
            try:
                return original(command)
            finally:
                link.mode = "up"
        return original(command)

    link.send = held  # type: ignore[method-assign]


class SameEpochFailoverTests(SynchronousTestCase):
    """Two gateways on the same map that disagree about a key's primary (one timed it out, the other still
    waits on it) are kept apart by read leases (``chashd.leases``): at most one of two results computed on
    the same record is acknowledged, and a result that was not acknowledged never wins later."""

    def two(self) -> tuple[Cluster, Router, dict[str, Link], tuple[str, ...]]:
        """The cluster's router ``gw1`` and a second router ``gw2`` over the same kvstores (their own
        connections), the same map; the key's replicas P, Q, third."""
        c = Cluster()
        links = {name: Link(link.backend) for name, link in c.links.items()}
        second = Router("gw2", c.clock, links.__getitem__)
        second.update(c.router.placement)
        return c, second, links, c.replicas(b"n")

    def values(self, c: Cluster) -> list[bytes]:
        return [c.record(n, b"n").value for n in c.replicas(b"n")]  # type: ignore[union-attr]

    def test_a_failover_and_a_gateway_still_waiting_on_the_paused_primary(self) -> None:
        """W1. Two gateways increment a counter whose primary P is paused. The first times P out and fails
        over to Q; the second, whose primary timeout has not run out yet, still waits on P, which resumes
        and runs its command on the record it holds. The failover waits for the second command's leases
        (it read Q before the failover could lease Q): it then reads that result and increments on top of
        it. Both acknowledged, two answers, 3 in the end on every replica. The failover's wait ends with the
        second command (its copy taken at Q ended its lease there): it reads again within a poll (5 ms), not
        when that lease would have run out (2.5 s after it was granted)."""
        c, second, links, (p, q, third) = self.two()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        c.links[p].mode = links[p].mode = "hang"  # P paused: both gateways' connections to it
        first_incr = c.router.execute(Arith(b"n", 1))
        c.advance(0.3)
        second_incr = second.execute(Arith(b"n", 1))  # reads P (held) and Q (1)
        c.advance(0.25)  # the first gateway's primary timeout: it fails over, and waits for Q's lease
        self.assertNoResult(first_incr)
        assert c.router.stats()["rmw_lease_waits_total"] == 1
        links[p].resume()  # P runs on before the second gateway's timeout: its read (1), then its command
        assert self.successResultOf(second_incr) == Number(2)
        c.links[p].resume()
        c.advance(0.01)
        assert self.successResultOf(first_incr) == Number(3)
        assert self.values(c) == [b"3", b"3", b"3"]
        c.advance(0.1)  # the hedging timers of the reads
        assert c.clock.getDelayedCalls() == []

    def test_a_gateway_waiting_on_the_primary_after_the_failover_leased_the_key(self) -> None:
        """The other order: the failover leases Q and the third exclusively before the second gateway reads;
        the second gateway's read of Q is refused while that lease lasts, and once it ends the second
        gateway reads again, finds the failover's result and increments on top of it."""
        c, second, links, (p, q, third) = self.two()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        c.links[p].mode = "hang"  # P paused for the first gateway
        hold(c.links[q], XApply)  # and its command at Q held: the exclusive lease lasts meanwhile
        first_incr = c.router.execute(Arith(b"n", 1))
        c.advance(0.55)  # the failover: exclusive leases on Q and the third
        second_incr = second.execute(Arith(b"n", 1))  # P (up for it) and Q, which refuses: leased
        self.assertNoResult(second_incr)
        assert q in {n for n, link in links.items() if link.backend.stats()["xlease_refused_total"]}
        c.links[q].resume()  # the failover's command runs at Q: 2, copied to the third
        assert self.successResultOf(first_incr) == Number(2)
        c.advance(5)
        assert self.successResultOf(second_incr) == Number(3)
        c.links[p].resume()
        assert self.values(c) == [b"3", b"3", b"3"]

    def test_a_copy_that_a_later_command_overtook(self) -> None:
        """The copies of a result reach Q and the third after a later command's result computed on it (its
        copies overtook them): they meet a newer record (EXISTS), which counts, since it was computed on
        the result: both commands acknowledged, no false failure. The same copies coming after the first
        command's deadline are refused instead: that command fails, saying the value may or may not have
        changed (it did), never acknowledged falsely."""
        for late in (False, True):
            c, second, links, (p, q, third) = self.two()
            self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
            hold(c.links[q], XPut)
            hold(c.links[third], XPut)
            first_incr = c.router.execute(Arith(b"n", 1))  # applied at P (2); its copies held
            self.assertNoResult(first_incr)
            assert self.successResultOf(second.execute(Arith(b"n", 1))) == Number(3)  # on P's 2
            if late:
                c.advance(2.1)  # past the first command's deadline
            c.links[q].resume()
            c.links[third].resume()
            if late:
                failure = self.failureResultOf(first_incr, ServiceUnavailable)
                assert "may or may not have changed" in str(failure.value)
                assert c.router.stats()["rmw_copies_refused_deadline_total"] == 2
            else:
                assert self.successResultOf(first_incr) == Number(2)
            assert self.values(c) == [b"3", b"3", b"3"]

    def test_a_result_refused_everywhere_but_the_primary_never_wins(self) -> None:
        """A fork: P applies the second gateway's append within its deadline, but its copies come after it
        and are refused; the failover's append (acknowledged) is computed without it. The fork stays on P
        with an older version than the failover's result, so it loses every later comparison: a copy of it
        (read repair, anti-entropy, handoff) is kept out, and a read through a gateway repairs P."""
        c, second, links, (p, q, third) = self.two()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"x")))
        c.links[p].mode = links[p].mode = "hang"
        first = c.router.execute(Store("append", b"n", 0, 0, b"a"))
        c.advance(0.3)
        late = second.execute(Store("append", b"n", 0, 0, b"b"))  # reads Q now: its deadline is 2.3
        c.advance(0.25)  # the first gateway fails over, and waits for the second command's lease on Q
        hold(links[q], XPut)
        hold(links[third], XPut)
        links[p].resume()  # P applies the late append (xb) within the deadline; its copies held
        c.advance(1.8)
        links[q].resume()
        links[third].resume()  # past the deadline: refused
        failure = self.failureResultOf(late, ServiceUnavailable)
        assert "may or may not have changed" in str(failure.value)
        fork = c.record(p, b"n")
        assert fork is not None and fork.value == b"xb"
        c.advance(1)  # the failover's leases: its append at Q (xa), copied to the third; P's copy held
        assert self.successResultOf(first) is Status.STORED
        acknowledged = c.record(q, b"n")
        assert acknowledged is not None and acknowledged.value == b"xa"
        assert acknowledged.version > fork.version
        # Anti-entropy, handoff and read repair keep the newer version: the fork is kept out.
        assert c.links[q].backend.execute(XPut(b"n", fork)) is Status.EXISTS
        result = self.successResultOf(second.execute(Get((b"n",))))
        assert result.items[0][1].value == b"xa"
        c.links[p].resume()
        assert self.values(c) == [b"xa", b"xa", b"xa"]

    def test_a_command_its_primary_may_have_applied_is_not_run_twice(self) -> None:
        """The first gateway's primary P answers the read, then pauses with the command (applied when it
        resumes). Meanwhile the second gateway read P and Q; once P resumes it increments on P's record,
        which holds the first command's result. The first gateway's failover waits for the second command's
        lease on Q, then reads a record newer than its own command: it may have been applied and built upon,
        so the failover does not run it again, and the command fails (may or may not have changed)."""
        c, second, links, (p, q, third) = self.two()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        hold(c.links[p], XApply)
        first_incr = c.router.execute(Arith(b"n", 1))  # read done; its command held at P
        c.advance(0.3)
        links[p].mode = "hang"  # P paused for the second gateway too
        second_incr = second.execute(Arith(b"n", 1))
        c.advance(0.25)  # the first gateway's failover: Q leased to the second command, it waits
        c.links[p].resume()  # P runs the first command (2)
        links[p].resume()  # then the second's read and command (3), copied to Q and the third
        assert self.successResultOf(second_incr) == Number(3)
        c.advance(5)
        failure = self.failureResultOf(first_incr, ServiceUnavailable)
        assert "may or may not have changed" in str(failure.value)
        assert self.values(c) == [b"3", b"3", b"3"]
        assert c.router.stats()["rmw_refused_maybe_applied_total"] == 1

    def test_a_version_past_the_deadline_is_not_applied(self) -> None:
        """A record whose version is further ahead of the gateway's clock than a round's deadline (a clock
        more than 2 s ahead wrote it): the command would carry a version its deadline does not allow, so it
        fails at once, saying so, and nothing is applied."""
        c = Cluster()
        ahead = Record(b"100", 0, 0, Version(int(NOW * 1000 + 10_000) << 16, "gw2"))
        for node in c.replicas(b"r"):
            c.links[node].backend.engine.put(b"r", ahead)
        failure = self.failureResultOf(c.router.execute(Arith(b"r", 1)), ServiceUnavailable)
        assert "ahead of this gateway's clock" in str(failure.value) and "not applied" in str(failure.value)
        assert not any(type(cmd) is XApply for link in c.links.values() for cmd in link.sent)
        c.advance(9)
        assert self.successResultOf(c.router.execute(Arith(b"r", 1))) == Number(101)


class LeaseEndTests(SynchronousTestCase):
    """Leases end when their command ends (``XRelease``, ``_ReadModifyWrite._end_leases``), and a command
    refused for another's lease reads again within a poll; shared leases of two map epochs conflict."""

    def leases(self, c: Cluster) -> int:
        return sum(len(link.backend.leases) for link in c.links.values())

    def test_commands_that_changed_nothing_leave_no_lease(self) -> None:
        """incr of a missing key (NOT_FOUND), add over a stored one (NOT_STORED), delete of a missing one: the
        primary's command ended its lease there, the release the other replica's."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        assert self.successResultOf(c.router.execute(Arith(b"missing", 1))) is Status.NOT_FOUND
        assert self.successResultOf(c.router.execute(Store("add", b"n", 0, 0, b"2"))) is Status.NOT_STORED
        assert self.successResultOf(c.router.execute(Delete(b"missing"))) is Status.NOT_FOUND
        assert self.leases(c) == 0
        assert c.router.stats()["rmw_leases_released_total"] == 3
        assert sum(link.backend.stats()["cmd_xrelease"] for link in c.links.values()) == 3
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)
        assert self.leases(c) == 0 and c.router.stats()["rmw_leases_released_total"] == 3  # ended by stores

    def test_a_copy_still_on_its_way_ends_the_lease_itself(self) -> None:
        """A command acknowledged before its copy reached a replica it leased sends that replica no release:
        the copy ends the lease when it is taken; a copy that is not taken gets the release then."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        _, q, _ = c.replicas(b"n")
        hold(c.links[q], XPut)
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)
        assert not any(type(cmd) is XRelease for cmd in c.links[q].sent)
        assert len(c.links[q].backend.leases) == 1
        c.links[q].resume()
        assert self.leases(c) == 0 and c.router.stats()["rmw_leases_released_total"] == 0
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(3)
        c.links[q].held.pop().errback(ConnectionLost("gone"))
        assert [type(cmd) for cmd in c.links[q].sent][-1] is XRelease
        assert self.leases(c) == 0 and c.router.stats()["rmw_leases_released_total"] == 1

    def test_a_failed_command_releases_its_leases(self) -> None:
        """A command that fails before anything is applied (W = 3: its read needs the third replica, whose
        connection fails) releases the leases its read took, with no floor: the next command is not held up."""
        c = Cluster(w=3)
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        first, second, third = c.replicas(b"n")
        c.links[third].mode = "down"
        self.failureResultOf(c.router.execute(Arith(b"n", 1)), QuorumNotReached)
        assert self.leases(c) == 0
        assert [cmd for cmd in c.links[first].sent if type(cmd) is XRelease][0].floor == 0
        c.links[third].mode = "up"
        assert self.successResultOf(c.router.execute(Arith(b"n", 1))) == Number(2)
        assert c.router.stats()["rmw_lease_waits_total"] == 0

    def test_two_commands_that_each_got_part_of_their_leases(self) -> None:
        """Two gateways' exclusive commands (both hold the key's primary stalled) each get one of the two
        leases: the one refused gives up the one it got, so the other completes, and it reads again after a
        poll and completes too, instead of both waiting for the other's lease to run out."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        x, y, z = c.replicas(b"n")
        links = {name: Link(link.backend) for name, link in c.links.items()}
        second = Router("gw2", c.clock, links.__getitem__)
        second.update(c.router.placement)
        for router in (c.router, second):
            router.suspect_for = 60
            router._mark_stalled(x)
        hold(links[y], XLease)
        b = second.execute(Arith(b"n", 1))  # Y held, Z granted
        a = c.router.execute(Arith(b"n", 1))  # Y granted, Z refused: gives Y up, polls
        self.assertNoResult(a)
        links[y].resume()  # the second command's read at Y is granted now
        assert self.successResultOf(b) == Number(2)
        c.advance(0.01)
        assert self.successResultOf(a) == Number(3)
        assert [c.record(n, b"n").value for n in (y, z)] == [b"3", b"3"]  # type: ignore[union-attr]
        assert c.router.stats()["rmw_lease_polls_total"] == 1
        assert self.leases(c) == 0
        c.advance(0.1)  # the hedging timers of the reads
        assert c.clock.getDelayedCalls() == []

    def test_exclusive_commands_of_one_gateway_take_turns(self) -> None:
        """Two exclusive commands of one gateway on one key: the second sends nothing until the first is over,
        then starts (no lease refused, no poll); a command of another key does not wait; a gateway that stops
        fails the commands still waiting for their turn."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        x, y, _ = c.replicas(b"n")
        c.router.suspect_for = 60
        c.router._mark_stalled(x)  # as its primary timeout does: the next replica is primary, exclusively
        hold(c.links[y], XApply)
        first = c.router.execute(Arith(b"n", 1))
        sent = c.sends()
        second = c.router.execute(Arith(b"n", 1))
        assert c.sends() == sent and c.router.stats()["rmw_turns_waited_total"] == 1
        other = next(k for k in (b"o%d" % i for i in range(100)) if [n for n in c.replicas(k) if n != x][0] != y)
        assert self.successResultOf(c.router.execute(Arith(other, 1))) is Status.NOT_FOUND
        c.links[y].resume()
        assert self.successResultOf(first) == Number(2)
        self.assertNoResult(second)  # started: its command held at Y in turn
        c.links[y].resume()
        assert self.successResultOf(second) == Number(3)
        stats = c.router.stats()
        assert (stats["rmw_lease_waits_total"], stats["rmw_lease_polls_total"]) == (0, 0)
        assert c.router._turns == {}
        c.router._mark_stalled(x)  # again: the other key's read heard from it
        third = c.router.execute(Arith(b"n", 1))
        fourth = c.router.execute(Arith(b"n", 1))
        c.router.stop()
        self.failureResultOf(fourth, ServiceUnavailable)
        c.links[y].resume()
        assert self.successResultOf(third) == Number(4)

    def test_shared_leases_of_two_map_epochs_conflict(self) -> None:
        """Shared commands of gateways on one map epoch lease a key together; a shared command of another
        epoch (its connection named another map) is refused while they last, and reads again once they
        ended."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"n", 0, 0, b"1")))
        p, q, _ = c.replicas(b"n")
        for link in c.links.values():
            link.epoch = 1
        same = {name: Link(link.backend) for name, link in c.links.items()}
        other = {name: Link(link.backend) for name, link in c.links.items()}
        for link in same.values():
            link.epoch = 1
        for link in other.values():
            link.epoch = 2
        routers = []
        for name, links in (("gw2", same), ("gw3", other)):
            router = Router(name, c.clock, links.__getitem__)
            router.update(c.router.placement)
            routers.append(router)
        hold(c.links[p], XApply)
        first = c.router.execute(Arith(b"n", 1))  # leases P and Q (epoch 1), its command held
        hold(same[p], XApply)
        second = routers[0].execute(Arith(b"n", 1))  # epoch 1 too: leased as well, its command held
        third = routers[1].execute(Arith(b"n", 1))  # epoch 2: refused, polls
        assert routers[1].stats()["rmw_lease_waits_total"] == 1
        c.links[p].resume()
        same[p].resume()
        assert (self.successResultOf(first), self.successResultOf(second)) == (Number(2), Number(3))
        c.advance(0.05)
        assert self.successResultOf(third) == Number(4)
        assert self.leases(c) == 0


class FastPathTests(SynchronousTestCase):
    """The short paths of the common cases behave as the general ones."""

    def test_single_key_get_with_r1_asks_one_replica(self) -> None:
        """With R=1 a get of one key is one XGet to the first up replica; hits and misses are counted."""
        c = Cluster(replicas=3, w=3, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 7, 0, b"v")))
        before = c.sends()
        result = self.successResultOf(c.router.execute(Get((b"k",))))
        assert [(k, r.value, r.flags) for k, r in result.items] == [(b"k", b"v", 7)]
        assert c.sends() - before == 1
        assert c.links[c.replicas(b"k")[0]].sent[-1] == XGet((b"k",))
        assert self.successResultOf(c.router.execute(Get((b"nothing",)))) == Values(())
        stats = c.router.stats()
        assert (stats["cmd_get"], stats["get_hits"], stats["get_misses"]) == (2, 1, 1)

    def test_n1_get_is_spliced(self) -> None:
        """With N=1 a get of one key is a SplicedGet: the kvstore's reply bytes are the answer (a tombstone or
        an expired record is its miss); hits and misses are counted; gets (cas) and multi-key gets are not
        spliced."""
        c = Cluster(replicas=1, w=1, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 7, 0, b"v")))
        self.successResultOf(c.router.execute(Store("set", b"gone", 0, 0, b"v")))
        self.successResultOf(c.router.execute(Delete(b"gone")))
        self.successResultOf(c.router.execute(Store("set", b"old", 0, 5, b"v")))
        c.advance(6)
        node = c.replicas(b"k")[0]
        assert self.successResultOf(c.router.execute(Get((b"k",)))) == b"VALUE k 7 1\r\nv\r\nEND\r\n"
        assert c.links[node].sent[-1] == SplicedGet(b"k")
        for missing in (b"nothing", b"gone", b"old"):
            assert self.successResultOf(c.router.execute(Get((missing,)))) == b"END\r\n"
        stats = c.router.stats()
        assert (stats["get_hits"], stats["get_misses"]) == (1, 3)
        gets = self.successResultOf(c.router.execute(Get((b"k",), cas=True)))
        assert isinstance(gets, Values) and gets.items[0][1].value == b"v"
        both = self.successResultOf(c.router.execute(Get((b"k", b"nothing"))))
        assert isinstance(both, Values) and [k for k, _ in both.items] == [b"k"]

    def test_n1_spliced_get_that_fails(self) -> None:
        """With N=1 a spliced get whose kvstore fails is a QuorumNotReached read, counted, as without the splice."""
        c = Cluster(replicas=1, w=1, r=1)
        c.links[c.replicas(b"k")[0]].mode = "down"
        failure = self.failureResultOf(c.router.execute(Get((b"k",))), QuorumNotReached)
        assert "read quorum not reached: 0 of 1" in str(failure.value)
        assert c.router.stats()["quorum_failures"] == 1

    def test_forward_get(self) -> None:
        """``forward_get`` with N=1 sends the key's kvstore a SplicedGet whose reply bytes reach the sink, counted
        as the general path counts them; a failure reaches it as the general path's QuorumNotReached."""
        c = Cluster(replicas=1, w=1, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 7, 0, b"v")))
        sink = Sink()
        assert c.router.forward_get(b"k", sink) and c.router.forward_get(b"none", sink)
        assert sink.replies == [b"VALUE k 7 1\r\nv\r\nEND\r\n", b"END\r\n"]
        assert c.links[c.replicas(b"k")[0]].sent[-2] == SplicedGet(b"k")
        c.links[c.replicas(b"k")[0]].mode = "hang"
        assert c.router.forward_get(b"k", sink)
        c.links[c.replicas(b"k")[0]].held[0].errback(ConnectionLost("gone"))
        (error,) = sink.errors
        assert isinstance(error, QuorumNotReached) and isinstance(error.__cause__, ConnectionLost)
        stats = c.router.stats()
        assert (stats["cmd_get"], stats["get_hits"], stats["get_misses"], stats["quorum_failures"]) == (3, 1, 1, 1)

    def test_forward_set(self) -> None:
        """``forward_set`` writes as ``execute(Store)`` does, its STORED (or its QuorumNotReached, counted) to
        the sink once; a slow replica is still written to, and answering clears its suspicion; with no nodes
        it declines (sends nothing, counts nothing): the general path words that error."""
        c = Cluster()
        sink = Sink()
        first, second, third = c.replicas(b"k")
        c.router._mark_slow(second)
        assert c.router.forward_set(Store("set", b"k", 3, 0, b"v"), sink)
        assert sink.replies == [Status.STORED] and not sink.errors  # type: ignore[comparison-overlap]  # a result, not bytes
        assert c.holders(b"k") == {first, second, third} and c.router.stats()["nodes_slow"] == 0
        c.links[second].mode = c.links[third].mode = "down"
        assert c.router.forward_set(Store("set", b"k", 3, 0, b"w"), sink)
        (error,) = sink.errors
        assert isinstance(error, QuorumNotReached) and "write quorum not reached: 1 of 2" in str(error)
        assert c.router.stats()["quorum_failures"] == 1 and c.router.stats()["cmd_set"] == 2
        empty = Cluster()
        empty.router.update(Placement(HashRing({})))
        assert not empty.router.forward_set(Store("set", b"k", 0, 0, b"v"), sink)
        assert empty.sends() == 0 and empty.router.stats()["cmd_set"] == 0

    def test_forward_get_declines(self) -> None:
        """With N=1 ``forward_get`` declines (sends nothing, counts nothing) with the node down or slow and
        without a connection up; with R=1 and N=3 it declines every get (``forwarding`` is False): the
        general path answers those."""
        sink = Sink()
        c = Cluster(r=1)
        assert not c.router.forwarding and not c.router.forward_get(b"k", sink)
        c = Cluster(replicas=1, w=1, r=1)
        assert c.router.forwarding
        node = c.replicas(b"k")[0]
        c.mark(**{node: "down"})
        assert not c.router.forward_get(b"k", sink)
        c.mark()
        c.router._mark_slow(node)
        assert not c.router.forward_get(b"k", sink)
        c.router._heard(None, node)
        c.links[node].mode = "down"
        assert not c.router.forward_get(b"k", sink)
        assert not sink.replies and not sink.errors and c.sends() == 0 and c.router.stats()["cmd_get"] == 0
        c.links[node].mode = "up"
        assert c.router.forward_get(b"k", sink) and sink.replies == [b"END\r\n"]

    def test_forward_get_of_a_quorum_read(self) -> None:
        """With R=2 ``forward_get`` takes the get as a quorum read whose answer comes to the sink as bytes:
        the newest of R replicas (read repair as on the general path), a miss, and a failed quorum."""
        c = Cluster()
        self.successResultOf(c.router.execute(Store("set", b"k", 5, 0, b"new")))
        first, second, third = c.replicas(b"k")
        c.links[first].backend.engine.put(b"k", Record(b"old", 5, 0, Version(1, "x")))
        sink = Sink()
        assert c.router.forwarding and c.router.forward_get(b"k", sink) and c.router.forward_get(b"none", sink)
        assert sink.replies == [b"VALUE k 5 3\r\nnew\r\nEND\r\n", b"END\r\n"]
        assert c.record(first, b"k").value == b"new"  # type: ignore[union-attr]  # repaired
        c.links[second].mode = c.links[third].mode = "down"
        assert c.router.forward_get(b"k", sink)
        (error,) = sink.errors
        assert isinstance(error, QuorumNotReached) and "1 of 2" in str(error)
        stats = c.router.stats()
        assert (stats["cmd_get"], stats["get_hits"], stats["get_misses"]) == (3, 1, 1)
        assert (stats["read_repairs"], stats["quorum_failures"]) == (1, 1)

    def test_forward_get_during_a_move(self) -> None:
        """With N=1, a key whose owner changed while the move is handed off is read from both owners (not
        spliced), its answer to the sink as bytes."""
        c, old, new, key = cluster_gaining_d()
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v")))
        c.router.update(Placement(new, previous=old))
        sink = Sink()
        assert c.router.forward_get(key, sink) and sink.replies == [b"VALUE %s 0 1\r\nv\r\nEND\r\n" % key]
        assert not any(type(cmd) is SplicedGet for link in c.links.values() for cmd in link.sent)

    def test_n1_get_during_a_move_is_not_spliced(self) -> None:
        """A key whose owner changed while the move is handed off is read from both owners, not spliced."""
        c, old, new, key = cluster_gaining_d()
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v")))
        c.router.update(Placement(new, previous=old))
        got = self.successResultOf(c.router.execute(Get((key,))))
        assert isinstance(got, Values) and got.items[0][1].value == b"v"
        assert not any(type(cmd) is SplicedGet for link in c.links.values() for cmd in link.sent)

    def test_single_key_get_with_r1_fails_over(self) -> None:
        """With R=1, a replica that fails is replaced by the next up one; when none is left the read fails."""
        c = Cluster(replicas=3, w=3, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")))
        first, second, third = c.replicas(b"k")
        c.links[first].mode = "down"
        c.links[second].mode = "down"
        assert self.successResultOf(c.router.execute(Get((b"k",)))).items[0][1].value == b"v"
        assert [len(c.links[n].sent) for n in (first, second, third)] == [2, 2, 2]
        c.links[third].mode = "down"
        failure = self.failureResultOf(c.router.execute(Get((b"k",))), QuorumNotReached)
        assert "read quorum not reached: 0 of 1" in str(failure.value)
        assert c.router.stats()["quorum_failures"] == 1

    def test_single_key_get_with_r1_skips_down_nodes(self) -> None:
        """A node marked down is not asked; with every replica down the read fails at once."""
        c = Cluster(replicas=2, w=1, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")))
        first, second = c.replicas(b"k")
        c.router.update(Placement(c.router.placement.ring, {first: NodeState.DOWN}))
        assert self.successResultOf(c.router.execute(Get((b"k",)))).items[0][1].value == b"v"
        assert not any(isinstance(cmd, XGet) for cmd in c.links[first].sent)
        c.router.update(Placement(c.router.placement.ring, {first: NodeState.DOWN, second: NodeState.DOWN}))
        self.failureResultOf(c.router.execute(Get((b"k",))), QuorumNotReached)

    def test_single_key_get_of_a_tombstone_or_expired_record(self) -> None:
        """The one-key paths (R=1 and R=2) answer a miss for a tombstone and an expired record."""
        for r in (1, 2):
            c = Cluster(r=r)
            self.successResultOf(c.router.execute(Store("set", b"t", 0, 10, b"v")))
            self.successResultOf(c.router.execute(Store("set", b"d", 0, 0, b"v")))
            self.successResultOf(c.router.execute(Delete(b"d")))
            c.clock.advance(11)
            assert self.successResultOf(c.router.execute(Get((b"t",)))) == Values(())
            assert self.successResultOf(c.router.execute(Get((b"d",)))) == Values(())
            assert c.router.stats()["get_misses"] == 2

    def test_single_key_get_with_r2_fails_when_quorum_is_impossible(self) -> None:
        """With R=2 and two of three replicas down the one-key read fails with QuorumNotReached."""
        c = Cluster()
        first, second, _ = c.replicas(b"k")
        c.router.update(Placement(c.router.placement.ring, {first: NodeState.DOWN, second: NodeState.DOWN}))
        failure = self.failureResultOf(c.router.execute(Get((b"k",))), QuorumNotReached)
        assert "1 of 2" in str(failure.value)
        assert c.router.stats()["quorum_failures"] == 1

    def test_set_to_a_single_replica_that_fails(self) -> None:
        """With N=1 a failed write is a QuorumNotReached (never STORED), counted as a quorum failure."""
        c = Cluster(replicas=1, w=1, r=1)
        c.links[c.replicas(b"k")[0]].mode = "down"
        failure = self.failureResultOf(c.router.execute(Store("set", b"k", 0, 0, b"v")), QuorumNotReached)
        assert "write quorum not reached: 0 of 1" in str(failure.value)
        assert isinstance(failure.value.__cause__, ConnectionLost)
        assert c.router.stats()["quorum_failures"] == 1

    def test_set_answers_at_the_w_th_acknowledgement(self) -> None:
        """A set to three replicas with W=2 is STORED once two acknowledged, with the third still waiting;
        that one failing afterwards changes nothing (no quorum failure counted)."""
        c = Cluster()
        third = c.replicas(b"k")[2]
        c.links[third].mode = "hang"
        d = c.router.execute(Store("set", b"k", 0, 0, b"v"))
        assert self.successResultOf(d) is Status.STORED
        assert [type(command) for command in c.links[third].held_commands] == [XPut]
        c.links[third].held.pop().errback(ConnectionLost("gone"))
        assert c.router.stats()["quorum_failures"] == 0

    def test_set_fails_once_w_is_out_of_reach(self) -> None:
        """A set whose connections took the XPut (none declined) fails with QuorumNotReached, counted once, as
        soon as W acknowledgements can no longer come, the last error as its cause."""
        c = Cluster()
        first, second, third = c.replicas(b"k")
        c.links[second].mode = c.links[third].mode = "hang"
        d = c.router.execute(Store("set", b"k", 0, 0, b"v"))
        self.assertNoResult(d)
        c.links[second].held.pop().errback(ConnectionLost("second gone"))
        self.assertNoResult(d)  # the first acknowledged, the third may still
        c.links[third].held.pop().errback(ConnectionLost("third gone"))
        failure = self.failureResultOf(d, QuorumNotReached)
        assert "write quorum not reached: 1 of 2" in str(failure.value)
        assert isinstance(failure.value.__cause__, ConnectionLost)
        assert c.router.stats()["quorum_failures"] == 1
        assert c.holders(b"k") == {first}

    def test_set_with_exptime(self) -> None:
        """A set with an exptime stores the absolute expiry on the replicas."""
        c = Cluster(replicas=1, w=1, r=1)
        self.successResultOf(c.router.execute(Store("set", b"k", 0, 100, b"v")))
        record = c.links[c.replicas(b"k")[0]].backend.engine.get(b"k")
        assert record is not None and record.expires_at == int(NOW) + 100

    def test_preference_lists_follow_a_new_ring(self) -> None:
        """Memoized preference lists are dropped when the placement changes, not when an equal one comes."""
        c, old, new, key = cluster_gaining_d()
        assert c.router.replicas_for(key) == old.preference_list(key, 1)
        placement = c.router.placement
        c.router.update(Placement(old))
        assert c.router.placement is placement  # an equal placement keeps the memo
        c.router.update(Placement(new))
        assert c.router.replicas_for(key) == ("d",)

    def test_unknown_command(self) -> None:
        """A command the gateway does not route fails with a RequestError."""
        c = Cluster()
        self.failureResultOf(c.router.execute(XGet((b"k",))), RequestError)


class HandoffRoutingTests(SynchronousTestCase):
    """While a move is under way, previous owners are asked too."""

    def test_read_finds_value_on_previous_owner(self) -> None:
        """A key written under the old ring is read under the new ring before it moved."""
        c = Cluster(count=4, replicas=1, w=1, r=1)
        old = HashRing({"a": 1, "b": 1, "c": 1}, epoch=1)
        c.router.update(Placement(old))
        keys = [b"h%d" % i for i in range(40)]
        for key in keys:
            self.successResultOf(c.router.execute(Store("set", key, 0, 0, key)))
        new = HashRing({"a": 1, "b": 1, "c": 1, "d": 1}, epoch=2)
        c.router.update(Placement(new, previous=old))
        moved = [k for k in keys if new.node_for(k) == "d"]
        assert moved
        result = self.successResultOf(c.router.execute(Get(tuple(keys))))
        assert [k for k, _ in result.items] == keys
        # The incr of a moved key starts from the value the previous owner holds.
        self.successResultOf(c.router.execute(Store("set", b"n0", 0, 0, b"5")))
        counter = next(k for k in (b"n%d" % i for i in range(100)) if new.node_for(k) == "d" and old.node_for(k) != "d")
        c.router.update(Placement(old))
        self.successResultOf(c.router.execute(Store("set", counter, 0, 0, b"41")))
        c.router.update(Placement(new, previous=old))
        assert self.successResultOf(c.router.execute(Arith(counter, 1))) == Number(42)


@pytest.mark.parametrize("count", [1, 2])
def test_small_rings_cap_quorums(count: int) -> None:
    """With fewer nodes than N, W and R are capped at the node count."""
    c = Cluster(count=count)
    d = c.router.execute(Store("set", b"k", 0, 0, b"v"))
    assert d.result is Status.STORED
    got = c.router.execute(Get((b"k",)))
    if count == 1:  # N=1: the kvstore's reply, spliced
        assert got.result == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    else:
        assert isinstance(got.result, Values) and got.result.items[0][1].value == b"v"


class VersionReadTests(SynchronousTestCase):
    """A quorum read of one key asks the first replica for its record and the others for their version only
    (XVer), with the same answers and read repairs as when every replica sends its record."""

    def diverged(self, newer_on: int) -> tuple[Cluster, bytes, Record, Record]:
        """N=3/R=2 with the key's first replica holding ``old`` and replica ``newer_on`` holding ``new``."""
        c = Cluster()
        key = b"k1"
        base = int(NOW * 1000) << 16
        old, new = Record(b"old", 0, 0, Version(base, "w")), Record(b"new", 0, 0, Version(base + 1, "w"))
        replicas = c.replicas(key)
        for node in replicas:
            c.links[node].backend.execute(XPut(key, new if node == replicas[newer_on] else old))
        return c, key, old, new

    def test_newer_version_is_fetched_and_repaired(self) -> None:
        """The second replica holds a newer version: it is asked for its record, the client gets that record
        (through the line protocol's sink, as bytes), and the first replica gets it written back."""
        c, key, _, new = self.diverged(1)
        first, second, _ = c.replicas(key)
        sink = Sink()
        assert c.router.forward_get(key, sink)
        assert sink.replies == [b"VALUE k1 0 3\r\nnew\r\nEND\r\n"]
        assert c.links[second].sent == [XVer(key), XGet((key,))]
        assert c.links[first].sent[0] == XGet((key,))
        assert c.record(first, key) == new and c.router.stats()["read_repairs"] == 1

    def test_older_version_is_repaired_from_the_record(self) -> None:
        """The first replica holds the newest record: the answer is its record, and the second replica, whose
        version is older, gets it written back without its record being read."""
        c, key, old, new = self.diverged(0)
        first, second, _ = c.replicas(key)
        values = self.successResultOf(c.router.execute(Get((key,))))
        assert values.items == ((key, new),)
        assert c.links[second].sent[0] == XVer(key) and XGet((key,)) not in c.links[second].sent
        assert c.record(second, key) == new and c.record(first, key) == new
        assert c.router.stats()["read_repairs"] == 1
        assert old != new

    def test_missing_on_the_second_is_repaired(self) -> None:
        """A replica that holds nothing answers END to XVer and gets the record written back."""
        c = Cluster()
        key = b"k2"
        first, second, _ = c.replicas(key)
        c.links[second].mode = "down"  # the write misses it
        self.successResultOf(c.router.execute(Store("set", key, 0, 0, b"v")))
        c.links[second].mode = "up"
        assert c.record(second, key) is None
        values = self.successResultOf(c.router.execute(Get((key,))))
        assert values.items[0][1].value == b"v"
        assert c.record(second, key) == c.record(first, key)

    def test_kvstore_without_xver(self) -> None:
        """A kvstore of an earlier version answers XVer with ERROR: it is asked with XGet at once (the read
        answers right), and the next reads ask it with XGet only, until the placement changes."""
        c, key, _, new = self.diverged(1)
        _, second, _ = c.replicas(key)
        link = c.links[second]
        run = link._run

        def old_kvstore(command: Any) -> Deferred[Any]:
            return fail(UnknownCommand()) if type(command) is XVer else run(command)

        link._run = old_kvstore  # type: ignore[method-assign]  # a kvstore that does not know xver
        values = self.successResultOf(c.router.execute(Get((key,))))
        assert values.items == ((key, new),) and link.sent == [XVer(key), XGet((key,))]
        self.successResultOf(c.router.execute(Get((key,))))
        assert link.sent[2:] == [XGet((key,))]
        assert c.router.stats()["quorum_failures"] == 0

    def test_failed_fetch_asks_the_next_replica(self) -> None:
        """The replica whose newer version was seen fails when asked for its record: the next replica is asked,
        and the read answers with the newest record among those it could read."""
        c, key, _, new = self.diverged(1)
        first, second, third = c.replicas(key)
        link = c.links[second]
        run = link._run

        def fails_on_records(command: Any) -> Deferred[Any]:
            return fail(ConnectionLost("gone")) if type(command) is XGet else run(command)

        link._run = fails_on_records  # type: ignore[method-assign]
        sink = Sink()
        assert c.router.forward_get(key, sink)
        assert XGet((key,)) in c.links[third].sent
        assert sink.replies == [b"VALUE k1 0 3\r\nold\r\nEND\r\n"] and not sink.errors
        assert new.value == b"new"
