"""The cluster map: the pure state machine, the view derived from it, the Raft settings, and the
Membership service over an in-memory Raft (``LocalRaft``)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from chashd.config import GatewayConfig, load_config
from chashd.errors import ClusterMapUnavailable, ConfigError
from chashd.gateway.membership import (
    CHANGED,
    DOWN,
    LEAVING,
    UP,
    ClusterSnapshot,
    ClusterState,
    ClusterView,
    GatewayInfo,
    LocalRaft,
    Membership,
    NodeInfo,
    Outcome,
    RaftListener,
    RaftSettings,
    RaftStatus,
    apply_operation,
    raft_settings,
)
from chashd.ring import HashRing


class ThreadlessReactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` runs the call on the next ``advance(0)``, as the real
    reactor runs it on its next iteration."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.callLater(0, f, *args, **kw)


def gateway_config(**values: Any) -> GatewayConfig:
    """A gateway config from option values, without the machine's environment."""
    return load_config(GatewayConfig, {"gateway_id": "g1", **values}, environ={})


def register(state: ClusterState, node_id: str = "a", **kw: Any) -> Outcome:
    """Register a node with defaults for what the test does not care about."""
    args: dict[str, Any] = {"host": "10.0.0.1", "port": 8080, "line_port": 11212, "weight": 100, "seq": 1} | kw
    return state.register_node(node_id, args["host"], args["port"], args["line_port"], args["weight"], args["seq"])


# -- the state machine ---------------------------------------------------------------------------------


class ClusterStateTests:
    """ClusterState: every real change bumps the epoch, nothing else does."""

    def test_register_new_node(self) -> None:
        """A new node is registered up, and the epoch goes from 0 to 1."""
        state = ClusterState()
        outcome = register(state)
        assert outcome == Outcome("registered", 1)
        assert state.nodes["a"] == NodeInfo("a", "10.0.0.1", 8080, 11212, 100, UP, 1)

    def test_identical_announcement_changes_nothing(self) -> None:
        """The same announcement again is 'unchanged' and keeps the epoch."""
        state = ClusterState()
        register(state)
        assert register(state) == Outcome("unchanged", 1)
        assert state.epoch == 1

    def test_older_identical_announcement_is_unchanged(self) -> None:
        """A replayed older announcement with the same data is harmless."""
        state = ClusterState()
        register(state, seq=5)
        assert register(state, seq=3).code == "unchanged"

    def test_stale_seq_with_other_data_is_rejected(self) -> None:
        """A seq not greater than the last one, with different data, is stale and changes nothing."""
        state = ClusterState()
        register(state, seq=5)
        outcome = register(state, seq=5, weight=200)
        assert outcome.code == "stale" and outcome.epoch == 1 and "seq 5" in outcome.detail
        assert register(state, seq=4, port=9).code == "stale"
        assert state.nodes["a"].weight == 100

    def test_newer_seq_updates(self) -> None:
        """A higher seq with a new weight is applied."""
        state = ClusterState()
        register(state, seq=1)
        assert register(state, seq=2, weight=300) == Outcome("updated", 2)
        assert state.nodes["a"].weight == 300 and state.nodes["a"].seq == 2

    def test_same_id_other_address_while_up_conflicts(self) -> None:
        """Another address for an id that is up is a conflict, even with a higher seq."""
        state = ClusterState()
        register(state, seq=1)
        outcome = register(state, seq=2, host="10.0.0.2")
        assert outcome.code == "conflict" and "10.0.0.1:8080" in outcome.detail
        assert state.nodes["a"].host == "10.0.0.1" and state.epoch == 1

    def test_same_id_other_address_while_leaving_conflicts(self) -> None:
        """A leaving node's id cannot be taken by another address either."""
        state = ClusterState()
        register(state, seq=1)
        state.start_leaving("a")
        assert register(state, seq=2, port=9090).code == "conflict"

    def test_node_back_from_down_with_higher_seq(self) -> None:
        """A down node coming back with a higher seq (even from another address) is accepted and up."""
        state = ClusterState()
        register(state, seq=1)
        state.mark_down("a")
        outcome = register(state, seq=2, host="10.0.0.9")
        assert outcome.code == "updated"
        assert state.nodes["a"].state == UP and state.nodes["a"].host == "10.0.0.9"

    def test_restart_at_same_address_is_up(self) -> None:
        """A restarted node (higher seq, same address) is up again even if it was leaving."""
        state = ClusterState()
        register(state, seq=1)
        state.start_leaving("a")
        assert register(state, seq=2).code == "updated"
        assert state.nodes["a"].state == UP

    def test_down_node_same_seq_stays_down(self) -> None:
        """A periodic re-announcement (same seq) does not bring a down node up: the probes do."""
        state = ClusterState()
        register(state)
        state.mark_down("a")
        assert register(state).code == "unchanged"
        assert state.nodes["a"].state == DOWN

    @pytest.mark.parametrize(
        ("field", "value"),
        [("weight", 0), ("weight", -5), ("weight", True), ("port", 0), ("line_port", 70000), ("seq", -1)],
    )
    def test_invalid_registration(self, field: str, value: Any) -> None:
        """Bad numbers are refused without a change."""
        state = ClusterState()
        outcome = register(state, **{field: value})
        assert outcome.code == "invalid" and outcome.epoch == 0
        assert state.nodes == {}

    def test_invalid_ids(self) -> None:
        """Empty, spaced or non-string ids are refused."""
        state = ClusterState()
        for bad in ("", "a b", 7, "x" * 65):
            assert register(state, node_id=bad).code == "invalid"  # type: ignore[arg-type]

    def test_state_transitions(self) -> None:
        """down, up, leaving: each real transition bumps the epoch; repeats are unchanged."""
        state = ClusterState()
        register(state)
        assert state.mark_down("a") == Outcome("updated", 2)
        assert state.mark_down("a") == Outcome("unchanged", 2)
        assert state.mark_up("a") == Outcome("updated", 3)
        assert state.mark_up("a") == Outcome("unchanged", 3)
        assert state.start_leaving("a") == Outcome("updated", 4)
        assert state.start_leaving("a") == Outcome("unchanged", 4)

    def test_leaving_node_stays_leaving(self) -> None:
        """mark_up and mark_down leave a draining node alone."""
        state = ClusterState()
        register(state)
        state.start_leaving("a")
        assert state.mark_up("a").code == "unchanged"
        assert state.mark_down("a").code == "unchanged"
        assert state.nodes["a"].state == LEAVING

    def test_down_node_can_leave(self) -> None:
        """A down node can be drained."""
        state = ClusterState()
        register(state)
        state.mark_down("a")
        assert state.start_leaving("a").code == "updated"

    def test_unknown_node(self) -> None:
        """Every per-node operation on an unknown id is 'unknown' and changes nothing."""
        state = ClusterState()
        for outcome in (
            state.mark_down("x"),
            state.mark_up("x"),
            state.start_leaving("x"),
            state.remove("x"),
            state.set_weight("x", 5),
        ):
            assert outcome.code == "unknown" and "'x'" in outcome.detail
        assert state.epoch == 0

    def test_remove(self) -> None:
        """Removing forgets the node (and its seq: it may register again from scratch)."""
        state = ClusterState()
        register(state, seq=9)
        assert state.remove("a") == Outcome("removed", 2)
        assert "a" not in state.nodes
        assert register(state, seq=1).code == "registered"

    def test_set_weight(self) -> None:
        """set_weight changes the weight once; zero is invalid."""
        state = ClusterState()
        register(state)
        assert state.set_weight("a", 7) == Outcome("updated", 2)
        assert state.set_weight("a", 7).code == "unchanged"
        assert state.set_weight("a", 0).code == "invalid"

    def test_register_gateway(self) -> None:
        """Gateways register once; a new Raft address replaces the old entry; one entry per address."""
        state = ClusterState()
        assert state.register_gateway("g1", "h:1", "http://h:8000") == Outcome("registered", 1)
        assert state.register_gateway("g1", "h:1", "http://h:8000").code == "unchanged"
        assert state.register_gateway("g1", "h:1", "http://h:9000").code == "updated"
        assert state.register_gateway("g2", "h:1", "http://h:9000").code == "registered"
        assert list(state.gateways) == ["g2"]

    def test_apply_operation_never_raises(self) -> None:
        """Unknown operations, wrong arities and type errors give outcomes, not exceptions."""
        state = ClusterState()
        assert apply_operation(state, "nope", ()).code == "invalid"
        assert apply_operation(state, "remove", ()).code == "invalid"
        assert apply_operation(state, "mark_down", ([],)).code == "failed"  # unhashable id
        assert state.epoch == 0

    def test_state_pickles(self) -> None:
        """The state survives pickling (pysyncobj snapshots it)."""
        state = ClusterState()
        register(state)
        state.register_gateway("g1", "h:1", "http://h:1")
        copy = pickle.loads(pickle.dumps(state, protocol=2))
        assert copy.snapshot() == state.snapshot()


_node_ids = st.sampled_from(["a", "b", "c", "d"])
_operations = st.one_of(
    st.tuples(
        st.just("register_node"),
        st.tuples(
            _node_ids,
            st.sampled_from(["h1", "h2"]),
            st.sampled_from([1, 2]),
            st.just(3),
            st.integers(-1, 3),
            st.integers(0, 4),
        ),
    ),
    st.tuples(st.sampled_from(["mark_down", "mark_up", "start_leaving", "remove"]), st.tuples(_node_ids)),
    st.tuples(st.just("set_weight"), st.tuples(_node_ids, st.integers(0, 3))),
)


class ClusterStatePropertyTests:
    """Properties of any sequence of operations."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(_operations, max_size=40))
    def test_epoch_counts_changes_and_replay_is_deterministic(self, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
        """The epoch rises by one exactly on a change; replaying the log gives the same map; applying
        each command a second time right away changes nothing (every command is idempotent)."""
        first, second = ClusterState(), ClusterState()
        for op, args in ops:
            before = first.epoch
            outcome = apply_operation(first, op, args)
            assert first.epoch == before + (1 if outcome.code in CHANGED else 0)
            assert outcome.epoch == first.epoch
            again = apply_operation(first, op, args)
            assert again.code not in CHANGED and first.epoch == outcome.epoch
            apply_operation(second, op, args)
            apply_operation(second, op, args)
        assert first.snapshot() == second.snapshot()
        for node in first.nodes.values():
            assert node.weight >= 1 and node.state in (UP, DOWN, LEAVING)


# -- the view ------------------------------------------------------------------------------------------


def snapshot_of(state: ClusterState) -> ClusterSnapshot:
    """The state's snapshot."""
    return state.snapshot()


class ClusterViewTests:
    """ClusterView: the ring of up and down nodes, the previous ring."""

    def test_ring_holds_up_and_down_nodes(self) -> None:
        """Leaving nodes own nothing; down nodes keep their arcs; the ring carries the epoch."""
        state = ClusterState()
        register(state, "a")
        register(state, "b", port=2)
        register(state, "c", port=3)
        state.mark_down("b")
        state.start_leaving("c")
        view = ClusterView.build(state.snapshot(), 160, None)
        assert view.ring.nodes == ("a", "b")
        assert view.ring.epoch == state.epoch == view.epoch
        assert view.ring.points_per_node == 160
        assert view.states == {"a": UP, "b": DOWN, "c": LEAVING}
        assert [n.id for n in view.nodes_in(LEAVING)] == ["c"]
        assert view.node("b") == state.nodes["b"] and view.node("zz") is None

    def test_weights_and_points(self) -> None:
        """The ring uses each node's weight and the configured points per node."""
        state = ClusterState()
        register(state, "a", weight=1)
        register(state, "b", port=2, weight=3)
        view = ClusterView.build(state.snapshot(), 40, None)
        assert view.ring == HashRing({"a": 1, "b": 3}, epoch=2, points_per_node=40)

    def test_previous_ring_tracks_placement_changes(self) -> None:
        """previous_ring is the ring before the last change of placement; down/up keep it."""
        state = ClusterState()
        register(state, "a")
        v1 = ClusterView.build(state.snapshot(), 160, ClusterView.empty(160))
        register(state, "b", port=2)
        v2 = ClusterView.build(state.snapshot(), 160, v1)
        assert v2.previous_ring is v1.ring
        state.mark_down("b")
        v3 = ClusterView.build(state.snapshot(), 160, v2)
        assert v3.previous_ring is v1.ring
        state.start_leaving("b")
        v4 = ClusterView.build(state.snapshot(), 160, v3)
        assert v4.previous_ring is v3.ring and v4.ring.nodes == ("a",)

    def test_gateway_at(self) -> None:
        """The gateway registered at a Raft address."""
        view = ClusterView(1, (), (GatewayInfo("g1", "h:1", "u"),), HashRing({}))
        assert view.gateway_at("h:1") == GatewayInfo("g1", "h:1", "u")
        assert view.gateway_at("h:2") is None and view.gateway_at(None) is None


# -- settings ------------------------------------------------------------------------------------------


class RaftSettingsTests:
    """raft_settings: peers, password rule, files."""

    def test_own_address_dropped_from_peers(self) -> None:
        """Listing every gateway on each of them is harmless: the own address is dropped, duplicates too."""
        config = gateway_config(raft_port="8001", peers="127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8002")
        settings = raft_settings(config)
        assert settings.self_address == "127.0.0.1:8001"
        assert settings.peers == ("127.0.0.1:8002",)

    def test_ipv6_addresses_lose_their_brackets(self) -> None:
        """pysyncobj splits at the last colon, so [::1]:8002 becomes ::1:8002."""
        config = gateway_config(advertise_host="::1", raft_port="8001", peers="[::1]:8002")
        settings = raft_settings(config)
        assert settings.self_address == "::1:8001" and settings.peers == ("::1:8002",)

    def test_non_loopback_peers_need_a_password(self) -> None:
        """A peer off loopback without --raft-password is refused with a line naming the option."""
        config = gateway_config(peers="10.1.2.3:8001")
        with pytest.raises(ConfigError, match="--raft-password.*10.1.2.3:8001"):
            raft_settings(config)

    def test_non_loopback_own_address_needs_a_password(self) -> None:
        """A Raft port advertised off loopback is exposed too."""
        with pytest.raises(ConfigError, match="--raft-password"):
            raft_settings(gateway_config(advertise_host="gw-0.gw.svc"))

    def test_password_or_insecure_flag_allows_it(self) -> None:
        """With a password (or --insecure-raft on purpose) the same config is accepted."""
        settings = raft_settings(gateway_config(peers="10.1.2.3:8001", raft_password="s3cret"))
        assert settings.password == "s3cret"
        assert raft_settings(gateway_config(peers="10.1.2.3:8001", insecure_raft=True)).password is None

    def test_loopback_needs_nothing(self) -> None:
        """Every address on loopback (or localhost): no password needed."""
        settings = raft_settings(gateway_config(peers="localhost:8002,127.0.0.2:8003"))
        assert settings.peers == ("localhost:8002", "127.0.0.2:8003")

    def test_files_under_data_dir(self) -> None:
        """Journal and dump live under --data-dir; without it, memory only."""
        settings = raft_settings(gateway_config(data_dir="/var/lib/chashd"))
        assert settings.journal_file == "/var/lib/chashd/raft.journal"
        assert settings.dump_file == "/var/lib/chashd/raft.dump"
        assert raft_settings(gateway_config()).journal_file is None

    def test_design_settings(self) -> None:
        """connectionTimeout >= 10 s, a short DNS cache, a bind failure that is reported."""
        settings = raft_settings(gateway_config())
        assert settings.connection_timeout >= 10
        assert settings.dns_cache_time <= 10
        assert settings.max_bind_retries == 1


# -- the Membership service ------------------------------------------------------------------------


class _Recorder:
    """A LocalRaft factory that keeps the last Raft object built."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.raft: LocalRaft | None = None
        self.calls = 0

    def __call__(self, settings: RaftSettings, listener: RaftListener) -> LocalRaft:
        self.calls += 1
        self.raft = LocalRaft(settings, listener, **self.kw)
        return self.raft


class MembershipTests(SynchronousTestCase):
    """Membership over LocalRaft, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = ThreadlessReactor()
        self.factory = _Recorder()
        self.views: list[ClusterView] = []
        self.config = gateway_config(raft_port="8001", port="tcp:8000")
        self.membership = Membership(self.config, self.reactor, self.factory, on_view=self.views.append)

    def start(self) -> LocalRaft:
        """Start the service and let the reactor run what the Raft side handed it."""
        self.membership.startService()
        self.reactor.advance(0)
        assert self.factory.raft is not None
        return self.factory.raft

    def command_timers(self) -> list[Any]:
        """The pending timers of submitted commands."""
        return [c for c in self.reactor.getDelayedCalls() if getattr(c, "func", None) == self.membership._fail]

    def stop(self) -> None:
        """Stop, and check no timer is left behind."""
        self.membership.stopService()
        self.reactor.advance(0)
        assert self.reactor.getDelayedCalls() == []

    def test_raft_built_in_start_service(self) -> None:
        """Nothing is built before startService (twistd builds services before the reactor runs)."""
        assert self.factory.calls == 0
        self.start()
        assert self.factory.calls == 1
        self.stop()
        assert self.factory.raft is not None and self.factory.raft.destroyed

    def test_ready_and_self_registration(self) -> None:
        """Once a leader is known, ready fires and the gateway registers itself; leader_id then names it."""
        self.start()
        self.assertIsNone(self.successResultOf(self.membership.ready))
        self.reactor.advance(0)
        assert self.membership.view.gateways == (GatewayInfo("g1", "127.0.0.1:8001", "http://127.0.0.1:8000"),)
        assert self.membership.leader_id() == "g1"
        assert self.membership.is_leader and self.membership.has_quorum and self.membership.leader_known
        self.stop()

    def test_no_leader_no_ready(self) -> None:
        """Without a leader, ready waits and nothing registers; a later leader makes both happen."""
        self.factory.kw = {"leader": False}
        raft = self.start()
        self.assertNoResult(self.membership.ready)
        assert raft.submitted == [] and self.membership.leader_id() is None
        raft.elect("127.0.0.1:8002")
        self.reactor.advance(0)
        self.successResultOf(self.membership.ready)
        assert raft.submitted == [("register_gateway", ("g1", "127.0.0.1:8001", "http://127.0.0.1:8000"))]
        assert not self.membership.is_leader
        assert self.membership.leader_id() is None  # the leader itself has not registered yet
        self.stop()

    def test_operation_fires_with_outcome_after_view(self) -> None:
        """An operation's Deferred fires after this gateway's view reached the outcome's epoch."""
        self.start()
        self.reactor.advance(0)
        d = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.assertNoResult(d)  # the reports wait for the reactor's next turn
        self.reactor.advance(0)
        outcome = self.successResultOf(d)
        assert outcome.code == "registered"
        assert self.membership.view.epoch == outcome.epoch
        assert self.membership.view.node("a") is not None
        assert self.views[-1] is self.membership.view
        self.stop()

    def test_history(self) -> None:
        """The service keeps the recent views, oldest first, bounded."""

        class Small(Membership):
            history_size = 3

        self.membership = Small(self.config, self.reactor, self.factory)
        self.start()
        self.reactor.advance(0)
        for i in range(4):
            self.membership.register_node(f"n{i}", "h", 1 + i, 2, 100, 1)
            self.reactor.advance(0)
        history = self.membership.history
        assert [v.epoch for v in history] == [3, 4, 5]
        assert history[-1] is self.membership.view
        assert history[-1].previous_ring is history[-2].ring
        self.stop()

    def test_idempotent_registration_keeps_epoch(self) -> None:
        """Registering twice: 'unchanged', same epoch, no new view."""
        self.start()
        self.reactor.advance(0)
        d1 = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        first = self.successResultOf(d1)
        count = len(self.views)
        d2 = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        assert self.successResultOf(d2) == Outcome("unchanged", first.epoch)
        assert len(self.views) == count
        self.stop()

    def test_timeout_fails_with_domain_error(self) -> None:
        """No answer within command_timeout: ClusterMapUnavailable (safe to retry); a late answer is ignored."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.mark_down("a")
        self.reactor.advance(self.membership.command_timeout)
        failure = self.failureResultOf(d, ClusterMapUnavailable)
        assert "no answer in time" in str(failure.value) and "safe to retry" in str(failure.value)
        raft.release()
        self.reactor.advance(0)  # the late report finds nothing pending
        self.stop()

    def test_leader_changed_fails_with_domain_error(self) -> None:
        """A pysyncobj LEADER_CHANGED fails the Deferred with a clear reason."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.remove("a")
        raft.fail_held(5)
        self.reactor.advance(0)
        failure = self.failureResultOf(d, ClusterMapUnavailable)
        assert "leader changed" in str(failure.value)
        assert self.command_timers() == []
        self.stop()

    def test_not_started(self) -> None:
        """Before start (or after stop) an operation fails at once."""
        self.failureResultOf(self.membership.mark_up("a"), ClusterMapUnavailable)

    def test_stop_fails_pending_operations(self) -> None:
        """stopService fails what is pending and leaves no timer."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.start_leaving("a")
        self.stop()
        self.failureResultOf(d, ClusterMapUnavailable)

    def test_cancel(self) -> None:
        """Cancelling an operation forgets it and its timer."""
        raft = self.start()
        self.reactor.advance(0)
        raft.hold()
        d = self.membership.mark_down("a")
        assert len(self.command_timers()) == 1
        d.cancel()
        self.failureResultOf(d, CancelledError)
        assert self.command_timers() == []
        self.stop()

    def test_view_lag_is_bounded(self) -> None:
        """If the committed epoch's view never arrives, the operation still answers after view_wait."""
        raft = self.start()
        self.reactor.advance(0)
        listener = raft.listener
        raft.listener = _DropSnapshots(listener)
        d = self.membership.register_node("a", "h", 1, 2, 100, 1)
        self.reactor.advance(0)
        self.assertNoResult(d)
        self.reactor.advance(self.membership.view_wait)
        assert self.successResultOf(d).code == "registered"
        self.stop()

    def test_observer_failure_is_logged(self) -> None:
        """An observer that raises is logged and does not stop the others."""

        def broken(view: ClusterView) -> None:
            raise ValueError("boom")

        seen: list[int] = []
        self.membership.subscribe(broken)
        self.membership.subscribe(lambda v: seen.append(v.epoch))
        with capturedLogs() as events:
            self.start()
            self.reactor.advance(0)
        assert seen and seen[-1] == self.membership.view.epoch == 1
        failures = [e for e in events if e.get("log_failure") is not None]
        assert [e["epoch"] for e in failures] == [0, 1]
        assert all(e["log_failure"].check(ValueError) for e in failures)
        assert len(self.flushLoggedErrors(ValueError)) == 2
        self.membership.unsubscribe(broken)
        self.stop()

    def test_registration_retried(self) -> None:
        """A failed self-registration is retried after register_retry."""
        self.factory.kw = {"leader": False}
        raft = self.start()
        raft.hold()
        raft.elect(raft.settings.self_address)
        self.reactor.advance(0)
        assert raft.submitted[-1][0] == "register_gateway"
        raft.fail_held(2)
        self.reactor.advance(0)
        assert len(raft.submitted) == 1
        self.reactor.advance(self.membership.register_retry)
        assert len(raft.submitted) == 2
        raft.release()
        self.reactor.advance(0)
        assert self.membership.leader_id() == "g1"
        self.stop()

    def test_bind_failure_is_fatal(self) -> None:
        """A Raft object that reports itself broken (port in use) stops the daemon."""
        fatal: list[str] = []
        raft_box: list[LocalRaft] = []

        def factory(settings: RaftSettings, listener: RaftListener) -> LocalRaft:
            raft = LocalRaft(settings, listener)
            raft.broken = lambda: True  # type: ignore[method-assign]
            raft_box.append(raft)
            return raft

        membership = Membership(self.config, self.reactor, factory, on_fatal=fatal.append)
        membership.startService()
        self.reactor.advance(0.5)
        assert fatal and "127.0.0.1:8001" in fatal[0]
        membership.stopService()

    def test_status_tracks_raft(self) -> None:
        """Leader changes reported by Raft are visible at once."""
        raft = self.start()
        self.reactor.advance(0)
        raft.elect(None)
        self.reactor.advance(0)
        assert self.membership.status == RaftStatus(None, False, False)
        assert not self.membership.leader_known and self.membership.leader_id() is None
        self.stop()


class _DropSnapshots:
    """A listener that loses snapshots (a view that lags)."""

    def __init__(self, inner: RaftListener) -> None:
        self._inner = inner

    def snapshot(self, snapshot: ClusterSnapshot) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
