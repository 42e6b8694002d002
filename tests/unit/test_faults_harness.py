"""The pure parts of the fault-injection harness: firewall rules, schedules, the clients' choices, figures."""

from __future__ import annotations

import threading

import pytest

from tests.faults.clients import Endpoint, Session, Worker, Workload, parse_mix
from tests.faults.history import FAIL, INFO, OK, Event, Op, Recorder
from tests.faults.nemesis import FAULTS, LEADERSHIP_GRACE, leadership_violation, make_schedule
from tests.faults.netns import Firewall, Member, block_rule, cut_rules, group_of, mark_rules, namespace_id
from tests.faults.stats import availability, percentile

A = Member("gateway-1", "127.0.0.11")
B = Member("kvstore-A", "127.0.0.21")
C = Member("kvstore-B", "127.0.0.22")


class FirewallTests:
    """The iptables rules that mark connections and cut links."""

    def test_group_of_address(self) -> None:
        """Each daemon's group id (and connection mark) is 40000 plus the last byte of its address."""
        assert group_of("127.0.0.21") == 40021
        assert B.group == 40021
        for bad in ("10.0.0.21", "127.0.1.21", "localhost", "127.0.0.x"):
            with pytest.raises(ValueError):
                group_of(bad)

    def test_mark_rules(self) -> None:
        """A chain for the cuts, jumped to from INPUT, and one CONNMARK rule per member for new connections."""
        rules = mark_rules([B, A, B])
        assert rules[:2] == [["-N", "chashd-cuts"], ["-A", "INPUT", "-j", "chashd-cuts"]]
        marks = [r for r in rules if "CONNMARK" in r]
        assert [r[r.index("--gid-owner") + 1] for r in marks] == ["40011", "40021"]
        assert all(r[r.index("--set-mark") + 1] == r[r.index("--gid-owner") + 1] for r in marks)
        assert all(r[2:6] == ["-m", "conntrack", "--ctstate", "NEW"] for r in marks)

    def test_cut_rules_both_ways(self) -> None:
        """Cutting A from B drops the connections A opened towards B and those B opened towards A."""
        rules = cut_rules(A, B)
        assert [(r[r.index("--mark") + 1], r[r.index("--ctorigdst") + 1], r[-1]) for r in rules] == [
            ("40011", "127.0.0.21", "DROP"),
            ("40021", "127.0.0.11", "DROP"),
        ]

    def test_refuses_the_host_namespace(self) -> None:
        """A firewall made in the namespace the run started from changes nothing."""
        with pytest.raises(RuntimeError):
            Firewall(namespace_id(), run=lambda args: None)
        with pytest.raises(RuntimeError):
            Firewall("", run=lambda args: None)

    def test_cut_uncut_heal(self) -> None:
        """Each link is cut once, restored by deleting its rules, and heal flushes the chain."""
        calls: list[list[str]] = []
        firewall = Firewall("net:[1]", run=lambda args: calls.append(list(args)))
        firewall.cut(A, B)
        firewall.cut(B, A)
        firewall.cut(A, A)
        assert calls == cut_rules(A, B)
        firewall.isolate(A, [B, C])
        assert len(calls) == 4
        calls.clear()
        firewall.uncut(B, A)
        assert calls == [["-D", *rule[1:]] for rule in cut_rules(A, B)]
        firewall.uncut(B, A)
        assert len(calls) == 2
        calls.clear()
        firewall.heal()
        firewall.heal()
        assert calls == [["-F", "chashd-cuts"]]

    def test_block_one_way(self) -> None:
        """Blocking A towards B drops only the connections A opens towards B; unblocking deletes that rule."""
        calls: list[list[str]] = []
        firewall = Firewall("net:[1]", run=lambda args: calls.append(list(args)))
        firewall.block(B, A)
        firewall.block(B, A)
        assert calls == [block_rule(B, A)] == [cut_rules(B, A)[0]]
        firewall.cut(A, B)  # a cut is a link of its own
        assert len(calls) == 3
        firewall.unblock(B, A)
        assert calls[-1] == ["-D", *block_rule(B, A)[1:]]
        assert list(firewall.cuts) == [frozenset((A, B))]


class ScheduleTests:
    """Seeded schedules of faults."""

    def test_same_seed_same_schedule(self) -> None:
        """A seed gives one schedule; another seed gives another."""
        assert make_schedule(5, FAULTS, 300) == make_schedule(5, FAULTS, 300)
        assert make_schedule(5, FAULTS, 300) != make_schedule(6, FAULTS, 300)

    def test_schedule_covers_its_length(self) -> None:
        """Steps are drawn until their durations, rests and removals reach the length asked for."""
        steps = make_schedule(1, ["kill", "remove"], 120, dead_after=15)
        spent = sum(s.duration + s.rest + (15 if s.fault == "remove" else 0) + 2 for s in steps)
        assert 120 <= spent < 120 + 40
        assert {s.fault for s in steps} <= {"kill", "remove"}
        assert all(2.0 <= s.duration <= 8.0 for s in steps if s.fault == "kill")

    def test_joins_only_while_a_slot_is_free(self) -> None:
        """With 4 kvstores and 5 slots, one join at most."""
        steps = make_schedule(1, ["join", "pause"], 200, kvstores=4, slots=5)
        assert sum(1 for s in steps if s.fault == "join") <= 1
        assert make_schedule(1, ["join"], 200, kvstores=4, slots=5) == make_schedule(1, ["join"], 10)
        assert len(make_schedule(1, ["join"], 200, kvstores=4, slots=5)) == 1

    def test_leadership(self) -> None:
        """A leader cut from the others longer than an election takes must not say it leads any more, nor a cut
        follower that its map is current or that it knows a leader (its last one is last_leader)."""
        still = {"is_leader": True, "leader": "gateway-1"}
        finding = leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, still)
        assert finding is not None and finding.category == "leadership" and finding.key == "gateway-1"
        assert leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, {"is_leader": False, "leader": "gateway-1"})
        assert leadership_violation("gateway-1", LEADERSHIP_GRACE - 1, still) is None
        assert leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, None) is None
        assert leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, {"is_leader": False, "leader": None}) is None
        current = {"is_leader": False, "leader": "gateway-2", "map_current": True}
        finding = leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, current, leader=False)
        assert finding is not None and "map current" in finding.message
        named = {"is_leader": False, "leader": "gateway-2", "map_current": False, "last_leader": "gateway-2"}
        finding = leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, named, leader=False)
        assert finding is not None and "'gateway-2'" in finding.message
        stale = {"is_leader": False, "leader": None, "map_current": False, "last_leader": "gateway-2"}
        assert leadership_violation("gateway-1", LEADERSHIP_GRACE + 1, stale, leader=False) is None
        assert leadership_violation("gateway-1", LEADERSHIP_GRACE - 1, current, leader=False) is None

    def test_unknown_fault(self) -> None:
        """A fault the nemesis does not know is refused."""
        with pytest.raises(ValueError, match="unknown faults"):
            make_schedule(1, ["kill", "meteor"], 60)


class WorkloadTests:
    """The clients' choices, without a network."""

    def worker(self, seed: int, writer: bool = True, mix: dict[str, float] | None = None) -> Worker:
        session = Session("w0", [Endpoint("gateway-1", "127.0.0.11", 1)], Recorder(), 1.0)
        workload = Workload(registers=5, counters=2, mix=mix or Workload().mix)
        return Worker("w0", writer, session, workload, seed, threading.Event())

    def test_choices_follow_the_seed(self) -> None:
        """Two workers with one seed draw the same operations; values are unique per client."""
        a, b = self.worker(3), self.worker(3)
        ops = [a.next_operation() for _ in range(200)]
        assert ops == [b.next_operation() for _ in range(200)]
        assert {kind for kind, _, _ in ops} == {"set", "add", "delete", "incr", "get"}
        values = [value for kind, _, value in ops if kind in ("set", "add")]
        assert len(values) == len(set(values))
        assert all(key.startswith("c") for kind, key, _ in ops if kind == "incr")
        assert any(key.startswith("f") for kind, key, _ in ops if kind == "set")

    def test_readers_only_read(self) -> None:
        """A reader gets registers and counters and nothing else."""
        reader = self.worker(3, writer=False)
        assert {reader.next_operation()[0] for _ in range(100)} == {"get"}

    def test_mix(self) -> None:
        """A mix names operations and weights; unknown ones are refused."""
        assert parse_mix("set=45,delete=15,get=40") == {"set": 45.0, "delete": 15.0, "get": 40.0}
        only_sets = self.worker(1, mix=parse_mix("set=1"))
        assert {only_sets.next_operation()[0] for _ in range(50)} == {"set"}
        for bad in ("set=1,cas=2", "set=-1", "set=0", "set=x"):
            with pytest.raises(ValueError):
                parse_mix(bad)


class StatsTests:
    """Availability windows and percentiles."""

    def test_availability_per_fault(self) -> None:
        """Each fault's window counts the operations invoked in it and those that did not succeed."""

        def op(i: int, invoke: float, outcome: str, client: str = "w0") -> Op:
            return Op(i, client, "gateway-1", "get", "k", None, invoke, invoke + 0.1, outcome)

        ops = [
            op(0, 1.0, OK),
            op(1, 2.0, FAIL),
            op(2, 2.5, INFO),
            op(3, 3.0, OK),
            op(4, 6.0, OK),
            op(5, 7, FAIL, "final"),
        ]
        windows = availability(ops, [Event("kill", "kvstore-A", 2.0, 4.0)])
        assert [(w.label, w.ops, w.failed) for w in windows] == [
            ("kill kvstore-A", 3, 2),
            ("after kill kvstore-A", 1, 0),  # 4.0-9.0 s: the operation at 6.0
            ("no fault", 2, 0),
            ("all", 5, 2),
        ]
        assert windows[0].failed_share == pytest.approx(2 / 3)

    def test_availability_after_each_heal(self) -> None:
        """The window after a heal lasts ``after`` seconds, or until the next fault starts; operations in it
        still count as outside every fault."""

        def op(i: int, invoke: float, outcome: str) -> Op:
            return Op(i, "w0", "gateway-1", "incr", "c0", None, invoke, invoke + 0.1, outcome)

        ops = [op(0, 1.5, FAIL), op(1, 2.5, FAIL), op(2, 3.5, OK), op(3, 6.0, OK), op(4, 12.0, FAIL)]
        events = [Event("partition-gateway", "gateway-1", 1.0, 2.0), Event("pause", "kvstore-B", 3.0, 4.0)]
        windows = availability(ops, events, after=5.0)
        assert [(w.label, w.start, w.end, w.ops, w.failed) for w in windows[:4]] == [
            ("partition-gateway gateway-1", 1.0, 2.0, 1, 1),
            ("after partition-gateway gateway-1", 2.0, 3.0, 1, 1),  # cut short by the pause
            ("pause kvstore-B", 3.0, 4.0, 1, 0),
            ("after pause kvstore-B", 4.0, 9.0, 1, 0),
        ]
        assert [(w.label, w.ops, w.failed) for w in windows[4:]] == [("no fault", 3, 2), ("all", 5, 3)]
        assert [w.label for w in availability(ops, events, after=0)] == [
            "partition-gateway gateway-1",
            "pause kvstore-B",
            "no fault",
            "all",
        ]

    def test_percentile(self) -> None:
        """Nearest-rank percentiles."""
        values = [float(v) for v in range(1, 101)]
        assert percentile(values, 0.99) == 99.0
        assert percentile(values, 0.5) == 50.0
        assert percentile([], 0.5) is None
        assert percentile([7.0], 0.99) == 7.0
